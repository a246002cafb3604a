"""Apply a run's execution choices to a built model, from outside its blocks.

The blocks of :mod:`megatron_stablelm.model` only compute. How they run is decided here, in one
place, from the config (as torchtitan's ``parallelize.py`` does for its models):

* the attention backend: every attention module gets the same :class:`~kernels.AttentionSelection`,
  held by the model, so building a model never changes what another model (or the free
  :func:`kernels.attention`) runs;
* selective recomputation (``recompute_granularity: selective``): the span between the QKV and the
  output projection is recomputed in backward (:func:`kernels.recompute_attention_core`);
* full activation recomputation (``checkpoint_activations``): the layers run in chunks of
  ``checkpoint_num_layers`` consecutive layers; each chunk keeps only its input and is recomputed whole
  in backward (GPT-NeoX's meaning of the key, and Megatron-LM's "uniform" method). A chunk of 1 keeps
  the least; a larger chunk keeps fewer inputs but holds a whole chunk's activations while it is
  recomputed. Only ``model.run_layers`` is replaced on the instance.
* FP8 GEMMs (``fp8``): the QKV, attention output and MLP linears of every layer run their GEMMs in
  FP8 with torchao's recipe while training (:mod:`megatron_stablelm.kernels.fp8`); an attribute of
  each linear, so parameters, checkpoints and evaluation are untouched.

Parameter names are untouched: checkpoints and HF conversion key on them, so a choice is applied by
rebinding a method or attribute on the instance (``model.run_layers``, ``attention.core``), never by a
wrapper module that would add a name level.
Tensor parallelism itself is not applied here: megatron-core's layers are built split, from the TP
group given to the model's constructor; the process groups are :mod:`megatron_stablelm.parallel`'s
(the name follows torchtitan's ``parallelize.py``, which applies its parallelisms the same way).
"""

from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint
from megatron.core import tensor_parallel
from torch import nn

from megatron_stablelm import kernels
from megatron_stablelm.config import Config

if TYPE_CHECKING:
    from megatron_stablelm.model import StableLMModel


def parallelize(model: StableLMModel, cfg: Config, *, attention: str | None = None) -> StableLMModel:
    """Apply ``cfg``'s attention type (or ``attention``, an ``attention_config`` name) and activation
    recomputation to ``model`` in place; returns it."""
    if attention is None:
        attention = kernels.attention_type_from_config(cfg.attention_config, cfg.num_layers)
    apply_attention_backend(model, attention)
    if cfg.recompute_granularity == "selective":
        apply_selective_recompute(model)
    if cfg.checkpoint_activations and cfg.checkpoint_num_layers:
        apply_full_recompute(model, cfg.checkpoint_num_layers)
    if cfg.fp8 is not None:
        apply_fp8(model, cfg.fp8)
    return model


def apply_attention_backend(model: StableLMModel, name: str) -> kernels.AttentionSelection:
    """Make every attention module of ``model`` run attention type ``name``; returns the selection
    (``selection.for_device(device)`` says which kernel runs there)."""
    selection = kernels.AttentionSelection(name)
    for layer in model.layers:
        layer.attention.attend = selection
    return selection


def attention_backend(model: StableLMModel, device: torch.device | str) -> kernels.AttentionBackend:
    """The attention kernel ``model`` runs on ``device`` (for logs and benchmark reports)."""
    return model.layers[0].attention.attend.for_device(device)


def apply_selective_recompute(model: StableLMModel) -> None:
    """Recompute QK-norm, rotary and attention in backward instead of keeping their intermediates."""
    for layer in model.layers:
        layer.attention.core = kernels.recompute_attention_core


def apply_fp8(model: StableLMModel, recipe: str | None) -> None:
    """Run the GEMMs of every layer's QKV, attention output and MLP linears in FP8 with torchao's
    ``recipe`` (``tensorwise`` / ``rowwise``; None: back to the compute dtype) while training. The
    embedding and the LM head stay in the compute dtype. torchao and the device are checked at the
    first FP8 GEMM (:mod:`megatron_stablelm.kernels.fp8`), so a tool that only reads a checkpoint
    trained this way never needs them."""
    for layer in model.layers:
        for linear in (layer.attention.qkv, layer.attention.dense, layer.mlp.fc1, layer.mlp.fc2):
            linear.fp8 = recipe


def apply_full_recompute(model: StableLMModel, chunk: int) -> None:
    """Recompute ``model``'s layers in backward in chunks of ``chunk`` consecutive layers (0..chunk-1,
    chunk..2·chunk-1, …), each keeping only its input, while training."""
    model.run_layers = types.MethodType(functools.partial(_recomputed_layers, chunk=chunk), model)


def _recomputed_layers(model, x, cos, sin, cu_seqlens=None, max_seqlen=None, cache=None, *, chunk: int):
    """``model.run_layers`` under full activation recomputation (training with autograd only).
    On GPU through megatron-core's checkpoint, which restores its CUDA RNG tracker so dropout is
    reproducible; megatron's needs CUDA, so on CPU through torch's (which restores the CPU RNG
    state)."""
    if cache is not None or not model.training or not torch.is_grad_enabled():
        return type(model).run_layers(model, x, cos, sin, cu_seqlens, max_seqlen, cache)
    layers = list(model.layers)
    for start in range(0, len(layers), chunk):
        run = functools.partial(_run_chunk, layers[start : start + chunk])
        if x.is_cuda:
            x = tensor_parallel.checkpoint(run, False, x, cos, sin, cu_seqlens, max_seqlen)
        else:
            x = torch.utils.checkpoint.checkpoint(
                run, x, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False, preserve_rng_state=True
            )
    return x


def _run_chunk(layers: list[nn.Module], x, cos, sin, cu_seqlens, max_seqlen):
    """One chunk's layers in order (the function a checkpoint runs twice)."""
    for layer in layers:
        x = layer(x, cos, sin, cu_seqlens, max_seqlen, None)
    return x
