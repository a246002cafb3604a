"""Model-level properties: TP-independent initialisation, init scales, packed documents, KV cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_stablelm import kernels, parallel
from megatron_stablelm.model import (
    InferenceCache,
    StableLMModel,
    build_model,
    canonical_shapes,
    config_splits,
    init_std,
    split_qkv,
)
from megatron_stablelm.parallelize import attention_backend, parallelize
from tests.dist_helpers import run_distributed
from tests.model_helpers import TINY_ARCHS, randomize, tiny_config
from tests.train_helpers import saved_activation_bytes

VOCAB = 256


@pytest.fixture(scope="module")
def single_rank():
    parallel.initialize(1)
    yield
    parallel.destroy()


def _init_worker(rank: int, world: int, out: str) -> None:
    parallel.initialize(2)
    cfg = tiny_config("stablelm-2-12b", model_parallel_size=2)
    model = build_model(cfg, VOCAB, seed=11)
    torch.save(model.local_state_dict(), Path(out) / f"rank{rank}.pt")


def test_initialisation_is_the_same_at_every_tp_size(tmp_path, single_rank):
    """Each canonical tensor is drawn whole and then split, so TP=2 ranks hold exactly the shards of
    the TP=1 model (checked by merging them back)."""
    whole_model = build_model(tiny_config("stablelm-2-12b"), VOCAB, seed=11)
    whole = whole_model.local_state_dict()
    run_distributed(_init_worker, 2, str(tmp_path))
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, tensor in whole.items():
        merged = whole_model.splits[name].merge([s[name] for s in shards])
        assert torch.equal(merged, tensor), name


@pytest.mark.parametrize("method", ["normal", "scaled_normal", "small_init", "wang_init"])
def test_init_methods_have_the_gpt_neox_scale(method, single_rank):
    cfg = tiny_config("stablelm-3b-4e1t", init_method=method, hidden_size=256, num_attention_heads=4)
    model = build_model(cfg, VOCAB, seed=0)
    expected = {
        "normal": 0.02,
        "scaled_normal": 0.02 / math.sqrt(2 * cfg.num_layers),
        "small_init": math.sqrt(2 / (5 * 256)),
        "wang_init": 2 / (cfg.num_layers * math.sqrt(256)),
    }[method]
    assert init_std(method, cfg) == pytest.approx(expected)
    fc1 = model.layers[0].mlp.fc1.weight
    assert fc1.std().item() == pytest.approx(expected, rel=0.03)
    assert model.layers[0].input_norm.weight.eq(1).all() and model.layers[0].input_norm.bias.eq(0).all()


@pytest.mark.parametrize("arch", ["stablelm-2-12b", "stablelm-2-1_6b"])
def test_packed_documents_equal_separate_documents(arch, single_rank):
    """With document boundaries (cu_seqlens) and restarted positions, each packed document gives the
    logits of running it alone."""
    cfg = tiny_config(arch)
    model = build_model(cfg, VOCAB, seed=2).eval()
    randomize(model, 2)
    gen = torch.Generator().manual_seed(0)
    lengths = [[5, 11, 16], [32]]
    tokens = torch.randint(0, VOCAB, (2, 32), generator=gen)
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in row]) for row in lengths]).view(2, 32)
    bounds = [0]
    for row in lengths:
        for n in row:
            bounds.append(bounds[-1] + n)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    with torch.no_grad():
        packed = model(tokens, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=32)
        flat_tokens, flat_packed = tokens.reshape(-1), packed.reshape(-1, VOCAB)
        for start, end in zip(bounds[:-1], bounds[1:]):
            alone = model(flat_tokens[start:end][None])[0]
            torch.testing.assert_close(flat_packed[start:end], alone, rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward(single_rank):
    cfg = tiny_config("stablelm-2-12b")
    model = build_model(cfg, VOCAB, seed=4).eval()
    randomize(model, 4)
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = InferenceCache(model, batch=2, max_len=24)
        steps = [model(tokens[:, :12], cache=cache)] + [
            model(tokens[:, i : i + 1], cache=cache) for i in range(12, 20)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the cache size"), torch.no_grad():
        model(tokens[:, :5], cache=cache)


def _loss_and_grads(model, tokens, labels):
    model.zero_grad(set_to_none=True)
    losses = model(tokens, labels=labels)
    losses.mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses.detach(), grads


@pytest.mark.parametrize("arch", ["stablelm-2-1_6b", "stablelm-base-alpha-v1"])
def test_fused_lm_head_loss_equals_logits_path(arch, single_rank):
    """``use_flash_cross_entropy`` (LM head fused into the loss) gives the losses and gradients of the
    logits + vocab-parallel cross-entropy path."""
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(5))
    labels = torch.roll(tokens, -1, dims=1)
    results = []
    for fused in (False, True):
        model = build_model(tiny_config(arch, use_flash_cross_entropy=fused), VOCAB, seed=6)
        randomize(model, 6)
        results.append(_loss_and_grads(model, tokens, labels))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _fused_tp2_worker(rank: int, world: int, out: str) -> None:
    parallel.initialize(2)
    case = torch.load(Path(out) / "case.pt")
    model = build_model(
        tiny_config("stablelm-2-12b", model_parallel_size=2, use_flash_cross_entropy=True), VOCAB
    )
    model.load_canonical_state_dict(case["state"])
    loss, grads = _loss_and_grads(model, case["tokens"], case["labels"])
    torch.save({"loss": loss, "grads": grads}, Path(out) / f"rank{rank}.pt")


def test_fused_lm_head_loss_tp2_equals_tp1(tmp_path, single_rank):
    model = build_model(tiny_config("stablelm-2-12b"), VOCAB, seed=7)
    randomize(model, 7)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(8))
    labels = torch.roll(tokens, -1, dims=1)
    ref_loss, ref_grads = _loss_and_grads(model, tokens, labels)
    torch.save({"state": model.local_state_dict(), "tokens": tokens, "labels": labels}, tmp_path / "case.pt")
    run_distributed(_fused_tp2_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        torch.testing.assert_close(r["loss"], ref_loss, rtol=1e-5, atol=1e-6)
    for name, ref in ref_grads.items():
        merged = model.splits[name].merge([r["grads"][name] for r in ranks])
        torch.testing.assert_close(merged, ref, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kv_heads,group", [(4, 1), (2, 3)], ids=["multihead", "gqa"])
@pytest.mark.parametrize("used", ["qkv", "qv"], ids=["all-used", "k-unused"])
def test_split_qkv_gradient_equals_slicing(kv_heads, group, used):
    """The fused-QKV split's hand-written backward against autograd's own for plain slicing."""
    torch.manual_seed(0)
    s, b, d = 5, 2, 8
    fused = torch.randn(s, b, kv_heads, group + 2, d, dtype=torch.float64)
    weights = [torch.randn(s, b, n, d, dtype=torch.float64) for n in (kv_heads * group, kv_heads, kv_heads)]

    def loss(q, k, v):
        parts = {"q": q, "k": k, "v": v}
        return sum((parts[name] * weights["qkv".index(name)]).sum() for name in used)

    mine = fused.clone().requires_grad_()
    q, k, v = split_qkv(mine)
    loss(q, k, v).backward()
    plain = fused.clone().requires_grad_()
    pq = plain[:, :, :, :group].reshape(s, b, kv_heads * group, d)
    loss(pq, plain[:, :, :, group], plain[:, :, :, group + 1]).backward()
    for got, want in zip((q, k, v), (pq, plain[:, :, :, group], plain[:, :, :, group + 1]), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(mine.grad, plain.grad, rtol=0, atol=0)


def _splits_tp2_worker(rank: int, world: int, out: str) -> None:
    parallel.initialize(2)
    case = torch.load(Path(out) / "case.pt")
    results = {}
    for arch in TINY_ARCHS:
        model = build_model(tiny_config(arch, model_parallel_size=2), VOCAB, seed=13)
        initialised = {name: t.clone() for name, t in model.local_state_dict().items()}
        model.load_canonical_state_dict(case[arch]["state"])
        loss, grads = _loss_and_grads(model, case["tokens"], case["labels"])
        results[arch] = {"init": initialised, "loss": loss, "grads": grads}
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_derived_splits_are_the_splits_tp2_computes_with(tmp_path, single_rank):
    """For every parameter of every tiny architecture, the split read off the layers is the one a
    TP=2 model actually has: its initialised shards are those splits of the TP=1 tensors, and loaded
    with those splits of a perturbed TP=1 model it computes the TP=1 loss, with gradients that merge
    back into the TP=1 gradients (a misplaced shard would change the function)."""
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(14))
    case, reference = {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1)}, {}
    for arch in TINY_ARCHS:
        model = build_model(tiny_config(arch), VOCAB, seed=13)
        initialised = {name: t.clone() for name, t in model.local_state_dict().items()}
        randomize(model, 13)
        reference[arch] = (model.splits, initialised, *_loss_and_grads(model, tokens, case["labels"]))
        case[arch] = {"state": model.local_state_dict()}
    torch.save(case, tmp_path / "case.pt")
    run_distributed(_splits_tp2_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for arch, (splits, initialised, ref_loss, ref_grads) in reference.items():
        assert splits == config_splits(tiny_config(arch)), arch
        assert splits.keys() == ref_grads.keys() == initialised.keys(), arch
        for name, spec in splits.items():
            for r in range(2):
                shard = ranks[r][arch]["init"][name]
                assert torch.equal(shard, spec.split(initialised[name], r, 2)), (arch, name, r)
                assert spec.full_shape(shard.shape, 2) == initialised[name].shape, (arch, name)
            merged = spec.merge([ranks[r][arch]["grads"][name] for r in range(2)])
            torch.testing.assert_close(merged, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{arch} {name}")
        for r in range(2):
            torch.testing.assert_close(ranks[r][arch]["loss"], ref_loss, rtol=1e-5, atol=1e-6)


def test_building_models_leaves_the_process_attention_alone(single_rank):
    """The model holds the attention backend it was given; building one (or the meta model behind
    shapes and splits) does not change what any other model or the free ``kernels.attention`` runs."""
    cfg = tiny_config("stablelm-2-1_6b")  # no attention_config: "flash", i.e. SDPA on CPU
    kernels.select_attention_backend("math")
    try:
        model = build_model(cfg, VOCAB, seed=0)
        canonical_shapes(cfg, VOCAB)
        config_splits(cfg)
        math_model = build_model(cfg, VOCAB, seed=0, attention="math")
        with torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.long))
        assert kernels.selected_attention_backend("cpu").name == "math"
        assert attention_backend(model, "cpu").name == "sdpa"
        assert attention_backend(math_model, "cpu").name == "math"
    finally:
        kernels.select_attention_backend("flash")
    assert attention_backend(math_model, "cpu").name == "math"


_RECOMPUTE = {
    # granularity: config overrides, and the first module the recomputation runs again
    "full": ({"checkpoint_activations": True, "checkpoint_num_layers": 1}, "input_norm"),
    "selective": ({"recompute_granularity": "selective"}, "attention.q_norm"),
}


@pytest.mark.parametrize("granularity", sorted(_RECOMPUTE))
def test_parallelize_recomputes_with_the_same_names_and_gradients(granularity, single_rank):
    """Full and selective recomputation are applied from outside: parameter names (the canonical
    names) stay as they are, the recomputed span runs again in backward, and the gradients are those
    of the plain model."""
    overrides, rerun = _RECOMPUTE[granularity]
    plain = build_model(tiny_config("stablelm-2-12b"), VOCAB, seed=3)
    randomize(plain, 3)
    cfg = tiny_config("stablelm-2-12b", **overrides)
    recomputed = StableLMModel(cfg, VOCAB)
    names = [name for name, _ in recomputed.named_parameters()]
    parallelize(recomputed, cfg)
    assert [name for name, _ in recomputed.named_parameters()] == names
    assert names == [name for name, _ in plain.named_parameters()]
    assert list(recomputed.state_dict()) == list(plain.state_dict())
    recomputed.load_canonical_state_dict(plain.local_state_dict())
    calls = []
    for layer in recomputed.layers:
        layer.get_submodule(rerun).register_forward_hook(lambda *_: calls.append(1))
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(tokens, -1, dims=1)
    ref_loss, ref_grads = _loss_and_grads(plain, tokens, labels)
    loss, grads = _loss_and_grads(recomputed, tokens, labels)
    assert len(calls) == 2 * cfg.num_layers  # in forward, then again in backward
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def _saved_bytes(model, tokens, labels) -> int:
    return saved_activation_bytes(model, lambda: model(tokens, labels=labels) / tokens.numel())


def test_checkpoint_num_layers_recomputes_chunks_of_layers(single_rank):
    """``checkpoint_num_layers: N`` has GPT-NeoX's meaning: the layers are recomputed in chunks of N
    consecutive layers, each chunk keeping only its input. Every layer runs again in backward whatever
    N is (gradients those of the plain model), and each chunk fewer keeps one layer input fewer (so
    Stability's published 24 or 40, one chunk for the whole stack, keeps one input)."""
    layers, b, s = 4, 2, 32
    tokens = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(8))
    labels = torch.roll(tokens, -1, dims=1)
    plain = build_model(tiny_config("stablelm-2-12b", num_layers=layers), VOCAB, seed=8)
    randomize(plain, 8)
    ref_loss, ref_grads = _loss_and_grads(plain, tokens, labels)
    saved = {}
    for chunk in (1, 2, 3, layers):
        cfg = tiny_config(
            "stablelm-2-12b", num_layers=layers, checkpoint_activations=True, checkpoint_num_layers=chunk
        )
        model = StableLMModel(cfg, VOCAB)
        parallelize(model, cfg)
        model.load_canonical_state_dict(plain.local_state_dict())
        calls = []
        for index, layer in enumerate(model.layers):
            layer.input_norm.register_forward_hook(lambda *_, i=index, seen=calls: seen.append(i))
        loss, grads = _loss_and_grads(model, tokens, labels)
        assert sorted(calls) == sorted(2 * list(range(layers))), chunk  # forward, then again in backward
        torch.testing.assert_close(loss, ref_loss)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
        saved[chunk] = _saved_bytes(model, tokens, labels)
    layer_input = b * s * plain.cfg.hidden_size * 4  # fp32
    for chunk in (2, 3, layers):
        assert saved[1] - saved[chunk] == (layers - math.ceil(layers / chunk)) * layer_input, (chunk, saved)
