"""Shared test utilities: seeded random weights and the parity tolerance."""

from __future__ import annotations

import math

import torch
from torch import nn

# Parity tolerance of the stack: max abs error <= REL_TOL * max abs value of the reference.
REL_TOL = 1e-4


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter seeded random values (no zero-initialised layer can hide a bug).

    Weights ~ N(0, 1/fan_in) so activations keep their scale through deep stacks;
    norm scales ~ 1 + N(0, 0.1^2); biases ~ N(0, 0.1^2). Order follows ``named_parameters``,
    so two modules with the same parameter order get the same values.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim == 1:
            value = (1.0 + 0.1 * noise) if ("norm" in name and name.endswith("weight")) else 0.1 * noise
        else:
            fan_in = p[0].numel()
            value = noise / math.sqrt(fan_in)
        p.copy_(value.to(p.dtype))
    return module


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
