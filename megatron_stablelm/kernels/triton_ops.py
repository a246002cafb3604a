"""Triton kernels for the memory-bound element-wise parts of a StableLM (or Llama) layer.

Why hand-written Triton: each of these ops reads and writes an activation once, so on a GPU they are
pure memory traffic. PyTorch's eager reference launches several kernels per op (e.g. rotary: slice,
negate, cat, two multiplies, add, cat) and saves intermediates for backward; one fused kernel per
op reads its input once and saves only what backward needs (SwiGLU saves its input, LayerNorm saves
its input plus two floats per row; RMSNorm runs the same kernels without the mean). All arithmetic is
fp32 in registers whatever the storage dtype.

Every function here has the signature of its reference in the sibling modules and is tested against
it (and against float64) on CPU under ``TRITON_INTERPRET=1``. Importing this module imports Triton;
``_dispatch`` only does so for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------- SwiGLU


@triton.jit
def _swiglu_fwd(x_ptr, out_ptr, n_out, width, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_out
    row = offs // width
    col = offs % width
    gate = tl.load(x_ptr + row * 2 * width + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * width + width + col, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(x_ptr, grad_ptr, dx_ptr, n_out, width, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_out
    row = offs // width
    col = offs % width
    gate_off = row * 2 * width + col
    gate = tl.load(x_ptr + gate_off, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + gate_off + width, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = g * silu
    tl.store(dx_ptr + gate_off, d_gate.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + gate_off + width, d_up.to(dx_ptr.dtype.element_ty), mask=mask)


_EW_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        width = x.shape[-1] // 2
        out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
        n = out.numel()
        if n:
            _swiglu_fwd[(triton.cdiv(n, _EW_BLOCK),)](x, out, n, width, BLOCK=_EW_BLOCK)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch.empty_like(x)
        n = grad.numel()
        if n:
            _swiglu_bwd[(triton.cdiv(n, _EW_BLOCK),)](x, grad, dx, n, x.shape[-1] // 2, BLOCK=_EW_BLOCK)
        return dx


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]``; saves only ``x`` for backward."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim, got {x.shape[-1]}")
    return _SwiGLU.apply(x)


# ----------------------------------------------------------------------------------------- rotary


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    cos_ptr,
    sin_ptr,
    token,
    stride_t,
    stride_h,
    n_heads,
    head_dim,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Rotate every head of one token. Forward: ``[x1, x2] -> [x1 c1 - x2 s1, x2 c2 + x1 s2]``;
    backward applies the transpose, ``[g1 c1 + g2 s2, g2 c2 - g1 s1]``."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    hmask = heads < n_heads
    rmask = hmask & (cols < half)
    src = src_ptr + token * stride_t + heads * stride_h
    dst = dst_ptr + token * n_heads * head_dim + heads * head_dim
    c1 = tl.load(cos_ptr + token * 2 * half + cols, mask=cols < half, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + token * 2 * half + half + cols, mask=cols < half, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + token * 2 * half + cols, mask=cols < half, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + token * 2 * half + half + cols, mask=cols < half, other=0.0).to(tl.float32)
    x1 = tl.load(src + cols, mask=rmask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + cols, mask=rmask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(dst + cols, o1.to(dst_ptr.dtype.element_ty), mask=rmask)
    tl.store(dst + half + cols, o2.to(dst_ptr.dtype.element_ty), mask=rmask)
    if BLOCK_PASS > 0:
        pcols = 2 * half + tl.arange(0, BLOCK_PASS)[None, :]
        pmask = hmask & (pcols < head_dim)
        tl.store(dst + pcols, tl.load(src + pcols, mask=pmask, other=0.0), mask=pmask)


@triton.jit
def _rotary_qk_kernel(
    q_ptr,
    k_ptr,
    oq_ptr,
    ok_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    n_q_heads,
    n_k_heads,
    head_dim,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
    HAS_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    _rotate_heads(
        q_ptr, oq_ptr, cos_ptr, sin_ptr, token, stride_qt, stride_qh, n_q_heads, head_dim, half,
        BLOCK_HQ, BLOCK_HALF, BLOCK_PASS, BACKWARD,
    )  # fmt: skip
    if HAS_K:
        _rotate_heads(
            k_ptr, ok_ptr, cos_ptr, sin_ptr, token, stride_kt, stride_kh, n_k_heads, head_dim, half,
            BLOCK_HK, BLOCK_HALF, BLOCK_PASS, BACKWARD,
        )  # fmt: skip


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., heads, d]`` as ``[tokens, heads, d]`` with unit stride on ``d`` (a view when possible)."""
    x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def _rotary_launch(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    lead = q.shape[:-2]
    rotary_dim = cos.shape[-1]
    head_dim = q.shape[-1]
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_dim {head_dim}")
    cos2 = cos.expand(*lead, rotary_dim).reshape(-1, rotary_dim).contiguous()
    sin2 = sin.expand(*lead, rotary_dim).reshape(-1, rotary_dim).contiguous()
    q3 = _rows(q)
    oq = torch.empty(q3.shape, dtype=q.dtype, device=q.device)
    k3 = _rows(k) if k is not None else q3
    ok = torch.empty(k3.shape, dtype=k3.dtype, device=k3.device) if k is not None else oq
    if q3.shape[0]:
        _rotary_qk_kernel[(q3.shape[0],)](
            q3, k3, oq, ok, cos2, sin2,
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1),
            q3.shape[1], k3.shape[1], head_dim, rotary_dim // 2,
            BLOCK_HQ=triton.next_power_of_2(q3.shape[1]),
            BLOCK_HK=triton.next_power_of_2(k3.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(max(rotary_dim // 2, 1)),
            BLOCK_PASS=triton.next_power_of_2(head_dim - rotary_dim) if head_dim > rotary_dim else 0,
            BACKWARD=backward,
            HAS_K=k is not None,
        )  # fmt: skip
    oq = oq.view(q.shape)
    return oq, (ok.view(k.shape) if k is not None else None)


class _RotaryQK(torch.autograd.Function):
    """cos/sin are functions of the positions only and get no gradient."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.has_k = k is not None
        return _rotary_launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        if gq is None:
            gq = torch.zeros(())  # never happens for the model; keep autograd's contract simple
        dq, dk = _rotary_launch(gq, gk if ctx.has_k else None, cos, sin, backward=True)
        return dq, dk, None, None


def apply_rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys in one kernel launch (one program per token handles all Q and K heads)."""
    q_out, k_out = _RotaryQK.apply(q, k, cos, sin)
    return q_out, k_out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _RotaryQK.apply(x, None, cos, sin)[0]


# -------------------------------------------------------------------------------------- LayerNorm


@triton.jit
def _ln_fwd(
    x_ptr,
    res_ptr,
    sum_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    n_cols,
    heads,
    eps,
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RMS: tl.constexpr,
):
    """LayerNorm, or with ``RMS`` RMSNorm (no centring: the mean stored is 0, ``rstd`` is
    ``1 / sqrt(mean(x^2) + eps)``)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        # normalise the rounded sum that is stored, so forward and backward see the same input
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * n_cols + cols, x, mask=mask)
        x = x.to(tl.float32)
    if RMS:
        mean = 0.0
    else:
        mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    param = (row % heads) * n_cols + cols
    w = tl.load(w_ptr + param, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(b_ptr + param, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _ln_bwd(
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dy_ptr,
    dsum_ptr,
    dx_ptr,
    dw_part_ptr,
    db_part_ptr,
    n_rows,
    n_cols,
    heads,
    n_programs,
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    RMS: tl.constexpr,
):
    """With ``RMS`` the gradient of RMSNorm (no mean term). Each program walks rows ``pid, pid + n_programs, ...``; ``n_programs`` is a multiple of
    ``heads`` so all of a program's rows use the same head's weights and its partial dw/db belong to
    that head."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    head = pid % heads
    w = tl.load(w_ptr + head * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    first_row = pid.to(tl.int64)
    for i in range(0, tl.cdiv(n_rows, n_programs)):
        row = first_row + i * n_programs
        cmask = mask & ((cols * 0 + row) < n_rows)  # tensor-shaped: the interpreter rejects scalar masks
        row = tl.minimum(row, n_rows - 1)  # past-the-end iterations read a valid row and store nothing
        base = row * n_cols
        x = tl.load(x_ptr + base + cols, mask=cmask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + base + cols, mask=cmask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(cmask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / n_cols
        if RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            c2 = tl.sum(wdy, axis=0) / n_cols
            dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DSUM:
            dx += tl.load(dsum_ptr + base + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + base + cols, dx.to(dx_ptr.dtype.element_ty), mask=cmask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(dw_part_ptr + pid * n_cols + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid * n_cols + cols, db, mask=mask)


def _bwd_programs(rows: int, heads: int, device: torch.device) -> int:
    """Enough programs to fill the GPU, rounded to a multiple of ``heads``, never more than needed."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: each program is a Python loop; fewer is faster
    per_head = max(1, min(target // heads or 1, triton.cdiv(rows, heads)))
    return per_head * heads


class _LayerNorm(torch.autograd.Function):
    """LayerNorm, or RMSNorm with ``rms`` (then ``bias`` is None)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, heads, rms=False):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        rows = x2.shape[0]
        if rows % heads:
            raise ValueError(f"{rows} rows are not a whole number of {heads} heads")
        y = torch.empty_like(x2)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        has_res = residual is not None
        if has_res:
            res2 = residual.reshape(-1, n).contiguous()
            total = torch.empty_like(x2)
        else:
            res2 = total = x2
        w = weight.contiguous()
        b = bias.contiguous() if bias is not None else w
        if rows:
            _ln_fwd[(rows,)](
                x2, res2, total, w, b, y, mean, rstd, n, heads, eps,
                BLOCK=triton.next_power_of_2(n), HAS_BIAS=bias is not None, HAS_RES=has_res, RMS=rms,
            )  # fmt: skip
        ctx.save_for_backward(total, w, mean, rstd)
        ctx.has_bias, ctx.has_res, ctx.heads, ctx.shape = bias is not None, has_res, heads, x.shape
        ctx.rms = rms
        ctx.bias_dtype = bias.dtype if bias is not None else None
        y = y.view(x.shape)
        return (y, total.view(x.shape)) if has_res else (y, None)

    @staticmethod
    def backward(ctx, dy, dsum):
        x2, w, mean, rstd = ctx.saved_tensors
        rows, n = x2.shape
        heads = ctx.heads
        dy2 = dy.reshape(rows, n).contiguous()
        has_dsum = ctx.has_res and dsum is not None
        dsum2 = dsum.reshape(rows, n).contiguous() if has_dsum else dy2
        dx = torch.empty_like(x2)
        programs = _bwd_programs(rows, heads, x2.device)
        dw_part = torch.zeros(programs, n, dtype=torch.float32, device=x2.device)
        db_part = torch.zeros_like(dw_part) if ctx.has_bias else dw_part
        if rows:
            _ln_bwd[(programs,)](
                x2, w, mean, rstd, dy2, dsum2, dx, dw_part, db_part, rows, n, heads, programs,
                BLOCK=triton.next_power_of_2(n), HAS_BIAS=ctx.has_bias, HAS_DSUM=has_dsum, RMS=ctx.rms,
            )  # fmt: skip
        dw = dw_part.view(-1, *w.shape).sum(0).to(w.dtype)
        db = db_part.view(-1, *w.shape).sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
        dx = dx.view(ctx.shape)
        return dx, (dx if ctx.has_res else None), dw, db, None, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _LayerNorm.apply(x, None, weight, bias, eps, 1)[0]


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(x + residual), x + residual)`` reading each input once."""
    y, total = _LayerNorm.apply(x, residual, weight, bias, eps, 1)
    return y, total


def per_head_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    heads = weight.shape[0]
    if x.shape[-2] != heads:
        raise ValueError(f"x has {x.shape[-2]} heads, weight has {heads}")
    return _LayerNorm.apply(x, None, weight, bias, eps, heads)[0]


# ---------------------------------------------------------------------------------------- RMSNorm
# The LayerNorm kernels with ``RMS``: one read of the input, ``rstd`` saved per row.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _LayerNorm.apply(x, None, weight, None, eps, 1, True)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` reading each input once."""
    y, total = _LayerNorm.apply(x, residual, weight, None, eps, 1, True)
    return y, total


def per_head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    heads = weight.shape[0]
    if x.shape[-2] != heads:
        raise ValueError(f"x has {x.shape[-2]} heads, weight has {heads}")
    return _LayerNorm.apply(x, None, weight, None, eps, heads, True)[0]


# ---------------------------------------------------------------------------------- cross-entropy

_CE_BLOCK = 4096


@triton.jit
def _row_lse_kernel(x_ptr, lse_ptr, n_cols, stride_row, BLOCK: tl.constexpr):
    """One program per row: online log-sum-exp over the row in ``BLOCK``-wide pieces (a block-wide
    running max, so fully masked lanes never meet another -inf)."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    tl.store(lse_ptr + row, running_max + tl.log(running_sum))


@triton.jit
def _ce_grad_kernel(
    x_ptr, out_ptr, lse_ptr, target_ptr, grad_loss_ptr, n_cols, stride_row, BLOCK: tl.constexpr
):
    """``out[row] = (softmax(x[row]) - onehot(target[row])) * grad_loss[row]``; ``target < 0`` means the
    target lives on another vocab shard. ``out`` may alias ``x``: each element is read before it is
    written, by the same program."""
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_loss_ptr + row)
    target = tl.load(target_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        p = tl.where(cols == target, p - 1.0, p)
        tl.store(out_ptr + row * stride_row + cols, (p * g).to(out_ptr.dtype.element_ty), mask=mask)


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """fp32 log-sum-exp of each row of a 2-D tensor with unit column stride: one read of ``x``, no
    fp32 copy of it."""
    rows, cols = x.shape
    if x.stride(1) != 1:
        raise ValueError("row_logsumexp needs unit stride along the vocabulary")
    lse = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _row_lse_kernel[(rows,)](
            x, lse, cols, x.stride(0), BLOCK=min(_CE_BLOCK, triton.next_power_of_2(cols))
        )
    return lse


def cross_entropy_grad(
    x: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, grad_loss: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Logits gradient of the per-token loss ``lse - x[target]`` into ``out`` (which may be ``x``):
    one read and one write per element. ``target`` is the index inside this shard, -1 where not owned."""
    rows, cols = x.shape
    if x.stride(1) != 1 or out.stride() != x.stride():
        raise ValueError("cross_entropy_grad needs x and out with the same unit-column-stride layout")
    if rows:
        _ce_grad_kernel[(rows,)](
            x, out, lse.float().contiguous(), target.contiguous(), grad_loss.float().contiguous(),
            cols, x.stride(0), BLOCK=min(_CE_BLOCK, triton.next_power_of_2(cols)),
        )  # fmt: skip
    return out
