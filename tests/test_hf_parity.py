"""The framework's logits equal `transformers`' for every StableLM architecture (and the tiny Llama 2 of
GPT-NeoX's configs), at TP=1 and TP=2, and HF → framework → HF conversion is bit-exact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_stablelm import checkpoint, hf_conversion, parallel
from megatron_stablelm.model import build_model
from tests.dist_helpers import run_distributed
from tests.model_helpers import TINY_ARCHS, randomize, tiny_config

VOCAB = 256
REL_TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
HF_CLASSES = {"stablelm-base-alpha-v1": "GPTNeoXForCausalLM", "llama-2": "LlamaForCausalLM"}


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = REL_TOL) -> None:
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3e} exceeds {tol} x max |logit| {scale:.3e}"


@pytest.fixture(scope="module")
def single_rank():
    parallel.initialize(1)
    yield
    parallel.destroy()


# Beside each tiny architecture as shipped, variants checked at TP=2 too: name -> (arch, overrides).
TP2_CASES = {arch: (arch, {}) for arch in sorted(TINY_ARCHS)}
TP2_CASES["llama-2-tied-codellama-theta"] = ("llama-2", {"no_weight_tying": False, "rotary_emb_base": 1e6})
TP2_CASES["llama-2-biases"] = ("llama-2", {"use_bias_in_attn_linear": True, "use_bias_in_mlp": True})


def _framework_model(arch: str, seed: int = 0, **overrides):
    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = build_model(cfg, VOCAB, seed=seed).eval()
    randomize(model, seed)
    return cfg, model


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_logits_match_transformers_tp1(arch, tmp_path, single_rank):
    cfg, model = _framework_model(arch)
    hf_dir = tmp_path / "hf"
    hf_conversion.write_hf_dir(hf_dir, cfg, model.local_state_dict(), VOCAB)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    expected_class = HF_CLASSES.get(arch, "StableLmForCausalLM")
    assert type(hf).__name__ == expected_class
    tokens = _tokens()
    with torch.no_grad():
        ours = model(tokens)
        ref = hf(tokens).logits
    assert ours.shape == ref.shape == (2, 32, VOCAB)
    assert_rel_close(ours, ref)
    # the loss path (vocab-parallel cross-entropy) agrees with a plain cross-entropy of HF's logits
    labels = torch.roll(tokens, -1, dims=1)
    with torch.no_grad():
        losses = model(tokens, labels=labels)
    ref_losses = torch.nn.functional.cross_entropy(
        ref.reshape(-1, VOCAB), labels.reshape(-1), reduction="none"
    )
    torch.testing.assert_close(losses.reshape(-1), ref_losses, rtol=1e-5, atol=1e-5)


def _tp2_worker(rank: int, world: int, work: str) -> None:
    parallel.initialize(2)
    work_dir = Path(work)
    for name, (arch, overrides) in TP2_CASES.items():
        case = torch.load(work_dir / f"{name}.pt")
        cfg = tiny_config(arch, model_parallel_size=2, **overrides)
        model = build_model(cfg, VOCAB).eval()
        model.load_canonical_state_dict(case["state"])
        with torch.no_grad():
            local = model(case["tokens"])
        shards = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(shards, local, group=parallel.tp_group())
        if rank == 0:
            torch.save(torch.cat(shards, dim=-1), work_dir / f"{name}.tp2.pt")


def test_logits_match_transformers_tp2(tmp_path, single_rank):
    references = {}
    for name, (arch, overrides) in TP2_CASES.items():
        cfg, model = _framework_model(arch, seed=3, **overrides)
        hf_dir = tmp_path / name
        hf_conversion.write_hf_dir(hf_dir, cfg, model.local_state_dict(), VOCAB)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        tokens = _tokens(seed=4)
        with torch.no_grad():
            references[name] = hf(tokens).logits
        torch.save({"state": model.local_state_dict(), "tokens": tokens}, tmp_path / f"{name}.pt")
    run_distributed(_tp2_worker, 2, str(tmp_path))
    for name, ref in references.items():
        assert_rel_close(torch.load(tmp_path / f"{name}.tp2.pt"), ref)


def _random_hf_dir(arch: str, path: Path) -> None:
    """An HF checkpoint made by `transformers` itself, every tensor random (norm biases zero where the
    architecture has none, as in the released Stable LM 2 12B)."""
    cfg = tiny_config(arch)
    hf_cfg = hf_conversion.hf_config(cfg, VOCAB, torch.float32)
    torch.manual_seed(5)
    hf = AutoModelForCausalLM.from_config(hf_cfg)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.copy_(torch.randn_like(param))
            if not cfg.use_bias_in_norms and "norm" in name and name.endswith(".bias"):
                param.zero_()
    hf.save_pretrained(path)


def _run_tool(*args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_round_trip_is_bit_exact(arch, tp, tmp_path, single_rank):
    src = tmp_path / "hf_in"
    _random_hf_dir(arch, src)
    hf_cfg, original = hf_conversion.read_hf_dir(src)
    ckpt = tmp_path / "ckpt"
    from tools.convert_from_hf import convert_from_hf
    from tools.convert_to_hf import convert_to_hf

    convert_from_hf(src, ckpt, tp=tp)
    assert checkpoint.read_meta(ckpt).tp_size == tp
    out = tmp_path / "hf_out"
    convert_to_hf(ckpt, out, dtype="fp32")
    _, result = hf_conversion.read_hf_dir(out)
    assert sorted(result) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(result[key], tensor), key


def test_convert_tools_cli(tmp_path, single_rank):
    """The command-line tools: HF → framework (TP=2) → HF in bf16, loadable by transformers."""
    src = tmp_path / "hf_in"
    _random_hf_dir("stablelm-2-1_6b", src)
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf_out"
    _run_tool("tools/convert_from_hf.py", str(src), str(ckpt), "--tp", "2")
    _run_tool("tools/convert_to_hf.py", str(ckpt), str(out), "--dtype", "bf16")
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert next(hf.parameters()).dtype == torch.bfloat16
    proc = subprocess.run(
        [sys.executable, "tools/convert_to_hf.py", str(ckpt), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "exists" in proc.stderr


def test_unrepresentable_hf_tensor_is_refused(tmp_path, single_rank):
    src = tmp_path / "hf_in"
    _random_hf_dir("stablelm-2-12b", src)
    hf_cfg, tensors = hf_conversion.read_hf_dir(src)
    cfg = hf_conversion.config_from_hf(hf_cfg, norm_bias=False)
    tensors["model.norm.bias"] = torch.ones_like(tensors["model.norm.bias"])
    names = list(tensors)  # any names: the check under test fires on the leftover bias
    from megatron_stablelm.model import canonical_shapes

    names = list(canonical_shapes(cfg, VOCAB))
    with pytest.raises(hf_conversion.ConversionError, match="model.norm.bias.*use_bias_in_norms"):
        hf_conversion.from_hf_state_dict(cfg, tensors, names)


def test_export_refuses_what_hf_cannot_represent():
    cfg = tiny_config("stablelm-2-1_6b", use_bias_in_mlp=True)
    with pytest.raises(hf_conversion.ConversionError, match="use_bias_in_mlp"):
        hf_conversion.architecture_for(cfg)
