"""Shared test utilities: seeded random weights and the parity tolerance."""

from __future__ import annotations

import torch

from cdiff.testing import one_thread  # noqa: F401  (tiny networks on one CPU thread)
from cdiff.testing import randomize_  # noqa: F401  (the tests' seeded random weights)

# Parity tolerance of the stack: max abs error <= REL_TOL * max abs value of the reference.
REL_TOL = 1e-4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    scale = expected.detach().abs().max().clamp_min(1e-30)
    return ((actual.detach().double() - expected.detach().double()).abs().max() / scale).item()


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, what: str, rel_tol: float = REL_TOL) -> float:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= rel_tol, f"{what}: max abs error {err:.2e} x max|ref| exceeds {rel_tol:.0e}"
    print(f"{what}: max abs error = {err:.2e} x max|ref|")
    return err


