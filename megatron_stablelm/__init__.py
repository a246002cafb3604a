"""megatron_stablelm: GPT-NeoX-style pretraining of the StableLM family on megatron-core and DeepSpeed."""

__version__ = "0.1.0"
