"""The README's first command, shortened: build the demo corpus from local files, train
``configs/demo.yml`` through ``train.py`` on the real data pipeline, see the loss fall, export the
checkpoint to Hugging Face format and generate with ``transformers``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from megatron_stablelm.checkpoint import resolve_checkpoint
from tests.train_helpers import REPO, run_train, subprocess_env

pytestmark = pytest.mark.slow

LINE = re.compile(r"^iter (\d+)/\d+ \| tokens \S+ \| loss ([0-9.]+) \|", re.M)


def test_demo_trains_and_exports(tmp_path):
    data = tmp_path / "demo"
    built = subprocess.run(
        [
            sys.executable,
            "tools/make_demo_corpus.py",
            "--out",
            str(data),
            "--max-mb",
            "0.5",
            "--vocab-size",
            "2048",
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    shards = f"[{data}/code_text_document,{data}/prose_text_document]"
    run = tmp_path / "run"
    result = run_train(
        REPO / "configs" / "demo.yml",
        synthetic=False,
        timeout=600,
        OMP_NUM_THREADS="2",
        overrides=[
            f"vocab_file={data}/tokenizer.json",
            f"train_data_paths={shards}",
            f"valid_data_paths={shards}",
            f"test_data_paths=[{data}/prose_text_document]",
            f"save={run}",
            f"load={run}",
            "train_iters=40",
            "log_interval=1",
            "eval_interval=20",
            "checkpoint_factor=20",
        ],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = {int(i): float(v) for i, v in LINE.findall(result.stdout)}
    assert sorted(losses) == list(range(1, 41))
    first, last = losses[1], sum(losses[i] for i in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)  # ln(2048) ≈ 7.6 at the start
    assert "[valid] iteration 20" in result.stdout and "[test] iteration 40" in result.stdout
    assert "MFU" in result.stdout and "tok/s" in result.stdout
    log = (run / "train.log").read_text()  # every printed line, the data mixture report included
    assert "data mixture (train): " in log and "[train.py] done at iteration 40" in log
    ckpt = resolve_checkpoint(run)
    assert ckpt.name == "iter_0000040"

    hf = tmp_path / "hf"
    exported = subprocess.run(
        [sys.executable, "tools/convert_to_hf.py", str(ckpt), str(hf)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr

    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(hf)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(data / "tokenizer.json"))
    ids = tok("def main(", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert out.shape[1] == ids.shape[1] + 12
    assert isinstance(tok.decode(out[0]), str)

    # tools/generate.py on the trained checkpoint picks the same greedy tokens as transformers
    generated = subprocess.run(
        [sys.executable, "tools/generate.py", str(ckpt), "--prompt", "def main(", "--greedy", "--ignore-eod",
         "--max-new-tokens", "12", "--format", "jsonl", "--tokenizer", str(data / "tokenizer.json")],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-3000:]
    import json

    record = json.loads(generated.stdout.strip().splitlines()[-1])
    assert record["prompt_tokens"] == ids[0].tolist()
    assert record["tokens"] == out[0, ids.shape[1] :].tolist()
