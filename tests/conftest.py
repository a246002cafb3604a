"""Set-up every test module shares, done before any of them is imported.

Triton's interpreter on CPU: ``tests/test_kernels_triton.py`` runs the Triton kernels on a machine
without a GPU through ``TRITON_INTERPRET=1``, and Triton reads that variable once, when it is first
imported. Importing ``megatron.core`` imports Triton (when installed), so the variable has to be set
before the first test module imports the package, which is here. ``import torch`` alone does not import
Triton, so asking torch whether there is a GPU first is safe. With a GPU the kernels compile natively.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
