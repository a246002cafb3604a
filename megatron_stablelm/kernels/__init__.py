"""Element-wise kernels and attention backends used by the model.

Each function here is the *reference* path, written in plain PyTorch so it runs anywhere (CPU
included) and serves as the ground truth for the fused/Triton/flash variants, which plug in behind
the same signatures.
"""

from megatron_stablelm.kernels.attention import attention
from megatron_stablelm.kernels.norms import layer_norm, per_head_layer_norm
from megatron_stablelm.kernels.rotary import apply_rotary, rotary_cos_sin
from megatron_stablelm.kernels.swiglu import swiglu

__all__ = ["apply_rotary", "attention", "layer_norm", "per_head_layer_norm", "rotary_cos_sin", "swiglu"]
