"""megatron_stablelm.launch: SLURM node lists, hostfiles, include/exclude, and the exact launch commands.

Everything here is pure planning (no process group, no GPU): the commands are asserted token by
token because a wrong flag on a cluster surfaces only as a hung job.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from megatron_stablelm.config import ConfigError, load_config
from megatron_stablelm.launch import hostfile as hf
from megatron_stablelm.launch.job import prepare_job_dir
from megatron_stablelm.launch.plan import build_plan
from megatron_stablelm.launch.request import LaunchError

ROOT = Path(__file__).resolve().parents[1]

TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32}


def write_config(path: Path, **extra: object) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({**TINY, **extra}))
    return path


def plan_for(tmp_path: Path, environ: dict[str, str] | None = None, extra_args=(), **keys: object):
    cfg_path = write_config(tmp_path / "run.yml", **keys)
    cfg = load_config([cfg_path], report_ignored=False)
    script = tmp_path / "train.py"
    plan = build_plan(
        cfg, [cfg_path], extra_args=extra_args, script=script, job_dir=tmp_path / "job", environ=environ or {}
    )
    return plan, str(script), str(cfg_path)


# ------------------------------------------------------------------------------------------ node lists
@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("node1", ["node1"]),
        ("gpu[001-004,010]", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010"]),
        ("node1,gpu[01-02]", ["node1", "gpu01", "gpu02"]),
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        (
            "rack1-gpu[7,9],rack2-gpu[1-2],login.local",
            ["rack1-gpu7", "rack1-gpu9", "rack2-gpu1", "rack2-gpu2", "login.local"],
        ),
        ("g[1]", ["g1"]),
    ],
)
def test_expand_nodelist(text: str, hosts: list[str]) -> None:
    assert hf.expand_nodelist(text) == hosts


# ------------------------------------------------------------------------------------------- hostfiles
def test_hostfile_round_trip(tmp_path: Path) -> None:
    text = hf.format_hostfile(hf.expand_nodelist("gpu[001-002],cpu7"), 8)
    assert text == "gpu001 slots=8\ngpu002 slots=8\ncpu7 slots=8\n"
    path = hf.write_hostfile(tmp_path / "sub" / "hostfile", {"a": 2, "b": 4})
    assert hf.read_hostfile(path) == {"a": 2, "b": 4}
    assert list(hf.parse_hostfile("# comment\n\nb slots=1  # inline\na slots=2 max_slots=2\n")) == ["b", "a"]


@pytest.mark.parametrize(
    ("parse", "text", "match"),
    [
        (hf.expand_nodelist, "", "empty"),
        (hf.expand_nodelist, "gpu[01-", "never closed"),
        (hf.expand_nodelist, "gpu01]", "without"),
        (hf.expand_nodelist, "gpu[[1]]", "nested"),
        (hf.expand_nodelist, "gpu[4-2]", "backwards"),
        (hf.expand_nodelist, "gpu[a-b]", "not a number"),
        (hf.expand_nodelist, "gpu[1,,2]", "empty entry"),
        (hf.expand_nodelist, "a,,b", "empty entry"),
        (hf.expand_nodelist, "gpu[1-2],gpu2", "twice"),
        (hf.expand_nodelist, "gpu 1", "bad characters"),
        (hf.expand_nodelist, "n[0-99999999]", "more than"),
        (hf.parse_hostfile, "gpu01\n", r"<hostfile>:1: host 'gpu01' names no slots"),
        (hf.parse_hostfile, "gpu01 slots=8\ngpu02 8\n", r":2: host 'gpu02' names no slots"),
        (hf.parse_hostfile, "gpu01 slots=8 fast\n", "unexpected 'fast'"),
        (hf.parse_hostfile, "gpu01 slots=x\n", "positive integer"),
        (hf.parse_hostfile, "gpu01 slots=0\n", "positive integer"),
        (hf.parse_hostfile, "gpu01 slots=-2\n", "positive integer"),
        (hf.parse_hostfile, "gpu01 slots=8 slots=4\n", "more than once"),
        (hf.parse_hostfile, "gpu01 slots=8\ngpu01 slots=8\n", "listed twice"),
        (hf.parse_hostfile, "# only a comment\n\n", "names no hosts"),
        (hf.parse_hostfile, "slots=8\n", "expected 'HOST slots=N'"),
    ],
)
def test_nodelist_and_hostfile_errors(parse: Callable[[str], object], text: str, match: str) -> None:
    with pytest.raises(hf.HostfileError, match=match):
        parse(text)


def test_read_hostfile_missing(tmp_path: Path) -> None:
    with pytest.raises(hf.HostfileError, match="not found"):
        hf.read_hostfile(tmp_path / "nope")


def test_format_hostfile_errors() -> None:
    with pytest.raises(hf.HostfileError, match="positive"):
        hf.format_hostfile(["a"], 0)
    with pytest.raises(hf.HostfileError, match="no hosts"):
        hf.format_hostfile([], 8)


def test_include_exclude() -> None:
    pool = {"h1": 4, "h2": 4, "h3": 2}
    assert hf.apply_filter(pool) == {"h1": [0, 1, 2, 3], "h2": [0, 1, 2, 3], "h3": [0, 1]}
    # include keeps hostfile order, not spec order
    assert hf.apply_filter(pool, include="h3@h1:0,2") == {"h1": [0, 2], "h3": [0, 1]}
    assert hf.apply_filter(pool, exclude="h2@h1:3") == {"h1": [0, 1, 2], "h3": [0, 1]}
    assert hf.apply_filter(pool, exclude="h3:0,1") == {"h1": [0, 1, 2, 3], "h2": [0, 1, 2, 3]}
    with pytest.raises(hf.HostfileError, match="not in the hostfile"):
        hf.apply_filter(pool, include="h9")
    with pytest.raises(hf.HostfileError, match="no slot 2"):
        hf.apply_filter(pool, include="h3:2")
    with pytest.raises(hf.HostfileError, match="not a number"):
        hf.apply_filter(pool, include="h1:x")
    with pytest.raises(hf.HostfileError, match="both"):
        hf.apply_filter(pool, include="h1", exclude="h2")
    with pytest.raises(hf.HostfileError, match="leaves no GPUs"):
        hf.apply_filter({"h1": 1}, exclude="h1:0")


def test_slurm_gpus_per_node() -> None:
    assert hf.slurm_gpus_per_node({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert hf.slurm_gpus_per_node({"SLURM_GPUS_PER_NODE": "gpu:a100:4"}) == 4
    assert hf.slurm_gpus_per_node({"SLURM_GPUS_PER_NODE": "2"}) == 2
    assert hf.slurm_gpus_per_node({"SLURM_JOB_GPUS": "0,1,2"}) == 3
    assert hf.slurm_gpus_per_node({}) is None


def test_hostfile_cli_and_shell_wrapper(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "megatron_stablelm.launch.hostfile", "expand", "x[1-3]"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.split() == ["x1", "x2", "x3"]
    env = {
        **os.environ,
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_GPUS_PER_NODE": "gpu:4",
        "PYTHON": sys.executable,
    }
    subprocess.run([str(ROOT / "launch/write_hostfile.sh"), str(tmp_path / "hf")], env=env, check=True)
    assert (tmp_path / "hf").read_text() == "gpu01 slots=4\ngpu02 slots=4\n"
    bad = subprocess.run(
        [str(ROOT / "launch/write_hostfile.sh"), str(tmp_path / "hf2"), "8", "gpu[01-"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "never closed" in bad.stderr and not (tmp_path / "hf2").exists()


# ----------------------------------------------------------------------------------- launch commands
def test_single_node(tmp_path: Path) -> None:
    plan, script, cfg = plan_for(tmp_path, extra_args=["--seed", "3"], num_gpus=2, master_port=29601)
    assert plan.mode == "single"
    assert plan.argv == ["deepspeed", "--num_gpus", "2", "--master_port", "29601", script, cfg, "--seed", "3"]
    assert plan.world_size == 2
    assert plan.env == {"MEGATRON_STABLELM_JOB_DIR": str(tmp_path / "job")}
    assert plan.remote_env == {}


def test_single_node_local_launcher_with_tp(tmp_path: Path) -> None:
    plan, script, cfg = plan_for(tmp_path, launcher="local", model_parallel_size=2)
    assert plan.argv == ["deepspeed", "--master_port", "29500", script, cfg]
    assert plan.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert plan.world_size is None  # DeepSpeed counts the GPUs itself


def test_single_node_torchrun(tmp_path: Path) -> None:
    plan, script, cfg = plan_for(tmp_path, launcher="torchrun", num_gpus=2, master_port=29602)
    assert plan.argv == [
        "torchrun",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        "--master_port=29602",
        script,
        cfg,
    ]


def test_multinode_hostfile(tmp_path: Path) -> None:
    hosts = hf.write_hostfile(tmp_path / "hostfile", ["gpu01", "gpu02"], 8)
    env = {"NCCL_IB_HCA": "mlx5", "NCCL_DEBUG": "WARN", "HOME_UNRELATED": "x"}
    plan, script, cfg = plan_for(
        tmp_path, environ=env, hostfile=str(hosts), master_addr="10.0.0.1", model_parallel_size=2
    )
    assert plan.mode == "multinode"
    assert plan.argv == [
        "deepspeed",
        "--hostfile",
        str(hosts),
        "--launcher",
        "pdsh",
        "--master_port",
        "29500",
        "--master_addr",
        "10.0.0.1",
        script,
        cfg,
    ]
    assert plan.world_size == 16
    assert plan.remote_env == {
        "NCCL_DEBUG": "WARN",
        "NCCL_IB_HCA": "mlx5",
        "MEGATRON_STABLELM_JOB_DIR": str(tmp_path / "job"),
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    }


def test_multinode_filters_and_counts(tmp_path: Path) -> None:
    hosts = hf.write_hostfile(tmp_path / "hostfile", {"a": 8, "b": 8, "c": 4})
    plan, script, cfg = plan_for(tmp_path, hostfile=str(hosts), launcher="openmpi", include="a:0,1@c")
    assert plan.argv[:7] == [
        "deepspeed",
        "--hostfile",
        str(hosts),
        "--launcher",
        "openmpi",
        "--include",
        "a:0,1@c",
    ]
    assert plan.hosts == {"a": [0, 1], "c": [0, 1, 2, 3]}
    plan, *_ = plan_for(tmp_path, hostfile=str(hosts), num_nodes=2, num_gpus=8)
    assert plan.argv[5:9] == ["--num_nodes", "2", "--num_gpus", "8"] and plan.world_size == 16


def test_one_host_hostfile_runs_locally(tmp_path: Path) -> None:
    hosts = hf.write_hostfile(tmp_path / "hostfile", ["localhost"], 2)
    plan, script, cfg = plan_for(tmp_path, hostfile=str(hosts))
    assert plan.argv == [
        "deepspeed",
        "--hostfile",
        str(hosts),
        "--launcher",
        "pdsh",
        "--no_ssh_check",
        "--master_port",
        "29500",
        "--master_addr",
        "127.0.0.1",
        script,
        cfg,
    ]


SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "stablelm",
    "SLURM_JOB_NODELIST": "gpu[001-002]",
    "SLURM_GPUS_ON_NODE": "8",
    "NCCL_SOCKET_IFNAME": "ib0",
}


def test_slurm_per_node(tmp_path: Path) -> None:
    plan, script, cfg = plan_for(tmp_path, environ=SLURM_ENV, launcher="slurm", master_port=24242)
    job = tmp_path / "job"
    assert plan.mode == "slurm-per-node"
    assert plan.hostfile == job / "hostfile" and plan.hostfile_to_write == {"gpu001": 8, "gpu002": 8}
    assert plan.argv[:8] == [
        "srun",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--nodelist=gpu001,gpu002",
        "--kill-on-bad-exit=1",
        "bash",
        "-c",
    ]
    assert len(plan.argv) == 9
    assert plan.argv[8] == (
        'NODE_RANK=-1; i=0; for h in gpu001 gpu002; do if [ "$h" = "$SLURMD_NODENAME" ]; then NODE_RANK=$i; fi; '
        "i=$((i+1)); done; "
        f'exec deepspeed --hostfile {job}/hostfile --no_ssh --node_rank="$NODE_RANK" '
        f"--master_addr gpu001 --master_port 24242 {script} {cfg}"
    )
    assert plan.world_size == 16


def test_slurm_per_node_shell_finds_rank(tmp_path: Path) -> None:
    """The per-node shell really computes this node's rank from SLURMD_NODENAME."""
    plan, *_ = plan_for(tmp_path, environ=SLURM_ENV, launcher="slurm", extra_args=["--x", "a b"])
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "deepspeed").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (fake / "deepspeed").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURMD_NODENAME": "gpu002"}
    out = subprocess.run(["bash", "-c", plan.argv[8]], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert "--node_rank=1" in lines and lines[-2:] == ["--x", "a b"]


def test_slurm_deepspeed_launcher(tmp_path: Path) -> None:
    plan, script, cfg = plan_for(
        tmp_path, environ=SLURM_ENV, launcher="slurm", deepspeed_slurm=True, master_port=24242
    )
    job = tmp_path / "job"
    assert plan.mode == "slurm-deepspeed"
    assert plan.argv == [
        "deepspeed",
        "--hostfile",
        f"{job}/hostfile",
        "--launcher",
        "slurm",
        "--no_ssh_check",
        "--master_addr",
        "gpu001",
        "--master_port",
        "24242",
        "--launcher_args",
        "--ntasks-per-node=8 --kill-on-bad-exit=1",
        script,
        cfg,
    ]
    assert plan.env["MASTER_ADDR"] == "gpu001" and plan.env["MASTER_PORT"] == "24242"
    assert plan.remote_env["NCCL_SOCKET_IFNAME"] == "ib0"


def test_slurm_torchrun(tmp_path: Path) -> None:
    plan, script, cfg = plan_for(tmp_path, environ=SLURM_ENV, launcher="torchrun", master_port=24242)
    assert plan.argv == [
        "srun",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--nodelist=gpu001,gpu002",
        "--kill-on-bad-exit=1",
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu001:24242",
        "--rdzv_id=4242",
        script,
        cfg,
    ]


def test_slurm_num_nodes_and_default_job_dir(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path / "run.yml", launcher="slurm", num_nodes=1)
    cfg = load_config([cfg_path], report_ignored=False)
    env = {**SLURM_ENV, "SLURM_JOB_NODELIST": "gpu[001-004]"}
    plan = build_plan(cfg, [cfg_path], script="train.py", environ=env, output_root=tmp_path / "runs")
    assert plan.job_dir == tmp_path / "runs" / "stablelm-4242"
    assert plan.hosts == {"gpu001": list(range(8))}
    assert "--nodelist=gpu001" in plan.argv


@pytest.mark.parametrize(
    ("keys", "environ", "match"),
    [
        ({"launcher": "mpi"}, {}, "unknown value 'mpi'"),
        ({"launcher": "slurm"}, {}, "SLURM_JOB_NODELIST is not set"),
        ({"launcher": "slurm"}, {"SLURM_JOB_NODELIST": "gpu[1-"}, "never closed"),
        ({"launcher": "slurm"}, {"SLURM_JOB_NODELIST": "gpu[1-2]"}, "how many GPUs"),
        ({"launcher": "slurm", "num_gpus": 16}, SLURM_ENV, "num_gpus=16 per node"),
        ({"launcher": "slurm", "num_nodes": 3}, SLURM_ENV, "num_nodes=3 but the SLURM allocation"),
        ({"num_nodes": 2}, {}, "needs a hostfile"),
        ({"include": "a", "num_gpus": 2}, {}, "cannot be combined"),
        ({"include": "a", "exclude": "b"}, {}, "cannot both"),
        ({"launcher": "torchrun", "include": "localhost:0"}, {}, "need the deepspeed launcher"),
        ({"launcher": "slurm", "deepspeed_slurm": True, "exclude": "gpu001:0"}, SLURM_ENV, "cannot pin"),
    ],
)
def test_plan_errors(tmp_path: Path, keys: dict, environ: dict, match: str) -> None:
    with pytest.raises((LaunchError, hf.HostfileError), match=match):
        plan_for(tmp_path, environ=environ, **keys)


def test_bad_launch_values_fail_when_the_config_loads(tmp_path: Path) -> None:
    """Ranges of the launch keys are the config's to check, before any plan exists."""
    with pytest.raises(ConfigError, match="master_port.*must be a TCP port"):
        plan_for(tmp_path, master_port=70000)
    with pytest.raises(ConfigError, match="num_gpus.*must be positive"):
        plan_for(tmp_path, num_gpus=0)


def test_hostfile_errors_before_launch(tmp_path: Path) -> None:
    (tmp_path / "noslots").write_text("gpu01\ngpu02 slots=8\n")
    with pytest.raises(hf.HostfileError, match="noslots:1: host 'gpu01' names no slots"):
        plan_for(tmp_path, hostfile=str(tmp_path / "noslots"))
    hosts = hf.write_hostfile(tmp_path / "hostfile", ["gpu01", "gpu02"], 8)
    with pytest.raises(LaunchError, match="num_gpus=9 per node but hostfile .* only 8"):
        plan_for(tmp_path, hostfile=str(hosts), num_gpus=9)
    with pytest.raises(LaunchError, match="num_nodes=3 but hostfile"):
        plan_for(tmp_path, hostfile=str(hosts), num_nodes=3)
    with pytest.raises(hf.HostfileError, match="'gpu03' is not in the hostfile"):
        plan_for(tmp_path, hostfile=str(hosts), include="gpu03")


# ----------------------------------------------------------------------------------------------- CLI
def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_"))}
    return subprocess.run(
        [sys.executable, "-m", "megatron_stablelm.launch", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_cli_dry_run(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "run.yml", num_gpus=2, use_mup=False)
    out = run_cli(
        str(cfg),
        "--dry-run",
        "--job-dir",
        str(tmp_path / "job"),
        "--master-port",
        "29603",
        "--",
        "--a",
        "1 2",
    )
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        "29603",
        str(ROOT / "train.py"),
        str(cfg),
        "--a",
        "1 2",
    ]
    assert "# mode: single" in out.stderr and "ignoring 'use_mup'" in out.stderr
    assert not (tmp_path / "job").exists()  # a dry run creates nothing


def test_cli_dry_run_slurm(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "run.yml", launcher="slurm", deepspeed_slurm=True)
    out = run_cli(str(cfg), "--dry-run", "--job-dir", str(tmp_path / "job"), env=SLURM_ENV)
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert argv[:6] == [
        "deepspeed",
        "--hostfile",
        str(tmp_path / "job/hostfile"),
        "--launcher",
        "slurm",
        "--no_ssh_check",
    ]


def test_cli_errors(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "run.yml")
    (tmp_path / "bad").write_text("gpu01 slots=\n")
    out = run_cli(str(cfg), "--dry-run", "--hostfile", str(tmp_path / "bad"))
    assert out.returncode == 2 and "error:" in out.stderr and "positive integer" in out.stderr
    out = run_cli(str(cfg), "--dry-run", "--launcher", "slurm", env={"SLURM_JOB_NODELIST": "g[2-1]"})
    assert out.returncode == 2 and "backwards" in out.stderr
    out = run_cli(str(cfg), "--script", str(tmp_path / "missing.py"), "--job-dir", str(tmp_path / "job"))
    assert out.returncode == 2 and "training script not found" in out.stderr
    assert not (tmp_path / "job").exists()


def test_cli_real_run_writes_job_dir(tmp_path: Path) -> None:
    """A real (non-dry) launch through a stand-in torchrun: job dir, resolved config, log, env."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "torchrun").write_text(
        '#!/bin/sh\necho "ran $* cdmc=$CUDA_DEVICE_MAX_CONNECTIONS job=$MEGATRON_STABLELM_JOB_DIR"\n'
    )
    (fake / "torchrun").chmod(0o755)
    script = tmp_path / "train.py"
    script.write_text("")
    cfg = write_config(tmp_path / "run.yml", launcher="torchrun", num_gpus=2, model_parallel_size=2)
    job = tmp_path / "job"
    env = {"PATH": f"{fake}:{os.environ['PATH']}"}
    out = run_cli(str(cfg), "--script", str(script), "--job-dir", str(job), env=env)
    assert out.returncode == 0, out.stderr
    assert f"cdmc=1 job={job}" in out.stdout
    assert "ran --nnodes=1 --nproc_per_node=2" in (job / "launch.log").read_text()
    saved = load_config([job / "config.yaml"], report_ignored=False)
    assert saved.to_dict() == load_config([cfg], report_ignored=False).to_dict()
    assert (job / "command.txt").read_text().startswith(f"MEGATRON_STABLELM_JOB_DIR={job} ")


def test_prepare_job_dir_writes_hostfile_and_deepspeed_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("MY_VAR=1\nNCCL_DEBUG=INFO\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    plan, *_ = plan_for(
        tmp_path, environ={**SLURM_ENV, "NCCL_DEBUG": "WARN"}, launcher="slurm", deepspeed_slurm=True
    )
    cfg = load_config([tmp_path / "run.yml"], report_ignored=False)
    prepare_job_dir(plan, cfg)
    job = tmp_path / "job"
    assert (job / "hostfile").read_text() == "gpu001 slots=8\ngpu002 slots=8\n"
    lines = (job / ".deepspeed_env").read_text().splitlines()
    assert lines[0] == "MY_VAR=1" and "NCCL_DEBUG=WARN" in lines and "NCCL_DEBUG=INFO" not in lines
    assert plan.env["DS_ENV_FILE"] == str(job / ".deepspeed_env")


def test_sbatch_template_dry_run(tmp_path: Path) -> None:
    """The sbatch script under a simulated allocation: hostfile written, master/port derived."""
    cfg = write_config(tmp_path / "run.yml")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "MASTER_"))},
        **SLURM_ENV,
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_NUM_NODES": "2",
        "RUNS_DIR": str(tmp_path / "runs"),
        "LAUNCH_ARGS": "--dry-run",
        "PYTHON": sys.executable,
    }
    out = subprocess.run(
        ["bash", str(ROOT / "launch/slurm/train.sbatch"), str(cfg), "--", "--seed", "5"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    job = tmp_path / "runs" / "stablelm-4242"
    assert (job / "hostfile").read_text() == "gpu001 slots=8\ngpu002 slots=8\n"
    command = out.stdout.strip().splitlines()[-1]
    argv = shlex.split(command)
    assert argv[0] == "srun" and "--nodelist=gpu001,gpu002" in argv
    assert argv[-1].endswith(
        f"--master_addr gpu001 --master_port 24242 {ROOT / 'train.py'} {cfg} --seed 5"
    ), argv[-1]
    assert f"--hostfile {job}/hostfile --no_ssh" in argv[-1]


# ------------------------------------------------------------------- shipped configs without SLURM
SHIPPED = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("stablelm-*.yml"))
OUTSIDE_SLURM = "launcher: slurm (from the config) but no SLURM allocation here"


def _main_outside_slurm(monkeypatch: pytest.MonkeyPatch, capsys, argv: list[str]) -> tuple[int, str, str]:
    """``python -m megatron_stablelm.launch ARGV`` in this process, from the repository root, with no
    SLURM variable set: (exit status, stdout, stderr)."""
    from megatron_stablelm.launch.__main__ import main

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(ROOT)
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("config", SHIPPED)
def test_shipped_configs_follow_the_named_resources_outside_slurm(config, tmp_path, monkeypatch, capsys):
    """launch/README.md's one-machine and ssh recipes with the shipped configs (``launcher: slurm``):
    ``--num-gpus`` runs deepspeed on this machine, a hostfile DeepSpeed's pdsh runner, each saying so
    in one line; with neither, one error line names the flags."""
    assert load_config([ROOT / config], report_ignored=False).launcher == "slurm"
    code, out, err = _main_outside_slurm(monkeypatch, capsys, [config, "--num-gpus", "8", "--dry-run"])
    assert code == 0, err
    assert shlex.split(out) == ["deepspeed", "--num_gpus", "8", "--master_port", "29500"] + [
        str(ROOT / "train.py"),
        str(ROOT / config),
    ]
    assert f"# {OUTSIDE_SLURM} (SLURM_JOB_NODELIST is not set): running as --launcher local" in err
    hosts = hf.write_hostfile(tmp_path / "hostfile", ["gpu001", "gpu002"], 8)
    code, out, err = _main_outside_slurm(monkeypatch, capsys, [config, "--hostfile", str(hosts), "--dry-run"])
    assert code == 0, err
    assert shlex.split(out)[:4] == ["deepspeed", "--hostfile", str(hosts), "--launcher"]
    assert shlex.split(out)[4] == "pdsh" and "running as --launcher pdsh" in err
    code, out, err = _main_outside_slurm(monkeypatch, capsys, [config, "--dry-run"])
    (error,) = [line for line in err.splitlines() if not line.startswith("# [config]")]
    assert code == 2 and out == "" and error.startswith(f"error: {OUTSIDE_SLURM}")
    assert "--num-gpus N" in error and "--hostfile FILE" in error


def test_launcher_slurm_on_the_command_line_is_obeyed(tmp_path, monkeypatch, capsys) -> None:
    cfg = write_config(tmp_path / "run.yml", launcher="slurm", num_gpus=2)
    code, _, err = _main_outside_slurm(monkeypatch, capsys, [str(cfg), "--launcher", "slurm", "--dry-run"])
    assert code == 2 and "must run inside a SLURM allocation" in err


def _readme_blocks() -> list[str]:
    import re

    return re.findall(r"```[a-z]*\n(.*?)```", (ROOT / "launch" / "README.md").read_text(), flags=re.S)


def _readme_block(first: str) -> str:
    """The one fenced block of launch/README.md starting with ``first`` (indentation removed)."""
    import textwrap

    found = [textwrap.dedent(b) for b in _readme_blocks() if b.lstrip().startswith(first)]
    assert len(found) == 1, first
    return found[0]


def test_readme_one_machine_example_is_what_the_launcher_prints(monkeypatch, capsys) -> None:
    block = _readme_block("$ python -m megatron_stablelm.launch").splitlines()
    argv = shlex.split(block[0])[4:]
    code, out, err = _main_outside_slurm(monkeypatch, capsys, argv)
    assert code == 0, err
    assert block[1] in err.splitlines()
    assert block[2] == out.strip().replace(f"{ROOT}/", "")


@pytest.mark.parametrize("deepspeed_slurm", [True, False])
def test_readme_slurm_worked_example_is_what_sbatch_runs(deepspeed_slurm: bool, tmp_path: Path) -> None:
    """The worked example of launch/README.md, line by line: the sbatch template under its simulated
    allocation (gpu[001-002], job 4242) with the shipped config writes the hostfile shown and runs the
    command shown for the config's ``deepspeed_slurm: true``, or for ``false`` when overridden."""
    config = "configs/stablelm-3b-4e1t.yml"
    assert load_config([ROOT / config], report_ignored=False).deepspeed_slurm is True
    override = [] if deepspeed_slurm else ["--override", "deepspeed_slurm=false"]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "MASTER_"))},
        **{k: v for k, v in SLURM_ENV.items() if not k.startswith("NCCL_")},
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_NUM_NODES": "2",
        "RUNS_DIR": str(tmp_path / "runs"),
        "LAUNCH_ARGS": "--dry-run",
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", str(ROOT / "launch/slurm/train.sbatch"), config, *override],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    job = tmp_path / "runs" / "stablelm-4242"
    assert (job / "hostfile").read_text() == _readme_block("gpu001 slots=8")
    command = done.stdout.strip().splitlines()[-1]
    command = command.replace(f"{tmp_path}/runs/", "runs/").replace(f"{ROOT}/", "")
    command = command.replace(" --override deepspeed_slurm=false", "")
    shown = _readme_block("deepspeed --hostfile" if deepspeed_slurm else "srun ")
    assert shlex.split(command) == shlex.split(shown.replace("\\\n", " "))


# ---------------------------------------------------------------------------------------------- real runs
def _tiny_train_config(path: Path) -> Path:
    import yaml

    values = yaml.safe_load((ROOT / "configs" / "tiny" / "stablelm-2-1_6b.yml").read_text())
    values.update(
        train_iters=3,
        train_micro_batch_size_per_gpu=2,
        launcher="local",
        num_gpus=2,
        zero_optimization={"stage": 1},
        optimizer={"type": "Adam", "params": {"lr": 1e-3}},
        log_interval=1,
    )
    path.write_text(yaml.safe_dump(values))
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "torchrun"])
def test_real_two_process_training_run(tmp_path: Path, launcher: str) -> None:
    """The launcher starts train.py in 2 ranks through the deepspeed launcher (``local``) and through
    torchrun; both finish 3 data-parallel ZeRO-1 steps and the job directory keeps the resolved config."""
    cfg = _tiny_train_config(tmp_path / "tiny.yml")
    job = tmp_path / "job"
    cmd = [sys.executable, "-m", "megatron_stablelm.launch", str(cfg), "--launcher", launcher]
    cmd += ["--job-dir", str(job), "--master-port", str(_free_port()), "--", "--synthetic-data"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "world 2 = TP 1 × DP 2" in out and "done at iteration 3" in out
    assert load_config([job / "config.yaml"], report_ignored=False).train_iters == 3


def test_slurm_task_variables_become_torch_distributed_ones() -> None:
    from megatron_stablelm.parallel import adopt_slurm_environment

    env = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "MASTER_ADDR": "gpu001"}
    assert adopt_slurm_environment(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("9", "16", "1")
    assert not adopt_slurm_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "MASTER_ADDR": "x"})
    assert not adopt_slurm_environment(
        {"RANK": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "MASTER_ADDR": "x"}
    )


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_a_torchrun_job_cleanly(tmp_path: Path) -> None:
    """The documented way to stop a job (SIGTERM or Ctrl-C to ``python -m megatron_stablelm.launch``,
    what ``scancel`` does): the ranks save at the next step boundary, torchrun sees them finish, and
    everything exits 0 without a traceback."""
    import signal

    import yaml

    from megatron_stablelm.checkpoint import resolve_checkpoint
    from tests.test_train_faults import _Reader

    cfg = _tiny_train_config(tmp_path / "tiny.yml")
    values = yaml.safe_load(cfg.read_text())
    values.update(train_iters=100000, save=str(tmp_path / "ckpt"))
    cfg.write_text(yaml.safe_dump(values))
    cmd = [sys.executable, "-m", "megatron_stablelm.launch", str(cfg), "--launcher", "torchrun"]
    cmd += ["--job-dir", str(tmp_path / "job"), "--master-port", str(_free_port()), "--", "--synthetic-data"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run = _Reader(proc)
    run.wait_for("iter 3/")
    proc.send_signal(signal.SIGTERM)
    out = run.rest(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "SignalException" not in out, out[-4000:]
    assert "SIGTERM received: saving at iteration" in out
    assert int(resolve_checkpoint(tmp_path / "ckpt").name.split("_")[1]) >= 3


def test_overrides_reach_the_launch_keys_and_train_py(tmp_path: Path) -> None:
    """The one ``--override`` grammar: before or after the configs, applied to the config the launcher
    plans with, and handed on to train.py so that every rank trains the same config."""
    cfg = _tiny_train_config(tmp_path / "tiny.yml")
    cmd = [sys.executable, "-m", "megatron_stablelm.launch", "--override", "num_gpus=3", "train_iters=7"]
    cmd += [str(cfg), "--launcher", "torchrun", "--job-dir", str(tmp_path / "job"), "--dry-run"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = shlex.split(done.stdout.strip().splitlines()[-1])
    assert "--nproc_per_node=3" in argv
    assert argv[argv.index("--override") :][:3] == ["--override", "num_gpus=3", "train_iters=7"]
