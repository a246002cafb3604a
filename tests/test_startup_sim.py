"""The start-up simulation at a tiny scale, and the blend cache it proposes.

``tools/simulate_startup.py`` is run by hand at scale; here its pieces run on a few thousand
documents: the synthetic shards are real shards (``check_shard`` and megatron-core read them) and
take no disk blocks, one rank's start-up runs in-process (cold, then warm from the cache), and
:class:`CheckedBlendedDataset` (what ``build_datasets`` blends with) gives megatron-core's blend, from
its cache on the second build, and refuses a bad cache file in a shared directory.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_stablelm.data import DataError
from megatron_stablelm.data.index_cache import CheckedBlendedDataset
from megatron_stablelm.data.indexed import check_shard

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("simulate_startup", TOOLS / "simulate_startup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rank_runs(sim, tmp_path_factory):
    """Two shards, a cold and a warm rank start-up in this process."""
    work = tmp_path_factory.mktemp("sim")
    prefixes = []
    for i, (path, tokens) in enumerate(
        (("data/redpajama/arxiv", 60_000), ("data/refinedweb/refinedweb", 300_000))
    ):
        mean, sigma = sim.doc_length_params(path)
        lengths = sim.synthetic_lengths(tokens, mean, sigma, seed=i)
        assert int(lengths.sum()) == tokens and lengths.min() >= 1
        prefix = str(work / path)
        sim.write_sparse_shard(prefix, lengths, np.uint16)
        prefixes.append(prefix)
    spec = {
        "vocab_size": 65_536,
        "config": {
            "seq_length": 256,
            "train_iters": 10,
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 200,
            "eval_iters": 0,
            "train_data_paths": prefixes,
            "train_data_weights": [0.5, 0.5],
            "data_cache_dir": str(work / "index-cache"),
            "seed": 1234,
        },
    }
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    return prefixes, sim._rank_run(str(spec_path)), sim._rank_run(str(spec_path))


def test_synthetic_shards_are_real_and_sparse(rank_runs):
    prefixes, _, _ = rank_runs
    arxiv = check_shard(prefixes[0], 65_536)
    assert arxiv.num_tokens == 60_000 and arxiv.sequence_lengths.mean() > 2_000  # long documents
    ds = IndexedDataset(prefixes[1])
    assert len(ds) == check_shard(prefixes[1]).num_sequences and int(ds[len(ds) - 1].max()) == 0
    assert os.stat(prefixes[1] + ".bin").st_blocks == 0  # sparse: no disk used


def test_rank_startup_cold_then_warm(rank_runs):
    _, cold, warm = rank_runs
    assert cold["samples"] == warm["samples"] == 2_000
    assert len(cold["per_source_s"]) == 2 and cold["peak_rss_gib"] > 0
    assert set(cold["phases"]) == set(warm["phases"])
    assert warm["phases"]["per-source index"] < cold["phases"]["per-source index"]  # loaded, not built


def test_checked_blend_matches_megatron_and_caches(sim, tmp_path, rank_runs):
    from megatron_stablelm.config import Config
    from megatron_stablelm.data import build_datasets

    prefixes, _, _ = rank_runs
    cfg = Config(
        seq_length=256,
        train_iters=10,
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=200,
        eval_iters=0,
        train_data_paths=prefixes,
        train_data_weights=[0.3, 0.7],
        data_cache_dir=str(tmp_path / "index-cache"),
    )
    built_by_run = build_datasets(cfg, sim.SimTokenizer(65_536)).train  # cached by build_datasets
    assert isinstance(built_by_run, CheckedBlendedDataset)
    config = copy.copy(built_by_run.config)
    config.path_to_cache = None  # megatron-core's own (greedy) blend: the same shares, its own order
    blend = BlendedDataset(built_by_run.datasets, built_by_run.weights, built_by_run.size, config)
    # the reference: every sample of every source in order of due time (k + 0.5) / weight, brute force
    due = sorted(
        ((k + 0.5) / w, d, k) for d, w in enumerate(blend.weights) for k in range(int(blend.size * w) + 3)
    )[: blend.size]
    assert built_by_run.dataset_index.tolist() == [d for _, d, _ in due]
    assert built_by_run.dataset_sample_index.tolist() == [k for _, _, k in due]
    greedy = np.bincount(blend.dataset_index, minlength=2)
    assert np.abs(np.bincount(built_by_run.dataset_index, minlength=2) - greedy).max() <= 1
    blend.dataset_index, blend.dataset_sample_index = (
        np.array(built_by_run.dataset_index),
        np.array(built_by_run.dataset_sample_index),
    )
    config = copy.copy(blend.config)
    config.path_to_cache = str(tmp_path / "blend")
    os.makedirs(config.path_to_cache, mode=0o700)

    def checked():
        return CheckedBlendedDataset(blend.datasets, blend.weights, blend.size, config)

    built = checked()
    assert np.array_equal(built.dataset_index, blend.dataset_index)
    assert np.array_equal(built.dataset_sample_index, blend.dataset_sample_index)
    loaded = checked()
    assert isinstance(loaded.dataset_index, np.memmap)  # from the cache, memory-mapped
    assert np.array_equal(loaded.dataset_sample_index, blend.dataset_sample_index)
    (index_file,) = [p for p in Path(config.path_to_cache).iterdir() if p.name.endswith("-dataset_index.npy")]
    index_file.write_bytes(b"\x80\x04not an array")  # a pickle where an array should be
    assert np.array_equal(checked().dataset_index, blend.dataset_index)  # private: rebuilt
    index_file.write_bytes(b"\x80\x04not an array")
    os.chmod(config.path_to_cache, 0o777)  # shared: refused, left in place
    with pytest.raises(DataError, match=index_file.name):
        checked()
    assert index_file.read_bytes().startswith(b"\x80")
