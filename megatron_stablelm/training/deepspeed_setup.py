"""How DeepSpeed is imported for training: for the device there is, quietly, and compiling nothing.

* Without CUDA, DeepSpeed tries every accelerator it knows, then warns on every start that it is
  "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it":
  a line that looks like a problem where there is none. ``DS_ACCELERATOR=cpu`` (set before DeepSpeed
  is imported, unless the user chose one) names the CPU instead, and DeepSpeed says nothing.
* DeepSpeed's CPU communication backend compiles a shared-memory all-reduce op (``ShareMemCommBuilder``,
  ``deepspeed_shm_comm``) at its first start, with torch's JIT extension builder, into the per-user
  cache ``~/.cache/torch_extensions/<python/torch tag>/``: shared by every virtual environment and
  clone of that user, so it compiled again (31-106 s, silently) whenever another one had built it
  last, and a start killed while compiling left torch's build ``lock`` behind, on which every later
  start (and the test suite) waited forever without a word. The op serves only
  ``inference_all_reduce`` (DeepSpeed-Inference's tensor parallelism); training never calls it: ZeRO's
  and our collectives go through torch.distributed (gloo on CPU). Marked not compatible in DeepSpeed's
  table of ops (``deepspeed.ops.__compatible_ops__``, which ``build_shm_op`` consults first), it is
  skipped as on a platform without it: nothing is compiled, loaded or locked, and no ``/dev/shm``
  segment is made.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

SHM_COMM_BUILDER = "ShareMemCommBuilder"


def import_deepspeed() -> ModuleType:
    """``deepspeed``, imported as the module docstring says (call it before ``deepspeed.initialize``)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder(SHM_COMM_BUILDER)
    if builder is not None:  # the CPU accelerator's (CUDA has none)
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
    return deepspeed
