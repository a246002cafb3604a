"""Vocab-parallel cross-entropy that never holds fp32 logits for the whole vocabulary at once.

Why: with a 100k vocabulary, ``[b*s, V]`` fp32 logits for 8 × 4096 tokens are 13 GB, and the usual
``logits.float()`` before the loss creates exactly that (plus the same again for the softmax saved
for backward). Here the loss walks the rows in chunks, upcasting one ``[chunk, V/tp]`` block at a time,
and saves only the (bf16) logits and one fp32 log-sum-exp per token; backward recomputes the softmax
chunk by chunk. :func:`fused_linear_cross_entropy` goes further and never materialises the logits at
all: the LM-head matmul is done chunk by chunk inside the loss (and again in backward).

Vocab parallelism follows megatron's scheme: each tensor-parallel rank holds a contiguous slice of the
vocabulary, ``[rank * V/tp, (rank + 1) * V/tp)``; the per-token max, sum of exponentials and target
logit are all-reduced over the TP group (three all-reduces of ``[tokens]`` fp32 vectors per call, not
per chunk). With ``group=None`` or a one-rank group nothing is communicated.

On CUDA (with Triton) the per-row log-sum-exp and the backward are each one Triton kernel
(:func:`triton_ops.row_logsumexp`, :func:`triton_ops.cross_entropy_grad`): one read of the bf16 logits
forward, one read and one write backward, where the chunked PyTorch path makes an fp32 copy of each
chunk and several passes over it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_stablelm.kernels import _dispatch

# Logits per block of the fused LM head + loss, in the compute dtype: 2**28 is 512 MiB of bf16 (a sixth
# of Stable LM 2's [16384, 100352] logits at micro-batch 4), ~2,700 rows at V/tp = 100k: blocks large
# enough for efficient GEMMs and few enough (7 there) that summing the fp32 weight gradient is cheap.
FUSED_CHUNK_ELEMENTS = 1 << 28
# fp32 elements per chunk of the unfused loss's PyTorch path (CPU, or no Triton): 2**24 is 64 MiB of
# scratch, small next to a 1.6B model's activations (~170 rows at V/tp = 100k).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if _group_info(group)[1] > 1:
        dist.all_reduce(t, op=op, group=group)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, float64 stays float64 (the tests' ground truth runs through the same code)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_rows(rows: int, width: int, chunk_elements: int) -> int:
    return max(1, min(rows, chunk_elements // max(1, width)))


def _target_local(target: torch.Tensor, vocab_start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each target inside this rank's slice (0 where it lives elsewhere) and the mask of
    targets this rank owns."""
    local = target - vocab_start
    owned = (local >= 0) & (local < width)
    return torch.where(owned, local, torch.zeros_like(local)), owned


def _finish_lse(
    local_max: torch.Tensor, sumexp: torch.Tensor, target_logit: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-rank (max, sum exp(x - max), owned target logit) into the global log-sum-exp and
    loss. ``sumexp`` is rescaled from the local to the global max before the sum all-reduce."""
    global_max = local_max.clone()
    _all_reduce(global_max, dist.ReduceOp.MAX, group)
    sumexp = sumexp * torch.exp(local_max - global_max)
    _all_reduce(sumexp, dist.ReduceOp.SUM, group)
    _all_reduce(target_logit, dist.ReduceOp.SUM, group)
    lse = global_max + torch.log(sumexp)
    return lse, lse - target_logit


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, chunk_elements, inplace_backward):
        rows, width = logits.shape
        rank, _ = _group_info(group)
        local, owned = _target_local(target, rank * width, width)
        acc = _acc_dtype(logits.dtype)
        fused = _dispatch.use_triton(logits, "cross_entropy") and acc == torch.float32
        # Per-rank log-sum-exp (one Triton pass, or torch's fused kernel chunk by chunk); combined
        # across ranks as (max = local lse, sum of exponentials = 1), which _finish_lse rescales to the
        # global max.
        if fused:
            local_lse = _dispatch.triton_ops().row_logsumexp(logits)
        else:
            local_lse = torch.empty(rows, dtype=acc, device=logits.device)
            step = _chunk_rows(rows, width, chunk_elements)
            for start in range(0, rows, step):
                local_lse[start : start + step] = torch.logsumexp(
                    logits[start : start + step].to(acc), dim=-1
                )
        target_logit = logits.gather(1, local[:, None]).squeeze(1).to(acc) * owned
        lse, loss = _finish_lse(local_lse, torch.ones_like(local_lse), target_logit, group)
        ctx.save_for_backward(logits, local, owned, lse)
        ctx.chunk_elements, ctx.inplace, ctx.fused = chunk_elements, inplace_backward, fused
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, local, owned, lse = ctx.saved_tensors
        rows, width = logits.shape
        grad = logits if ctx.inplace else torch.empty_like(logits)
        grad_loss = grad_loss.to(lse.dtype)
        if ctx.fused:
            target = torch.where(owned, local, torch.full_like(local, -1))
            _dispatch.triton_ops().cross_entropy_grad(logits, lse, target, grad_loss, grad)
            return grad, None, None, None, None
        step = _chunk_rows(rows, width, ctx.chunk_elements)
        for start in range(0, rows, step):
            sl = slice(start, start + step)
            probs = logits[sl].to(lse.dtype) - lse[sl, None]  # a new fp32 block; the rest is in place
            probs.exp_()
            probs.scatter_add_(1, local[sl, None], -owned[sl, None].to(lse.dtype))
            probs.mul_(grad_loss[sl, None])
            if step >= rows and not ctx.inplace and probs.dtype == grad.dtype:
                return probs, None, None, None, None  # one chunk: the block is the gradient
            grad[sl] = probs
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Per-token fp32 loss ``[...]`` from this rank's logits slice ``[..., V/tp]`` (any dtype) and
    global target ids ``[...]``.

    ``inplace_backward=True`` writes the gradient into the logits' storage (as megatron does), saving
    one logits-sized buffer; only use it when nothing else needs the logits after the loss.
    """
    width = logits.shape[-1]
    flat = logits.reshape(-1, width)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    loss = _VocabParallelCrossEntropy.apply(flat, target.reshape(-1), group, chunk_elements, inplace_backward)
    return loss.view(target.shape)


@torch.no_grad()
def vocab_parallel_target_log_prob(
    logits: torch.Tensor, target: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For scoring (no autograd): ``log p(target)`` in fp32 (or wider) and whether the target holds
    the largest logit (ties count), ``[...]`` each, from this rank's logits slice ``[..., V/tp]`` and
    global target ids ``[...]``. The log-probability is minus :func:`vocab_parallel_cross_entropy`;
    the argmax check adds two all-reduces of ``[tokens]`` vectors."""
    log_prob = -vocab_parallel_cross_entropy(logits, target, group)
    width = logits.shape[-1]
    flat = logits.reshape(-1, width)
    local, owned = _target_local(target.reshape(-1), _group_info(group)[0] * width, width)
    acc = _acc_dtype(flat.dtype)
    target_logit = flat.gather(1, local[:, None]).squeeze(1).to(acc) * owned
    global_max = flat.amax(dim=-1).to(acc)
    _all_reduce(target_logit, dist.ReduceOp.SUM, group)
    _all_reduce(global_max, dist.ReduceOp.MAX, group)
    return log_prob, (target_logit >= global_max).view(target.shape)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The LM head and the loss, one block of rows at a time. Each block's logits are made by a GEMM in
    the compute dtype (bf16 on GPU: tensor cores), their log-sum-exp and gradient by the same Triton
    kernels as :class:`_VocabParallelCrossEntropy` where it uses them (else the chunked PyTorch path),
    the gradient written over the block; the weight gradient is a compute-dtype GEMM per block, summed
    over blocks in fp32. (It used to upcast each block and run the weight-gradient GEMM in fp32, off
    the tensor cores, over blocks of ~170 rows: 29% slower than the unfused step on an H100.)"""

    @staticmethod
    def forward(ctx, hidden, weight, target, group, chunk_elements, reduce_input_grad):
        rows = hidden.shape[0]
        width = weight.shape[0]
        rank, _ = _group_info(group)
        local, owned = _target_local(target, rank * width, width)
        acc = _acc_dtype(hidden.dtype)
        fused = _dispatch.use_triton(hidden, "cross_entropy") and acc == torch.float32
        local_lse = torch.empty(rows, dtype=acc, device=hidden.device)
        target_logit = torch.empty_like(local_lse)
        step = _chunk_rows(rows, width, chunk_elements)
        for start in range(0, rows, step):
            sl = slice(start, start + step)
            block = hidden[sl] @ weight.t()
            if fused:
                local_lse[sl] = _dispatch.triton_ops().row_logsumexp(block)
            else:
                local_lse[sl] = torch.logsumexp(block.to(acc), dim=-1)
            target_logit[sl] = block.gather(1, local[sl, None]).squeeze(1).to(acc) * owned[sl]
        # combined across ranks as (max = local lse, sum of exponentials = 1), as the unfused loss does
        lse, loss = _finish_lse(local_lse, torch.ones_like(local_lse), target_logit, group)
        ctx.save_for_backward(hidden, weight, local, owned, lse)
        ctx.group, ctx.chunk_elements, ctx.reduce_input_grad = group, chunk_elements, reduce_input_grad
        ctx.fused = fused
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local, owned, lse = ctx.saved_tensors
        rows, width = hidden.shape[0], weight.shape[0]
        acc = lse.dtype
        grad_loss = grad_loss.to(acc)
        grad_hidden = torch.empty_like(hidden)
        # the weight gradient summed over blocks in fp32: adding dozens of compute-dtype partial sums in
        # bf16 would lose the small contributions (each block's own GEMM accumulates in fp32 inside)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        target = torch.where(owned, local, torch.full_like(local, -1)) if ctx.fused else None
        step = _chunk_rows(rows, width, ctx.chunk_elements)
        for start in range(0, rows, step):
            sl = slice(start, start + step)
            block = hidden[sl] @ weight.t()
            if ctx.fused:  # the logits gradient over the block, in place
                _dispatch.triton_ops().cross_entropy_grad(block, lse[sl], target[sl], grad_loss[sl], block)
                dlogits = block
            else:
                probs = torch.exp(block.to(acc) - lse[sl, None])
                probs.scatter_add_(1, local[sl, None], -owned[sl, None].to(acc))
                dlogits = (probs * grad_loss[sl, None]).to(hidden.dtype)
            grad_hidden[sl] = dlogits @ weight
            grad_weight += dlogits.t() @ hidden[sl]
        # each rank holds a vocab slice, so its input gradient is a partial sum (as in megatron's
        # ColumnParallelLinear backward); under sequence parallelism the caller's gather reduce-scatters it
        if ctx.reduce_input_grad:
            _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    chunk_elements: int = FUSED_CHUNK_ELEMENTS,
    reduce_input_grad: bool = True,
) -> torch.Tensor:
    """Per-token fp32 loss of ``hidden @ weight.T`` without materialising the logits.

    ``hidden`` ``[..., h]`` must be the same on every TP rank; ``weight`` is this rank's vocab slice
    ``[V/tp, h]`` of the (possibly tied) output embedding. Each rank's input gradient is a partial sum
    over its vocab slice: with ``reduce_input_grad`` it is all-reduced over ``group`` here, so do *not*
    also route ``hidden`` through megatron's ``copy_to_tensor_model_parallel_region``. Under sequence
    parallelism pass ``reduce_input_grad=False`` and gather ``hidden`` with megatron-core's
    ``gather_from_sequence_parallel_region``, whose backward reduce-scatters the partial sums (half
    the traffic of an all-reduce, and each rank keeps only its positions). Costs one extra LM-head
    matmul (recomputed in backward) in exchange for never storing ``[tokens, V/tp]``.
    """
    h = hidden.shape[-1]
    loss = _FusedLinearCrossEntropy.apply(
        hidden.reshape(-1, h).contiguous(),
        weight,
        target.reshape(-1),
        group,
        chunk_elements,
        reduce_input_grad,
    )
    return loss.view(target.shape)


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Unchunked, single-rank, in the logits' dtype upcast to at least fp32: the ground truth."""
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    loss = torch.nn.functional.cross_entropy(flat, target.reshape(-1), reduction="none")
    return loss.view(target.shape)
