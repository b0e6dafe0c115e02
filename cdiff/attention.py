"""The one attention seam of the stack.

Every attention in the VAE and the U-Net calls ``attention``. The default backend is
``torch.nn.functional.scaled_dot_product_attention``; the plain ``math`` path exists as the
readable reference, and is chosen with ``CDIFF_ATTENTION=math`` or ``attention_backend("math")``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from cdiff import flags

_forced: str | None = None


@contextlib.contextmanager
def attention_backend(name: str):
    """Force a backend ("sdpa" or "math") inside a ``with`` block (tests, benchmarks)."""
    global _forced
    if name not in ("sdpa", "math"):
        raise ValueError(f"attention backend must be 'sdpa' or 'math', got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def current_backend() -> str:
    return _forced or flags.get("CDIFF_ATTENTION")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, heads, L, d) tensors.

    Scores and softmax run in fp32 when ``upcast`` so fp16/bf16 inputs cannot overflow;
    the result comes back in v's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if upcast:
        q, k = q.float(), k.float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, heads, Lq, Lk)
    weights = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(weights, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """Multi-head attention on token tensors.

    q: (B, Lq, heads*d); k, v: (B, Lk, heads*d). Returns (B, Lq, heads*d).
    ``upcast`` forces fp32 scores (SD 2.1 768's ``upcast_attention``); SDPA's fused kernels
    already accumulate in fp32, so it only matters on the math path and forces math there.
    """
    batch, q_len, width = q.shape
    d = width // heads
    q, k, v = (t.reshape(batch, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
    if current_backend() == "math" or upcast:
        out = math_attention(q, k, v, upcast=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, q_len, width)  # (B, Lq, heads*d)
