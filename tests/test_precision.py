"""The one precision table (``config/precision.py``) agrees with torch, with the config's allowed
values and with the memory arithmetic; the one perplexity cap stays finite where it is logged."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_stablelm.config import PRECISIONS
from megatron_stablelm.config.precision import (
    SHORT_NAMES,
    TORCH_NAMES,
    bytes_per_value,
    optimizer_bytes_per_parameter,
    short_name,
    torch_dtype,
)
from megatron_stablelm.metrics import PERPLEXITY_MAX_LOSS, perplexity


@pytest.mark.parametrize("spelling", sorted(SHORT_NAMES))
def test_every_spelling_names_its_torch_dtype(spelling):
    dtype = torch_dtype(spelling)
    assert str(dtype).removeprefix("torch.") == TORCH_NAMES[short_name(spelling)]
    assert bytes_per_value(spelling) == dtype.itemsize


def test_the_config_accepts_exactly_the_table_spellings():
    assert set(PRECISIONS) == set(SHORT_NAMES)


def test_optimizer_state_is_adam_moments_plus_a_master_copy_below_fp32():
    assert optimizer_bytes_per_parameter("fp32") == 8
    assert optimizer_bytes_per_parameter("bf16") == optimizer_bytes_per_parameter("float16") == 12


def test_unknown_precision_names_the_accepted_ones():
    with pytest.raises(ValueError, match="unknown precision 'fp8'.*bf16"):
        torch_dtype("fp8")


def test_perplexity_is_exp_below_the_cap_and_finite_in_float32_above_it():
    assert perplexity(2.0) == math.exp(2.0)
    assert perplexity(1e6) == math.exp(PERPLEXITY_MAX_LOSS)
    assert np.isfinite(np.float32(perplexity(1e6)))
