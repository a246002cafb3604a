"""Corpus recipes end to end (tiny corpora in each real schema and folder layout, through megatron-core's
IndexedDataset), resumable sharded preprocessing with its merge, atomic publication, and one-line
errors for bad inputs."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megatron_stablelm.data import pieces
from megatron_stablelm.data.indexed import check_shard
from megatron_stablelm.data.preprocess import Target, preprocess, preprocess_targets
from megatron_stablelm.data.recipes import available_sources, load_recipe, recipe_targets
from megatron_stablelm.tokenizers import HFTokenizer
from tests.data_helpers import random_text, shard_documents, tiny_tokenizer_files, write_records

ROOT = Path(__file__).resolve().parents[1]
PILE_SETS = ("ArXiv", "Books3", "Github")


def _tool():
    spec = importlib.util.spec_from_file_location("preprocess_data", ROOT / "tools" / "preprocess_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tok_file() -> str:
    return tiny_tokenizer_files()["json"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, dict]:
    """Each source in its downloaded layout and schema; ``expected[source][subset]`` is the list of
    texts each output must hold, in order (files sorted, rows in file order)."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("raw")
    exp: dict[str, dict[str, list[str]]] = {}

    def texts(n: int) -> list[str]:
        return [random_text(rng, rng.randint(1, 30)) for _ in range(n)]

    # RefinedWeb: data/*.parquet, text in `content`, no subsets.
    a, b = texts(5), texts(4)
    for name, part in (("train-00000-of-00002.parquet", a), ("train-00001-of-00002.parquet", b)):
        rows = [
            {"content": t, "url": f"https://x/{i}", "dump": "CC-MAIN-2023-06"} for i, t in enumerate(part)
        ]
        write_records(root / "refinedweb" / "data" / name, rows)
    exp["refinedweb"] = {"refinedweb": a + b}
    # RedPajama: jsonl per subset folder (common_crawl: .jsonl.zst one folder deeper); an unknown folder
    # is not a subset of this closed list and is ignored.
    exp["redpajama"] = {}
    for subset, files in {
        "arxiv": ["arxiv_0a.jsonl", "arxiv_1b.jsonl"],
        "common_crawl": ["2019-30/en_head_0000.jsonl.zst", "2023-06/en_head_0000.jsonl.zst"],
        "wikipedia": ["wiki.jsonl"],
        "not_a_subset": ["x.jsonl"],
    }.items():
        exp["redpajama"][subset] = []
        for name in files:
            part = texts(3)
            meta = {"redpajama_set_name": subset, "language": "en"}
            write_records(root / "redpajama" / subset / name, [{"text": t, "meta": meta} for t in part])
            exp["redpajama"][subset] += part
    del exp["redpajama"]["not_a_subset"]
    # The Pile: train/NN.jsonl.zst, sets tagged in meta.pile_set_name.
    pile_rows = []
    for name in ("00.jsonl.zst", "01.jsonl.zst"):
        rows = [{"text": t, "meta": {"pile_set_name": rng.choice(PILE_SETS)}} for t in texts(12)]
        write_records(root / "pile" / "train" / name, rows)
        pile_rows += rows
    exp["pile"] = {"rows": pile_rows}
    # StarCoder: parquet per language folder, text in `content`.
    exp["starcoder"] = {}
    for lang in ("python", "rust"):
        part = texts(4)
        rows = [{"content": t, "max_stars_repo_name": "a/b", "max_stars_count": 3} for t in part]
        write_records(root / "starcoder" / lang / "train-00000-of-00001.parquet", rows)
        exp["starcoder"][lang] = part
    # CulturaX: parquet per language code, `text`; the default is Stable LM 2's seven languages.
    exp["culturax"] = {}
    for lang in ("de", "en", "es", "fr", "it", "nl", "pt"):
        part = texts(2)
        write_records(
            root / "culturax" / lang / f"{lang}_part_00000.parquet", [{"text": t, "url": "u"} for t in part]
        )
        exp["culturax"][lang] = part
    return root, exp


def _cli(*args: str, tok: str) -> int:
    return _tool().main(
        [*args, "--tokenizer-type", "HFTokenizer", "--vocab-file", tok, "--append-eod", "--no-progress"]
    )


def _ids(tok: HFTokenizer, texts: list[str]) -> list[list[int]]:
    return [tok.encode(t) + [tok.eod] if t else [] for t in texts]


def test_shipped_recipes(capsys):
    """The five sources, their text fields and subset rules, as the issue names them."""
    assert available_sources() == ["culturax", "pile", "redpajama", "refinedweb", "starcoder"]
    fields = {s: (load_recipe(s).text_field, load_recipe(s).subsets_by) for s in available_sources()}
    assert fields == {
        "refinedweb": ("content", "none"),
        "redpajama": ("text", "directory"),
        "pile": ("text", "field"),
        "starcoder": ("content", "directory"),
        "culturax": ("text", "directory"),
    }
    assert load_recipe("pile").subset_field == "meta.pile_set_name"
    assert load_recipe("culturax").default == ("en", "de", "es", "fr", "it", "nl", "pt")
    assert _tool().main(["--source", "redpajama", "--describe"]) == 0
    assert "urls.txt" in capsys.readouterr().out


@pytest.mark.parametrize(
    "source, extra, outputs",
    [
        ("refinedweb", [], ["refinedweb"]),
        ("redpajama", [], ["arxiv", "common_crawl", "wikipedia"]),
        ("redpajama", ["--subset", "wikipedia", "arxiv"], ["wikipedia", "arxiv"]),
        ("starcoder", ["--subset", "rust"], ["rust"]),
        ("culturax", [], ["en", "de", "es", "fr", "it", "nl", "pt"]),
    ],
)
def test_recipe_end_to_end(tmp_path, raw, tok_file, source, extra, outputs):
    """``--source NAME``: one shard per selected subset at ``OUT/<source>/<subset>``, each holding exactly
    that subset's documents (tokenizer ids + EOD, in order), and nothing else under the output root."""
    root, exp = raw
    out = tmp_path / "out"
    assert (
        _cli(
            "--source",
            source,
            "--input-root",
            str(root / source),
            "--output-root",
            str(out),
            *extra,
            tok=tok_file,
        )
        == 0
    )
    tok = HFTokenizer(tok_file)
    for subset in outputs:
        assert shard_documents(str(out / source / subset)) == _ids(tok, exp[source][subset]), subset
    assert sorted(p.name for p in (out / source).iterdir()) == sorted(
        f"{s}{e}" for s in outputs for e in (".bin", ".idx", ".done", ".tokens.json")
    )


def test_pile_sets_selected_and_excluded_by_name(tmp_path, raw, tok_file):
    """The Pile's sets by ``meta.pile_set_name``: Books3 is left out by default, ``--subset`` keeps only
    the named sets, ``--exclude-subset`` leaves the named ones out; one output, ``OUT/pile/pile``."""
    root, exp = raw
    tok = HFTokenizer(tok_file)
    rows = exp["pile"]["rows"]
    for extra, keep in (
        ([], {"ArXiv", "Github"}),
        (["--subset", "Books3"], {"Books3"}),
        (["--exclude-subset", "Github"], {"ArXiv", "Books3"}),
    ):
        out = tmp_path / "_".join(extra or ["default"])
        args = ("--source", "pile", "--input-root", str(root / "pile"), "--output-root", str(out), *extra)
        assert _cli(*args, tok=tok_file) == 0
        texts = [r["text"] for r in rows if r["meta"]["pile_set_name"] in keep]
        assert shard_documents(str(out / "pile" / "pile")) == _ids(tok, texts), extra


def test_datasets_streaming_reader_matches_native(tmp_path, raw, tok_file):
    """``reader="datasets"`` (``load_dataset(streaming=True)`` on the local files) writes the same shards,
    for parquet and for .jsonl.zst with a metadata selection."""
    root, _ = raw
    kw = dict(tokenizer_type="HFTokenizer", vocab_file=tok_file, progress=False, log=lambda _: None)
    for source in ("starcoder", "pile"):
        recipe = load_recipe(source)
        digests = []
        for reader in ("native", "datasets"):
            targets = recipe_targets(recipe, str(root / source), str(tmp_path / reader))
            preprocess_targets(targets, jsonl_keys=[recipe.text_field], reader=reader, **kw)
            digests.append(
                [
                    Path(p + ".bin").read_bytes() + Path(p + ".idx").read_bytes()
                    for t in targets
                    for p in t.outputs.values()
                ]
            )
        assert digests[0] == digests[1], source


def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path, raw, tok_file, capsys):
    root, _ = raw
    cases = [
        (["--source", "pile", "--subset", "Books4"], "no subset 'Books4'"),
        (["--source", "redpajama", "--subset", "arxvi"], "no subset 'arxvi'"),
        (["--source", "starcoder", "--subset", "klingon"], str(root / "starcoder" / "klingon")),
        (["--source", "refinedweb", "--subset", "x"], "has no subsets"),
        (["--source", "nope"], "unknown source 'nope'"),
        (["--source", "culturax", "--subset", "zz"], "zz"),
    ]
    bad = write_records(tmp_path / "bad" / "de" / "de_part_00000.parquet", [{"content": "no text column"}])
    cases.append(
        (
            ["--source", "culturax", "--input-root", str(tmp_path / "bad"), "--subset", "de"],
            f"'{bad}': no column 'text'",
        )
    )
    cut = tmp_path / "cut" / "train" / "00.jsonl.zst"
    cut.parent.mkdir(parents=True)
    cut.write_bytes((root / "pile" / "train" / "00.jsonl.zst").read_bytes()[:-40])  # a half-downloaded file
    cases.append((["--source", "pile", "--input-root", str(tmp_path / "cut")], f"input '{cut}' is truncated"))
    for args, needle in cases:
        if "--input-root" not in args:
            source = args[1]
            args = [*args, "--input-root", str(root / source if (root / source).is_dir() else root)]
        assert _cli(*args, "--output-root", str(tmp_path / "o"), tok=tok_file) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, (args, err)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.bin"))


def test_sharded_jobs_resume_and_merge(tmp_path, raw, tok_file, capsys):
    """Two ``--shard i/2`` jobs split the files; merge refuses while a piece is missing or half-written;
    a re-run redoes only the missing piece; the merged shard is byte for byte the one-pass shard."""
    root, exp = raw
    base = [
        "--source",
        "redpajama",
        "--input-root",
        str(root / "redpajama"),
        "--output-root",
        str(tmp_path / "o"),
    ]
    assert _cli(*base, "--shard", "0/2", tok=tok_file) == 0
    capsys.readouterr()
    assert _cli(*base, "--merge", tok=tok_file) == 2
    err = capsys.readouterr().err
    assert "is missing (no '" in err and ".parts/" in err and err.count("\n") == 1
    assert _cli(*base, "--shard", "1/2", tok=tok_file) == 0
    parts = tmp_path / "o" / "redpajama" / "common_crawl.parts"
    done = sorted(parts.glob("*.done"))
    assert [p.name for p in done] == [
        "2019-30__en_head_0000.jsonl.zst.done",
        "2023-06__en_head_0000.jsonl.zst.done",
    ]
    # A job killed while writing a piece: its marker is gone, temporaries are left.
    victim = str(done[1])[: -len(".done")]
    os.remove(victim + ".done")
    Path(victim + ".bin.tmp-99999").write_bytes(b"partial")
    assert _cli(*base, "--merge", tok=tok_file) == 2
    err = capsys.readouterr().err
    assert f"piece '{victim}.bin' is half-written" in err and "\n" not in err.strip()
    assert not (tmp_path / "o" / "redpajama" / "arxiv.idx").exists()  # nothing merged before the check
    before = {p: p.stat().st_mtime_ns for p in parts.glob("*.bin")}
    capsys.readouterr()
    for i in range(2):
        assert _cli(*base, "--shard", f"{i}/2", tok=tok_file) == 0
    out = capsys.readouterr().out
    assert "1 pieces written" in out and out.count("0 pieces written") == 1
    assert not list(parts.glob("*.tmp-*"))
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if str(p) != victim + ".bin")
    assert _cli(*base, "--merge", tok=tok_file) == 0
    assert not parts.exists()  # pieces removed after the merge
    tok = HFTokenizer(tok_file)
    for subset in ("arxiv", "common_crawl", "wikipedia"):
        prefix = str(tmp_path / "o" / "redpajama" / subset)
        assert shard_documents(prefix) == _ids(tok, exp["redpajama"][subset])
    cc = root / "redpajama" / "common_crawl"
    one = preprocess(
        [str(cc / "*" / "*.jsonl.zst")],
        str(tmp_path / "one"),
        tokenizer_type="HFTokenizer",
        vocab_file=tok_file,
        progress=False,
    )
    for ext in (".bin", ".idx"):
        assert (
            Path(one.outputs["text"] + ext).read_bytes()
            == (tmp_path / "o" / "redpajama" / f"common_crawl{ext}").read_bytes()
        )
    assert _cli(*base, tok=tok_file) == 0
    assert capsys.readouterr().out.count("already merged") == 3


class _Killed(BaseException):
    """Stands for SIGKILL in-process: nothing after it runs (``abort`` is disabled as well)."""


def test_killed_job_leaves_no_acceptable_incomplete_pair(tmp_path, tok_file, monkeypatch):
    """A job killed in the middle of a piece (a real SIGKILL) and in the middle of the merge: no pair
    under any name that a reader accepts but that is incomplete; the re-run finishes the missing work."""
    rng = random.Random(1)
    inputs = tuple(
        str(
            write_records(
                tmp_path / "in" / f"{i}.jsonl", [{"text": random_text(rng, 20)} for _ in range(600)]
            )
        )
        for i in range(3)
    )
    out = tmp_path / "out" / "t"
    target = Target("t", inputs, {"text": str(out)}, str(tmp_path / "in"))
    script = textwrap.dedent(
        f"""
        import os, signal
        from megatron_stablelm.data import pieces, preprocess as pp
        calls, add = [], pieces.StreamingShardWriter.add_documents
        def add_then_die(self, *a):  # the 4th chunk is the first of the 2nd file: die mid-piece
            add(self, *a)
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        pieces.StreamingShardWriter.add_documents = add_then_die
        t = pp.Target("t", {inputs!r}, {{"text": {str(out)!r}}}, {str(tmp_path / "in")!r})
        pp.preprocess_targets([t], tokenizer_type="HFTokenizer", vocab_file={tok_file!r}, progress=False)
        """
    )

    def acceptable_incomplete() -> list[str]:
        bad = []
        for idx in (tmp_path / "out").rglob("*.idx"):
            prefix = str(idx)[:-4]
            check_shard(prefix, scan_tokens=False)  # a pair that exists is consistent ...
            if not os.path.exists(prefix + ".done"):
                bad.append(prefix)  # ... and complete: a marker follows every published pair
        return bad

    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr
    assert list((tmp_path / "out").rglob("*.tmp-*"))  # it really died mid-write
    assert acceptable_incomplete() in ([], [str(out) + ".parts/0.jsonl"]) and not os.path.exists(f"{out}.idx")

    add_shard = pieces.StreamingShardWriter.add_shard

    def add_shard_then_die(self, prefix):
        add_shard(self, prefix)
        if prefix.endswith("1.jsonl"):
            raise _Killed

    monkeypatch.setattr(pieces.StreamingShardWriter, "add_shard", add_shard_then_die)
    monkeypatch.setattr(pieces.StreamingShardWriter, "abort", lambda self: None)
    kw = dict(tokenizer_type="HFTokenizer", vocab_file=tok_file, progress=False, log=lambda _: None)
    with pytest.raises(_Killed):
        preprocess_targets([target], **kw)
    assert list((tmp_path / "out").glob("t.*.tmp-*")) and not os.path.exists(f"{out}.idx")
    assert acceptable_incomplete() == []
    monkeypatch.undo()
    stats = preprocess_targets([target], **kw)
    assert (stats.pieces_skipped, stats.pieces_done) == (3, 0)  # the pieces were all done: merge only
    assert not list((tmp_path / "out").rglob("*.tmp-*"))
    assert check_shard(str(out)).num_documents == 1800 and acceptable_incomplete() == []


def test_streaming_writer_is_megatron_cores_format(tmp_path, monkeypatch):
    """Byte for byte megatron-core's builder: documents (empty ones as Megatron-LM writes them), and
    appending whole shards as its ``add_index`` does, across the writer's block boundaries."""
    from megatron.core.datasets import indexed_dataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    assert pieces.INDEX_HEADER == indexed_dataset._INDEX_HEADER
    assert all(indexed_dataset.DType.code_from_dtype(t) == c for t, c in pieces.DTYPE_CODES.items())
    monkeypatch.setattr(pieces, "_BLOCK", 3)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, size=n) for n in (4, 0, 1, 9, 0, 0, 7, 2, 5)]
    ours = pieces.StreamingShardWriter(str(tmp_path / "a"), np.uint16)
    ref = IndexedDatasetBuilder(str(tmp_path / "ref_a.bin"), dtype=np.uint16)
    lengths = np.array([d.size for d in docs])
    ours.add_documents(np.concatenate(docs[:4]), lengths[:4])
    ours.add_documents(np.concatenate(docs[4:]), lengths[4:])
    for d in docs:
        ref.add_document(d, [d.size] if d.size else [])
    ours.finalize()
    ref.finalize(str(tmp_path / "ref_a.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"ref_a{ext}").read_bytes()
    merged = pieces.StreamingShardWriter(str(tmp_path / "m"), np.uint16)
    ref = IndexedDatasetBuilder(str(tmp_path / "ref_m.bin"), dtype=np.uint16)
    for _ in range(3):
        merged.add_shard(str(tmp_path / "a"))
        ref.add_index(str(tmp_path / "a"))
    merged.finalize()
    ref.finalize(str(tmp_path / "ref_m.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"m{ext}").read_bytes() == (tmp_path / f"ref_m{ext}").read_bytes()
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(ValueError, match="int32 tokens, not uint16"):
        wide = pieces.StreamingShardWriter(str(tmp_path / "w"), np.int32)
        wide.add_documents(np.arange(3), np.array([3]))
        wide.finalize()
        merged = pieces.StreamingShardWriter(str(tmp_path / "m2"), np.uint16)
        merged.add_shard(str(tmp_path / "w"))


def test_plain_inputs_sharded_then_merged(tmp_path, tok_file):
    """The plain flags with ``--shard`` / ``--merge``: same shard as the one-pass run."""
    rng = random.Random(3)
    for i in range(3):
        write_records(tmp_path / "in" / f"p{i}.jsonl", [{"text": random_text(rng, 9)} for _ in range(5)])
    common = ["--input", str(tmp_path / "in" / "*.jsonl")]
    for i in range(3):
        assert _cli(*common, "--output-prefix", str(tmp_path / "s"), "--shard", f"{i}/3", tok=tok_file) == 0
    assert _cli(*common, "--output-prefix", str(tmp_path / "s"), "--merge", tok=tok_file) == 0
    assert _cli(*common, "--output-prefix", str(tmp_path / "one"), tok=tok_file) == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"s_text_document{ext}").read_bytes() == (
            tmp_path / f"one_text_document{ext}"
        ).read_bytes()


def test_same_shard_twice_stops_the_second_job(tmp_path, tok_file, capsys):
    """A job that finds a piece's lock held by a live process (the same ``--shard`` started twice, a
    requeued task whose first run still lives) stops with one line naming the piece and the holder,
    and leaves the holder's live temporaries alone; a lock file left by a dead job blocks nothing."""
    rng = random.Random(4)
    for i in range(2):
        write_records(tmp_path / "in" / f"p{i}.jsonl", [{"text": random_text(rng, 9)} for _ in range(5)])
    common = ["--input", str(tmp_path / "in" / "*.jsonl"), "--output-prefix", str(tmp_path / "s")]
    assert _cli(*common, "--shard", "0/1", tok=tok_file) == 0
    markers = sorted(Path(str(tmp_path / "s_text_document") + ".parts").glob("*.done"))
    assert len(markers) == 2
    piece = str(markers[0])[: -len(".done")]
    os.remove(piece + ".done")  # this piece is to be redone
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, piece + ".lock"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        live = Path(f"{piece}.bin.tmp-{holder.pid}")
        live.write_bytes(b"being written")
        capsys.readouterr()
        assert _cli(*common, "--shard", "0/1", tok=tok_file) == 2
        err = capsys.readouterr().err
        assert f"piece '{piece}' is being written by another job (pid {holder.pid} on test-host" in err
        assert "--shard running twice" in err and err.count("\n") == 1
        assert live.exists() and not Path(piece + ".done").exists()
    finally:
        holder.kill()
        holder.wait()
    assert _cli(*common, "--shard", "0/1", tok=tok_file) == 0  # the dead holder's lock file blocks nothing
    assert Path(piece + ".done").exists() and not list(Path(piece).parent.glob("*.tmp-*"))
    assert _cli(*common, "--merge", tok=tok_file) == 0
    assert not Path(piece).parent.exists()  # lock files go with the pieces


_HOLD_LOCK = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.seek(0)
f.truncate()
f.write(f"pid {os.getpid()} on test-host")
f.flush()
print("locked", flush=True)
time.sleep(120)
"""


# ------------------------------------------------------------------------------------- recipes to mixture
MIXTURE = ROOT / "configs" / "data" / "stablelm-2-1_6b.yml"


def _readme_recipe_commands() -> list[list[str]]:
    """The ``tools/preprocess_data.py --source`` commands of the README's "Prepare the Stable LM 2 data"
    block, as argument lists (``$TOK`` dropped: the tokenizer does not change which shards are made)."""
    import shlex

    section = (ROOT / "README.md").read_text().split("### Prepare the Stable LM 2 data", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        words = shlex.split(line.split("#", 1)[0].replace("$TOK", ""))
        if "tools/preprocess_data.py" in words and "--input-root" in words:
            commands.append(words[words.index("tools/preprocess_data.py") + 1 :])
    return commands


def _downloaded(root: Path, recipe, mixture_subsets: set[str]) -> Path:
    """``RAW/<source>`` as the recipe's own download command leaves it: its ``--include "SUBSET/*"``
    folders when it names some (comments aside), else every known subset (or, for an open list, the ones the mixture
    names plus one more); one input file in each, named to match the recipe's ``files``."""
    import re

    commands = [line for line in recipe.download.splitlines() if not line.lstrip().startswith("#")]
    included = re.findall(r'"([^"/]+)/\*"', "\n".join(commands))
    subsets = included or sorted(
        set(recipe.names) | mixture_subsets | ({"extra"} if not recipe.closed else set())
    )
    pattern = recipe.files[0].replace("**/", "").replace("*", "part")
    for subset in subsets if recipe.subsets_by == "directory" else [None]:
        name = pattern.replace("{subset}", subset) if subset else pattern
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


def _prefixes_made(argv: list[str], tmp_path: Path, mixture: list[str]) -> set[str]:
    """The output prefixes ``tools/preprocess_data.py ARGV`` writes (its own argument parser, the
    recipe's selection), from downloads laid out by :func:`_downloaded`."""
    args = _tool()._parser().parse_args(argv)
    recipe = load_recipe(args.source)
    named = {Path(p).name for p in mixture if Path(p).parent.name == recipe.source}
    raw = _downloaded(tmp_path / args.input_root, recipe, named)
    targets = recipe_targets(recipe, str(raw), args.output_root, args.subset, args.exclude_subset)
    return {prefix for target in targets for prefix in target.outputs.values()}


def test_readme_recipe_commands_make_every_shard_the_mixture_names(tmp_path):
    """Following the README: the recipes' downloads and the ``--source`` commands, run from the
    directory where ``data`` is the output root, write every prefix configs/data/stablelm-2-1_6b.yml
    trains on (CulturaX's default selection includes English, the mixture's second-largest weight)."""
    import yaml

    mixture = yaml.safe_load(MIXTURE.read_text())["train_data_paths"]
    commands = _readme_recipe_commands()
    assert {argv[argv.index("--source") + 1] for argv in commands} == set(available_sources())
    made: set[str] = set()
    for argv in commands:
        made |= _prefixes_made(argv, tmp_path, mixture)
    assert not set(mixture) - made, f"the README's commands never make {sorted(set(mixture) - made)}"


def test_missing_shards_listed_at_once_with_the_commands_that_make_them(tmp_path, capsys):
    """tools/mixture_report.py (and ``check_shards_present``, which train.py calls before anything
    heavy) names every missing prefix in one error, each with a recipe command; that command, run as
    printed, makes exactly that prefix."""
    import yaml

    from megatron_stablelm.config import load_config
    from megatron_stablelm.data import DataError
    from megatron_stablelm.data.mixture import with_data_root
    from megatron_stablelm.data.recipes import check_shards_present, missing_shards
    from tests.data_helpers import write_synthetic_shard
    from tools.mixture_report import main as mixture_main

    data = tmp_path / "data"
    present = ["refinedweb/refinedweb", "culturax/de"]
    for name in present:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_shard(str(data / name), [20, 30], eod=0, vocab=100)
    configs = [str(ROOT / "configs" / "stablelm-2-1_6b.yml"), str(MIXTURE)]
    assert mixture_main([*configs, "--data-root", str(tmp_path), "--dp-size", "8"]) == 2
    err = capsys.readouterr().err
    mixture = yaml.safe_load(MIXTURE.read_text())["train_data_paths"]
    absent = [str(tmp_path / p) for p in mixture if p.split("/", 1)[1] not in present]
    assert err.startswith(f"error: {len(absent)} of the shards the config names do not exist")
    lines = err.splitlines()[1:]
    assert [line.split(": ", 1)[0].strip() for line in lines] == absent
    for line in lines:
        prefix, command = (part.strip() for part in line.split(": ", 1))
        argv = command.split()
        assert argv[:2] == ["python", "tools/preprocess_data.py"] and "$TOK" in argv
        argv = [a for a in argv[2:] if a != "$TOK"]
        assert prefix in _prefixes_made(argv, tmp_path / "cmd", [prefix]), line
    cfg = with_data_root(load_config(configs, report_ignored=False), str(tmp_path))
    assert missing_shards(cfg) == absent
    with pytest.raises(DataError, match="culturax/en: python tools/preprocess_data.py --source culturax"):
        check_shards_present(cfg)
