"""tools/generate.py: greedy decoding equals `transformers`' greedy `generate` on the exported checkpoint,
token for token, at TP=1 and TP=2; sampling is seeded and respects top-k/top-p; bad input fails first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_stablelm import checkpoint, hf_conversion, parallel
from megatron_stablelm.generation import SamplingParams, generate, sample_next
from megatron_stablelm.model import build_model
from tests.data_helpers import tiny_tokenizer_files
from tests.dist_helpers import run_distributed
from tests.model_helpers import randomize, tiny_config

VOCAB = 512  # the tiny test tokenizer has 400 tokens
NEW_TOKENS = 12
PROMPTS = ["the model reads tokens", "every rank takes", "0 1 2 3 numpy torch αβγ", "def class"]


@pytest.fixture(scope="module")
def single_rank():
    parallel.initialize(1)
    yield
    parallel.destroy()


def make_checkpoint(arch: str, root: Path, seed: int = 0, tp: int = 1, **overrides) -> tuple[Path, Path]:
    """A random-weight tiny checkpoint (run directory with ``latest``) whose config names the tiny test
    tokenizer, and its Hugging Face export. Needs a single-rank process group."""
    tok = tiny_tokenizer_files()["json"]
    cfg = tiny_config(arch, padded_vocab_size=VOCAB, vocab_file=tok, **overrides)
    torch.manual_seed(seed)
    model = build_model(cfg, VOCAB, seed=seed).eval()
    randomize(model, seed)
    state = model.local_state_dict()
    full_cfg = tiny_config(arch, padded_vocab_size=VOCAB, vocab_file=tok, model_parallel_size=tp, **overrides)
    shards = [{n: model.splits[n].split(t, r, tp).clone() for n, t in state.items()} for r in range(tp)]
    run = root / "run"
    run.mkdir(parents=True)
    checkpoint.save_model(run / "iter_0000010", full_cfg, shards, VOCAB)
    checkpoint.write_latest(run, "iter_0000010")
    hf_dir = root / "hf"
    hf_conversion.write_hf_dir(hf_dir, cfg, state, VOCAB)
    return run, hf_dir


def hf_greedy(
    hf_dir: Path, prompts: list[list[int]], new_tokens: int = NEW_TOKENS, vocab_limit: int | None = None
) -> list[list[int]]:
    """transformers' greedy ``generate``; ``vocab_limit`` suppresses the embedding's padding rows, as
    tools/generate.py does with the tokenizer's size."""
    from transformers import AutoModelForCausalLM  # here: the spawned TP ranks do not need it

    suppress = list(range(vocab_limit, VOCAB)) if vocab_limit else None
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            seq = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                eos_token_id=None,
                pad_token_id=0,
                suppress_tokens=suppress,
            )
        out.append(seq[0, len(prompt) :].tolist())
    return out


@pytest.mark.parametrize("arch", ["stablelm-2-12b", "stablelm-base-alpha-v1"])
def test_greedy_matches_transformers_tp1(arch, tmp_path, single_rank):
    """Library path, prompts of several lengths batched by length, the KV cache against HF's."""
    from megatron_stablelm.generation import load_checkpoint_model, load_tokenizer

    run, hf_dir = make_checkpoint(arch, tmp_path)
    loaded = load_checkpoint_model(run, device="cpu")
    tok = load_tokenizer(loaded.cfg)
    prompts = [tok.encode(p) for p in PROMPTS] + [tok.encode(PROMPTS[0])]
    ours = generate(loaded.model, prompts, NEW_TOKENS, batch_size=2)
    assert ours == hf_greedy(hf_dir, prompts)
    assert ours[0] == ours[-1]
    assert len(set(ours[0])) > 1, "degenerate output would make the comparison weak"


LL_PAIRS = [([5, 6, 7], [8, 9]), ([1], [300, 2, 3, 4]), ([7] * 20, [450])]


def _tp2_worker(rank: int, world: int, run: str, out: str) -> None:
    from megatron_stablelm import evaluation
    from megatron_stablelm.generation import load_checkpoint_model
    from tools.generate import main

    parallel.initialize(2)  # kept up across the two uses (main() leaves a group it did not start)
    argv = [run, "--prompt-file", str(Path(out).with_suffix(".txt")), "--max-new-tokens", str(NEW_TOKENS)]
    assert (
        main([*argv, "--format", "jsonl", "--output", out, "--ignore-eod", "--greedy", "--device", "cpu"])
        == 0
    )
    # the lm-eval adapter's vocab-parallel log-probabilities, for comparison with TP=1
    if evaluation.HAVE_LM_EVAL:
        lm = evaluation.MegatronLM(loaded=load_checkpoint_model(run, device="cpu"))
        result = lm.loglikelihood_tokens(LL_PAIRS)
        if rank == 0:
            Path(out).with_suffix(".ll.json").write_text(json.dumps(result))


def test_cli_greedy_matches_transformers_tp2_and_tp1(tmp_path, single_rank):
    """The command line at TP=2 (2 gloo ranks, checkpoint saved at TP=1) and at TP=1 (checkpoint saved
    at TP=2) both equal transformers' greedy output."""
    from megatron_stablelm.generation import load_tokenizer
    from tools.generate import main

    run1, hf_dir = make_checkpoint("stablelm-2-1_6b", tmp_path / "tp1", seed=2)
    run2, _ = make_checkpoint("stablelm-2-1_6b", tmp_path / "tp2", seed=2, tp=2)
    (tmp_path / "out2.txt").write_text("\n".join(PROMPTS) + "\n")
    run_distributed(_tp2_worker, 2, str(run1), str(tmp_path / "out2.jsonl"))
    out1 = tmp_path / "out1.jsonl"
    argv = [str(run2), *(f"--prompt={p}" for p in PROMPTS), "--max-new-tokens", str(NEW_TOKENS)]
    assert main([*argv, "--format", "jsonl", "--output", str(out1), "--ignore-eod", "--device", "cpu"]) == 0
    rec2 = [json.loads(line) for line in (tmp_path / "out2.jsonl").read_text().splitlines()]
    rec1 = [json.loads(line) for line in out1.read_text().splitlines()]
    assert [r["prompt"] for r in rec2] == PROMPTS
    vocab_limit = load_tokenizer(
        tiny_config("stablelm-2-1_6b", vocab_file=tiny_tokenizer_files()["json"])
    ).vocab_size
    expected = hf_greedy(hf_dir, [r["prompt_tokens"] for r in rec2], vocab_limit=vocab_limit)
    assert [r["tokens"] for r in rec2] == expected
    assert [r["tokens"] for r in rec1] == expected
    assert rec1[0]["completion"] and isinstance(rec1[0]["completion"], str)
    from megatron_stablelm import evaluation

    if evaluation.HAVE_LM_EVAL:
        tp2 = json.loads((tmp_path / "out2.ll.json").read_text())
        tp1 = evaluation.MegatronLM(run1, device="cpu").loglikelihood_tokens(LL_PAIRS)
        assert [g for _, g in tp2] == [g for _, g in tp1]
        assert [lp for lp, _ in tp2] == pytest.approx([lp for lp, _ in tp1], rel=1e-5)


def test_sampling_is_seeded_and_truncated(tmp_path, single_rank):
    run, _ = make_checkpoint("stablelm-3b-4e1t", tmp_path)
    from megatron_stablelm.generation import load_checkpoint_model

    model = load_checkpoint_model(run, device="cpu").model
    prompt = [[5, 6, 7]]
    hot = SamplingParams(greedy=False, temperature=2.0)
    a = generate(model, prompt, 8, hot, seed=1)
    assert a == generate(model, prompt, 8, hot, seed=1)
    assert a != generate(model, prompt, 8, hot, seed=2)
    assert generate(model, prompt, 8, SamplingParams(greedy=False, top_k=1)) == generate(model, prompt, 8)
    assert all(t < 300 for t in generate(model, prompt, 8, hot, vocab_limit=300)[0])
    # eos stops a prompt's generation (and is kept)
    first = generate(model, prompt, 8)[0]
    assert generate(model, prompt, 8, eos_id=first[2])[0] == first[:3]

    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    picked = sample_next(logits, SamplingParams(greedy=False, top_p=0.8), gen)
    assert set(picked.tolist()) == {0, 1}  # p(0)=0.71 < 0.8, so token 1 completes the nucleus
    picked = sample_next(logits, SamplingParams(greedy=False, top_k=3), gen)
    assert set(picked.tolist()) == {0, 1, 2}


def test_bad_input_is_reported_before_work(tmp_path, capsys, single_rank):
    from tools.generate import main

    assert main([str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    run, _ = make_checkpoint("stablelm-3b-4e1t", tmp_path)
    assert main([str(run), "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main([str(run), "--greedy", "--top-k", "5", "--prompt", "x"]) == 2
    assert main([str(run), "--prompt", "x", "--tokenizer", str(tmp_path / "tok.json")]) == 2
    assert "tok.json" in capsys.readouterr().err
    # a corrupt shard names the checkpoint directory
    shard = run / "iter_0000010" / checkpoint.shard_filename(0)
    shard.write_bytes(b"not safetensors")
    assert main([str(run), "--prompt", "x", "--device", "cpu"]) == 2
    assert "iter_0000010" in capsys.readouterr().err
