"""Tiny versions of every StableLM architecture (``configs/tiny/``), for parity and parallelism tests."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_stablelm.config import Config, load_config

TINY_DIR = Path(__file__).resolve().parents[1] / "configs" / "tiny"
TINY_ARCHS = sorted(p.stem for p in TINY_DIR.glob("*.yml"))


def tiny_config(arch: str, **overrides) -> Config:
    return load_config([TINY_DIR / f"{arch}.yml"], overrides=overrides, report_ignored=False)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every parameter (norm weights and biases too) so that no path is trivially zero or one.
    Only meaningful at TP=1; other layouts get the resulting canonical tensors loaded into them."""
    gen = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        param.add_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * 0.05)
