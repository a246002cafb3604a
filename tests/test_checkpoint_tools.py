"""Checkpoint tools: resharding (TP=1 → 2 → 1 bit for bit, optimizer state included, and a training run
resumed from a resharded checkpoint continuing with the same loss), inspection, and the Hugging Face
export's tokenizer files loading with ``AutoTokenizer``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_stablelm import checkpoint, parallel
from megatron_stablelm.checkpoint.describe import describe_checkpoint
from megatron_stablelm.checkpoint.reshard import reshard_checkpoint
from megatron_stablelm.model import config_splits
from tests.data_helpers import tiny_tokenizer_files
from tests.test_generate import make_checkpoint
from tools.inspect_checkpoint import main as inspect_main
from tools.reshard_checkpoint import main as reshard_main


@pytest.fixture(scope="module")
def single_rank():
    parallel.initialize(1)
    yield
    parallel.destroy()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _add_training_files(ckpt: Path, dp: int = 2) -> None:
    """What the trainer writes beside the model shards: per-parameter optimizer state spread over DP
    files, train_state.json and per-rank RNG files (the layout of megatron_stablelm/training/checkpoint.py)."""
    cfg = checkpoint.read_config(ckpt)
    meta = checkpoint.read_meta(ckpt)
    gen = torch.Generator().manual_seed(7)
    for tp_rank in range(meta.tp_size):
        shard = _tensors(ckpt / checkpoint.shard_filename(tp_rank))
        files: list[dict[str, torch.Tensor]] = [{} for _ in range(dp)]
        for i, (name, t) in enumerate(sorted(shard.items())):
            for key in ("exp_avg", "exp_avg_sq"):
                files[i % dp][f"{name}/{key}"] = torch.randn(t.shape, generator=gen)
        for dp_rank, tensors in enumerate(files):
            save_file(tensors, str(ckpt / f"optim_tp{tp_rank:02d}_dp{dp_rank:03d}.safetensors"))
    state = {"format": 1, "iteration": 10, "consumed_samples": 80, "consumed_tokens": 2560}
    state.update(has_optimizer=True, adam_step=10, optimizer_keys=["exp_avg", "exp_avg_sq"], world_size=2)
    state.update(tp_size=meta.tp_size, dp_size=dp)
    (ckpt / "train_state.json").write_text(json.dumps(state))
    for rank in range(2):
        torch.save({"torch": torch.get_rng_state()}, ckpt / f"rng_rank{rank:05d}.pt")
    assert cfg.num_layers  # the config is readable


def _optimizer(ckpt: Path) -> dict[str, list[torch.Tensor]]:
    """Every optimizer tensor, per TP rank, whichever DP file holds it."""
    meta = checkpoint.read_meta(ckpt)
    out: dict[str, list[torch.Tensor]] = {}
    for tp_rank in range(meta.tp_size):
        for path in sorted(ckpt.glob(f"optim_tp{tp_rank:02d}_dp*.safetensors")):
            for key, t in _tensors(path).items():
                out.setdefault(key, []).append(t)
    return out


@pytest.mark.parametrize("arch", ["stablelm-2-12b", "stablelm-base-alpha-v1"])
def test_reshard_round_trip_is_bit_exact(arch, tmp_path, single_rank):
    run, _ = make_checkpoint(arch, tmp_path, seed=3)
    src = checkpoint.resolve_checkpoint(run)
    _add_training_files(src)
    two = reshard_checkpoint(run, tmp_path / "tp2", 2, log=lambda _: None)
    assert reshard_main([str(tmp_path / "tp2"), str(tmp_path / "tp1"), "--tp", "1"]) == 0
    back = checkpoint.resolve_checkpoint(tmp_path / "tp1")
    assert two.name == back.name == src.name
    # model shards and metadata: bit for bit
    assert checkpoint.read_meta(two).tp_size == 2
    original = _tensors(src / checkpoint.shard_filename(0))
    assert _tensors(back / checkpoint.shard_filename(0)).keys() == original.keys()
    for name, t in _tensors(back / checkpoint.shard_filename(0)).items():
        assert t.dtype == original[name].dtype and torch.equal(t, original[name]), name
    assert json.loads((back / "model_meta.json").read_text()) == json.loads(
        (src / "model_meta.json").read_text()
    )
    assert yaml.safe_load((back / "config.yml").read_text()) == yaml.safe_load(
        (src / "config.yml").read_text()
    )
    assert checkpoint.read_config(two).model_parallel_size == 2
    # the TP=2 shards are the sharding rules' split of each canonical tensor
    splits = config_splits(checkpoint.read_config(src))
    for rank in range(2):
        for name, t in _tensors(two / checkpoint.shard_filename(rank)).items():
            assert torch.equal(t, splits[name].split(original[name], rank, 2)), name
    # optimizer state: re-split the same way, back bit for bit
    before, middle, after = _optimizer(src), _optimizer(two), _optimizer(back)
    assert before.keys() == middle.keys() == after.keys()
    for key, (t,) in before.items():
        assert torch.equal(after[key][0], t), key
        spec = splits[key.rsplit("/", 1)[0]]
        assert all(torch.equal(middle[key][r], spec.split(t, r, 2)) for r in range(2)), key
    state = json.loads((back / "train_state.json").read_text())
    assert state["iteration"] == 10 and state["has_optimizer"] and state["tp_size"] == 1
    assert not list(back.glob("rng_rank*.pt"))


def test_model_meta_record_reads_and_writes_the_same_file(tmp_path, single_rank):
    """``model_meta.json`` read into its record and written back is the same text; a malformed entry
    is refused naming the file and the tensor."""
    run, _ = make_checkpoint("stablelm-2-12b", tmp_path, seed=1)
    path = checkpoint.resolve_checkpoint(run) / "model_meta.json"
    meta = checkpoint.read_meta(run)
    assert json.dumps(meta.to_json(), indent=1) == path.read_text()
    assert meta.vocab_size is None and meta.export_vocab_size == meta.padded_vocab_size
    data = json.loads(path.read_text())
    name = next(iter(data["splits"]))
    with pytest.raises(checkpoint.CheckpointError, match=f"{path}: the split of '{name}'"):
        checkpoint.ModelMeta.from_json(path, dict(data, splits=dict(data["splits"], **{name: [0]})))


def test_reshard_refuses_bad_input_and_can_drop_the_optimizer(tmp_path, capsys, single_rank):
    run, _ = make_checkpoint("stablelm-2-1_6b", tmp_path)
    src = checkpoint.resolve_checkpoint(run)
    _add_training_files(src)
    assert reshard_main([str(run), str(tmp_path / "x"), "--tp", "3"]) == 2  # 4 heads over 3 ranks
    assert "TP=3" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert reshard_main([str(tmp_path / "missing"), str(tmp_path / "x"), "--tp", "2"]) == 2
    assert "missing" in capsys.readouterr().err
    assert reshard_main([str(run), str(run), "--tp", "2"]) == 2
    assert "exists" in capsys.readouterr().err
    (src / "mystery.bin").write_bytes(b"?")
    assert reshard_main([str(run), str(tmp_path / "x"), "--tp", "2"]) == 2
    assert "mystery.bin" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert reshard_main([str(run), str(tmp_path / "x"), "--tp", "2", "--skip-unknown", "--no-optimizer"]) == 0
    out = checkpoint.resolve_checkpoint(tmp_path / "x")
    assert "optimizer state: left out" in capsys.readouterr().out
    assert not list(out.glob("optim_*")) and not (out / "mystery.bin").exists()
    assert json.loads((out / "train_state.json").read_text())["has_optimizer"] is False


def test_reshard_force_replaces_the_destination_only_when_complete(tmp_path, capsys, single_rank):
    """Without ``--force`` an existing destination is refused in one line naming it and the flag, and
    left as it was; with it, it is replaced, and a failure half-way leaves the old one in place."""
    run, _ = make_checkpoint("stablelm-2-1_6b", tmp_path)
    _add_training_files(checkpoint.resolve_checkpoint(run))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    assert reshard_main([str(run), str(dst), "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {dst} exists") and "--force" in err
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt"]
    with pytest.raises(RuntimeError, match="disk full"):  # fails once the new shards are written
        reshard_checkpoint(run, dst, 2, force=True, log=_disk_full)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt"]
    assert reshard_main([str(run), str(dst), "--tp", "2", "--force"]) == 0
    assert checkpoint.read_meta(checkpoint.resolve_checkpoint(dst)).tp_size == 2
    assert not (dst / "old.txt").exists()
    assert reshard_main([str(run), str(run), "--tp", "2", "--force"]) == 2  # never over its own source
    assert "holds the checkpoint" in capsys.readouterr().err and checkpoint.resolve_checkpoint(run)


def _disk_full(line: str) -> None:
    raise RuntimeError("disk full")


def test_inspect_checkpoint(tmp_path, capsys, single_rank):
    run, _ = make_checkpoint("stablelm-3b-4e1t", tmp_path, tp=2)
    src = checkpoint.resolve_checkpoint(run)
    info = describe_checkpoint(run)
    assert info["iteration"] == 10 and info["train_state"] is None and info["tp_size"] == 2
    full = checkpoint.read_canonical_state_dict(src)
    assert info["parameters"] == sum(t.numel() for t in full.values())
    for name, t in full.items():
        entry = info["tensors"][name]
        assert entry["shape"] == list(t.shape) and entry["dtype"] == "float32"
        assert entry["norm"] == pytest.approx(float(t.double().norm()), rel=1e-12)
    _add_training_files(src)
    assert inspect_main([str(run)]) == 0
    text = capsys.readouterr().out
    assert "iteration       10" in text and "80 samples, 2560 tokens" in text
    assert "optim_tp00_dp001.safetensors" in text and "layers.1.mlp.fc1.weight" in text
    assert inspect_main([str(run), "--json", "--no-norms"]) == 0
    assert json.loads(capsys.readouterr().out)["consumed_tokens"] == 2560
    assert inspect_main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_hf_export_includes_a_loadable_tokenizer(tmp_path, single_rank):
    from transformers import AutoTokenizer

    from megatron_stablelm.tokenizers import HFTokenizer
    from tools.convert_to_hf import main as to_hf_main

    run, _ = make_checkpoint("stablelm-2-1_6b", tmp_path)
    ours = HFTokenizer(tiny_tokenizer_files()["json"])
    text = "the model reads tokens 0 1 2 ünïcödé 日本語"
    # from the checkpoint config's vocab_file, and from --tokenizer
    assert to_hf_main([str(run), str(tmp_path / "hf_a")]) == 0
    assert to_hf_main([str(run), str(tmp_path / "hf_b"), "--tokenizer", tiny_tokenizer_files()["json"]]) == 0
    for out in ("hf_a", "hf_b"):
        tok = AutoTokenizer.from_pretrained(tmp_path / out)
        assert tok.encode(text, add_special_tokens=False) == ours.encode(text)
        assert tok.eos_token_id == ours.eod
        assert json.loads((tmp_path / out / "config.json").read_text())["eos_token_id"] == ours.eod
    assert to_hf_main([str(run), str(tmp_path / "hf_c"), "--tokenizer", str(tmp_path / "none.json")]) == 2
    assert not (tmp_path / "hf_c").exists()


# --------------------------------------------------------------------------- resume after resharding
def _have_trainer() -> bool:
    try:
        import deepspeed  # noqa: F401

        from megatron_stablelm.training import loop  # noqa: F401
        from tests import train_helpers  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(
    not _have_trainer(), reason="the trainer (megatron_stablelm.training, deepspeed) is missing"
)
def test_training_resumed_from_a_resharded_checkpoint_continues_with_the_same_loss(tmp_path):
    """TP=1 run saving at iteration 3 and going on to 6; its iteration-3 checkpoint resharded to TP=2;
    a TP=2 run resumed from it: iterations 4..6 have the same loss."""
    from tests.train_helpers import losses, run_ranks, tiny_dict

    base = tiny_dict(train_iters=6, checkpoint_factor=3, zero_optimization={"stage": 1})
    first = run_ranks(1, {**base, "save": str(tmp_path / "a")}, tmp_path / "out_a")[0]
    assert first["exit_reason"] == "done", first.get("log")
    reshard_checkpoint(tmp_path / "a" / "iter_0000003", tmp_path / "b", 2, log=lambda _: None)
    resumed_cfg = {**base, "model_parallel_size": 2, "load": str(tmp_path / "b"), "save": str(tmp_path / "c")}
    resumed = run_ranks(2, resumed_cfg, tmp_path / "out_b")[0]
    assert resumed["exit_reason"] == "done", resumed.get("log")
    original = losses(first)[3:]
    again = losses(resumed)
    assert sorted(resumed["losses"], key=int) == ["4", "5", "6"]
    assert again == pytest.approx(original, rel=1e-5)
