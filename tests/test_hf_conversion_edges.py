"""HF conversion never guesses: every disagreement is refused naming the key, absent ``config.json``
keys mean what they mean to ``transformers``, GPT-NeoX's tanh GeLU round-trips (``gelu_new`` and
``gelu_fast`` keep their names), vocabularies are padded on import as training pads them (a model
imported at TP 1 runs at TP 2), bf16 checkpoints export as bf16, tokenizers travel both ways, and
``--force`` replaces an output only once the new one is complete."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, StableLmConfig

from megatron_stablelm import checkpoint, hf_conversion, parallel
from megatron_stablelm.config import ConfigError
from megatron_stablelm.model import build_model
from megatron_stablelm.tokenizers import TiktokenTokenizer, build_tokenizer
from tests.data_helpers import tiny_tokenizer_files
from tests.dist_helpers import run_distributed
from tests.model_helpers import TINY_DIR, randomize, tiny_config
from tools.convert_from_hf import convert_from_hf
from tools.convert_to_hf import convert_to_hf
from tools.convert_to_hf import main as convert_to_hf_main

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def single_rank():
    parallel.initialize(1)
    yield
    parallel.destroy()


def _tokens(vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def _max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _hf_dir(path: Path, hf_cfg, seed: int = 5) -> Path:
    """An HF checkpoint written by ``transformers`` itself from ``hf_cfg``, every tensor random."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    model.save_pretrained(path)
    return path


def _tiny_hf_dir(path: Path, arch: str, vocab: int = VOCAB, **overrides) -> Path:
    cfg = tiny_config(arch, **overrides)
    return _hf_dir(path, hf_conversion.hf_config(cfg, vocab, torch.float32))


def _yaml(path: Path, arch: str, **overrides) -> str:
    values = yaml.safe_load((TINY_DIR / f"{arch}.yml").read_text())
    values.update(overrides)
    path.write_text(yaml.safe_dump(values))
    return str(path)


# ------------------------------------------------------------------------------------- disagreements
@pytest.mark.parametrize(
    ("override", "key", "ours", "theirs"),
    [
        ({"activation": "relu"}, "act_fn_name", "'relu'", "'gelu'"),
        ({"bias_gelu_fusion": True}, "act_fn_name", "'gelu_tanh'", "'gelu'"),
        ({"layernorm_epsilon": 1.0e-6}, "norm_epsilon", "1e-06", "1e-05"),
        ({"rotary_emb_base": 500.0}, "rotary_emb_base", "500.0", "10000.0"),
        ({"rotary_pct": 0.5}, "rotary_dim", "8", "4"),
        ({"gpt_j_residual": False}, "gpt_j_residual", "False", "True"),
        ({"no_weight_tying": False}, "tied_embeddings", "True", "False"),
    ],
)
def test_yaml_disagreeing_with_checkpoint_is_refused(tmp_path, override, key, ours, theirs):
    src = _tiny_hf_dir(tmp_path / "hf", "stablelm-base-alpha-v1")
    user = _yaml(tmp_path / "user.yml", "stablelm-base-alpha-v1", **override)
    with pytest.raises(ConfigError, match=rf"'{key}' is {ours} but the HF checkpoint has {theirs}"):
        convert_from_hf(src, tmp_path / "out", configs=[user])
    assert not (tmp_path / "out").exists()


def test_agreeing_yaml_is_used(tmp_path):
    src = _tiny_hf_dir(tmp_path / "hf", "stablelm-base-alpha-v1")
    user = _yaml(tmp_path / "user.yml", "stablelm-base-alpha-v1", seq_length=48, seed=7)
    cfg = checkpoint.read_config(convert_from_hf(src, tmp_path / "out", configs=[user]))
    assert (cfg.seq_length, cfg.seed, cfg.act_fn_name) == (48, 7, "gelu")


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    ],
)
def test_rope_scaling_is_refused_never_ignored(tmp_path, rope):
    src = _tiny_hf_dir(tmp_path / "hf", "stablelm-2-1_6b")
    hf = json.loads((src / "config.json").read_text())
    hf.pop("rope_parameters", None)
    hf.update(rope)
    (src / "config.json").write_text(json.dumps(hf))
    kind = rope["rope_scaling"].get("rope_type", rope["rope_scaling"].get("type"))
    # transformers honours the old spelling too: the reference this refusal protects
    assert StableLmConfig.from_dict(hf).rope_parameters["rope_type"] == kind
    with pytest.raises(hf_conversion.ConversionError, match=rf"rope_scaling.*'{kind}'"):
        convert_from_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_hidden_act_is_refused():
    hf = {"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4, "hidden_act": "quick_gelu"}
    with pytest.raises(hf_conversion.ConversionError, match="hidden_act 'quick_gelu'"):
        hf_conversion.config_from_hf(hf, norm_bias=True)


# ------------------------------------------------------------------------------------- absent keys
PARTIAL = {
    "gpt_neox": {
        "model_type": "gpt_neox",
        "architectures": ["GPTNeoXForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "vocab_size": VOCAB,
    },
    "stablelm": {
        "model_type": "stablelm",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 160,
        "vocab_size": VOCAB,
    },
}


@pytest.mark.parametrize("model_type", sorted(PARTIAL))
def test_absent_keys_take_transformers_defaults(model_type, tmp_path, single_rank):
    """A ``config.json`` spelling only the shapes: the derived values equal what ``transformers``'
    config class and model make of the same dict, and so do the logits."""
    partial = PARTIAL[model_type]
    hf_cfg = (GPTNeoXConfig if model_type == "gpt_neox" else StableLmConfig).from_dict(partial)
    cfg = hf_conversion.config_from_hf(partial, norm_bias=True)
    rope = hf_cfg.rope_parameters
    assert cfg.rotary_dim == int(64 // 4 * rope["partial_rotary_factor"])
    assert cfg.rotary_emb_base == rope["rope_theta"]
    assert cfg.layernorm_epsilon == hf_cfg.layer_norm_eps
    assert hf_conversion.HF_ACTIVATIONS[cfg.act_fn_name] == hf_cfg.hidden_act
    assert cfg.gpt_j_residual == hf_cfg.use_parallel_residual
    assert cfg.tied_embeddings == hf_cfg.tie_word_embeddings
    assert cfg.max_positions == hf_cfg.max_position_embeddings
    if model_type == "gpt_neox":
        assert cfg.rotary_dim == 4  # transformers: 0.25 of the head, not 1.0
        assert cfg.dense_bias == cfg.qkv_bias == hf_cfg.attention_bias
    else:
        assert (cfg.kv_heads, cfg.qkv_bias, cfg.qk_norm) == (2, hf_cfg.use_qkv_bias, hf_cfg.qk_layernorm)
    # the same partial config.json, loaded by transformers and by the framework, computes the same
    src = _hf_dir(tmp_path / "hf", hf_cfg)
    (src / "config.json").write_text(json.dumps(partial))
    ref_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    out = convert_from_hf(src, tmp_path / "out")
    model = build_model(checkpoint.read_config(out), VOCAB).eval()
    checkpoint.load_into_model(out, model, 0, 1)
    with torch.no_grad():
        assert _max_rel_err(model(_tokens()), ref_model(_tokens()).logits) <= REL_TOL


# ------------------------------------------------------------------------------------- tanh GeLU
def _tanh_case(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    cfg = tiny_config("stablelm-base-alpha-v1", bias_gelu_fusion=True)
    assert cfg.act_fn_name == "gelu_tanh"
    model = build_model(cfg, VOCAB, seed=0).eval()
    randomize(model, 0)
    with torch.no_grad():  # pre-activations of order 1, where the two GeLU forms differ most
        for layer in model.layers:
            layer.mlp.fc1.weight.mul_(4)
    hf_dir = tmp_path / "hf_tanh"
    hf_conversion.write_hf_dir(hf_dir, cfg, model.local_state_dict(), VOCAB)
    return model, hf_dir


def _tp2_worker(rank: int, world: int, work: str) -> None:
    parallel.initialize(2)
    work_dir = Path(work)
    for case in ("tanh", "vocab509", "vocab509tp1"):
        run = work_dir / case
        model = build_model(checkpoint.read_config(run), checkpoint.read_meta(run).padded_vocab_size)
        checkpoint.load_into_model(run, model.eval(), rank, world)
        with torch.no_grad():
            local = model(torch.load(work_dir / f"{case}.tokens.pt"))
        shards = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(shards, local, group=parallel.tp_group())
        if rank == 0:
            torch.save(torch.cat(shards, dim=-1), work_dir / f"{case}.tp2.pt")


def test_tanh_gelu_and_padded_vocab_match_transformers_tp1_tp2(tmp_path, single_rank):
    model, hf_dir = _tanh_case(tmp_path)
    hf_json = json.loads((hf_dir / "config.json").read_text())
    assert hf_json["hidden_act"] == "gelu_pytorch_tanh"
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = _tokens()
    with torch.no_grad():
        ref, ours = hf(tokens).logits, model(tokens)
        exact = build_model(tiny_config("stablelm-base-alpha-v1"), VOCAB).eval()
        exact.load_state_dict(model.state_dict())
        exact_logits = exact(tokens)
    assert _max_rel_err(ours, ref) <= REL_TOL
    assert _max_rel_err(exact_logits, ref) > 5 * REL_TOL  # the test tells the two GeLU forms apart
    # the import reads gelu_pytorch_tanh back as bias_gelu_fusion, at TP=2
    convert_from_hf(hf_dir, tmp_path / "tanh", tp=2)
    assert checkpoint.read_config(tmp_path / "tanh").act_fn_name == "gelu_tanh"
    torch.save(tokens, tmp_path / "tanh.tokens.pt")

    # vocabulary 509 at TP=2: padded with zero rows on import, the real ids compute HF's logits
    src509 = _tiny_hf_dir(tmp_path / "hf509", "stablelm-2-1_6b", vocab=509, padded_vocab_size=509)
    hf509 = AutoModelForCausalLM.from_pretrained(src509, dtype=torch.float32).eval()
    tokens509 = _tokens(509, seed=2)
    torch.save(tokens509, tmp_path / "vocab509.tokens.pt")
    convert_from_hf(src509, tmp_path / "vocab509", tp=2)
    # imported at TP=1, the same model must run at TP=2: padded as training pads, to 128 × TP rows
    torch.save(tokens509, tmp_path / "vocab509tp1.tokens.pt")
    assert (
        checkpoint.read_meta(convert_from_hf(src509, tmp_path / "vocab509tp1", tp=1)).padded_vocab_size == 512
    )
    meta = checkpoint.read_meta(tmp_path / "vocab509")
    assert meta.tp_size == 2 and meta.padded_vocab_size % 2 == 0 and meta.padded_vocab_size > 509
    state = checkpoint.read_canonical_state_dict(tmp_path / "vocab509")
    assert not torch.any(state["embedding.weight"][509:]) and not torch.any(state["output.weight"][509:])
    # and the export gives the HF model's shape back: 509 rows, the same tensors
    assert meta.vocab_size == 509
    back = AutoModelForCausalLM.from_pretrained(convert_to_hf(tmp_path / "vocab509", tmp_path / "back509"))
    assert back.config.vocab_size == 509
    for name, tensor in hf509.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name

    run_distributed(_tp2_worker, 2, str(tmp_path))
    assert _max_rel_err(torch.load(tmp_path / "tanh.tp2.pt"), ref) <= REL_TOL
    with torch.no_grad():
        ref509 = hf509(tokens509).logits
    assert _max_rel_err(torch.load(tmp_path / "vocab509.tp2.pt")[..., :509], ref509) <= REL_TOL
    assert _max_rel_err(torch.load(tmp_path / "vocab509tp1.tp2.pt")[..., :509], ref509) <= REL_TOL


@pytest.mark.parametrize(("hidden_act", "expected"), [("gelu", "gelu"), ("gelu_new", "gelu_tanh")])
def test_released_alpha_v1_gelu_imports_exactly(tmp_path, hidden_act, expected):
    """Stability's released Alpha v1 checkpoints say ``gelu``: exact GeLU, as ``transformers`` runs them."""
    src = _tiny_hf_dir(tmp_path / "hf", "stablelm-base-alpha-v1")
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf, "hidden_act": hidden_act}))
    assert checkpoint.read_config(convert_from_hf(src, tmp_path / "out")).act_fn_name == expected


@pytest.mark.parametrize("hidden_act", ["gelu_new", "gelu_fast"])
def test_hand_written_tanh_gelu_round_trips_with_its_name(tmp_path, single_rank, hidden_act):
    """An HF GPT-NeoX model with ``gelu_new`` or ``gelu_fast`` (the tanh approximation written out by
    hand): imported, it computes ``transformers``' logits; exported, it says the same ``hidden_act`` and
    holds the same tensors, so the round trip leaves config.json as it was."""
    model, hf_dir = _tanh_case(tmp_path)  # pre-activations of order 1: the GeLU forms differ there
    hf = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**hf, "hidden_act": hidden_act}))
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    run = convert_from_hf(hf_dir, tmp_path / "run")
    cfg = checkpoint.read_config(run)
    assert (cfg.act_fn_name, cfg.hf_hidden_act) == ("gelu_tanh", hidden_act)
    imported = build_model(cfg, VOCAB).eval()
    checkpoint.load_into_model(run, imported, 0, 1)
    with torch.no_grad():
        assert _max_rel_err(imported(_tokens()), ref(_tokens()).logits) <= REL_TOL
    back = convert_to_hf(run, tmp_path / "back", dtype="fp32")
    assert json.loads((back / "config.json").read_text())["hidden_act"] == hidden_act
    _, original = hf_conversion.read_hf_dir(hf_dir)
    _, result = hf_conversion.read_hf_dir(back)
    assert sorted(result) == sorted(original) and all(torch.equal(result[k], t) for k, t in original.items())
    with pytest.raises(ConfigError, match="hf_hidden_act.*'gelu_new' is not a Hugging Face name of .*'gelu'"):
        tiny_config("stablelm-base-alpha-v1", hf_hidden_act="gelu_new")


# ------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize(("precision", "expected"), [("bfloat16", torch.bfloat16), ("fp32", torch.float32)])
def test_export_defaults_to_training_precision(tmp_path, single_rank, precision, expected):
    cfg = tiny_config("stablelm-2-1_6b", precision=precision)
    model = build_model(cfg, VOCAB, dtype=cfg.params_dtype)
    checkpoint.save_canonical_model(tmp_path / "ckpt", cfg, model.local_state_dict(), VOCAB, 1)
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {expected}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert next(hf.parameters()).dtype == expected
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hf32", dtype="fp32")  # an explicit --dtype wins
    assert next(AutoModelForCausalLM.from_pretrained(tmp_path / "hf32").parameters()).dtype == torch.float32


def test_bf16_hf_model_round_trips_in_bf16(tmp_path):
    cfg = tiny_config("stablelm-2-1_6b")
    hf = AutoModelForCausalLM.from_config(hf_conversion.hf_config(cfg, VOCAB, torch.bfloat16))
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    assert (
        checkpoint.read_config(convert_from_hf(tmp_path / "hf", tmp_path / "run")).params_dtype_name == "bf16"
    )
    convert_to_hf(tmp_path / "run", tmp_path / "out")
    _, original = hf_conversion.read_hf_dir(tmp_path / "hf")
    _, result = hf_conversion.read_hf_dir(tmp_path / "out")
    assert all(result[k].dtype == torch.bfloat16 and torch.equal(result[k], t) for k, t in original.items())


# ------------------------------------------------------------------------------------- tokenizers
def test_tiktoken_export_loads_with_auto_tokenizer(tmp_path, single_rank):
    ranks = tiny_tokenizer_files()["tiktoken"]
    cfg = tiny_config(
        "stablelm-2-1_6b", tokenizer_type="TiktokenTokenizer", vocab_file=ranks, padded_vocab_size=512
    )
    model = build_model(cfg, 512)
    checkpoint.save_canonical_model(tmp_path / "ckpt", cfg, model.local_state_dict(), 512, 1)
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    ours, theirs = TiktokenTokenizer(ranks), AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def f(x):\n  return 1234 <|endoftext|> данные 🙂<|im_start|>user<|im_end|>\n\n"
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert (
        theirs.eos_token_id
        == ours.eod
        == json.loads((tmp_path / "hf/config.json").read_text())["eos_token_id"]
    )
    assert theirs.decode(ours.encode(text)) == text


def test_convert_from_hf_keeps_the_tokenizer(tmp_path):
    files = tiny_tokenizer_files()
    for kind, source in (("HFTokenizer", files["json"]), ("TiktokenTokenizer", files["tiktoken"])):
        src = _tiny_hf_dir(tmp_path / f"hf_{kind}", "stablelm-2-1_6b", vocab=512, padded_vocab_size=512)
        shutil.copy(source, src / ("tokenizer.json" if kind == "HFTokenizer" else "arcade.tiktoken"))
        run = convert_from_hf(src, tmp_path / f"run_{kind}")
        cfg = checkpoint.read_config(run)
        assert cfg.tokenizer_type == kind and Path(cfg.vocab_file).parent == (run / "tokenizer").resolve()
        shutil.rmtree(src)  # the run directory needs nothing from the HF directory
        tok = build_tokenizer(cfg)
        assert tok.encode("the model 123") == build_tokenizer(tokenizer_type=kind, vocab_file=source).encode(
            "the model 123"
        )
    proc = subprocess.run(
        [sys.executable, "tools/generate.py", str(run), "--prompt", "the model", "--max-new-tokens", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


# ------------------------------------------------------------------------------------- --force
def test_force_replaces_only_when_the_new_output_is_complete(tmp_path, monkeypatch, capsys, single_rank):
    src = _tiny_hf_dir(tmp_path / "hf", "stablelm-2-1_6b")
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    out.mkdir()
    (run / "old").write_text("old run")
    (out / "old").write_text("old export")
    with pytest.raises(FileExistsError, match="--force"):
        convert_from_hf(src, run)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_canonical_model", broken)
        with pytest.raises(OSError, match="disk full"):
            convert_from_hf(src, run, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out", "run"]
    assert (run / "old").read_text() == "old run"
    convert_from_hf(src, run, force=True)
    assert not (run / "old").exists() and checkpoint.read_meta(run).tp_size == 1

    assert convert_to_hf_main([str(run), str(out)]) == 2  # the command line: refused, named
    assert "--force" in capsys.readouterr().err and (out / "old").is_file()
    with monkeypatch.context() as patch:
        patch.setattr(hf_conversion, "write_hf_dir", broken)
        with pytest.raises(OSError, match="disk full"):
            convert_to_hf(run, out, force=True)
    assert (out / "old").read_text() == "old export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out", "run"]
    assert convert_to_hf_main([str(run), str(out), "--force"]) == 0
    assert not (out / "old").exists()
    # --force never replaces the input being converted
    with pytest.raises(ValueError, match="holds the HF model"):
        convert_from_hf(src, tmp_path, force=True)
    with pytest.raises(ValueError, match="holds the checkpoint"):
        convert_to_hf(run, run, force=True)
    assert checkpoint.read_meta(run).tp_size == 1 and (src / "config.json").is_file()
    _, tensors = hf_conversion.read_hf_dir(out)
    _, original = hf_conversion.read_hf_dir(src)
    assert all(torch.equal(tensors[k], original[k]) for k in original)
