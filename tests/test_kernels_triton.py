"""The Triton kernels against the float64 truths and the PyTorch references, forward and backward.

On a CPU machine they run in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``
before anything imports Triton: the interpreter is chosen when ``@triton.jit`` decorates); on a GPU the
CUDA variants run natively. The ``dev`` extra installs Triton, so CI runs them; skipped where Triton is
not installed.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
triton = pytest.importorskip("triton")

if not ON_GPU and not triton.knobs.runtime.interpret:
    # Not a skip: with Triton installed these tests must run, and a silent skip would hide that they
    # stopped running.
    pytest.fail(
        "triton was imported before TRITON_INTERPRET=1 could be set (tests/conftest.py sets it)",
        pytrace=False,
    )

from megatron_stablelm import kernels  # noqa: E402
from tests.model_helpers import TINY_ARCHS  # noqa: E402

from .test_kernels import (  # noqa: E402
    F64,
    _grads,
    assert_close_all,
    layer_norm_truth,
    rms_norm_truth,
    rotary_truth,
    swiglu_truth,
)

MODULE = "megatron_stablelm.kernels.triton_ops"


@pytest.fixture(scope="module")
def ops():
    """The kernel module (interpreted on CPU; reloaded in case it was imported before the variable)."""
    if MODULE in sys.modules:
        return importlib.reload(sys.modules[MODULE])
    return importlib.import_module(MODULE)


DEVICE = "cuda" if ON_GPU else "cpu"
# fp32 storage: the kernels compute in fp32, so they match float64 to fp32 rounding; bf16 storage adds
# the bf16 rounding of inputs and outputs.
DTYPES = [(torch.float32, 2e-5), (torch.bfloat16, 4e-2)]


@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_swiglu(ops, dtype, atol):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 2 * 40) * 2).to(dtype).to(DEVICE)
    got = _grads(ops.swiglu, [x])
    truth = _grads(swiglu_truth, [x.to(F64)])
    ref = _grads(kernels.swiglu_reference, [x])
    assert_close_all(got[0] + got[1], truth[0] + truth[1], atol=atol, rtol=atol)
    assert_close_all(got[0] + got[1], ref[0] + ref[1], atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("rotary_dim", [8, 32])  # partial (25% as Stable LM 2) and full
def test_rotary_qk_gqa(ops, dtype, atol, rotary_dim):
    torch.manual_seed(1)
    s, b, h, kv, d = 6, 2, 4, 2, 32
    positions = torch.randint(0, 100, (s, b))
    cos, sin = (t.to(DEVICE) for t in kernels.rotary_cos_sin(positions, rotary_dim, 10000.0, dtype))
    # k as a strided view into a fused buffer, the way the model slices it out of the QKV output
    fused = torch.randn(s, b, kv, 3, d).to(dtype).to(DEVICE)
    q, k = torch.randn(s, b, h, d).to(dtype).to(DEVICE), fused[:, :, :, 1]

    got = _grads(lambda a, c: ops.apply_rotary_qk(a, c, cos, sin), [q, k])
    truth = _grads(
        lambda a, c: (
            rotary_truth(a, positions, rotary_dim, 10000.0),
            rotary_truth(c, positions, rotary_dim, 10000.0),
        ),
        [q.to(F64), k.to(F64)],
    )
    ref = _grads(lambda a, c: kernels.apply_rotary_qk(a, c, cos, sin), [q, k])  # CPU tensors → reference
    tol = max(atol, 1e-5)  # cos/sin are fp32 tables
    assert_close_all(got[0] + got[1], truth[0] + truth[1], atol=tol, rtol=tol)
    assert_close_all(got[0] + got[1], ref[0] + ref[1], atol=tol, rtol=tol)
    single = ops.apply_rotary(q, cos, sin)
    torch.testing.assert_close(single, got[0][0].to(dtype))


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm(ops, dtype, atol, bias, residual):
    torch.manual_seed(2)
    n = 48
    x = (torch.randn(7, 3, n) * 2 + 1).to(dtype).to(DEVICE)
    r = torch.randn(7, 3, n).to(dtype).to(DEVICE)
    w = torch.randn(n).to(dtype).to(DEVICE)
    b = torch.randn(n).to(dtype).to(DEVICE)
    inputs = [x, w] + ([b] if bias else []) + ([r] if residual else [])

    def unpack(args):
        x, w, *rest = args
        bb = rest.pop(0) if bias else None
        return x, w, bb, (rest.pop(0) if residual else None)

    def make(mod, truth=False):
        def fn(*args):
            x, w, bb, rr = unpack(args)
            if truth:
                return (
                    (layer_norm_truth(x + rr, w, bb, 1e-5), x + rr)
                    if residual
                    else layer_norm_truth(x, w, bb, 1e-5)
                )
            if residual:
                return mod.add_layer_norm(x, rr, w, bb, 1e-5)
            return mod.layer_norm(x, w, bb, 1e-5)

        return fn

    got = _grads(make(ops), inputs)
    truth = _grads(make(None, truth=True), [t.to(F64) for t in inputs])
    tol = atol * 5 if dtype == torch.bfloat16 else 1e-4  # dw sums over rows
    assert_close_all(got[0] + got[1], truth[0] + truth[1], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_per_head_layer_norm(ops, dtype, atol, bias):
    torch.manual_seed(3)
    heads, d = 3, 16
    x = (torch.randn(5, 2, heads, d) * 2).to(dtype).to(DEVICE)
    w, b = torch.randn(heads, d).to(dtype).to(DEVICE), torch.randn(heads, d).to(dtype).to(DEVICE)
    inputs = [x, w, b] if bias else [x, w]
    got = _grads(lambda x, w, b=None: ops.per_head_layer_norm(x, w, b, 1e-5), inputs)
    truth = _grads(lambda x, w, b=None: layer_norm_truth(x, w, b, 1e-5), [t.to(F64) for t in inputs])
    tol = atol * 5 if dtype == torch.bfloat16 else 1e-4
    assert_close_all(got[0] + got[1], truth[0] + truth[1], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(ops, dtype, atol, residual):
    """RMSNorm (the LayerNorm kernels without the mean) against float64 and the reference, with eps
    large against the inputs' mean square so the formula is pinned."""
    torch.manual_seed(7)
    n, eps = 48, 1e-2
    x = (torch.randn(7, 3, n) * 0.2).to(dtype).to(DEVICE)
    r = (torch.randn(7, 3, n) * 0.1).to(dtype).to(DEVICE)
    w = torch.randn(n).to(dtype).to(DEVICE)
    inputs = [x, w, r] if residual else [x, w]

    def make(mod):
        def fn(x, w, r=None):
            if mod is None:
                return (rms_norm_truth(x + r, w, eps), x + r) if residual else rms_norm_truth(x, w, eps)
            return mod.add_rms_norm(x, r, w, eps) if residual else mod.rms_norm(x, w, eps)

        return fn

    got = _grads(make(ops), inputs)
    truth = _grads(make(None), [t.to(F64) for t in inputs])
    ref = _grads(make(kernels), inputs)  # CPU tensors → the PyTorch reference
    tol = atol * 5 if dtype == torch.bfloat16 else 1e-4  # dw sums over rows
    assert_close_all(got[0] + got[1], truth[0] + truth[1], atol=tol, rtol=tol)
    assert_close_all(got[0] + got[1], ref[0] + ref[1], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_per_head_rms_norm(ops, dtype, atol):
    torch.manual_seed(8)
    heads, d = 3, 16
    x = (torch.randn(5, 2, heads, d) * 2).to(dtype).to(DEVICE)
    w = torch.randn(heads, d).to(dtype).to(DEVICE)
    got = _grads(lambda x, w: ops.per_head_rms_norm(x, w, 1e-6), [x, w])
    truth = _grads(lambda x, w: rms_norm_truth(x, w, 1e-6), [x.to(F64), w.to(F64)])
    tol = atol * 5 if dtype == torch.bfloat16 else 1e-4
    assert_close_all(got[0] + got[1], truth[0] + truth[1], atol=tol, rtol=tol)


def _ce_truth(logits, target):
    """float64 per-token loss ``logsumexp(x) - x[target]``, written out (no torch cross_entropy)."""
    x = logits.to(F64)
    lse = x.max(-1, keepdim=True).values
    lse = lse.squeeze(-1) + torch.log(torch.exp(x - lse).sum(-1))
    return lse - x.gather(-1, target[..., None]).squeeze(-1)


@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_cross_entropy_row_kernels(ops, monkeypatch, dtype, atol):
    """The log-sum-exp and gradient kernels, with rows spanning several blocks, a padded last block and
    targets owned by another vocab shard (index -1: softmax with no one-hot)."""
    monkeypatch.setattr(ops, "_CE_BLOCK", 64)
    torch.manual_seed(4)
    rows, vocab = 6, 200
    logits = (torch.randn(rows, vocab) * 4).to(dtype).to(DEVICE)
    target = torch.tensor([0, 199, 63, 64, -1, 5], device=DEVICE)
    grad_loss = torch.randn(rows, device=DEVICE)
    x64 = logits.to(F64)
    lse_truth = torch.logsumexp(x64, -1)
    lse = ops.row_logsumexp(logits)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.to(F64), lse_truth, atol=1e-5, rtol=1e-6)
    onehot = torch.zeros_like(x64)
    owned = target >= 0
    onehot[owned.nonzero().squeeze(1), target[owned]] = 1.0
    grad_truth = (torch.softmax(x64, -1) - onehot) * grad_loss.to(F64)[:, None]
    out = torch.full_like(logits, float("nan"))  # every element must be written
    ops.cross_entropy_grad(logits, lse, target, grad_loss, out)
    torch.testing.assert_close(out.to(F64), grad_truth, atol=atol / 4, rtol=atol)
    inplace = logits.clone()
    ops.cross_entropy_grad(inplace, lse, target, grad_loss, inplace)
    torch.testing.assert_close(inplace, out, atol=0, rtol=0)


def _force_triton_cross_entropy(ops, monkeypatch) -> list[str]:
    """Make the losses take their Triton path (as on CUDA; interpreted on CPU) with small blocks; the
    returned list records each Triton cross-entropy kernel call by name."""
    from megatron_stablelm.kernels import _dispatch

    calls: list[str] = []

    def traced(name):
        fn = getattr(ops, name)
        return lambda *a: calls.append(name) or fn(*a)

    fake = type("Ops", (), {n: staticmethod(traced(n)) for n in ("row_logsumexp", "cross_entropy_grad")})
    monkeypatch.setattr(_dispatch, "use_triton", lambda x, kernel=None: True)
    monkeypatch.setattr(_dispatch, "triton_ops", lambda: fake)
    monkeypatch.setattr(ops, "_CE_BLOCK", 128)
    return calls


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_vocab_parallel_cross_entropy_uses_triton(ops, monkeypatch, dtype, atol, inplace):
    """The public loss with its Triton path forced (as on CUDA), against the float64 truth."""
    calls = _force_triton_cross_entropy(ops, monkeypatch)
    torch.manual_seed(5)
    logits = (torch.randn(3, 4, 300) * 3).to(dtype).to(DEVICE)
    target = torch.randint(0, 300, (3, 4), device=DEVICE)
    got = _grads(
        lambda t: kernels.vocab_parallel_cross_entropy(t, target, inplace_backward=inplace), [logits]
    )
    truth = _grads(lambda t: _ce_truth(t, target), [logits.to(F64)])
    assert calls == ["row_logsumexp", "cross_entropy_grad"]
    assert_close_all(got[0] + got[1], truth[0] + truth[1], atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_fused_linear_cross_entropy_uses_triton(ops, monkeypatch, dtype, atol):
    """The fused LM head + loss with its Triton path forced (as on CUDA), over several row blocks: loss
    and both gradients against the float64 truth of ``cross_entropy(x @ w.T)``, every block through the
    Triton log-sum-exp forward and the Triton gradient backward."""
    calls = _force_triton_cross_entropy(ops, monkeypatch)
    torch.manual_seed(9)
    rows, hidden, vocab = 13, 32, 300
    x = torch.randn(rows, hidden).to(dtype).to(DEVICE)
    w = (torch.randn(vocab, hidden) * 0.3).to(dtype).to(DEVICE)
    target = torch.randint(0, vocab, (rows,), device=DEVICE)
    got = _grads(
        lambda a, b: kernels.fused_linear_cross_entropy(a, b, target, chunk_elements=5 * vocab), [x, w]
    )
    truth = _grads(lambda a, b: _ce_truth(a @ b.t(), target), [x.to(F64), w.to(F64)])
    blocks = -(-rows // 5)
    assert calls == ["row_logsumexp"] * blocks + ["cross_entropy_grad"] * blocks
    assert_close_all(got[0] + got[1], truth[0] + truth[1], atol=atol, rtol=atol)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_public_functions_dispatch_to_triton_on_gpu(ops):
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(kernels.swiglu(x), ops.swiglu(x))


# ------------------------------------------------------------------- the whole model through them

# The kernels a forward + backward of each tiny architecture must reach (GeLU models have no SwiGLU;
# only the QK-norm model has the per-head LayerNorm).
_KERNEL_FUNCTIONS = (
    "layer_norm", "add_layer_norm", "per_head_layer_norm", "rms_norm", "add_rms_norm", "per_head_rms_norm",
    "apply_rotary", "apply_rotary_qk", "swiglu", "row_logsumexp", "cross_entropy_grad",
)  # fmt: skip


NATIVE_ON_GPU = pytest.mark.skipif(
    ON_GPU, reason="on a GPU the model runs these kernels natively (tests/test_gpu_trainer.py)"
)


def _both_ways(monkeypatch, cfg, dtype: torch.dtype):
    """Losses and gradients of one forward + backward of the tiny model built from ``cfg`` in
    ``dtype``, through the references and through the Triton kernels; checks that each kernel the
    architecture uses ran (and none on the reference pass)."""
    from megatron_stablelm import parallel
    from megatron_stablelm.kernels import _dispatch
    from megatron_stablelm.model import build_model
    from tests.model_helpers import randomize

    # few tokens: the interpreter runs each program of a kernel's grid in turn, one per row (or head)
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(tokens, -1, dims=1)
    module = _dispatch.triton_ops()
    calls: dict[str, int] = {}

    def counted(name: str, fn):
        def run(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return run

    for name in _KERNEL_FUNCTIONS:
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    results = {}
    parallel.initialize(1)
    try:
        model = build_model(cfg, 256, dtype=dtype, seed=5)
        randomize(model, 5)
        for mode in ("reference", "triton"):
            monkeypatch.setenv(_dispatch.ENV_VAR, mode)
            model.zero_grad(set_to_none=True)
            losses = model(tokens, labels=labels)
            losses.float().mean().backward()
            grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
            results[mode] = (losses.detach().float(), grads)
            if mode == "reference":
                assert not calls, calls
    finally:
        parallel.destroy()
    expected = {"row_logsumexp", "cross_entropy_grad", "apply_rotary_qk"}
    expected |= {"swiglu"} if cfg.is_gated_mlp and cfg.act_fn_name == "silu" else set()
    rms = cfg.norm == "rmsnorm"
    expected |= {"per_head_rms_norm" if rms else "per_head_layer_norm"} if cfg.qk_norm else set()
    assert expected <= calls.keys(), calls
    assert calls.keys() & ({"rms_norm", "add_rms_norm"} if rms else {"layer_norm", "add_layer_norm"}), calls
    assert results["triton"][1].keys() == results["reference"][1].keys()
    return results["reference"], results["triton"]


@NATIVE_ON_GPU
@pytest.mark.parametrize(
    "arch,fused_loss",
    [(a, False) for a in TINY_ARCHS] + [("stablelm-2-1_6b", True)],  # the fused loss: Stable LM 2's YAMLs
    ids=[*TINY_ARCHS, "stablelm-2-1_6b-fused_lm_head_loss"],
)
def test_whole_model_through_the_kernels_equals_the_references(arch, fused_loss, monkeypatch):
    """Each tiny architecture's losses and every parameter's gradient with the element-wise kernels on
    Triton (``MEGATRON_STABLELM_KERNELS=triton``, interpreted on CPU) equal those with the PyTorch
    references: the kernels receive the shapes, strides and dtypes the real model gives them (partial
    rotary, GQA, QK-norm, parallel residual, norm biases or none, the fused LM head)."""
    from tests.model_helpers import tiny_config

    cfg = tiny_config(arch, use_flash_cross_entropy=fused_loss)
    (ref_loss, ref_grads), (loss, grads) = _both_ways(monkeypatch, cfg, torch.float32)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@NATIVE_ON_GPU
def test_whole_model_through_the_kernels_in_bf16(monkeypatch):
    """The same in bf16, the GPU's compute dtype, for Stable LM 2 with the fused LM head + loss. The two
    paths round differently, so each loss agrees within 2**-8 relative (bf16 keeps 8 significant bits) and
    each gradient within 5% of its norm (measured: 1.4% at most)."""
    from tests.model_helpers import tiny_config

    cfg = tiny_config("stablelm-2-1_6b", use_flash_cross_entropy=True)
    (ref_loss, ref_grads), (loss, grads) = _both_ways(monkeypatch, cfg, torch.bfloat16)
    torch.testing.assert_close(loss, ref_loss, rtol=2**-8, atol=0)
    for name in ref_grads:
        error = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12)
        assert error < 5e-2, (name, error.item())


@NATIVE_ON_GPU
def test_rmsnorm_in_the_other_block_layouts_through_the_kernels(monkeypatch):
    """``norm: rmsnorm`` wherever a config puts a norm beside Llama's sequential block: a parallel
    residual with two norms and the per-head QK-norm (RMSNorm per head), through the Triton kernels and
    through the references."""
    from tests.model_helpers import tiny_config

    cfg = tiny_config("llama-2", gpt_j_residual=True, qk_norm=True)
    (ref_loss, ref_grads), (loss, grads) = _both_ways(monkeypatch, cfg, torch.float32)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert any(".q_norm." in name for name in ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
