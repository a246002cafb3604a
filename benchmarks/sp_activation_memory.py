"""Saved-activation bytes of one micro-batch at TP=2 (gloo, CPU), with and without sequence
parallelism, beside ``inspect``'s estimate (reference kernels, as CPU runs them): the check of the
estimate that benchmarks/RESULTS.md reports (sequence parallelism acts only at TP > 1, so one GPU
cannot measure it). From the repository root:

    CUDA_VISIBLE_DEVICES= PYTHONPATH=. torchrun --nproc_per_node 2 benchmarks/sp_activation_memory.py
"""

import json

import torch

from megatron_stablelm import parallel
from megatron_stablelm.inspect import activation_bytes
from megatron_stablelm.model import build_model
from tests.model_helpers import tiny_config
from tests.test_sequence_parallel import saved_activation_bytes

torch.set_num_threads(1)
parallel.initialize(2)
rank = torch.distributed.get_rank()
over = dict(
    hidden_size=512,
    num_attention_heads=8,
    num_kv_heads=2,
    seq_length=512,
    max_position_embeddings=512,
    padded_vocab_size=1024,
    num_layers=2,
    model_parallel_size=2,
)
for arch in ("stablelm-2-12b", "stablelm-2-1_6b"):
    extra = {} if arch == "stablelm-2-12b" else {"num_kv_heads": 8}
    for sp in (False, True):
        cfg = tiny_config(arch, **{**over, **extra}, sequence_parallel=sp, train_micro_batch_size_per_gpu=2)
        model = build_model(cfg, 1024)
        gen = torch.Generator().manual_seed(0)
        batch = {
            "tokens": torch.randint(0, 1024, (2, 512), generator=gen),
            "labels": torch.randint(0, 1024, (2, 512), generator=gen),
        }
        measured = saved_activation_bytes(model, batch)
        est = activation_bytes(cfg, 1024, tp=2, sequence_parallel=sp, fused_kernels=False)
        gpu = activation_bytes(cfg, 1024, tp=2, sequence_parallel=sp)
        if rank == 0:
            print(
                json.dumps(
                    dict(
                        arch=arch,
                        sp=sp,
                        measured=measured,
                        estimate_reference_kernels=est,
                        estimate_fused_kernels=gpu,
                        ratio=round(measured / est, 4),
                    )
                ),
                flush=True,
            )
parallel.destroy()
