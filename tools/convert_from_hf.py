#!/usr/bin/env python
"""Hugging Face model directory → framework checkpoint, split for any tensor-parallel size.

    python tools/convert_from_hf.py HF_DIR OUT_DIR [--tp N] [--config CONFIG.yml ...] [--force]

OUT_DIR becomes a run directory holding ``iter_0000000/`` and a ``latest`` pointer, so a training
config can ``load`` it. The architecture comes from the HF ``config.json``, read by ``transformers``'
own config class (an absent key means what it means to ``transformers``); what the framework cannot
compute the same way (RoPE scaling, another activation) is refused. With ``--config`` the given YAML
files are merged over it (training settings, tokenizer...; a file may hold only those) and every
architectural key they set must agree with the checkpoint. HF tensors the framework cannot represent
(non-zero biases where the config has none, ...) are refused with the tensor's name. A vocabulary
that does not split over ``--tp`` ranks is padded with zero rows, as the trainer pads.

The HF directory's tokenizer (a ``.tiktoken`` ranks file, else ``tokenizer.json``, else a SentencePiece
``tokenizer.model``) is copied into
``OUT_DIR/tokenizer/`` and the saved config points at it, so ``tools/generate.py OUT_DIR`` needs no
``--tokenizer`` (unless ``--config`` names its own ``vocab_file``). OUT_DIR must not exist unless
``--force``: the new run directory is written under a staging name and replaces the old one only once
it is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

from megatron_stablelm import checkpoint, hf_conversion
from megatron_stablelm.checkpoint.atomic import check_destination
from megatron_stablelm.cli import positive_int, run_command
from megatron_stablelm.config import (
    ALIASES,
    ARCHITECTURE_KEYS,
    FIELDS,
    Config,
    ConfigError,
    load_config,
    read_yaml,
    validate_config,
)
from megatron_stablelm.tokenizers import TokenizerError, build_tokenizer, tokenizer_in_directory

TOKENIZER_DIR = "tokenizer"
# The keys that spell the MLP together (its kind, activation and width rule): a YAML giving any of them
# gives the MLP in its own spelling (GPT-NeoX's ``activation: swiglu`` + ``intermediate_size``, say),
# which replaces the import's whole (``mlp_type: llama`` + the HF width); the widths are then compared.
MLP_KEYS = (
    "mlp_type",
    "activation",
    "bias_gelu_fusion",
    "intermediate_size",
    "expansion_factor",
    "mlp_multiple_of",
)


def _merged_config(cfg: Config, configs: list[str], settings: dict) -> Config:
    """The HF model's config with every key the YAML files set on top, validated as one config (errors
    name the file that set the key). The files may be partial (only ``train_iters``, a tokenizer...):
    the HF ``config.json`` gives the architecture, so nothing the model needs is missing."""
    user = load_config(configs, overrides=settings, validate=False)
    origin = {ALIASES.get(key, key): str(path) for path in configs for key in read_yaml(path)}
    given = {key: getattr(user, key) for key in origin if key in FIELDS}
    if any(key in given for key in MLP_KEYS):
        given = {**{key: getattr(user, key) for key in MLP_KEYS}, **given}
    merged = dataclasses.replace(
        cfg, **{**given, "config_files": user.config_files, "ignored_keys": user.ignored_keys}
    )
    validate_config(merged, origin)
    _check_user_config(merged, cfg, configs)
    return merged


def _check_user_config(user: Config, cfg: Config, configs: list[str]) -> None:
    """Every architectural key of the merged config must equal the checkpoint's."""
    for key in ARCHITECTURE_KEYS:
        if getattr(user, key) != getattr(cfg, key):
            tanh_only = (user.act_fn_name, cfg.act_fn_name) == ("gelu_tanh", "gelu")
            hint = " (bias_gelu_fusion: false imports it as it was released)" if tanh_only else ""
            raise ConfigError(
                f"{', '.join(configs)}: '{key}' is {getattr(user, key)!r} but the HF checkpoint has "
                f"{getattr(cfg, key)!r}{hint}"
            )


def _kept_tokenizer(hf_dir: Path, out: Path, vocab: int) -> tuple[str, Path, Path] | None:
    """``(tokenizer_type, source file, path in the final run directory)`` of the HF directory's
    tokenizer, checked to load and to fit the model's vocabulary; None if it has none."""
    found = tokenizer_in_directory(hf_dir)
    if found is None:
        return None
    kind, source = found
    try:
        tokenizer = build_tokenizer(tokenizer_type=kind, vocab_file=str(source))
    except TokenizerError as err:
        print(f"note: the HF tokenizer is not kept ({err}); give one with --config", file=sys.stderr)
        return None
    if tokenizer.vocab_size > vocab:
        raise hf_conversion.ConversionError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} ids but the model only {vocab}"
        )
    return kind, source, (out / TOKENIZER_DIR / source.name).resolve()


def convert_from_hf(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    configs: list[str] | None = None,
    force: bool = False,
) -> Path:
    """Write the HF model in ``hf_dir`` as the run directory ``out``, split for ``tp`` ranks. Every
    input (output path, config.json, tensor files and shapes, YAML files) is checked before
    megatron-core is imported or anything is written."""
    hf_dir = Path(hf_dir)
    out = check_destination(out, hf_dir, force, f"the HF model {hf_dir} being converted", "output")
    hf_cfg, tensors = hf_conversion.read_hf_dir(hf_dir)
    norm_bias = hf_conversion.hf_norm_bias_used(hf_cfg, tensors)
    vocab = hf_conversion.hf_config_from_dict(hf_cfg).vocab_size
    padded = hf_conversion.padded_import_vocab(Config(), vocab, tp)
    settings = {"model_parallel_size": tp, "padded_vocab_size": padded}
    cfg = hf_conversion.config_from_hf(hf_cfg, norm_bias, overrides=settings)
    if configs:
        cfg = _merged_config(cfg, configs, settings)
    hf_conversion.check_hf_shapes(cfg, hf_cfg, tensors, vocab)
    tokenizer = None if cfg.vocab_file else _kept_tokenizer(hf_dir, out, vocab)
    if tokenizer is not None:
        cfg = dataclasses.replace(cfg, tokenizer_type=tokenizer[0], vocab_file=str(tokenizer[2]))
    from megatron_stablelm.model import canonical_shapes  # megatron-core: only once the input is checked

    shapes = canonical_shapes(cfg, padded)
    canonical = hf_conversion.from_hf_state_dict(cfg, tensors, list(shapes))
    canonical = hf_conversion.pad_vocab_rows(canonical, padded)
    for name, shape in shapes.items():
        if tuple(canonical[name].shape) != shape:
            raise hf_conversion.ConversionError(
                f"'{name}': HF gives {tuple(canonical[name].shape)}, expected {shape}"
            )
    name = checkpoint.iteration_dirname(0)
    with checkpoint.StagedDirectory(out, overwrite=force) as tmp:
        checkpoint.save_canonical_model(tmp / name, cfg, canonical, padded, tp, vocab_size=vocab)
        checkpoint.write_latest(tmp, name)
        if tokenizer is not None:
            (tmp / TOKENIZER_DIR).mkdir()
            shutil.copy(tokenizer[1], tmp / TOKENIZER_DIR / tokenizer[1].name)
    return out


def _convert(args: argparse.Namespace) -> int:
    print(f"wrote {convert_from_hf(args.hf_dir, args.out, args.tp, args.config, args.force)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("hf_dir")
    parser.add_argument("out")
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size to split for")
    parser.add_argument(
        "--config", nargs="*", default=None, help="YAML configs merged over the HF architecture"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace OUT_DIR (only once the new one is complete)"
    )
    return run_command(_convert, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
