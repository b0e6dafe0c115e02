"""The one attention seam of the stack.

Every attention in the VAE and the U-Net calls ``attention``, which splits the heads and hands
(B, heads, L, d) tensors to a backend: a function ``f(q, k, v, mask) -> (B, heads, Lq, d)``.

- ``"sdpa"`` (the default): ``torch.nn.functional.scaled_dot_product_attention``, which picks
  its fastest kernel that takes the inputs, falling back to its math kernel;
- ``"fused"``: the same function restricted to its fused kernels (flash, memory-efficient,
  cuDNN; on the CPU its flash kernel), which never materialise the L x L scores; an error where
  none takes the inputs, instead of a silent fallback (``fused_attention``);
- ``"math"``: ``math_attention``, the plain formula, the readable reference;
- any function of that signature: one's own attention, plugged in without editing this file.

Which backend a module runs, most specific first, looked up at every call (never at import):
1. the module's own ``attention_backend`` attribute, set with ``set_attention_backend(model_or_module, backend)``;
2. the process-wide ``with use_attention_backend(backend):`` block (``process_attention_backend()``);
3. the environment switch ``CDIFF_ATTENTION`` ("sdpa", "fused" or "math", see cdiff.flags).

``with capture_attention(unet) as maps:`` records the attention probabilities of chosen layers
(the cross-attention, by default), which run the math path for the time.

Precision: both built-in backends accumulate the scores and the softmax in fp32 whatever the
input dtype (the math path casts fp16/bf16 up; SDPA's kernels accumulate in fp32), which is
what SD 2.1-768's ``upcast_attention`` asks for. So cdiff needs no upcast flag, and the fast
fused kernels stay in use in half precision.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from cdiff import flags

# A backend's name, or a function (q, k, v, mask) -> out on (B, heads, L, d) tensors.
Backend = Union[str, Callable]
BACKEND_NAMES = ("sdpa", "math", "fused")

_forced: Backend | None = None


def _check_backend(backend: Backend | None, allow_none: bool = False) -> None:
    if (backend is None and allow_none) or callable(backend) or backend in BACKEND_NAMES:
        return
    raise ValueError(
        f"attention backend must be 'sdpa', 'math' or a function (q, k, v, mask) -> out "
        f"(or 'fused': SDPA's fused kernels only), got {backend!r}"
    )


@contextlib.contextmanager
def use_attention_backend(backend: Backend):
    """Use ``backend`` ("sdpa", "fused", "math" or a function) process-wide inside a ``with`` block.

    Modules whose own backend was set with ``set_attention_backend`` keep theirs.
    """
    global _forced
    _check_backend(backend)
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


def process_attention_backend() -> Backend:
    """The process-wide backend: the innermost ``use_attention_backend`` block's, else CDIFF_ATTENTION."""
    return _forced if _forced is not None else flags.get("CDIFF_ATTENTION")


def set_attention_backend(model: nn.Module, backend: Backend | None) -> int:
    """Give ``model`` (a whole model or one of its modules) and every attention module inside it
    its own backend; None returns them to the process-wide choice. Returns how many were set.

    Attention modules are those with an ``attention_backend`` attribute (the U-Net's
    ``Attention``, the VAE's ``MidAttention``).
    """
    _check_backend(backend, allow_none=True)
    count = 0
    for module in model.modules():
        if hasattr(module, "attention_backend"):
            module.attention_backend = backend
            count += 1
    if not count:
        raise ValueError(f"set_attention_backend: {type(model).__name__} holds no attention module")
    return count


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over keys, in fp32 (fp64 stays fp64): (B, heads, Lq, Lk).

    q: (B, heads, Lq, d); k: (B, heads, Lk, d). ``mask``, broadcastable to (B, heads, Lq, Lk),
    is boolean (True: the key takes part) or a float added to the scores, as in SDPA.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale  # (B, heads, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(dtype)
    return scores.softmax(dim=-1)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, heads, L, d) tensors, scores in fp32; the result in v's dtype."""
    return torch.matmul(attention_probs(q, k, mask).to(v.dtype), v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's fused scaled_dot_product_attention (flash, memory-efficient or its own math kernel)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on its fused kernels only: flash, memory-efficient or cuDNN (on the CPU: its flash kernel).

    Which takes what (CUDA; aten/src/ATen/native/transformers/cuda/sdp_utils.cpp): flash wants
    fp16/bf16, head size <= 256 and no mask (the U-Net's 64-wide heads without a padding mask);
    the memory-efficient kernel takes any head size that is a multiple of 8 (4 in fp32), a mask,
    and fp32 too: it runs the VAE's single 512-wide head. Raises RuntimeError where none applies.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(kernels):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def resolve_backend(backend: Backend | None = None) -> Callable:
    """The function that runs for a module whose own choice is ``backend`` (None: the process-wide one)."""
    choice = backend if backend is not None else process_attention_backend()
    if callable(choice):
        return choice
    if choice == "sdpa":
        return sdpa_attention
    if choice == "math":
        return math_attention
    if choice == "fused":
        return fused_attention
    raise ValueError(f"unknown attention backend {choice!r}; expected one of {BACKEND_NAMES} or a function")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Multi-head attention on token tensors.

    q: (B, Lq, heads*d); k, v: (B, Lk, heads*d). Returns (B, Lq, heads*d).
    mask: None, or broadcastable to (B, heads, Lq, Lk); boolean (True: attend) or additive.
    backend: the calling module's own choice; None takes the process-wide one.
    """
    batch, q_len, width = q.shape
    d = width // heads
    q, k, v = (t.reshape(batch, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
    out = resolve_backend(backend)(q, k, v, mask)
    return out.transpose(1, 2).reshape(batch, q_len, width)  # (B, Lq, heads*d)


def _recorder(store: list) -> Callable:
    def record(q, k, v, mask=None):
        probs = attention_probs(q, k, mask)  # (B, heads, Lq, Lk), fp32
        store.append(probs.detach())
        return torch.matmul(probs.to(v.dtype), v)

    return record


@contextlib.contextmanager
def capture_attention(model: nn.Module, layers: str = "cross_attn"):
    """Record the attention probabilities of every attention module of ``model`` whose name ends
    in ``layers`` (default: the U-Net's cross-attentions, ``...blocks.K.cross_attn``).

    Yields ``maps``: {module name: [probabilities (B, heads, Lq, Lk), fp32, one per call]}.
    Rows sum to 1 over the keys; Lq is the latent's h*w at that level, row-major. Inside the
    block those modules run the math path (the others keep their backend); afterwards each
    gets back the backend it had. With gradient checkpointing on, the recomputation in the
    backward pass records a second time.
    """
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "attention_backend") and (name == layers or name.endswith("." + layers))
    ]
    if not chosen:
        raise ValueError(f"capture_attention: {type(model).__name__} has no attention module named *{layers}")
    maps: dict[str, list[torch.Tensor]] = {name: [] for name, _ in chosen}
    saved = [(module, module.attention_backend) for _, module in chosen]
    try:
        for name, module in chosen:
            module.attention_backend = _recorder(maps[name])
        yield maps
    finally:
        for module, backend in saved:
            module.attention_backend = backend
