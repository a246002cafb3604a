"""tools/evaluate.py and the lm-eval adapter: perplexity on indexed shards against a brute-force
`transformers` computation, the adapter's log-likelihoods against the HF model, lm-eval tasks built from
local files (no download), and bad input (unknown task, missing shard) failing before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_stablelm import checkpoint, evaluation, parallel
from megatron_stablelm.generation import generate, load_checkpoint_model
from tests.data_helpers import data_config, write_synthetic_shard
from tests.dist_helpers import run_distributed
from tests.test_generate import VOCAB, make_checkpoint

needs_lm_eval = pytest.mark.skipif(not evaluation.HAVE_LM_EVAL, reason="lm-eval is not installed")
ARCH = "stablelm-2-1_6b"


@pytest.fixture(scope="module")
def single_rank():
    parallel.initialize(1)
    yield
    parallel.destroy()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, single_rank):
    """(run directory, HF export, HF model) of one random tiny checkpoint, shared by the module."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eval_ckpt")
    run, hf_dir = make_checkpoint(ARCH, root, seed=4)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return run, hf_dir, hf


def hf_logprobs(hf, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i+1] | tokens[:i+1]) for every i, from the HF model (full context)."""
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0].double()
    return logits.log_softmax(-1)[:-1].gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).squeeze(-1)


def test_perplexity_matches_transformers(ckpt, tmp_path, capsys):
    from tools.evaluate import main

    run, _, hf = ckpt
    a, b = str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")
    docs_a = write_synthetic_shard(a, [20, 7, 30], eod=0, vocab=400, seed=1)
    write_synthetic_shard(b, [9, 14], eod=0, vocab=400, seed=2)
    assert main([str(run), "--data", a, b, "--seq-length", "16", "--micro-batch-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out)["perplexity"]
    stream = np.concatenate(docs_a).tolist()
    assert report["datasets"][a]["tokens"] == len(stream) - 1 == 56
    assert report["tokens"] == 56 + 22
    # brute force: the same consecutive windows of 17 tokens through the HF model
    nll = -sum(float(hf_logprobs(hf, stream[s : s + 17]).sum()) for s in range(0, len(stream) - 1, 16))
    assert math.isclose(report["datasets"][a]["loss"], nll / 56, rel_tol=1e-5)
    assert math.isclose(report["datasets"][a]["perplexity"], math.exp(nll / 56), rel_tol=1e-5)
    # --batches caps the micro-batches read per dataset
    assert (
        main([str(run), "--data", a, "--seq-length", "16", "--batches", "1", "--micro-batch-size", "2"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["perplexity"]["tokens"] == 32
    # --max-tokens keeps whole micro-batches until the limit is reached (2 windows of 16 = 32 >= 20),
    # marks the dataset incomplete, and shows progress on stderr
    assert (
        main([str(run), "--data", a, "--seq-length", "16", "--max-tokens", "20", "--micro-batch-size", "2"])
        == 0
    )
    out = capsys.readouterr()
    report = json.loads(out.out)["perplexity"]
    assert report["tokens"] == 32 and report["datasets"][a]["complete"] is False
    first_two = -sum(float(hf_logprobs(hf, stream[s : s + 17]).sum()) for s in (0, 16))
    assert math.isclose(report["loss"], first_two / 32, rel_tol=1e-5)
    assert a in out.err and "batch" in out.err


def test_bad_data_is_reported_before_loading(ckpt, tmp_path, capsys):
    from tools.evaluate import main

    run, _, _ = ckpt
    missing = str(tmp_path / "nothing_here")
    assert main([str(run), "--data", missing]) == 2
    assert "nothing_here" in capsys.readouterr().err
    assert main([str(tmp_path / "no_ckpt"), "--data", missing]) == 2
    assert "no_ckpt" in capsys.readouterr().err
    assert main([str(run)]) == 2  # no training data in its config: no trainer's validation loss
    assert "give --data PREFIX or --tasks" in capsys.readouterr().err
    assert main([str(run), "--max-tokens", "9"]) == 2
    assert "--max-tokens only apply to --data" in capsys.readouterr().err


@needs_lm_eval
def test_adapter_loglikelihoods_match_transformers(ckpt):
    run, _, hf = ckpt
    lm = evaluation.MegatronLM(run, batch_size=3, device="cpu")
    tok = lm.tokenizer

    class Req:  # what lm-eval hands over: an object with .args
        def __init__(self, *args):
            self.args = args

    pairs = [("the model reads", " tokens"), ("every rank takes its", " slice of the"), ("", "numpy torch")]
    pairs.append(("def class return ", "import"))  # trailing space moves to the continuation
    results = lm.loglikelihood([Req(c, x) for c, x in pairs])
    for (context, continuation), (logp, greedy) in zip(pairs, results):
        ctx, cont = lm._encode_pair(context, continuation)
        ref = hf_logprobs(hf, ctx + cont)[-len(cont) :]
        assert math.isclose(logp, float(ref.sum()), rel_tol=1e-5, abs_tol=1e-5)
        with torch.no_grad():
            argmax = hf(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1].argmax(-1).tolist()
        assert greedy == (argmax == cont)
    assert lm._encode_pair("def class return ", "import")[1] == tok.encode(" import")
    # a greedy continuation is reported as greedy
    prompt = tok.encode("the model")
    best = generate(lm.model, [prompt], 3)[0]
    assert lm.loglikelihood_tokens([(prompt, best)])[0][1] is True

    # rolling: within max_length it is the full-context log-likelihood after EOD ...
    text = "the model reads tokens from shards and samples documents by weight"
    ids = tok.encode(text)
    (rolling,) = lm.loglikelihood_rolling([Req(text)])
    assert math.isclose(rolling, float(hf_logprobs(hf, [tok.eod, *ids]).sum()), rel_tol=1e-5)
    # ... and beyond it every token is scored once, later windows with a full context
    lm.max_length = 5
    windows = lm.rolling_windows(ids)
    assert sum(n for _, _, n in windows) == len(ids)
    assert [t for _, tgt, n in windows for t in tgt[len(tgt) - n :]] == ids
    assert all(len(inp) == 5 for inp, _, _ in windows)
    lm.max_length = 64

    # generate_until: greedy, cut at the stop string
    new = generate(lm.model, [tok.encode("every rank")], 10, eos_id=tok.eod, vocab_limit=tok.vocab_size)[0]
    full = tok.decode(new[:-1] if new[-1] == tok.eod else new)
    (out,) = lm.generate_until([Req("every rank", {"until": [full[3:6]], "max_gen_toks": 10})])
    assert out == full.split(full[3:6])[0]


def _write_tasks(root: Path) -> Path:
    """Three lm-eval tasks (multiple choice, rolling perplexity, generation) over local JSONL files."""
    root.mkdir()
    rows = [
        {"question": f"the model reads {i}", "choices": [" tokens", " shards", " numpy"], "label": i % 3}
        for i in range(4)
    ]
    with open(root / "qa.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "answer": " tokens"}) + "\n")
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'qa.jsonl'}\ntest_split: test\n"
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + data + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    (root / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + data + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{question}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (root / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + data + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    return root


@needs_lm_eval
def test_lm_eval_tasks_from_local_data(ckpt, tmp_path, capsys, monkeypatch):
    from tools.evaluate import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, _, _ = ckpt
    tasks = _write_tasks(tmp_path / "tasks")
    argv = [str(run), "--tasks", "tiny_mc", "tiny_ppl", "tiny_gen", "--include-path", str(tasks)]
    assert main([*argv, "--no-default-tasks", "--device", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)["lm_eval"]["results"]
    assert 0.0 <= results["tiny_mc"]["acc,none"] <= 1.0
    assert results["tiny_ppl"]["word_perplexity,none"] > 1.0
    assert results["tiny_gen"]["exact_match,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)


@needs_lm_eval
def test_unknown_task_fails_before_the_model_loads(ckpt, tmp_path, capsys):
    from tools.evaluate import main

    run, _, _ = ckpt
    tasks = _write_tasks(tmp_path / "tasks")
    # a corrupt model shard would fail the load: the task error must come first
    broken = tmp_path / "broken"
    checkpoint.save_model(broken, checkpoint.read_config(run), [{"x": torch.zeros(1)}], VOCAB)
    argv = [str(broken), "--tasks", "tiny_mc", "tiny_mcq", "--include-path", str(tasks), "--no-default-tasks"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tiny_mcq" in err and "did you mean tiny_mc" in err
    with pytest.raises(evaluation.EvalTaskError, match="no_such"):
        evaluation.run_eval_tasks(broken, ["no_such"], include_path=tasks, include_defaults=False)


def test_missing_lm_eval_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(evaluation, "HAVE_LM_EVAL", False)
    with pytest.raises(evaluation.EvalTaskError, match="pip install lm-eval"):
        evaluation.check_tasks(["hellaswag"])


def test_library_loader_rejects_bad_tp(ckpt):
    run, _, _ = ckpt
    with pytest.raises(ValueError, match="tensor-parallel size 3"):
        load_checkpoint_model(run, tp_size=3)


def _log_prob_tp2_worker(rank: int, world: int, out: str) -> None:
    from megatron_stablelm.kernels.cross_entropy import vocab_parallel_target_log_prob

    parallel.initialize(2)
    logits, targets = _scoring_case()
    width = logits.shape[-1] // world
    log_prob, greedy = vocab_parallel_target_log_prob(
        logits[..., rank * width : (rank + 1) * width], targets, parallel.tp_group()
    )
    if rank == 0:
        torch.save((log_prob, greedy), out)


def _scoring_case() -> tuple[torch.Tensor, torch.Tensor]:
    """[2, 5, 16] logits and targets: targets in both halves of the vocabulary, one target the argmax,
    one tied with the argmax, one below it."""
    logits = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(1))
    targets[0, 0], targets[0, 1] = logits[0, 0].argmax(), 12
    logits[0, 1, 12] = logits[0, 1, 3] = logits[0, 1].max() + 1.0  # a tie across the two halves
    return logits, targets


def test_vocab_parallel_log_prob_tp2_matches_log_softmax(tmp_path):
    """The adapter's scoring kernel over 2 gloo ranks against a single-process log_softmax/argmax."""
    out = tmp_path / "tp2.pt"
    run_distributed(_log_prob_tp2_worker, 2, str(out))
    log_prob, greedy = torch.load(out)
    logits, targets = _scoring_case()
    reference = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(log_prob, reference)
    target_logit = logits.gather(-1, targets[..., None]).squeeze(-1)
    assert torch.equal(greedy, target_logit >= logits.amax(-1))
    assert greedy[0, 0] and greedy[0, 1] and not greedy.all()


# ------------------------------------------------------------------- the trainer's validation loss
@pytest.fixture(scope="module")
def trained(tmp_path_factory, single_rank) -> tuple[Path, dict[int, float]]:
    """(run directory, the trainer's validation loss per iteration) of a tiny model trained 4 steps on two real shards blended
    as configs/demo.yml blends them (the same shards for the valid split, documents packed with
    ``reset_attention_mask``, dropout on): evaluated at iteration 2 (then saved) and at the end
    (saved first)."""
    from megatron_stablelm.config import config_from_dict
    from megatron_stablelm.tokenizers import HFTokenizer
    from megatron_stablelm.training.loop import Trainer
    from tests.data_helpers import tiny_tokenizer_files
    from tests.train_helpers import _real_data, tiny_dict

    root = tmp_path_factory.mktemp("trained")
    files = tiny_tokenizer_files()
    tokenizer = HFTokenizer(files["json"])
    prefixes = [str(root / f"{name}_text_document") for name in ("code", "prose")]
    for seed, prefix in enumerate(prefixes):
        lengths = torch.randint(5, 60, (150,), generator=torch.Generator().manual_seed(seed)).tolist()
        write_synthetic_shard(prefix, lengths, tokenizer.eod, tokenizer.vocab_size, seed=seed)
    cfg = dict(
        tokenizer_type="HFTokenizer",
        vocab_file=files["json"],
        train_data_paths=prefixes,
        train_data_weights=[0.5, 0.5],
        valid_data_paths=prefixes,
        valid_data_weights=[0.5, 0.5],
        padded_vocab_size=None,
        num_workers=0,  # no loader processes left behind in this one
        reset_position_ids=True,
        reset_attention_mask=True,
        eod_mask_loss=True,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        train_iters=4,
        eval_interval=2,
        eval_iters=2,
        checkpoint_factor=2,
        save=str(root / "run"),
    )
    config = config_from_dict(tiny_dict(**cfg))
    make_data, padded = _real_data(config)
    logs: list[str] = []
    trainer = Trainer(config, make_data, padded_vocab=padded, log=logs.append)
    trainer.setup()  # in this process (its single-rank group): no second interpreter to start
    result = trainer.train()
    assert result.exit_reason == "done", logs[-5:]
    return root / "run", {e["iteration"]: e["loss"] for e in result.evals}


@pytest.mark.parametrize("iteration", [2, 4])
def test_default_loss_is_the_trainers_validation_loss(trained, iteration, single_rank, capsys):
    """tools/evaluate.py CHECKPOINT (no --data) reports the ``[valid]`` loss the trainer logged for that
    checkpoint's model: at an evaluation iteration (evaluated, then saved) and at the end of training
    (saved, then evaluated), each evaluation reading its own samples of the valid split."""
    from tools.evaluate import main

    run, logged = trained
    assert sorted(logged) == [2, 4] and logged[2] != logged[4]
    assert main([str(run / f"iter_{iteration:07d}")]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)["validation"]
    per_eval = 2 * 2  # eval_iters × micro-batch (2) × accumulation (1) × DP (1)
    assert (report["first_sample"], report["samples"]) == ((iteration // 2 - 1) * per_eval, per_eval)
    assert report["loss"] == pytest.approx(logged[iteration], rel=1e-5, abs=1e-6)
    assert f"samples {report['first_sample']}-" in out.err


def test_evaluation_start_follows_the_trainers_order():
    cfg = data_config(train_iters=10, eval_interval=4)
    per_eval = 8
    assert evaluation.evaluation_start(cfg, None, per_eval) == 0  # weights only: the first evaluation's
    state = {"iteration": 4, "consumed_valid_samples": 8}  # evaluated at 4, then saved
    assert evaluation.evaluation_start(cfg, state, per_eval) == 0
    state = {"iteration": 6, "consumed_valid_samples": 8}  # not evaluated: the next evaluation's
    assert evaluation.evaluation_start(cfg, state, per_eval) == 8
    state = {"iteration": 10, "consumed_valid_samples": 16}  # saved at the end, then evaluated
    assert evaluation.evaluation_start(cfg, state, per_eval) == 16


@pytest.mark.parametrize("tool", ["generate", "evaluate"])
def test_help_keeps_each_example_on_its_own_line(tool, capsys):
    """The usage examples of the docstring (indented lines, a trailing backslash continuing one) come
    out of ``--help`` line for line, not reflowed into one paragraph."""
    import importlib

    module = importlib.import_module(f"tools.{tool}")
    with pytest.raises(SystemExit):
        module.main(["--help"])
    shown = capsys.readouterr().out.splitlines()
    examples = [line for line in module.__doc__.splitlines() if line.startswith("    ")]
    assert len(examples) >= 5 and all(line in shown for line in examples)
    assert sum(line.lstrip().startswith(("python tools/", "torchrun")) for line in shown) >= 4
