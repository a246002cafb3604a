"""GPT-NeoX's Llama family end to end: its Llama / Llama 2 / Code Llama / Llemma configs
(``tests/fixtures/neox/``) load as they are, alone and merged with ``local_setup.yml``; ``inspect`` counts
exactly the parameters of ``transformers``' ``LlamaForCausalLM`` of the same config; a tiny version
trains on SentencePiece shards and exports to a ``LlamaForCausalLM`` (and a tokenizer ``AutoTokenizer``
loads) computing the same logits; HF ``LlamaForCausalLM`` checkpoints (RoPE theta, GQA, tied head,
biases, an odd vocabulary) import with ``transformers``' logits and export back bit for bit (TP 2:
tests/test_hf_parity.py); what ``LlamaForCausalLM`` cannot express is refused naming the key."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from megatron_stablelm import checkpoint, hf_conversion, parallel
from megatron_stablelm.config import ConfigError, load_config
from megatron_stablelm.inspect import main as inspect_main
from megatron_stablelm.inspect import parameters_per_gpu
from megatron_stablelm.model import build_model
from tests.data_helpers import random_text, tiny_sentencepiece_model, write_jsonl
from tests.model_helpers import tiny_config
from tools.convert_from_hf import convert_from_hf
from tools.convert_to_hf import convert_to_hf

ROOT = Path(__file__).resolve().parents[1]
NEOX = ROOT / "tests" / "fixtures" / "neox"
NEOX_LLAMA = sorted(NEOX.glob("*/*.yml"))
LOCAL_SETUP = NEOX / "local_setup.yml"
REL_TOL = 1e-5


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def single_rank():
    parallel.initialize(1)
    yield
    parallel.destroy()


# ------------------------------------------------------------------------------------- configs, counts
@pytest.mark.parametrize("path", NEOX_LLAMA, ids=_name)
def test_neox_llama_config_loads_alone_and_with_local_setup(path):
    alone = load_config([path], report_ignored=False)
    merged = load_config([path, LOCAL_SETUP], report_ignored=False)
    assert alone.architecture() == merged.architecture()
    assert (merged.save, merged.data_path) == ("checkpoints", "data/enwik8/enwik8_text_document")
    assert (alone.norm, alone.norm_bias, alone.tokenizer_type) == ("rmsnorm", False, "SPMTokenizer")
    assert alone.is_gated_mlp and alone.act_fn_name == "silu" and not alone.mlp_bias
    assert alone.rotary_dim == alone.head_dim and not alone.tied_embeddings
    assert alone.norm_epsilon == (1e-6 if path.parent.name == "llama" else 1e-5)
    hf_conversion.architecture_for(alone)  # exportable as it is


# The released models' shapes (their HF config.json values) each NeoX config must reproduce.
RELEASED = {
    "llama/7B": (32, 4096, 32, 32, 11008, 1e4),
    "llama/13B": (40, 5120, 40, 40, 13824, 1e4),
    "llama/30B": (60, 6656, 52, 52, 17920, 1e4),
    "llama/65B": (80, 8192, 64, 64, 22016, 1e4),
    "llama2/7B": (32, 4096, 32, 32, 11008, 1e4),
    "llama2/13B": (40, 5120, 40, 40, 13824, 1e4),
    "llama2/70B": (80, 8192, 64, 8, 28672, 1e4),
    "llama2/codellama": (32, 4096, 32, 32, 11008, 1e6),
    "llemma/7B": (32, 4096, 32, 32, 11008, 1e6),
    "llemma/34B": (48, 8192, 64, 8, 22016, 1e6),
}


@pytest.mark.parametrize("path", NEOX_LLAMA, ids=_name)
def test_inspect_counts_llama_for_causal_lm_exactly(path):
    """The arithmetic count of ``inspect`` equals the parameters of ``transformers``' LlamaForCausalLM
    of the released shape (built on the meta device from its own LlamaConfig, not from ours)."""
    cfg = load_config([path], overrides=["model_parallel_size=1"], report_ignored=False)
    layers, hidden, heads, kv, width, theta = RELEASED[_name(path)]
    released = LlamaConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=width, vocab_size=32000, rope_parameters={"rope_type": "default", "rope_theta": theta},
    )  # fmt: skip
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.ffn_hidden_size) == (
        layers, hidden, heads, kv, width,
    )  # fmt: skip
    assert cfg.rotary_emb_base == theta
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(released)
    assert parameters_per_gpu(cfg, 32000) == sum(p.numel() for p in hf.parameters())


def _sentencepiece_of_size(path: Path, pieces: int) -> Path:
    """The tiny SentencePiece model grown to ``pieces`` pieces (unused fillers), as Llama's 32,000."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(Path(tiny_sentencepiece_model()).read_bytes())
    for i in range(pieces - len(model.pieces)):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = f"<filler{i}>", -1e6 - i, piece.UNUSED
    path.write_bytes(model.SerializeToString())
    return path


def test_inspect_llama2_7b_with_its_32000_token_vocabulary(tmp_path, capsys):
    vocab = _sentencepiece_of_size(tmp_path / "tokenizer.model", 32000)
    config = [str(NEOX / "llama2" / "7B.yml"), "--override", f"vocab_file={vocab}"]
    assert inspect_main(config) == 0
    out = capsys.readouterr().out
    assert "parameters:          6,738,415,616 " in out and "padded vocab:        32,000" in out
    assert "norm:                rmsnorm, eps 1e-05" in out and "SwiGLU width 11008" in out


# ------------------------------------------------------------------------------------- training
TINY_LLAMA = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, intermediate_size=512)


def test_tiny_neox_llama2_trains_and_exports_to_transformers(tmp_path, single_rank):
    """GPT-NeoX's Llama 2 7B config merged with local_setup.yml and a file shrinking it (and pointing at
    SentencePiece shards): trains, saves, and exports to a LlamaForCausalLM whose logits are the
    framework's, with a tokenizer ``AutoTokenizer`` loads that gives sentencepiece's ids."""
    import sentencepiece

    from megatron_stablelm.data.preprocess import preprocess
    from megatron_stablelm.training.loop import Trainer
    from tests.train_helpers import _real_data

    spm_file = tiny_sentencepiece_model()
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_file)
    rng = random.Random(3)
    texts = [random_text(rng, rng.randint(5, 60)) for _ in range(120)]
    preprocess([str(write_jsonl(tmp_path / "docs.jsonl", texts))], str(tmp_path / "llama"),
               tokenizer_type="SPMTokenizer", vocab_file=spm_file, progress=False)  # fmt: skip
    tiny = dict(
        TINY_LLAMA, seq_length=32, max_position_embeddings=32, vocab_file=spm_file,
        data_path=str(tmp_path / "llama_text_document"), split="100,0,0", save=str(tmp_path / "run"),
        load=None, tensorboard_dir=None, log_dir=None, checkpoint_factor=4, eval_interval=0, eval_iters=0,
        optimizer={"type": "Adam", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8}},
        zero_optimization={"stage": 1}, train_micro_batch_size_per_gpu=4, train_iters=4, warmup=0.0,
        lr_decay_style="constant", hidden_dropout=0.0, attention_dropout=0.0, num_workers=0, precision="fp32",
        log_interval=1, steps_per_print=0,
    )  # fmt: skip
    (tmp_path / "tiny.yml").write_text(yaml.safe_dump(tiny))
    cfg = load_config(
        [NEOX / "llama2" / "7B.yml", LOCAL_SETUP, tmp_path / "tiny.yml"], training=True, report_ignored=False
    )
    assert (cfg.norm, cfg.tokenizer_type, cfg.ffn_hidden_size, cfg.make_vocab_size_divisible_by) == (
        "rmsnorm", "SPMTokenizer", 256, 1,
    )  # fmt: skip
    make_data, padded = _real_data(cfg)
    assert padded == 400  # make_vocab_size_divisible_by: 1 keeps the SentencePiece vocabulary
    logs: list[str] = []
    trainer = Trainer(cfg, make_data, padded_vocab=padded, log=logs.append)
    trainer.setup()
    result = trainer.train()
    assert result.exit_reason == "done", logs[-5:]
    losses = [result.losses[i] for i in sorted(result.losses)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses

    out = convert_to_hf(tmp_path / "run", tmp_path / "hf")
    hf_json = json.loads((out / "config.json").read_text())
    assert hf_json["architectures"] == ["LlamaForCausalLM"] and hf_json["rms_norm_eps"] == 1e-5
    assert (hf_json["num_key_value_heads"], hf_json["intermediate_size"], hf_json["tie_word_embeddings"]) == (
        2, 256, False,
    )  # fmt: skip
    assert (hf_json["bos_token_id"], hf_json["eos_token_id"]) == (sp.bos_id(), sp.eos_id())  # <s>, </s>
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model = build_model(checkpoint.read_config(tmp_path / "run"), padded).eval()
    checkpoint.load_into_model(tmp_path / "run", model, 0, 1)
    tokens = torch.randint(0, padded, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel_err(model(tokens), hf(tokens).logits) <= REL_TOL
    theirs = AutoTokenizer.from_pretrained(out)
    assert (out / "tokenizer.model").read_bytes() == Path(spm_file).read_bytes()
    for text in texts[:20] + ["  spaces  and\nnewlines ", "данные 🙂 ʃ∮", "<s> literal </s>"]:
        assert theirs(text)["input_ids"] == sp.encode(text), text
    assert (theirs.bos_token_id, theirs.eos_token_id) == (sp.bos_id(), sp.eos_id())


# ------------------------------------------------------------------------------------- HF both ways
# Each case: tiny_config("llama-2") overrides, and the vocabulary of the HF model (odd sizes are padded on
# import so that a checkpoint imported at TP 1 runs at TP 2).
CASES = {
    "tied-codellama-theta": (dict(no_weight_tying=False, rotary_emb_base=1e6), 400),
    "biases-odd-vocab": (
        dict(use_bias_in_attn_linear=True, use_bias_in_mlp=True, rms_norm_epsilon=1e-6),
        409,
    ),
}


def _hf_llama_dir(path: Path, overrides: dict, vocab: int) -> Path:
    """A LlamaForCausalLM saved by ``transformers`` itself, every tensor random (norm weights too)."""
    hf_cfg = hf_conversion.hf_config(tiny_config("llama-2", **overrides), vocab, torch.float32)
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    model.save_pretrained(path)
    return path


def test_hf_llama_imports_and_exports_bit_exact(tmp_path, single_rank):
    """HF LlamaForCausalLM checkpoints made by ``transformers`` (tied head with Code Llama's theta;
    attention and MLP biases with an odd vocabulary) import at TP 1 with ``transformers``' logits and
    export back bit for bit, config.json included. (The same variants at TP 2: tests/test_hf_parity.py;
    an odd vocabulary imported at TP 1 run at TP 2: tests/test_hf_conversion_edges.py.)"""
    for case, (overrides, vocab) in CASES.items():
        src = _hf_llama_dir(tmp_path / case / "hf", overrides, vocab)
        shutil.copy(tiny_sentencepiece_model(), src / "tokenizer.model")  # an HF Llama directory's tokenizer
        hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        assert type(hf).__name__ == "LlamaForCausalLM"
        run = convert_from_hf(src, tmp_path / case / "run", tp=1)
        cfg, meta = checkpoint.read_config(run), checkpoint.read_meta(run)
        assert cfg.norm == "rmsnorm" and cfg.tokenizer_type == "SPMTokenizer"
        assert meta.padded_vocab_size % 256 == 0 and (meta.vocab_size or vocab) == vocab
        tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(4))
        model = build_model(cfg, meta.padded_vocab_size).eval()
        checkpoint.load_into_model(run, model, 0, 1)
        with torch.no_grad():
            assert _rel_err(model(tokens)[..., :vocab], hf(tokens).logits) <= REL_TOL, case
        back = convert_to_hf(run, tmp_path / case / "back", dtype="fp32")
        _, original = hf_conversion.read_hf_dir(src)
        _, result = hf_conversion.read_hf_dir(back)
        assert sorted(result) == sorted(original), case
        assert all(torch.equal(result[k], t) for k, t in original.items()), case
        keys = ("vocab_size", "tie_word_embeddings", "rope_parameters", "num_key_value_heads", "rms_norm_eps",
                "attention_bias", "mlp_bias", "intermediate_size", "hidden_act", "head_dim")  # fmt: skip
        theirs, ours = (json.loads((d / "config.json").read_text()) for d in (src, back))
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}, case


# ------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"gpt_j_residual": True}, "gpt_j_residual"),
        ({"qk_norm": True}, "qk_norm"),
        ({"rotary_pct": 0.5}, "rotary_pct"),
        ({"activation": "gelu"}, "activation"),
        ({"use_qkv_bias": True}, "use_qkv_bias"),
    ],
)
def test_what_llama_cannot_express_is_refused_naming_the_key(overrides, key):
    cfg = tiny_config("llama-2", **overrides)
    with pytest.raises(hf_conversion.ConversionError, match=f"LlamaForCausalLM: config key '{key}'") as err:
        hf_conversion.architecture_for(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"head_dim": 32}, "head_dim 32 is not hidden_size / num_attention_heads"),
        (
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 5e5,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
            "'llama3'",
        ),  # fmt: skip
        (
            {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 16},
            "'mistral'",
        ),
    ],
)
def test_hf_llama_configs_it_cannot_compute_are_refused(change, match):
    hf = hf_conversion.hf_config(tiny_config("llama-2"), 256, torch.float32).to_dict()
    with pytest.raises(hf_conversion.ConversionError, match=match):
        hf_conversion.config_from_hf({**hf, **change}, norm_bias=False)


def test_sliding_window_stays_refused(tmp_path):
    path = tmp_path / "mistral.yml"
    path.write_text(
        (NEOX / "llama2" / "7B.yml").read_text().rstrip().rstrip("}") + '"sliding_window_width": 4096}\n'
    )
    with pytest.raises(ConfigError, match="sliding_window_width.*sliding-window attention"):
        load_config([path], report_ignored=False)


def test_import_with_the_neox_config_uses_its_spelling(tmp_path):
    """``convert_from_hf --config`` with GPT-NeoX's Llama 2 config (shrunk): the YAML's MLP spelling
    (``activation: swiglu`` + ``intermediate_size`` + ``mlp_multiple_of``) replaces the import's and must
    give the checkpoint's width; a disagreeing epsilon is refused naming the key."""
    src = _hf_llama_dir(tmp_path / "hf", {}, 400)
    shrink = tmp_path / "tiny.yml"
    shrink.write_text(yaml.safe_dump(dict(TINY_LLAMA, seq_length=32, max_position_embeddings=64)))
    configs = [str(NEOX / "llama2" / "7B.yml"), str(shrink)]
    cfg = checkpoint.read_config(convert_from_hf(src, tmp_path / "run", configs=configs))
    assert (cfg.activation, cfg.mlp_type, cfg.ffn_hidden_size, cfg.norm_epsilon) == (
        "swiglu",
        "regular",
        256,
        1e-5,
    )
    assert cfg.tokenizer_type == "SPMTokenizer"
    shrink.write_text(yaml.safe_dump(dict(TINY_LLAMA, seq_length=32, rms_norm_epsilon=1e-6)))
    with pytest.raises(ConfigError, match="'norm_epsilon' is 1e-06 but the HF checkpoint has 1e-05"):
        convert_from_hf(src, tmp_path / "run2", configs=configs)
