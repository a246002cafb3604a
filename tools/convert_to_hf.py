#!/usr/bin/env python
"""Framework checkpoint → Hugging Face model directory (``config.json`` + ``model.safetensors``).

    python tools/convert_to_hf.py CHECKPOINT OUT_DIR [--dtype fp32|bf16|fp16] [--tokenizer PATH] [--force]

CHECKPOINT is a checkpoint directory or a run directory with a ``latest`` file. The output loads with
``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` as ``StableLmForCausalLM`` (or
``GPTNeoXForCausalLM`` for StableLM-Base-Alpha v1), in the precision the checkpoint was trained in
unless ``--dtype`` says otherwise. OUT_DIR must not exist unless ``--force``; it is written under a
temporary name and renamed at the end (replacing the old one only then).

Tokenizer files are exported beside the weights so that ``AutoTokenizer.from_pretrained(OUT_DIR)``
works: ``--tokenizer`` names a ``tokenizer.json`` or a directory of HF tokenizer files; without it the
checkpoint config's ``vocab_file`` is used when it is a ``tokenizer.json`` that exists. For a bare
``tokenizer.json`` a ``tokenizer_config.json`` is written too (``PreTrainedTokenizerFast`` with the
end-of-document token as BOS/EOS, the model's context length), and ``config.json`` gets the matching
``bos_token_id``/``eos_token_id``. A ``.tiktoken`` ranks file (Arcade100k) is copied and also
converted into the equivalent ``tokenizer.json`` (same ids, special tokens included), so no remote
code is needed. A SentencePiece ``.model`` (``SPMTokenizer``, GPT-NeoX's Llama configs) is copied as
``tokenizer.model`` and converted by ``transformers``' SentencePiece converter into a ``tokenizer.json``
giving ``sentencepiece``'s ids (no BOS added, as the framework trains); ``config.json`` takes the
model's own BOS and, unless it has an ``<|endoftext|>`` piece, its own EOS (``</s>``) rather than the
unknown piece GPT-NeoX appends as end of document to such a model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from megatron_stablelm import hf_conversion
from megatron_stablelm.checkpoint import (
    StagedDirectory,
    read_canonical_state_dict,
    read_header,
)
from megatron_stablelm.checkpoint.atomic import check_destination
from megatron_stablelm.cli import run_command
from megatron_stablelm.config.precision import TORCH_NAMES, torch_dtype

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
)


def tokenizer_files_for(path: str | Path | None, cfg) -> list[Path]:
    """The tokenizer files to export: those named by ``path`` (a file, or the HF tokenizer files in a
    directory), else the config's ``vocab_file`` when it is an existing ``tokenizer.json`` or
    ``.tiktoken`` file, or a SentencePiece ``.model``."""
    if path is None:
        vocab = Path(cfg.vocab_file) if cfg.vocab_file else None
        exportable = (
            vocab is not None and vocab.is_file() and vocab.suffix in (".json", ".tiktoken", ".model")
        )
        return [vocab] if exportable else []
    path = Path(path)
    if path.is_dir():
        files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        files += sorted(path.glob("*.tiktoken"))
        if not files:
            raise ValueError(
                f"tokenizer directory '{path}' holds no tokenizer.json, .tiktoken or tokenizer.model file"
            )
        return files
    if not path.is_file():
        raise ValueError(f"tokenizer file '{path}' does not exist")
    return [path]


def _is_tokenizer_json(f: Path) -> bool:
    """Whether ``f`` is exported as ``tokenizer.json`` (a ``.json`` that is no other HF tokenizer file)."""
    return f.suffix == ".json" and f.name not in TOKENIZER_FILES[1:]


def _tiktoken_file(files: list[Path]) -> Path | None:
    """The ``.tiktoken`` ranks file to convert into a ``tokenizer.json`` (none when one is given)."""
    if any(_is_tokenizer_json(f) for f in files):
        return None
    return next((f for f in files if f.suffix == ".tiktoken"), None)


def _sentencepiece_file(files: list[Path]) -> Path | None:
    """The SentencePiece ``.model`` to convert into a ``tokenizer.json`` (none when one is given)."""
    if any(_is_tokenizer_json(f) for f in files):
        return None
    return next((f for f in files if f.suffix == ".model"), None)


def _sentencepiece_specials(files: list[Path]) -> dict[str, tuple[str, int]] | None:
    """``{"bos" | "eos" | "unk": (piece, id)}`` of the SentencePiece model exported, if one is."""
    from megatron_stablelm.tokenizers import SPMTokenizer

    model = _sentencepiece_file(files)
    if model is None:
        return None
    tok = SPMTokenizer(model)
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": int(tok._sp.unk_id())}
    return {name: (tok.piece(i), i) for name, i in ids.items() if i >= 0}


def _tokenizer_eod(files: list[Path]) -> tuple[str, int] | None:
    """(token, id) of the end-of-document token of the exported tokenizer, if any (for a SentencePiece
    model, the EOS an exported model stops at)."""
    from megatron_stablelm.tokenizers import HFTokenizer, TiktokenTokenizer, TokenizerError

    ranks = _tiktoken_file(files)
    if ranks is not None:
        tok = TiktokenTokenizer(ranks)
        return tok.decode([tok.eod]), tok.eod
    spm = _sentencepiece_specials(files)
    if spm is not None:
        return spm.get("eos")
    json_file = next((f for f in files if _is_tokenizer_json(f)), None)
    if json_file is None:
        return None
    try:
        tok = HFTokenizer(json_file)
    except TokenizerError:
        if any(f.name == "tokenizer_config.json" for f in files):
            return None  # a complete HF tokenizer directory: its own config names the special tokens
        raise
    return tok._tok.id_to_token(tok.eod), tok.eod


def _write_tokenizer_config(
    out: Path, eod: tuple[str, int], max_length: int, spm: dict[str, tuple[str, int]] | None = None
) -> None:
    """What ``AutoTokenizer`` needs to load a bare ``tokenizer.json`` as ``PreTrainedTokenizerFast``.
    ``spm``: the SentencePiece model's own special pieces (BOS, EOS, unknown), whose literal text then
    encodes as ``sentencepiece`` encodes it (``split_special_tokens``)."""
    if (out / "tokenizer_config.json").exists():
        return
    token = eod[0]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token,
        "eos_token": token,
        "unk_token": token,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    if spm is not None:
        config.update({f"{name}_token": piece for name, (piece, _) in spm.items()}, split_special_tokens=True)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def convert_to_hf(
    checkpoint: str | Path,
    out: str | Path,
    dtype: str | None = None,
    tokenizer_files: list[Path] | None = None,
    tokenizer: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Export ``checkpoint`` to ``out`` in ``dtype`` (default: the precision the checkpoint was trained
    in). ``force`` replaces an existing ``out``, only once the new directory is complete."""
    ckpt, meta, cfg = read_header(checkpoint)
    out = check_destination(out, ckpt, force, f"the checkpoint {ckpt} being converted", "output")
    if tokenizer_files is None:
        tokenizer_files = tokenizer_files_for(tokenizer, cfg)
    tokenizer_files = [Path(f) for f in tokenizer_files]
    for f in tokenizer_files:
        if not f.is_file():
            raise ValueError(f"tokenizer file '{f}' does not exist")
    eod = _tokenizer_eod(tokenizer_files)
    spm = _sentencepiece_specials(tokenizer_files)
    bos_id = spm["bos"][1] if spm and "bos" in spm else None
    hf_conversion.architecture_for(cfg)  # refuse early, before reading tensors
    state = read_canonical_state_dict(ckpt)
    # a model imported from HF and padded to split over TP goes back at the HF model's vocabulary size
    rows = meta.export_vocab_size
    state = {k: v[:rows] if k in hf_conversion.VOCAB_ROWS else v for k, v in state.items()}
    with StagedDirectory(out, overwrite=force) as tmp:
        eod_id = eod[1] if eod else None
        dtype_ = torch_dtype(dtype or cfg.params_dtype_name)
        hf_conversion.write_hf_dir(tmp, cfg, state, rows, dtype_, eod_id, bos_id)
        _copy_tokenizer(tokenizer_files, tmp)
        if eod is not None:
            _write_tokenizer_config(tmp, eod, cfg.max_positions, spm)
    return out


def _copy_tokenizer(files: list[Path], out: Path) -> None:
    """The tokenizer files into ``out``; a ``.tiktoken`` file or a SentencePiece ``.model`` (copied as
    ``tokenizer.model``) also as the equivalent ``tokenizer.json``."""
    from megatron_stablelm.tokenizers import (
        TiktokenTokenizer,
        hf_tokenizer_from_sentencepiece,
        hf_tokenizer_from_tiktoken,
    )

    for f in files:
        name = (
            "tokenizer.json"
            if _is_tokenizer_json(f)
            else "tokenizer.model"
            if f.suffix == ".model"
            else f.name
        )
        shutil.copy(f, out / name)
    ranks = _tiktoken_file(files)
    if ranks is not None:
        hf_tokenizer_from_tiktoken(TiktokenTokenizer(ranks)).save(str(out / "tokenizer.json"))
    model = _sentencepiece_file(files)
    if model is not None:
        hf_tokenizer_from_sentencepiece(model).save(str(out / "tokenizer.json"))


def _convert(args: argparse.Namespace) -> int:
    path = convert_to_hf(args.checkpoint, args.out, args.dtype, tokenizer=args.tokenizer, force=args.force)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument(
        "--dtype", choices=sorted(TORCH_NAMES), help="default: the precision the checkpoint was trained in"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer.json or a directory of HF tokenizer files (default: the config's)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace OUT_DIR (only once the new one is complete)"
    )
    return run_command(_convert, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
