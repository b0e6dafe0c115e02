"""cdiff: C-DiffSET SAR-to-EO translation on a plain-PyTorch Stable Diffusion 2.1 stack.

Public API (see docs/library.md):
    UNet, UNetConfig                the SD 2.1 U-Net (cdiff.unet, cdiff.config)
    VAE, VAEConfig                  the SD 2.1 autoencoder (cdiff.vae, cdiff.config)
    DDPM                            the forward process (cdiff.schedulers)
    DDIM, DPMSolverPP2M, LCM        the samplers (LCM: a distilled student's); make_sampler picks one by name
                                    (cdiff.samplers)
    Pipeline, Translation           SAR in, EO and confidence out (cdiff.pipeline)
    Tiling                          overlapping tiles for images of any size (cdiff.tiling)
    confidence_nll                  the C-Diff loss (cdiff.loss), with variance_from_raw, confidence_from_raw
    SyntheticPairs, make_pair,      synthetic SAR-EO pairs and the real datasets' readers (cdiff.data)
    open_dataset
    load_unet, load_vae, load_pipeline      read any checkpoint layout, cdiff's native file too (cdiff.load)
    load_weights                            ... into a model one has built or changed, strict or not
    cdiffset_surgery                        SD 2.1 U-Net -> C-DiffSET U-Net (cdiff.surgery)
    save_native                             cdiff's one-file format (cdiff.native); exporters: cdiff.export
    use_attention_backend           inside a with block, the process-wide attention backend: "sdpa", "math",
                                    "fused" or a function (cdiff.attention); process_attention_backend() reads it
    set_attention_backend           a backend of its own for one model or module
    capture_attention               record attention probabilities, per layer
"""

__version__ = "0.1.0"

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _expose_checkout_kernels() -> None:
    # A wheel installs the top-level kernels/ folder as cdiff.kernels (setup.py's package_dir).
    # In a plain checkout on sys.path, give the same folder the same name.
    if "cdiff.kernels" in _sys.modules:
        return
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "kernels")):
        return  # an installed wheel
    init = _os.path.join(_os.path.dirname(here), "kernels", "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _importlib_util.spec_from_file_location(
        "cdiff.kernels", init, submodule_search_locations=[_os.path.dirname(init)]
    )
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["cdiff.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_expose_checkout_kernels()

from cdiff.attention import (  # noqa: E402
    capture_attention, process_attention_backend, set_attention_backend, use_attention_backend,
)
from cdiff.config import UNetConfig, VAEConfig  # noqa: E402
from cdiff.data import SyntheticPairs, make_pair, open_dataset  # noqa: E402
from cdiff.load import load_pipeline, load_unet, load_vae, load_weights  # noqa: E402
from cdiff.loss import confidence_from_raw, confidence_nll, variance_from_raw  # noqa: E402
from cdiff.native import save_native  # noqa: E402
from cdiff.pipeline import Pipeline, Translation  # noqa: E402
from cdiff.samplers import DDIM, LCM, DPMSolverPP2M, make_sampler  # noqa: E402
from cdiff.schedulers import DDPM  # noqa: E402
from cdiff.surgery import cdiffset_surgery  # noqa: E402
from cdiff.tiling import Tiling  # noqa: E402
from cdiff.unet import UNet  # noqa: E402
from cdiff.vae import VAE  # noqa: E402

__all__ = [
    "DDIM", "DDPM", "DPMSolverPP2M", "LCM", "Pipeline", "SyntheticPairs", "Tiling", "Translation", "UNet", "UNetConfig",
    "VAE", "VAEConfig", "capture_attention", "cdiffset_surgery", "confidence_from_raw", "confidence_nll",
    "load_pipeline", "load_unet", "load_vae", "load_weights", "make_pair", "make_sampler", "open_dataset",
    "process_attention_backend", "save_native", "set_attention_backend", "use_attention_backend", "variance_from_raw",
]
