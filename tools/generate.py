#!/usr/bin/env python
r"""Generate text from a framework checkpoint (any tensor-parallel size, CPU or GPU, with a KV cache).

    python tools/generate.py CHECKPOINT --prompt "Once upon a time" [--prompt ...] \
        [--max-new-tokens 64] [--greedy | --temperature 0.8 --top-k 50 --top-p 0.95] [--seed 0] \
        [--format text|jsonl] [--tokenizer tokenizer.json] [--output FILE]
    python tools/generate.py CHECKPOINT --prompt-file prompts.txt        # one prompt per line
    python tools/generate.py CHECKPOINT --prompt-file prompts.jsonl      # {"prompt": "..."} per line
    torchrun --nproc-per-node 2 tools/generate.py CHECKPOINT --prompt ...  # TP=2 (TP = world size)

CHECKPOINT is a checkpoint directory or a run directory with a ``latest`` file, saved at any TP size.
The tokenizer comes from the checkpoint's config (``tokenizer_type``/``vocab_file``) unless
``--tokenizer`` names a ``tokenizer.json``, a ``.tiktoken`` file or a directory holding one. Decoding is
greedy unless a sampling option is given; generation of a prompt stops at the end-of-document token
unless ``--ignore-eod``. Only the first rank prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_stablelm.cli import non_negative_int, positive_int, run_command

if TYPE_CHECKING:
    from megatron_stablelm.generation import SamplingParams


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    """Prompts from the command line and/or a file: ``.jsonl`` (or ``.json``) lines with a string
    ``prompt`` (or ``text``) field, otherwise one prompt per non-empty line. Errors name the file and
    line (a ``.json`` file read as text would silently prompt with its JSON)."""
    out = list(prompts or [])
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file '{path}' does not exist")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix.lower() in (".jsonl", ".json"):
                out.append(_json_prompt(line, f"{path}:{number}"))
            else:
                out.append(line)
    if not out:
        raise ValueError("no prompt given: use --prompt TEXT or --prompt-file FILE")
    return out


def _json_prompt(line: str, where: str) -> str:
    """The ``prompt`` (else ``text``) string of one JSON-lines record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a JSON object with a string 'prompt' field")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory, or run directory with a 'latest' file")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="one prompt per line, or .jsonl / .json with a 'prompt' field")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    p.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same text on every device)")
    p.add_argument("--format", choices=["text", "jsonl"], default="text")
    p.add_argument("--output", help="write here instead of stdout")
    p.add_argument("--tokenizer", help="tokenizer.json / .tiktoken file or directory (default: the config's)")
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="prompts of equal length decoded together"
    )
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: the checkpoint's")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--ignore-eod", action="store_true", help="do not stop at the end-of-document token")
    return p


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The sampling settings of the command line."""
    sampling = args.temperature is not None or args.top_k is not None or args.top_p is not None
    if args.greedy and sampling:
        raise ValueError("--greedy cannot be combined with --temperature/--top-k/--top-p")
    from megatron_stablelm.generation import SamplingParams

    if not sampling or args.temperature == 0:
        return SamplingParams(greedy=True)
    return SamplingParams(
        greedy=False,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k or 0,
        top_p=1.0 if args.top_p is None else args.top_p,
    )


def generate_from_args(args: argparse.Namespace) -> int:
    """Check every input before any process group or model exists (numbers by argparse; prompts, their
    lengths and the checkpoint's header even before the model code is imported; the device), load the
    checkpoint at the launcher's TP size, generate, and write the completions (first rank only)."""
    texts = read_prompts(args.prompt, args.prompt_file)
    from megatron_stablelm import checkpoint

    ckpt, _, cfg = checkpoint.read_header(args.checkpoint)
    from megatron_stablelm.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(cfg, args.tokenizer)  # before the model code is imported
    params = sampling_from_args(args)
    from megatron_stablelm.generation import check_prompts, generate, load_checkpoint_model

    prompts = [tokenizer.encode(t) for t in texts]
    check_prompts(prompts, args.max_new_tokens, cfg.max_positions)
    loaded = load_checkpoint_model(ckpt, device=args.device, dtype=args.dtype)
    outputs = generate(
        loaded.model,
        prompts,
        args.max_new_tokens,
        params,
        eos_id=None if args.ignore_eod else tokenizer.eod,
        seed=args.seed,
        vocab_limit=tokenizer.vocab_size,
        batch_size=args.batch_size,
    )
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    lines = []
    for text, prompt, new in zip(texts, prompts, outputs):
        completion = tokenizer.decode(new)
        if args.format == "jsonl":
            record = {"prompt": text, "completion": completion, "prompt_tokens": prompt, "tokens": new}
            lines.append(json.dumps(record, ensure_ascii=False))
        else:
            lines.append(text + completion + "\n" + "-" * 40)
    body = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(body, encoding="utf-8")
    else:
        sys.stdout.write(body)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(generate_from_args, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
