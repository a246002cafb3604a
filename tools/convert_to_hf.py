#!/usr/bin/env python
"""Framework checkpoint → Hugging Face model directory (``config.json`` + ``model.safetensors``).

    python tools/convert_to_hf.py CHECKPOINT OUT_DIR [--dtype fp32|bf16|fp16]

CHECKPOINT is a checkpoint directory or a run directory with a ``latest`` file. The output loads with
``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` as ``StableLmForCausalLM`` (or
``GPTNeoXForCausalLM`` for StableLM-Base-Alpha v1). OUT_DIR must not exist yet; it is written under a
temporary name and renamed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from megatron_stablelm import checkpointing, hf_conversion

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert_to_hf(
    checkpoint: str | Path, out: str | Path, dtype: str = "fp32", tokenizer_files: list[Path] | None = None
) -> Path:
    ckpt = checkpointing.resolve_checkpoint(checkpoint)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite it")
    cfg = checkpointing.read_config(ckpt)
    meta = checkpointing.read_meta(ckpt)
    hf_conversion.architecture_for(cfg)  # refuse early, before reading tensors
    state = checkpointing.load_canonical_state_dict(ckpt)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        hf_conversion.write_hf_dir(tmp, cfg, state, meta["padded_vocab_size"], DTYPES[dtype])
        for f in tokenizer_files or []:
            shutil.copy(f, tmp / Path(f).name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    try:
        out = convert_to_hf(args.checkpoint, args.out, args.dtype)
    except (checkpointing.CheckpointError, hf_conversion.ConversionError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
