"""Model FLOPs per token, device peaks, MFU, peak memory and perplexity: one definition for the
training log (:mod:`megatron_stablelm.training.logging`), ``tools/benchmark.py`` and the evaluation,
so the same step reports the same MFU (and the same loss the same perplexity) in each.

**The convention (primary, "strict"), used for every MFU this project prints unlabelled:**
training FLOPs per token = ``6 × matmul parameters + 6 × layers × seq × heads × head_dim``.

* matmul parameters: per layer the fused QKV projection ``h (n_q + 2 n_kv) d`` (grouped-query
  attention counted as it is), the attention output ``n_q d h`` and the MLP ``h f`` per up/gate
  branch plus ``f h`` down; plus the LM head ``h V``. The input embedding is a lookup, not a matmul,
  and is not counted; norms, rotary and other element-wise work are not counted either.
* ``6 ×``: a matmul costs 2 FLOPs per weight and token forward and twice that backward.
* attention: the scores ``Q K^T`` and the weighted sum ``P V`` cost ``2 · 2 · s · n_q · d`` per token
  and layer forward over a full row; causal attention computes half of it (the triangle), so
  ``2 s n_q d`` forward and ``6 s n_q d`` forward + backward. With packed documents (shorter causal
  rows) this is an upper bound.
* recomputation (activation checkpointing) is never counted: MFU stays comparable across memory
  settings.

MFU = achieved model FLOP/s per device / the device's dense (no sparsity) datasheet peak for the
training precision (:data:`PEAK_TFLOPS`), or the config's ``peak_tflops`` where it is set.

**The anchors' convention, "6N+12lsh"** (llm-foundry's throughput table, the Megatron papers), always
printed with that label: ``6 × all parameters`` (the input embedding included, the LM head counted
again when untied) ``+ 12 × layers × seq × hidden`` for attention, i.e. the full score matrix with no
causal discount. It is larger than the strict figure for the same step; compare a published target
only with the figure of its own convention.
"""

from __future__ import annotations

import math
import re
import resource
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_stablelm.config import Config

# Dense (no sparsity) datasheet peaks in TFLOP/s by device-name key and training precision. "fp32" is
# plain FP32 (the trainer does not enable TF32); a precision a device lacks (V100 bf16) is absent, so
# its MFU is not reported. A key matches a device name where it stands as a whole word (``L4`` does not
# match ``L40S``); the longest matching key wins (``H100 PCIe`` before ``H100``).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # H100 SXM ("NVIDIA H100 80GB HBM3"); the benchmark's former "H100 SXM" and "H100 80GB HBM3" keys
    # held the same 989, so the plain key serves them all.
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A800": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},  # the training log had 30.0; datasheet 30.3
    # A10G (AWS g5): the two former tables disagreed, 70 (training log) against 125 (benchmark). 125 is
    # NVIDIA's datasheet figure for the A10, another GA102 part (72 SMs, 31.2 FP32 TFLOP/s); NVIDIA
    # publishes no A10G datasheet (80 SMs at 1.71 GHz: 35 FP32 TFLOP/s). 125 fits neither reading of
    # that chip (the A10's per-SM rate would give 140); 70 is the GA102 rate for BF16/FP16 with FP32
    # accumulation on the parts without the A10's full rate (2 × FP32, as on the RTX 3090). We keep 70,
    # derived from this device's own SMs and clock; it is the lower bound, so MFU may read high if AWS's
    # part has the full rate. Set ``peak_tflops`` in the config to override (both tools honour it).
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6},  # FP32 accumulation (330 with FP16)
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "MI300X": {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4},
    "MI250X": {"bf16": 383.0, "fp16": 383.0, "fp32": 47.9},
}

# Perplexity is exp(loss), with the loss capped here for every report (the training log, TensorBoard,
# W&B, metrics.jsonl, tools/evaluate.py). 80 nats keeps the value finite in each of them: TensorBoard
# stores scalars as float32, whose largest value is exp(88.7) (math.exp itself overflows only past
# 709.78). Nothing is lost: a uniform guess over a 100k-token vocabulary is 11.5 nats, so a loss above
# 80 is a diverged model whose perplexity means nothing, and the loss is always reported beside it.
PERPLEXITY_MAX_LOSS = 80.0


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean token loss in nats, capped at ``exp(PERPLEXITY_MAX_LOSS)`` (see there)."""
    return math.exp(min(loss, PERPLEXITY_MAX_LOSS))


def matmul_params_per_layer(cfg: Config) -> int:
    """Weights of one layer's matmuls: fused QKV (with GQA), attention output, MLP (gated or not)."""
    h, heads, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
    attention = h * (heads + 2 * kv) * d + heads * d * h
    return attention + h * cfg.ffn_hidden_size * (3 if cfg.is_gated_mlp else 2)


def flops_per_token(cfg: Config, vocab_size: int, seq_length: int | None = None) -> float:
    """Training FLOPs per token in the strict convention (module docstring); ``seq_length`` defaults
    to the config's."""
    seq = seq_length or cfg.seq_length
    matmul_params = cfg.num_layers * matmul_params_per_layer(cfg) + cfg.hidden_size * vocab_size
    causal_attention = 6 * cfg.num_layers * seq * cfg.num_attention_heads * cfg.head_dim
    return float(6 * matmul_params + causal_attention)


def flops_per_token_6n_12lsh(cfg: Config, vocab_size: int, seq_length: int | None = None) -> float:
    """Training FLOPs per token in the anchors' 6N+12lsh convention (module docstring)."""
    seq = seq_length or cfg.seq_length
    h, layers = cfg.hidden_size, cfg.num_layers
    embeddings = h * vocab_size * (1 if cfg.tied_embeddings else 2)
    return float(6 * (layers * matmul_params_per_layer(cfg) + embeddings) + 12 * layers * seq * h)


def device_peak_tflops(device_name: str, precision: str) -> float | None:
    """:data:`PEAK_TFLOPS` entry for a device name (as ``torch.cuda.get_device_name`` gives it) and a
    precision (``bf16``/``fp16``/``fp32``); None for an unlisted device or precision."""
    matches = [
        key
        for key in PEAK_TFLOPS
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name)
    ]
    if not matches:
        return None
    return PEAK_TFLOPS[max(matches, key=len)].get(precision)


def peak_tflops(cfg: Config, precision: str, device: torch.device | None = None) -> float | None:
    """The config's ``peak_tflops`` where set, else the dense datasheet peak of ``device`` (default:
    the current CUDA device) for ``precision``; None on a CPU or an unlisted device, where MFU is not
    reported."""
    if cfg.peak_tflops:
        return float(cfg.peak_tflops)
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return None
    return device_peak_tflops(torch.cuda.get_device_name(device), precision)


def tflops_per_device(tokens_per_s: float, flops_per_token: float, devices: int = 1) -> float:
    """Achieved model TFLOP/s per device for a throughput of ``tokens_per_s`` over ``devices``."""
    return tokens_per_s * flops_per_token / devices / 1e12


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation (a fraction), or None without a known ``peak`` (TFLOP/s per device)."""
    if not peak:
        return None
    return tflops_per_device(tokens_per_s, flops_per_token, devices) / peak


def peak_memory_gib(device: torch.device | None = None) -> tuple[float, str]:
    """Peak memory of this process and what was measured: the CUDA allocator's peak (``"GPU"``) on a
    CUDA ``device`` (default: the current one once CUDA is initialised), else the peak resident set
    size (``"RSS"``)."""
    if device is None:
        on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    else:
        on_gpu = device.type == "cuda"
    if on_gpu:
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RSS"  # KiB on Linux


def si_prefixed(n: float) -> str:
    """``n`` with four significant digits and an SI prefix (K, M, G, T, P): token counts, throughputs,
    sizes (append the unit: ``B`` for bytes)."""
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{prefix}"
        n /= 1000.0
    return f"{n:.4g}P"
