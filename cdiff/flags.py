"""Environment switches, all in one place. Each is read when it is used, never at import.

CDIFF_ATTENTION   "sdpa" (default), "fused" or "math": the attention backend (see cdiff.attention).
CDIFF_LOSS        "auto" (default), "triton" or "torch": the C-Diff loss backend (see cdiff.loss).
CDIFF_GROUP_NORM  "torch" (default) or "triton": GroupNorm (+ SiLU) in the VAE and the U-Net on
                  PyTorch's op, or on the fused Triton kernel of kernels/group_norm_silu.py for
                  CUDA tensors (CPU tensors keep PyTorch's op, except under TRITON_INTERPRET=1,
                  Triton's interpreter, which the tests use; inside torch.compile, PyTorch's op).
                  Off by default until a GPU measures it faster (benchmarks/bench_group_norm.py).

CDIFF_PROGRESS_SECONDS  seconds between progress lines when stderr is not a terminal (a log file,
                  a batch job); default 30 (cdiff.progress). On a terminal the bar is redrawn instead.

Paths to the metric networks' weights (cdiff.perceptual); unset by default, then the caches `cdiff fetch` fills:
CDIFF_LPIPS_VGG       torchvision's ImageNet VGG16, vgg16-397923af.pth (the LPIPS trunk).
CDIFF_FID_INCEPTION   pytorch-fid's Inception, pt_inception-2015-12-05-6726825d.pth (FID and KID).
CDIFF_DISTS           DISTS's alpha/beta, the authors' DISTS_pytorch/weights.pt (cdiff.networks).
CDIFF_DINO            the DINOv3-SAT ViT-L/16 folder in the transformers layout (the DINO metric).
CDIFF_CACHE_DIR       one folder for everything `cdiff fetch` downloads and converts (its --cache-dir):
                      hub/ (Hugging Face layout), checkpoints/ (web files), models/ (native files);
                      `cdiff evaluate` looks there for the metric networks.
                      Unset: the Hugging Face cache, torch's hub cache and ~/.cache/cdiff (see cdiff.hub).

Read by `cdiff fetch` (cdiff.hub), with the meaning huggingface_hub and torch give them:
HF_ENDPOINT (the hub's address), HF_TOKEN (a token for gated repositories), HF_HUB_OFFLINE=1
(download nothing, use the cache), HF_HOME / HF_HUB_CACHE (the hub cache), TORCH_HOME (torch's).
"""

from __future__ import annotations

import os

_CHOICES = {
    "CDIFF_ATTENTION": ("sdpa", "math", "fused"),
    "CDIFF_LOSS": ("auto", "triton", "torch"),
    "CDIFF_GROUP_NORM": ("torch", "triton"),
}
_PATHS = ("CDIFF_LPIPS_VGG", "CDIFF_FID_INCEPTION", "CDIFF_DISTS", "CDIFF_DINO", "CDIFF_CACHE_DIR")


def get(name: str) -> str:
    """The value of switch ``name``, or its default (the first choice); a bad value raises."""
    choices = _CHOICES[name]
    value = os.environ.get(name, choices[0]).strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"environment variable {name}={value!r}: expected one of {choices}")
    return value


def get_path(name: str) -> str | None:
    """The file path held by switch ``name``, or None when it is unset or empty."""
    if name not in _PATHS:
        raise KeyError(f"{name} is not a path switch; known: {_PATHS}")
    value = os.environ.get(name, "").strip()
    return value or None


def get_seconds(name: str, default: float) -> float:
    """The non-negative number of seconds held by switch ``name``, or ``default`` when unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"environment variable {name}={value!r}: expected a number of seconds >= 0")
    return seconds
