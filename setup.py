"""cdiff: SAR-to-EO translation with C-DiffSET on a plain-PyTorch Stable Diffusion 2.1 stack.

Distribution name ``cdiffset`` (``pip install 'cdiffset[clip]'``); the import name and the
command stay ``cdiff``. The name ``cdiff`` on PyPI belongs to an unrelated coloured-diff viewer,
which also installs a ``cdiff`` module and command: the two cannot be installed side by side
(docs/install.md).

Torch builds, chosen deliberately (see README "Set-up"):
- the runtime asks for any torch >= 2.4; the ``cpu`` extra pins the small CPU wheel 2.13.0;
- the ``test`` extra pins torch 2.14.1 with torchvision 0.29.1, because open_clip (used by
  the tests and by ``cdiff convert``) needs torchvision, and torchvision only imports
  beside that torch. Its x86-64 build also brings Triton, which the kernel tests run in
  Triton's CPU interpreter.
- so ``clip`` (and ``metrics``, ``test``) cannot agree with ``cpu``: ``[cpu,clip]`` does not
  resolve, and adding ``[clip]`` to a ``[cpu]`` install replaces torch 2.13.0 (CPU) by 2.14.1
  with the CUDA wheels. The torchvision of torch 2.13 (0.28.0) on PyPI is built for its CUDA
  build and fails to import beside the CPU wheel ("operator torchvision::nms does not exist",
  tried 2026-12-04), so no pin of ours can make them agree (docs/install.md).
"""

import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "cdiff" / "__init__.py").read_text()).group(1)

TORCH_WITH_VISION = ["torch==2.14.1", "torchvision==0.29.1"]
CLIP = TORCH_WITH_VISION + ["open_clip_torch==3.3.0"]
# LPIPS and FID with the libraries the paper used (cdiff.perceptual); both need torchvision and scipy.
# dists-pytorch: the DISTS authors' package, which cdiff's DISTS (cdiff.networks) is tested equal to; it
# also ships the learnt alpha/beta file that cdiff then finds without a download.
METRICS = TORCH_WITH_VISION + ["lpips==0.1.4", "pytorch-fid==0.3.0", "scipy>=1.10", "dists-pytorch==0.1"]
GEO = ["rasterio>=1.3"]  # GeoTIFF scenes in and out of `cdiff translate` (cdiff.geo)
# Optional for `cdiff fetch` (cdiff.hub), which downloads with the standard library: the token of
# `hf auth login`, and the `hf` command to inspect or clean the shared Hugging Face cache.
HUB = ["huggingface_hub>=0.23"]

setup(
    name="cdiffset",  # "cdiff" on PyPI is another project (module docstring)
    version=VERSION,
    description="C-DiffSET SAR-to-EO translation on a plain-PyTorch Stable Diffusion 2.1 stack",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tomllib (the training configs); Python 3.10 reached its end of life in October 2026
    # kernels/ sits at the top of the repository (the design card's layout) and is shipped
    # inside the cdiff namespace: a top-level module named "kernels" belongs to another package.
    packages=["cdiff", "cdiff.layouts", "cdiff.data", "cdiff.npde", "cdiff.train", "cdiff.kernels"],
    package_dir={"cdiff": "cdiff", "cdiff.kernels": "kernels"},
    # The field's frozen split lists (cdiff.data.frozen) travel inside the package.
    package_data={"cdiff.data": ["splits/NOTICE", "splits/*/*.txt", "splits/*/*.json"]},
    install_requires=["torch>=2.4", "numpy>=1.24", "safetensors>=0.4", "pillow>=9"],
    extras_require={
        "cpu": ["torch==2.13.0"],
        "clip": CLIP,
        "tiff": GEO,  # GeoTIFF datasets (SpaceNet6) are read with rasterio too: the same extra as geo
        "triton": ["triton>=3.0"],
        "metrics": METRICS,
        "geo": GEO,
        "hub": HUB,
        "train": ["tensorboard>=2.14"],  # optional: cdiff train also writes TensorBoard scalars
        "test": CLIP
        + METRICS
        + GEO
        + HUB
        + [
            "pytest>=8",
            "setuptools>=70.1",  # builds the wheel in tests/test_package.py without the `wheel` package
            "diffusers==0.42.1",
            "transformers==5.23.0",
            "accelerate>=1.0",
            "tifffile>=2023.1",
            "triton>=3.0",
            "torchmetrics==1.9.0",  # the metrics the release reports with; cdiff.metrics is compared to it
        ],
    },
    entry_points={"console_scripts": ["cdiff=cdiff.cli:main"]},
)
