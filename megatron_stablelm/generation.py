"""Text generation from a framework checkpoint at any tensor-parallel size, with a KV cache.

Used by ``tools/generate.py`` and by the lm-eval adapter (:mod:`megatron_stablelm.evaluation`).

Every TP rank runs the same loop: the model returns vocab-parallel logits ``[b, s, V/tp]``, which are
gathered over the TP group (sampling needs the whole distribution), the next token is chosen on the
CPU with a seeded generator (so a seed gives the same text on CPU and GPU) and broadcast from the TP
group's first rank, so that every rank feeds the same token back even if floating point ever made the
ranks' logits differ. Prompts of equal length are batched together; prompts of different lengths go
in different batches, which keeps the KV cache free of padding and the result exactly what a
one-prompt-at-a-time run gives (the property the ``transformers`` parity test relies on).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_stablelm import parallel
from megatron_stablelm.checkpoint import CheckpointError, load_into_model, read_header
from megatron_stablelm.checkpoint.meta import ModelMeta
from megatron_stablelm.checkpoint.model_files import config_at_tp_size
from megatron_stablelm.config import Config, ConfigError
from megatron_stablelm.config.precision import SHORT_NAMES, torch_dtype
from megatron_stablelm.model import InferenceCache, StableLMModel
from megatron_stablelm.parallelize import parallelize
from megatron_stablelm.tokenizers import load_tokenizer

__all__ = [
    "GenerationError",
    "LoadedModel",
    "SamplingParams",
    "check_prompts",
    "gather_vocab",
    "generate",
    "load_checkpoint_model",
    "load_tokenizer",
    "resolve_device",
    "sample_next",
]


class GenerationError(ValueError):
    """Bad generation input (empty prompt, too long a sequence, invalid sampling settings)."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``greedy`` ignores the rest. ``top_k`` 0 and ``top_p`` 1.0 mean
    no truncation; temperature divides the logits before top-k/top-p (as ``transformers`` does)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.greedy:
            if self.temperature <= 0:
                raise GenerationError(f"temperature must be > 0 for sampling, got {self.temperature}")
            if self.top_k < 0:
                raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
            if not 0.0 < self.top_p <= 1.0:
                raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class LoadedModel:
    """A model filled from a checkpoint, with what built it."""

    cfg: Config
    model: StableLMModel
    meta: ModelMeta
    checkpoint: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, by default cuda:LOCAL_RANK when CUDA is available, else the CPU. A device this machine
    lacks is refused naming it here, before a model is built (torch would fail later, deep in the model
    code)."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise GenerationError(f"device {str(device)!r}: not a torch device ({err})") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise GenerationError(f"device {str(device)!r}: this machine has {count} CUDA device(s)")
    return resolved


def load_checkpoint_model(
    checkpoint: str | Path,
    *,
    tp_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | None = None,
) -> LoadedModel:
    """Read the checkpoint's config and metadata, start the process groups (TP = ``tp_size``, default
    the launcher's world size) and load this rank's shards, re-split if the checkpoint was saved at
    another TP size. The checkpoint is validated before any process group exists, so a bad path fails
    with a :class:`~megatron_stablelm.checkpoint.CheckpointError` naming it and nothing to clean up."""
    device = resolve_device(device)
    ckpt, meta, cfg = read_header(checkpoint)
    if tp_size is None:
        tp_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = config_at_tp_size(ckpt, meta, cfg, tp_size, "run")
    vocab = meta.padded_vocab_size
    name = dtype or meta.dtype or "float32"  # a checkpoint records torch's name of its dtype
    if name not in SHORT_NAMES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(SHORT_NAMES)}")
    parallel.initialize(tp_size, backend="nccl" if device.type == "cuda" else "gloo")
    model = parallelize(StableLMModel(cfg, vocab, dtype=torch_dtype(name)), cfg)
    try:
        load_into_model(ckpt, model, parallel.tp_rank(), parallel.tp_size())
    except CheckpointError:
        raise
    except Exception as err:  # safetensors' errors do not name the file
        raise CheckpointError(f"{ckpt}: cannot read the model shards ({err})") from None
    return LoadedModel(cfg, model.to(device).eval(), meta, ckpt)


def gather_vocab(local: torch.Tensor) -> torch.Tensor:
    """Whole-vocabulary logits from this rank's vocab-parallel slice (last dim), in rank order."""
    size = parallel.tp_size()
    if size == 1:
        return local
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local, group=parallel.tp_group())
    return torch.cat(parts, dim=-1)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Next token ids ``[b]`` from whole-vocabulary logits ``[b, V]`` (on the CPU, fp32)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, index = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # drop a token when the tokens before it already cover top_p (the first one always stays)
        drop = probs.cumsum(dim=-1) - probs > params.top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, index, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _broadcast_from_tp_src(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    if parallel.tp_size() == 1:
        return tokens.to(device)
    from megatron.core import parallel_state

    tokens = tokens.to(device)
    dist.broadcast(tokens, src=parallel_state.get_tensor_model_parallel_src_rank(), group=parallel.tp_group())
    return tokens


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, limit: int) -> None:
    """Every prompt has a token and fits the model's ``limit`` positions with ``max_new_tokens`` more;
    a command calls it before loading the model, :func:`generate` before decoding."""
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty (it needs at least one token)")
        if len(prompt) + max_new_tokens > limit:
            raise GenerationError(
                f"prompt {i} has {len(prompt)} tokens; with {max_new_tokens} new tokens that exceeds the "
                f"model's {limit} positions"
            )


@torch.no_grad()
def generate(
    model: StableLMModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    *,
    eos_id: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    seed: int = 0,
    vocab_limit: int | None = None,
    batch_size: int = 8,
) -> list[list[int]]:
    """New token ids for each prompt (the prompt itself not included), in the prompts' order.

    Generation of a prompt ends after ``max_new_tokens``, after ``eos_id`` (kept in the output), or
    when ``stop(new_ids)`` says so. ``vocab_limit`` (the tokenizer's size) keeps the padding rows of
    the embedding from ever being sampled. Call on every TP rank with the same arguments."""
    params = params or SamplingParams()
    check_prompts(prompts, max_new_tokens, model.cfg.max_positions)
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    results: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return results
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for length, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            tokens = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)
            cache = InferenceCache(model, len(chunk), length + max_new_tokens)
            logits = model(tokens, cache=cache)[:, -1]
            done = [False] * len(chunk)
            for step in range(max_new_tokens):
                full = gather_vocab(logits).float().cpu()
                if vocab_limit is not None and vocab_limit < full.shape[-1]:
                    full[:, vocab_limit:] = float("-inf")
                chosen = _broadcast_from_tp_src(sample_next(full, params, generator), device)
                for row, token in enumerate(chosen.tolist()):
                    if done[row]:
                        continue
                    out = results[chunk[row]]
                    out.append(token)
                    if token == eos_id or (stop is not None and stop(out)):
                        done[row] = True
                if all(done) or step == max_new_tokens - 1:
                    break
                logits = model(chosen.view(-1, 1), cache=cache)[:, -1]
    return results
