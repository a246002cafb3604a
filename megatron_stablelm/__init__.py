"""megatron_stablelm: GPT-NeoX-style pretraining of the StableLM family on megatron-core and DeepSpeed."""

import warnings

# megatron-core warns on import (four times) that Transformer Engine and apex are absent. Both are
# optional here (our fused kernels and torch's optimizers stand in), so the notice is noise in every
# tool's output.
warnings.filterwarnings(
    "ignore", message="Transformer Engine and Apex are not installed", category=UserWarning
)

__version__ = "0.1.0"
