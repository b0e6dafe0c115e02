"""What the translate tests share: the tiny stack's modules, SAR images written as files, and
``cdiff translate`` called in-process. Their fixtures (``model``, ``inputs``) are in conftest.py."""

import numpy as np
import torch
from PIL import Image

from cdiff import VAE, UNet, UNetConfig, VAEConfig
from cdiff.cli import main
from cdiff.data.imageio import to_uint8, write_png
from cdiff.data.synth import make_pair

PROMPT = "a custom prompt"  # not the default: the stored prompt must be used without --prompt


def tiny_modules(seed=0):
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.tiny(in_channels=8, out_channels=5, model_channels=16)).eval()
    vae = VAE(VAEConfig.tiny(block_channels=(16, 32, 32, 32))).eval()
    return unet, vae, torch.randn(6, 1024)


def sar_png(path, size, seed=0, rgb=False):
    grey = to_uint8(make_pair(seed, size=size).sar)
    write_png(path, np.repeat(grey[..., None], 3, axis=2) if rgb else grey)
    return path


def run(*argv):
    return main(["translate", *map(str, argv)])


def read(path):
    return np.asarray(Image.open(path))
