"""DISTS and DINO: the two networks of the field's protocol that the paper did not use.

- DISTS (Ding et al., "Image Quality Assessment: Unifying Structure and Texture Similarity",
  2020): ImageNet VGG16's convolutions with Hann-window L2 pooling in place of max pooling; the
  score compares, per channel of six feature maps (the image and five stages), the spatial
  means (texture) and the correlation (structure) of the two images, weighted by learnt
  alpha/beta. Written here in plain PyTorch and tested equal to the authors' DISTS_pytorch
  (``pip install dists-pytorch==0.1``). GeoSET's and ReFlowSET's evaluators call pyiqa's
  ``create_metric("dists")``, a line-for-line copy of the authors' module (pyiqa's
  ``archs/dists_arch.py``); pyiqa itself is not used here (a non-commercial licence and some
  fifty dependencies).
- DINO (GeoSET's evaluator): the cosine similarity of DINOv3-SAT ViT-L/16 patch tokens of the
  two images at 224 px, averaged over patches. Loaded with transformers' ``DINOv3ViTModel``
  from a local folder in the transformers layout (``cdiff fetch dino-sat``).

The weights are found as every metric network's are (cdiff.perceptual.find_weights), except
DINO's folder: ``--dino``, ``CDIFF_DINO``, else where ``cdiff fetch dino-sat`` put it in the
Hugging Face cache (``find_dino``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from cdiff import flags
from cdiff.hub import hub_cache, locate
from cdiff.weightfile import CheckpointError
from cdiff.zoo import MODELS
from cdiff.perceptual import DISTS_ALPHA_BETA, LPIPS_VGG, Weights, find_weights, read_weights

# --- DISTS --------------------------------------------------------------------------------

DISTS_CHANNELS = (3, 64, 128, 256, 512, 512)  # the image, then relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
DISTS_C1 = DISTS_C2 = 1e-6  # the stabilising constants of the texture and structure terms
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# VGG16's `features` up to relu5_3, in torchvision's indices: (index of the conv, its output channels);
# a 2 x 2 max pool of VGG sits at indices 4, 9, 16 and 23, where DISTS puts an L2 pool instead.
VGG16_STAGES = (
    ((0, 64), (2, 64)),
    ((5, 128), (7, 128)),
    ((10, 256), (12, 256), (14, 256)),
    ((17, 512), (19, 512), (21, 512)),
    ((24, 512), (26, 512), (28, 512)),
)


class L2Pool(torch.nn.Module):
    """sqrt(Hann-window blur of x², stride 2): the 3 x 3 window is the inner taps of a 5-tap
    Hann window, [0.5, 1, 0.5] outer itself, normalised; padding 1; 1e-12 inside the root."""

    def __init__(self, channels: int):
        super().__init__()
        taps = torch.tensor([0.5, 1.0, 0.5])
        window = taps[:, None] * taps[None, :]
        self.register_buffer("window", (window / window.sum()).expand(channels, 1, 3, 3).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x * x, self.window, stride=2, padding=1, groups=x.shape[1])
        return (blurred + 1e-12).sqrt()


class DISTS(torch.nn.Module):
    """DISTS between images (B, 3, H, W) in [0, 1]: (B,), 0 for identical images.

    Parameters: VGG16's convolutions under torchvision's names (``features.N.weight``), and
    ``alpha``, ``beta`` (1, 1475, 1, 1), the weights of the texture and structure terms of every
    channel of the six feature maps.
    """

    def __init__(self):
        super().__init__()
        convs, channels_in = {}, 3
        for stage in VGG16_STAGES:
            for index, channels in stage:
                convs[str(index)] = torch.nn.Conv2d(channels_in, channels, 3, padding=1)
                channels_in = channels
        self.features = torch.nn.ModuleDict(convs)
        self.pools = torch.nn.ModuleList(L2Pool(stage[0][1]) for stage in VGG16_STAGES[:-1])
        self.alpha = torch.nn.Parameter(torch.zeros(1, sum(DISTS_CHANNELS), 1, 1))
        self.beta = torch.nn.Parameter(torch.zeros(1, sum(DISTS_CHANNELS), 1, 1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The six maps DISTS compares: the image itself, then the last ReLU of each VGG stage."""
        maps, h = [images], (images - self.mean) / self.std
        for number, stage in enumerate(VGG16_STAGES):
            if number > 0:
                h = self.pools[number - 1](h)
            for index, _ in stage:
                h = F.relu(self.features[str(index)](h))
            maps.append(h)
        return maps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch = pred.shape[0]
        maps = self.feature_maps(torch.cat([pred, target]))  # one pass over both: each (2B, C, h, w)
        total = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / total, DISTS_CHANNELS, dim=1)
        betas = torch.split(self.beta / total, DISTS_CHANNELS, dim=1)
        similarity = torch.zeros(batch, device=pred.device, dtype=pred.dtype)
        for both, alpha, beta in zip(maps, alphas, betas):
            x, y = both[:batch], both[batch:]
            mean_x, mean_y = x.mean((2, 3), keepdim=True), y.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
            texture = (2 * mean_x * mean_y + DISTS_C1) / (mean_x**2 + mean_y**2 + DISTS_C1)
            var_x = (x - mean_x).square().mean((2, 3), keepdim=True)
            var_y = (y - mean_y).square().mean((2, 3), keepdim=True)
            cov = (x * y).mean((2, 3), keepdim=True) - mean_x * mean_y
            structure = (2 * cov + DISTS_C2) / (var_x + var_y + DISTS_C2)
            similarity = similarity + (alpha * texture + beta * structure).sum(1).flatten()
        return 1 - similarity


def load_dists(alpha_beta_path: str | os.PathLike | None = None, vgg_path: str | os.PathLike | None = None,
               device=None) -> DISTS:
    """DISTS with its alpha/beta from ``alpha_beta_path`` and its trunk from torchvision's VGG16
    file (``vgg_path``; both found by cdiff.perceptual.find_weights when None).

    The alpha/beta file is the authors' (``{"alpha", "beta"}``). pyiqa's
    ``DISTS_weights-f5e65c96.pth``, which also holds the trunk (``stageK.N.weight``), is read too:
    its trunk is then used and no VGG16 file is needed.
    """
    path = find_weights(DISTS_ALPHA_BETA, alpha_beta_path)
    state = _load_state(path, DISTS_ALPHA_BETA)
    if not all(isinstance(state.get(k), torch.Tensor) for k in ("alpha", "beta")):
        raise CheckpointError(f"DISTS weights {path}: no 'alpha' and 'beta' tensors (found {sorted(state)[:4]})")
    # pyiqa names the trunk by stage (stage2.5.weight): the index after the stage is torchvision's.
    trunk = {f"features.{k.split('.', 1)[1]}": v for k, v in state.items() if k.startswith("stage")}
    trunk = {k: v for k, v in trunk.items() if k.endswith((".weight", ".bias"))}
    if not trunk:
        vgg = find_weights(LPIPS_VGG, vgg_path)
        trunk = {k: v for k, v in _load_state(vgg, LPIPS_VGG).items() if k.startswith("features.")}
        path = vgg
    model = DISTS()
    wanted = model.state_dict()
    found = {"alpha": state["alpha"], "beta": state["beta"], **{k: trunk[k] for k in wanted if k in trunk}}
    missing = [k for k in wanted if k not in found]
    wrong = [k for k in wanted if k in found and found[k].shape != wanted[k].shape]
    if missing or wrong:
        raise CheckpointError(f"DISTS weights {path}: not VGG16 + DISTS ({len(missing)} tensors missing, e.g. "
                              f"{missing[:2]}; {len(wrong)} of the wrong shape, e.g. {wrong[:2]})")
    model.load_state_dict(found)
    return model.eval().requires_grad_(False).to(device)


def _load_state(path: Path, weights: Weights) -> dict:
    return {k.removeprefix("module."): v for k, v in read_weights(path, weights).items()}


# --- DINO ---------------------------------------------------------------------------------

DINO_SIZE = 224  # GeoSET resizes both images to 224 x 224 (bilinear, antialiased) for DINOv3
DINO_MEAN, DINO_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)  # DINOv3-SAT's normalisation
DINO_FETCH = "dino-sat"  # its name in cdiff.zoo
DINO_HINT = (f"get them with `cdiff fetch {DINO_FETCH}` (Meta's facebook/dinov3-vitl16-pretrain-sat493m, gated), "
             "or pass --dino FOLDER or set CDIFF_DINO=FOLDER")


def find_dino(path: str | os.PathLike | None = None) -> Path:
    """The DINOv3 folder (transformers layout: config.json + model.safetensors): ``path``, else
    ``CDIFF_DINO``, else the snapshot folder ``cdiff fetch dino-sat`` filled in the Hugging Face
    cache (cdiff.hub.hub_cache: ``$CDIFF_CACHE_DIR/hub`` when set, else ``HF_HUB_CACHE``...); an
    error naming what is missing otherwise."""
    given = path if path is not None else flags.get_path("CDIFF_DINO")
    if given is None:
        cached = _fetched_dino()
        if cached is not None:
            return cached
        raise FileNotFoundError(f"DINO needs the DINOv3-SAT ViT-L/16 weights, not found in {hub_cache()}: {DINO_HINT}")
    folder = Path(given)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"DINO weights {folder}: no config.json there (a transformers model folder; {DINO_HINT})")
    return folder


def _fetched_dino() -> Path | None:
    """The snapshot folder of ``cdiff fetch dino-sat`` when all its files are cached, else None."""
    paths = [locate(remote) for remote in MODELS[DINO_FETCH].files]
    if any(p is None for p in paths):
        return None
    folders = {p.parent for p in paths}
    return folders.pop() if len(folders) == 1 else None


class DinoPatchTokens(torch.nn.Module):
    """DINOv3 patch tokens after the final norm, (B, P, D), of images (B, 3, H, W) in [0, 1],
    as GeoSET computes them: resized to 224 px, normalised, the backbone in bf16."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.skip = 1 + backbone.config.num_register_tokens  # the class token, then the registers
        self.register_buffer("mean", torch.tensor(DINO_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(DINO_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.clamp(0, 1).float(), size=(DINO_SIZE, DINO_SIZE), mode="bilinear",
                          align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        tokens = self.backbone(pixel_values=x.to(torch.bfloat16)).last_hidden_state  # (B, 1 + R + P, D)
        return tokens[:, self.skip:].float()


def load_dino(path: str | os.PathLike | None = None, device=None) -> DinoPatchTokens:
    folder = find_dino(path)
    try:
        from transformers import DINOv3ViTModel
    except ImportError as err:
        raise ImportError("DINO needs transformers with DINOv3 (>= 4.56): pip install transformers") from err
    backbone = DINOv3ViTModel.from_pretrained(folder, local_files_only=True)
    return DinoPatchTokens(backbone.to(torch.bfloat16)).eval().requires_grad_(False).to(device)


@torch.no_grad()
def dino_similarity(model: DinoPatchTokens, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the two images' patch tokens, averaged over patches: (B,)."""
    return F.cosine_similarity(model(pred), model(target), dim=-1).mean(1)
