"""VGG16/19 feature extractor for the perceptual loss, in plain torch, from a local weights file.

The weights are torchvision's ImageNet VGG16 or VGG19 (without batch norm) in torchvision's
state-dict layout, ``features.{i}.weight`` / ``.bias`` (``classifier.*`` is ignored), as a
``.safetensors`` file or a pickled ``.pth`` read with ``torch.load(weights_only=True)``.
Nothing is downloaded: ``load_vgg`` reads the path it is given. The layout (16 or 19) is
recognised from the number of convolutions in the file.
"""

from __future__ import annotations

import logging
import os
import re

import torch
import torch.nn as nn

from cdiff.statedict import check_state_dict
from cdiff.weightfile import CheckpointError, read_state_dict

log = logging.getLogger(__name__)

# Convs per block ("M" = 2x2 max pool), torchvision's cfgs "D" and "E".
VGG_BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _layout(blocks: tuple[int, ...]) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """torchvision's ``features`` indices: [("conv", 64), ("relu", 0), ..., ("pool", 0)], and
    the index of each ReLU by name (``relu{block}_{conv}``, counted from 1)."""
    layers, relu_index, width = [], {}, 64
    for b, convs in enumerate(blocks, start=1):
        for k in range(1, convs + 1):
            layers += [("conv", width), ("relu", 0)]
            relu_index[f"relu{b}_{k}"] = len(layers) - 1
        layers.append(("pool", 0))
        width = min(2 * width, 512)
    return layers, relu_index


class VGGFeatures(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> the activations at ``layers`` (a list of
    (B, C_l, H / 2^k, W / 2^k)). ``features`` is truncated after the last layer asked for;
    its indices and keys are torchvision's. Frozen: no parameter requires grad."""

    def __init__(self, arch: str, layers: tuple[str, ...]):
        super().__init__()
        if arch not in VGG_BLOCKS:
            raise ValueError(f"VGGFeatures: arch must be one of {sorted(VGG_BLOCKS)}, got {arch!r}")
        plan, relu_index = _layout(VGG_BLOCKS[arch])
        unknown = [name for name in layers if name not in relu_index]
        if unknown:
            raise ValueError(f"VGGFeatures: {arch} has no layers {unknown}; known: {sorted(relu_index)}")
        self.arch, self.layers = arch, tuple(layers)
        self.taps = [relu_index[name] for name in layers]
        modules, cin = [], 3
        for kind, width in plan[: max(self.taps) + 1]:
            if kind == "conv":
                modules.append(nn.Conv2d(cin, width, 3, padding=1))
                cin = width
            else:
                modules.append(nn.ReLU() if kind == "relu" else nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*modules)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = ((images + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet-normalised RGB
        found = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                found[i] = x
        return [found[t] for t in self.taps]


def load_vgg(path: str | os.PathLike, layers: tuple[str, ...]) -> VGGFeatures:
    """VGG16 or VGG19 features from torchvision-layout weights at ``path``, in eval mode."""
    state = read_state_dict(path)
    if not any(k.startswith("features.") for k in state):
        state = {f"features.{k}": v for k, v in state.items()}  # a saved ``vgg.features`` alone
    if any("running_mean" in k for k in state):
        raise CheckpointError(f"{path}: a batch-norm VGG (vgg16_bn / vgg19_bn); give the plain VGG16 or VGG19 weights")
    convs = sorted(int(m.group(1)) for k, v in state.items() if (m := re.fullmatch(r"features\.(\d+)\.weight", k)) and v.ndim == 4)
    arch = {13: "vgg16", 16: "vgg19"}.get(len(convs))
    if arch is None:
        raise CheckpointError(f"{path}: expected torchvision VGG16 or VGG19 weights (13 or 16 convs under features.), "
                              f"found {len(convs)} convs")
    model = VGGFeatures(arch, layers)
    expected = model.state_dict()
    kept = {k: v for k, v in state.items() if k in expected}
    check_state_dict(expected, kept, path, f"{arch} features")
    model.load_state_dict(kept)
    log.info("perceptual loss: %s features %s from %s (%d tensors of the file unused)",
             arch, ", ".join(layers), path, len(state) - len(kept))
    return model.eval()
