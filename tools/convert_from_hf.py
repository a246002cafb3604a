#!/usr/bin/env python
"""Hugging Face model directory → framework checkpoint, split for any tensor-parallel size.

    python tools/convert_from_hf.py HF_DIR OUT_DIR [--tp N] [--config CONFIG.yml ...]

OUT_DIR becomes a run directory holding ``iter_0000000/`` and a ``latest`` pointer, so a training
config can ``load`` it. The architecture comes from the HF ``config.json``; with ``--config`` the
given YAML files are merged over it (training settings, tokenizer...) and every architectural key
must agree with the checkpoint. HF tensors the framework cannot represent (non-zero biases where the
config has none, ...) are refused with the tensor's name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_stablelm import checkpoint, hf_conversion
from megatron_stablelm.cli import run_command
from megatron_stablelm.config import ARCHITECTURE_KEYS, ConfigError, load_config
from megatron_stablelm.model import canonical_shapes


def convert_from_hf(
    hf_dir: str | Path, out: str | Path, tp: int = 1, configs: list[str] | None = None
) -> Path:
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite it")
    hf_cfg, tensors = hf_conversion.read_hf_dir(hf_dir)
    norm_bias = hf_conversion.hf_norm_bias_used(hf_cfg, tensors)
    cfg = hf_conversion.config_from_hf(hf_cfg, norm_bias, overrides={"model_parallel_size": tp})
    if configs:
        user = load_config(
            configs, overrides={"model_parallel_size": tp, "padded_vocab_size": hf_cfg["vocab_size"]}
        )
        for key in ARCHITECTURE_KEYS:
            if getattr(user, key) != getattr(cfg, key):
                raise ConfigError(
                    f"{', '.join(configs)}: '{key}' is {getattr(user, key)!r} but the HF checkpoint has "
                    f"{getattr(cfg, key)!r}"
                )
        cfg = user
    vocab = hf_cfg["vocab_size"]
    shapes = canonical_shapes(cfg, vocab)
    canonical = hf_conversion.from_hf_state_dict(cfg, tensors, list(shapes))
    for name, shape in shapes.items():
        if tuple(canonical[name].shape) != shape:
            raise hf_conversion.ConversionError(
                f"'{name}': HF gives {tuple(canonical[name].shape)}, expected {shape}"
            )
    out.mkdir(parents=True)
    name = checkpoint.iteration_dirname(0)
    checkpoint.save_canonical_model(out / name, cfg, canonical, vocab, tp)
    checkpoint.write_latest(out, name)
    return out


def _convert(args: argparse.Namespace) -> int:
    print(f"wrote {convert_from_hf(args.hf_dir, args.out, args.tp, args.config)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("hf_dir")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to split for")
    parser.add_argument(
        "--config", nargs="*", default=None, help="YAML configs merged over the HF architecture"
    )
    return run_command(_convert, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
