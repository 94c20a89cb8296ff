"""Shared test helpers: dtype tolerances, seeded generators, thread-count control."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}

# (rtol, atol) for outputs stored in each dtype. Inputs are quantized to the dtype before
# the float64 reference sees them, so only the op's own arithmetic and final rounding count.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def tol(dtype: torch.dtype) -> dict:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of gating outputs (weights, scores): float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_generator(*seed_parts) -> torch.Generator:
    """A CPU generator seeded from the test parameters, so every case is reproducible."""
    seed = 0
    for part in seed_parts:
        for ch in str(part):
            seed = (seed * 131 + ord(ch)) % (2**31 - 1)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def assert_close(actual, expected, dtype=None, msg=""):
    """Compare `actual` with a float64 reference, using the tolerance of `dtype` (default: actual's)."""
    dtype = dtype or actual.dtype
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), **tol(dtype), msg=lambda m: f"{msg}\n{m}"
    )


def assert_equal(actual, expected, msg=""):
    """Exact equality, dtype, shape and values."""
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        diff = (actual != expected).nonzero()
        raise AssertionError(
            f"{msg}: {diff.shape[0]} differing elements, first at {diff[:5].tolist()}\n"
            f"actual:\n{actual}\nexpected:\n{expected}"
        )


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, msg=""):
    """Same dtype, shape and bits (NaNs with the same payload compare equal)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (
        f"{msg}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    )
    if a.is_floating_point():
        int_type = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.contiguous().view(int_type), b.contiguous().view(int_type)
    if not torch.equal(a, b):
        raise AssertionError(f"{msg}: results differ bitwise at {(a != b).nonzero()[:5].tolist()}")


@pytest.fixture
def restore_num_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
