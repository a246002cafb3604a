"""The side effects of a launch: the per-job directory and running the command.

Why separate from planning: everything before this module is pure, so ``--dry-run`` and the tests
see the exact command without creating anything; here the job directory gets the resolved config,
the command, the generated hostfile and ``.deepspeed_env``, and the command runs with its output
kept in ``launch.log``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_stablelm.config import Config
from megatron_stablelm.launch.hostfile import format_hostfile
from megatron_stablelm.launch.request import LaunchError, LaunchPlan


def _existing_deepspeed_env() -> list[str]:
    """Lines of the user's own ~/.deepspeed_env and ./.deepspeed_env: pointing DS_ENV_FILE at the job's
    file makes DeepSpeed skip those, so they are carried over (ours win on conflicts)."""
    lines: list[str] = []
    for base in (Path.home(), Path.cwd()):
        path = base / ".deepspeed_env"
        if path.is_file():
            lines += [ln.rstrip("\n") for ln in path.read_text().splitlines() if "=" in ln]
    return lines


def prepare_job_dir(plan: LaunchPlan, cfg: Config) -> None:
    """Create the job directory: resolved config, the command, the generated hostfile, .deepspeed_env."""
    plan.job_dir.mkdir(parents=True, exist_ok=True)
    sources = ", ".join(str(Path(f).resolve()) for f in cfg.config_files)
    header = f"# resolved config of this launch; merged from: {sources}\n"
    (plan.job_dir / "config.yaml").write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    env_text = "".join(f"{k}={shlex.quote(v)} " for k, v in plan.env.items())
    (plan.job_dir / "command.txt").write_text(env_text + shlex.join(plan.argv) + "\n")
    if plan.hostfile_to_write is not None and plan.hostfile is not None:
        plan.hostfile.parent.mkdir(parents=True, exist_ok=True)
        plan.hostfile.write_text(format_hostfile(plan.hostfile_to_write))
    if plan.remote_env:
        ours = {k: v for k, v in plan.remote_env.items() if "\n" not in v}
        kept = [ln for ln in _existing_deepspeed_env() if ln.split("=", 1)[0].strip() not in ours]
        path = plan.job_dir / ".deepspeed_env"
        path.write_text("".join(f"{ln}\n" for ln in kept) + "".join(f"{k}={v}\n" for k, v in ours.items()))
        plan.env["DS_ENV_FILE"] = str(path)


def run_plan(plan: LaunchPlan) -> int:
    """Run the command, copying its output to the console and to ``launch.log`` in the job directory.
    Returns the exit status.

    Stopping: SIGTERM/SIGINT (``scancel``, ``kill``, Ctrl-C) go to the training processes themselves,
    which save at the next step boundary and exit 0, so that torchrun's or DeepSpeed's launcher sees
    its workers finish and exits cleanly too. Signalled directly, those launchers would print a
    traceback and kill the workers after a grace period, possibly in the middle of a save. The command
    runs in its own session so a terminal's Ctrl-C reaches this process only. Where no training
    process runs on this host (ranks started over ssh or srun), the signal goes to the command."""
    if shutil.which(plan.argv[0]) is None:
        raise LaunchError(f"'{plan.argv[0]}' is not on PATH")
    env = {**os.environ, **plan.env}
    script = next((a for a in plan.argv if a.endswith(".py")), None)
    with open(plan.job_dir / "launch.log", "ab") as log:
        proc = subprocess.Popen(
            plan.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )

        def forward(signum: int, _frame: object) -> None:
            if proc.poll() is not None:
                return
            workers = [pid for pid in _descendants(proc.pid) if script and _runs_script(pid, script)]
            for pid in workers:
                _signal_quietly(pid, signum)
            if not workers:
                proc.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return code if code >= 0 else 128 - code


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``; empty where it does not exist)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended while we looked
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _runs_script(pid: int, script: str) -> bool:
    """Whether process ``pid`` is a Python interpreter running ``script`` itself, not a launcher that
    merely names it among its arguments (DeepSpeed's runner and ``launch`` module, torchrun): those
    handle a SIGTERM by killing their workers, possibly in the middle of a save."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    for arg in argv[1:]:  # the interpreter's options come before the program
        if arg in ("-m", "-c"):
            return False
        if not arg.startswith("-"):
            return Path(arg).name == Path(script).name and (
                arg == script or Path(arg).resolve() == Path(script).resolve()
            )
    return False


def _signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # it ended meanwhile
        pass
