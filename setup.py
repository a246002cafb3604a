"""Packaging for megatron_stablelm.

torch is deliberately *not* pinned to a CUDA build: on a CPU machine install the local CPU wheel first
(`pip install torch==2.13.0`), and the range below is then already satisfied, so pip pulls no CUDA
packages. On a GPU cluster, install the torch build that matches the cluster's CUDA first.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_stablelm",
    version="0.1.0",
    description="GPT-NeoX-style distributed pretraining for the StableLM family on megatron-core + DeepSpeed",
    packages=find_packages(include=["megatron_stablelm", "megatron_stablelm.*"]),
    # the corpus recipes are data files read at run time (megatron_stablelm/data/recipes.py)
    package_data={"megatron_stablelm.data": ["recipes/*.yml"]},
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.4",
        # 0.17+ needs Python 3.12; 0.16.x is what Python 3.11 resolves. Both share the APIs used here.
        "megatron-core>=0.16,<0.18",
        "deepspeed>=0.16,<0.20",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "tiktoken>=0.7",
        # SPMTokenizer (GPT-NeoX's SentencePiece tokenizer, the Llama configs); protobuf reads a .model's
        # pieces when the export converts it into a tokenizer.json
        "sentencepiece>=0.2",
        "protobuf>=3.20",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy>=1.26",
        "tqdm>=4.66",
        "zstandard>=0.22",
        "pyarrow>=15",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5", "triton>=3.0", "liger-kernel>=0.5"],
        "datasets": ["datasets>=2.18"],
        "eval": ["lm-eval>=0.4.13"],
        "wandb": ["wandb>=0.17"],
        "tensorboard": ["tensorboard>=2.15"],
        "plot": ["matplotlib>=3.8"],
        # FP8 GEMMs (`fp8: tensorwise | rowwise`): torchao's float8 recipes. It has no dependencies, so it
        # pulls no other torch; the 0.18 line is what megatron_stablelm/kernels/fp8.py is tested with.
        "fp8": ["torchao>=0.18,<0.19"],
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "lm-eval>=0.4.13",
            "tensorboard>=2.15",
            "wandb>=0.17",
            "matplotlib>=3.8",
            # the Triton kernels' tests run in Triton's interpreter on CPU (tests/conftest.py)
            "triton>=3.4",
            # tests/test_fp8.py: torchao's FP8 casts and GEMMs run on CPU too
            "torchao>=0.18,<0.19",
        ],
    },
)
