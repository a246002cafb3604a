"""Element-wise kernels (rotary, SwiGLU, LayerNorm, RMSNorm, cross-entropy) and attention backends used by
the model.

Each public function keeps one signature and picks its implementation per call: a fused Triton kernel
for CUDA tensors when Triton is installed, the plain PyTorch ``*_reference`` function otherwise (CPU
included; ``MEGATRON_STABLELM_KERNELS=reference`` forces it on GPU). The references are the ground
truth the fused kernels are tested against. A model's attention runs the :class:`AttentionSelection`
it holds (given by :func:`megatron_stablelm.parallelize.parallelize`); the free function
:func:`attention` runs the process-wide :data:`default_attention`, which
:func:`select_attention_backend` changes (default: the best available).
"""

from megatron_stablelm.kernels.attention import (
    AttentionBackend,
    AttentionFn,
    AttentionSelection,
    attention,
    attention_math,
    attention_type_from_config,
    default_attention,
    resolve_attention_backend,
    select_attention_backend,
    selected_attention_backend,
)
from megatron_stablelm.kernels.cross_entropy import (
    cross_entropy_reference,
    fused_linear_cross_entropy,
    vocab_parallel_cross_entropy,
)
from megatron_stablelm.kernels.norms import (
    add_layer_norm,
    add_layer_norm_reference,
    add_rms_norm,
    add_rms_norm_reference,
    layer_norm,
    layer_norm_reference,
    per_head_layer_norm,
    per_head_layer_norm_reference,
    per_head_rms_norm,
    rms_norm,
    rms_norm_reference,
)
from megatron_stablelm.kernels.recompute import attention_core, checkpointed, recompute_attention_core
from megatron_stablelm.kernels.rotary import (
    apply_rotary,
    apply_rotary_qk,
    apply_rotary_reference,
    rotary_cos_sin,
)
from megatron_stablelm.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "AttentionBackend",
    "AttentionFn",
    "AttentionSelection",
    "add_layer_norm",
    "add_layer_norm_reference",
    "add_rms_norm",
    "add_rms_norm_reference",
    "apply_rotary",
    "apply_rotary_qk",
    "apply_rotary_reference",
    "attention",
    "attention_core",
    "attention_math",
    "attention_type_from_config",
    "checkpointed",
    "default_attention",
    "cross_entropy_reference",
    "fused_linear_cross_entropy",
    "layer_norm",
    "layer_norm_reference",
    "per_head_layer_norm",
    "per_head_layer_norm_reference",
    "per_head_rms_norm",
    "recompute_attention_core",
    "resolve_attention_backend",
    "rms_norm",
    "rms_norm_reference",
    "rotary_cos_sin",
    "select_attention_backend",
    "selected_attention_backend",
    "swiglu",
    "swiglu_reference",
    "vocab_parallel_cross_entropy",
]
