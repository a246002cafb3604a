"""Sequence parallelism (megatron-core's, at TP > 1) changes where activations live, never what is
computed: TP=2 with it equals TP=1 and TP=2 without it — losses over 5 optimizer steps, every
gradient after one (norms and replicated biases included), with and without packed documents, full
recompute, the fused LM-head loss and tied embeddings — and greedy generation equals `transformers`.

One 2-rank gloo run checks every case (process start-up dominates the cost); the trainer's
TP=2 × DP=2 run with ZeRO-1 is in ``test_train_parallel.py``. The saved-activation bytes of the
TP=2 run, with and without it, are measured here against ``inspect``'s estimate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_stablelm import hf_conversion, parallel
from megatron_stablelm.config import ConfigError, load_config
from megatron_stablelm.inspect import activation_bytes
from megatron_stablelm.model import StableLMModel, build_model
from tests import train_helpers
from tests.dist_helpers import run_distributed
from tests.model_helpers import TINY_DIR, randomize, tiny_config
from tests.test_generate import hf_greedy

VOCAB = 256
STEPS = 5
NEW_TOKENS = 8
# (arch, packed documents, full recompute, fused LM head + loss, tied embeddings, switch)
CASES = [
    ("stablelm-2-12b", False, False, False, False, "sequence_parallel"),
    ("stablelm-2-12b", True, False, False, False, "partition_activations"),
    ("stablelm-2-12b", False, True, False, False, "sequence_parallel"),
    ("stablelm-2-12b", True, True, True, False, "sequence_parallel"),
    ("stablelm-2-1_6b", False, False, False, False, "partition_activations"),
    ("stablelm-2-1_6b", True, False, False, True, "sequence_parallel"),
    ("stablelm-2-1_6b", False, True, True, True, "sequence_parallel"),
    ("stablelm-2-1_6b", True, True, False, False, "sequence_parallel"),
]
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12], [100, 3, 200, 4, 17, 90], [1, 2, 3]]  # even: split prefill


def _case_config(case: tuple, tp: int, sp: bool):
    arch, _, recompute, fused, tied, switch = case
    extra = {switch: True} if sp else {}
    return tiny_config(
        arch, model_parallel_size=tp, checkpoint_activations=recompute, use_flash_cross_entropy=fused,
        no_weight_tying=not tied, **extra,
    )  # fmt: skip


def _batch(packed: bool, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=gen)
    batch = {"tokens": tokens, "labels": torch.randint(0, VOCAB, (2, 32), generator=gen)}
    if packed:
        lengths = [[5, 11, 16], [20, 12]]
        batch["position_ids"] = torch.cat([torch.cat([torch.arange(n) for n in r]) for r in lengths]).view(
            2, 32
        )
        bounds = torch.tensor([0] + [n for r in lengths for n in r]).cumsum(0)
        batch["cu_seqlens"], batch["max_seqlen"] = bounds.to(torch.int32), 20
    return batch


def _losses(model: StableLMModel, batch: dict) -> torch.Tensor:
    return model(
        batch["tokens"], batch.get("position_ids"), batch.get("cu_seqlens"), batch.get("max_seqlen"),
        labels=batch["labels"],
    )  # fmt: skip


def _train(model: StableLMModel, packed: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """5 AdamW steps (elementwise, so sharded parameters step exactly as whole ones): the per-token
    losses of each step and the gradients of the first."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses, first = [], {}
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        out = _losses(model, _batch(packed, step))
        out.mean().backward()
        if step == 0:
            first = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(out.detach())
    return losses, first


def _gather(model: StableLMModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors from every TP rank's shards."""
    out = {}
    for name, local in tensors.items():
        spec = model.splits[name]
        if spec.dim is None:
            out[name] = local
            continue
        parts = [torch.empty_like(local) for _ in range(model.tp_group.size())]
        dist.all_gather(parts, local.contiguous(), group=model.tp_group)
        out[name] = spec.merge(parts)
    return out


def _assert_close(got: dict, ref: dict, what: str) -> None:
    assert got.keys() == ref.keys(), what
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=f"{what}: {name}")


def saved_activation_bytes(model: StableLMModel, batch: dict) -> int:
    """The activation memory of one micro-batch of ``batch``, measured (see ``train_helpers``)."""
    return train_helpers.saved_activation_bytes(model, lambda: _losses(model, batch))


def _worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    parallel.initialize(2)
    single = [dist.new_group([r]) for r in range(world)][rank]  # the TP=1 reference, in this process
    states = torch.load(Path(out) / "states.pt")
    report: dict = {"cases": []}
    for case in CASES:
        arch, packed = case[0], case[1]
        runs = {}
        for name, tp, sp, group in (
            ("tp1", 1, False, single),
            ("tp2", 2, False, None),
            ("sp", 2, True, None),
        ):
            model = build_model(_case_config(case, tp, sp), VOCAB, tp_group=group)
            assert model.sequence_parallel == sp
            model.load_canonical_state_dict(states[arch, case[4]])
            losses, grads = _train(model, packed)
            runs[name] = (losses, _gather(model, grads), model)
        ref_losses, ref_grads, _ = runs["tp1"]
        for name in ("tp2", "sp"):
            losses, grads, model = runs[name]
            for step, (got, want) in enumerate(zip(losses, ref_losses)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{case} {name} step {step}")
            _assert_close(grads, ref_grads, f"{case} {name} gradients")
        # the replicated parameters are the ones sequence parallelism marks (and reduces)
        sp_model = runs["sp"][2]
        marked = {n for n, p in sp_model.named_parameters() if getattr(p, "sequence_parallel", False)}
        assert marked == {n for n, s in sp_model.splits.items() if s.dim is None} and marked
        assert any("norm" in n for n in marked)
        report["cases"].append([str(c) for c in case])

    # generation: prefill split over TP where the prompt length allows, one-token steps unsplit
    from megatron_stablelm.generation import generate

    model = build_model(tiny_config("stablelm-2-12b", model_parallel_size=2, sequence_parallel=True), VOCAB)
    model.load_canonical_state_dict(states["stablelm-2-12b", False])
    report["generated"] = generate(model.eval(), PROMPTS, NEW_TOKENS, batch_size=2)
    assert model.embedding.reduce_scatter_embeddings and model.layers[0].attention.qkv.sequence_parallel

    # activation memory of one micro-batch of the 12B-style model, with and without
    memory = {}
    for sp in (False, True):
        cfg = tiny_config("stablelm-2-12b", model_parallel_size=2, sequence_parallel=sp)
        model = build_model(cfg, VOCAB)
        memory[sp] = saved_activation_bytes(model, _batch(False, 0))
    report["measured"] = memory
    if rank == 0:
        (Path(out) / "report.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_tp2_sequence_parallel_equals_tp1_and_transformers(tmp_path):
    parallel.initialize(1)
    try:
        states = {}
        for arch in ("stablelm-2-12b", "stablelm-2-1_6b"):
            for tied in (False, True):
                model = build_model(tiny_config(arch, no_weight_tying=not tied), VOCAB, seed=3)
                randomize(model, 3)
                states[arch, tied] = model.local_state_dict()
        torch.save(states, tmp_path / "states.pt")
        cfg = tiny_config("stablelm-2-12b")
        hf_conversion.write_hf_dir(tmp_path / "hf", cfg, states["stablelm-2-12b", False], VOCAB)
    finally:
        parallel.destroy()
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU tensors on gloo, also on a machine with a GPU
    try:
        run_distributed(_worker, 2, str(tmp_path))
    finally:
        if hidden is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["cases"]) == len(CASES)
    expected = hf_greedy(tmp_path / "hf", PROMPTS, new_tokens=NEW_TOKENS)
    assert report["generated"] == expected
    assert len({t for seq in expected for t in seq}) > 2, "degenerate output would make the check weak"
    # inspect's estimate (with the reference kernels' extra tensors, as CPU runs them) against the
    # measurement: both layouts, and the saving itself
    measured = {sp == "true": v for sp, v in report["measured"].items()}
    cfg = tiny_config("stablelm-2-12b", model_parallel_size=2)
    estimate = {
        sp: activation_bytes(cfg, VOCAB, tp=2, sequence_parallel=sp, micro_batch=2, fused_kernels=False)
        for sp in (False, True)
    }
    for sp in (False, True):
        assert measured[sp] == pytest.approx(estimate[sp], rel=0.05), (sp, measured, estimate)
    saving = measured[False] - measured[True]
    assert saving == pytest.approx(estimate[False] - estimate[True], rel=0.05), (measured, estimate)


def test_sequence_parallel_keys(capsys):
    """partition_activations turns it on at TP > 1 and says so; at TP 1 both keys are reported as
    having no effect; pipe_parallel_size above 1 is refused by name, 0 and 1 load."""
    base = TINY_DIR / "stablelm-2-12b.yml"
    cfg = load_config([base], overrides=["model_parallel_size=2", "partition_activations=true"])
    assert cfg.uses_sequence_parallel
    out = capsys.readouterr().out
    assert "'partition_activations: true' → megatron-core sequence parallelism over TP=2" in out
    cfg = load_config([base], overrides=["sequence_parallel=true"])
    assert not cfg.uses_sequence_parallel and "sequence_parallel" in cfg.ignored_keys
    assert "only acts at model_parallel_size > 1" in capsys.readouterr().out
    for stages in (0, 1):
        assert load_config([base], overrides=[f"pipe_parallel_size={stages}"]).pipe_parallel_size == stages
    with pytest.raises(ConfigError, match=r"key 'pipe_parallel_size': 2 .*model_parallel_size"):
        load_config([base], overrides=["pipe_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"key 'sequence_parallel'.*seq_length=31"):
        load_config([base], overrides=["model_parallel_size=2", "sequence_parallel=true", "seq_length=31"])
