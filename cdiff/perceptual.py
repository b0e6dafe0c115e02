"""LPIPS and FID: the two metrics of the paper that need pretrained networks; where every metric
network's weights are found (``Weights``, ``find_weights``; DISTS and DINO are in cdiff.networks).

They use the libraries the paper used, so that the numbers compare with its tables
(``pip install 'cdiffset[metrics]'``; imported only inside these functions):
- LPIPS: ``lpips.LPIPS(net="vgg")``, the linear layers calibrated on human judgments (shipped
  inside the lpips package) on top of torchvision's ImageNet VGG16.
- FID: pytorch-fid's Inception (the TensorFlow FID network ported to PyTorch), 2048-d
  pool features, then the Fréchet distance of their Gaussian statistics (cdiff.metrics).

Neither library may download anything here: the network weights come from local files,
found in this order (``find_weights``):
1. the path given by the caller (``--lpips-vgg`` / ``--fid-weights`` / ``--dists-weights``);
2. the environment variable ``CDIFF_LPIPS_VGG`` / ``CDIFF_FID_INCEPTION`` / ``CDIFF_DISTS`` (cdiff.flags);
3. where ``cdiff fetch NAME`` puts them (cdiff.hub.web_cache): ``$CDIFF_CACHE_DIR/checkpoints/<file>``
   when that variable is set, and torch's hub cache, ``$TORCH_HOME/hub/checkpoints/<file>``, where
   torchvision and pytorch-fid put them too;
4. for DISTS's alpha/beta only: the copy inside the DISTS_pytorch package, when it is installed.

The files are read with ``torch.load(weights_only=True)`` only (``read_weights``): a file that
holds pickled Python objects is refused, never unpickled.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cdiff import flags
from cdiff.hub import web_cache
from cdiff.metrics import to_unit
from cdiff.weightfile import CheckpointError

FID_DIMS = 2048  # pytorch-fid's default: the final average pool of Inception v3
FID_SIZE = 299  # pytorch-fid resizes every image to 299 x 299 (bilinear) first


@dataclass(frozen=True)
class Weights:
    """A pretrained network cdiff cannot download: its file name, where it comes from."""

    what: str
    file_name: str
    url: str
    env: str
    option: str
    fetch: str  # the name `cdiff fetch NAME` gets it by
    package_file: tuple[str, str] | None = None  # (package, file) that also ships it, if any


LPIPS_VGG = Weights(
    what="VGG16 (LPIPS, DISTS)",
    file_name="vgg16-397923af.pth",
    url="https://download.pytorch.org/models/vgg16-397923af.pth",
    env="CDIFF_LPIPS_VGG",
    option="--lpips-vgg",
    fetch="lpips-vgg",
)
FID_INCEPTION = Weights(
    what="Inception (FID, KID)",
    file_name="pt_inception-2015-12-05-6726825d.pth",
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    env="CDIFF_FID_INCEPTION",
    option="--fid-weights",
    fetch="fid-inception",
)
# DISTS's learnt alpha/beta (the authors' DISTS_pytorch/weights.pt); its trunk is LPIPS_VGG's file.
DISTS_ALPHA_BETA = Weights(
    what="DISTS alpha/beta",
    file_name="dists-alpha-beta.pt",
    url="https://raw.githubusercontent.com/dingkeyan93/DISTS/master/DISTS_pytorch/weights.pt",
    env="CDIFF_DISTS",
    option="--dists-weights",
    fetch="dists",
    package_file=("DISTS_pytorch", "weights.pt"),
)


def find_weights(weights: Weights, path: str | os.PathLike | None = None) -> Path:
    """The local file of ``weights`` (search order in the module docstring), or one error
    naming the missing file and where it is normally obtained."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{weights.what} weights {path}: no such file ({_where(weights)})")
        return Path(path)
    from_env = flags.get_path(weights.env)
    if from_env is not None:
        if not Path(from_env).is_file():
            raise FileNotFoundError(f"{weights.what} weights {from_env} (from {weights.env}): no such file ({_where(weights)})")
        return Path(from_env)
    folders = cache_folders()
    for folder in folders:
        if (folder / weights.file_name).is_file():
            return folder / weights.file_name
    packaged = _package_file(weights)
    if packaged is not None:
        return packaged
    raise FileNotFoundError(
        f"{weights.what} weights {weights.file_name} not found in {' or '.join(map(str, folders))}: "
        f"{_where(weights)}; or pass {weights.option} FILE or set {weights.env}=FILE"
    )


def cache_folders() -> list[Path]:
    """Where ``cdiff fetch`` puts the metric networks: ``$CDIFF_CACHE_DIR/checkpoints`` when that
    is set, then torch's hub cache (``$TORCH_HOME/hub/checkpoints``)."""
    folders = [web_cache(), Path(torch.hub.get_dir()) / "checkpoints"]
    return list(dict.fromkeys(folders))  # one entry when CDIFF_CACHE_DIR is not set


def _where(weights: Weights) -> str:
    return f"get it with `cdiff fetch {weights.fetch}` (from {weights.url})"


def _package_file(weights: Weights) -> Path | None:
    """The copy of ``weights`` an installed package ships, found without importing the package."""
    if weights.package_file is None:
        return None
    import importlib.util

    package, name = weights.package_file
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / name
    return path if path.is_file() else None


def _import(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise ImportError(f"LPIPS and FID need {module.split('.')[0]}: pip install 'cdiffset[metrics]'") from err


def read_weights(path: str | os.PathLike, weights: Weights) -> dict:
    """The dictionary of tensors in ``path``, a file of ``weights``, read with
    ``torch.load(weights_only=True)``. A file that holds pickled Python objects (code could run
    when they are unpickled) is refused in one line saying how to get the right file; so is a
    damaged file, or one that holds no dictionary."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{weights.what} weights {path}: not a plain tensor file (it holds pickled Python objects, and cdiff "
            f"never unpickles untrusted code); {_where(weights)}"
        ) from None
    except Exception as err:  # torch.load raises many types for damaged or non-tensor files
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{weights.what} weights {path}: cannot read ({type(err).__name__}: {first}); "
                              f"{_where(weights)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{weights.what} weights {path}: holds a {type(state).__name__}, not a dictionary of "
                              f"tensors; {_where(weights)}")
    return state


def _load_exactly(module: torch.nn.Module, state: dict, path: Path, what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or wrong:
        raise CheckpointError(
            f"{what} weights {path}: not the expected network ({len(missing)} tensors missing, e.g. "
            f"{missing[:2]}; {len(wrong)} of the wrong shape, e.g. {wrong[:2]})"
        )
    module.load_state_dict({k: state[k] for k in expected})


# --- LPIPS --------------------------------------------------------------------------------


def load_lpips(vgg_path: str | os.PathLike | None = None, device=None) -> torch.nn.Module:
    """``lpips.LPIPS(net="vgg")`` with its calibrated linear layers and the VGG16 trunk read
    from torchvision's ImageNet file (``features.N.*`` keys), in eval mode."""
    path = find_weights(LPIPS_VGG, vgg_path)
    lpips = _import("lpips")
    state = read_weights(path, LPIPS_VGG)  # first: a bad file is refused before the network is built
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    # lpips cuts VGG16's `features` into slices that keep the layer indices: slice2.5 is features.5.
    trunk_keys = {key: "features." + key.split(".", 1)[1] for key in model.net.state_dict()}
    renamed = {ours: state[theirs] for ours, theirs in trunk_keys.items() if theirs in state}
    _load_exactly(model.net, renamed, path, LPIPS_VGG.what)
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, pred: torch.Tensor, target: torch.Tensor, paper_scaling: bool = False) -> torch.Tensor:
    """LPIPS per image, (B,), for images (B, 3, H, W) in [-1, 1].

    LPIPS expects images in [-1, 1]. The release gives it its metric images in [0, 1]
    ``(x + 0.5).clamp(0, 1)`` as they are; ``paper_scaling=True`` does the same, to compare
    with the published tables. The default gives it the images in [-1, 1] (clamped).
    """
    if paper_scaling:
        pred, target = to_unit(pred, paper_scaling=True), to_unit(target, paper_scaling=True)
    else:
        pred, target = pred.clamp(-1, 1), target.clamp(-1, 1)
    device = next(model.parameters()).device
    return model(pred.float().to(device), target.float().to(device)).flatten().cpu()


# --- FID ----------------------------------------------------------------------------------


class FIDInception(torch.nn.Module):
    """pytorch-fid's Inception v3 up to the 2048-d average pool: images (B, 3, H, W) in
    [0, 1] -> features (B, 2048). It resizes to 299 x 299 (bilinear) and maps to [-1, 1]
    first, as pytorch-fid's ``InceptionV3`` does by default."""

    def __init__(self, inception):
        super().__init__()
        self.net = inception

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        n = self.net
        x = F.max_pool2d(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))), kernel_size=3, stride=2)
        x = F.max_pool2d(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(n, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)


def load_fid_inception(weights_path: str | os.PathLike | None = None, device=None) -> FIDInception:
    """The FID Inception of pytorch-fid, its weights read from a local file."""
    path = find_weights(FID_INCEPTION, weights_path)
    fid = _import("pytorch_fid.inception")
    models = _import("torchvision.models")
    # torchvision's Inception v3 with the blocks pytorch-fid swaps in to match TensorFlow's FID
    # network (1008 classes, no auxiliary head), as pytorch_fid.inception.fid_inception_v3 builds it.
    net = models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    _load_exactly(net, read_weights(path, FID_INCEPTION), path, FID_INCEPTION.what)
    return FIDInception(net).eval().requires_grad_(False).to(device)


@torch.no_grad()
def inception_features(model: FIDInception, images: torch.Tensor) -> torch.Tensor:
    """(B, 2048) float64 features of images (B, 3, H, W) in [0, 1]."""
    device = next(model.parameters()).device
    return model(images.float().to(device)).double().cpu()
