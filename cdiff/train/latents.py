"""The latent cache: ``cdiff cache-latents`` encodes the training pairs once; training reads it.

The VAE is frozen, so its latents never change, and at 512 px encoding a SAR-EO pair costs about
as much as the U-Net's forward and backward. The cache is a folder:

    index.json                the count, views, latent shape, crop, the data section, val.holdout (the
                              pairs held out of the training list are not cached), the model file
                              and the SHA-256 of its VAE's weights, and the measured flip error
    shard-00000.safetensors   "sar", "eo": (n, views, 4, h, w) scaled posterior means (fp32);
                              metadata "names": the pairs' names (JSON)

What it keeps of the augmentation, exactly: each pair is encoded at one fixed window, the whole
image or, with a crop side, its centre crop. With ``--dihedral`` the 8 flips / 90-degree
rotations of that window are each encoded from the transformed image, and training picks one
of the 8 per sample (uniformly, seeded by (seed, position)): the same distribution as random
horizontal + vertical flips + rotations of the images. Without it, training sees the window
as is, and a config asking for flips is refused. Random crops cannot be kept: the cache
holds only the centre window, and a config asking for random crops of larger images is refused.
Flipping a latent instead of encoding the flipped image is not exact (the VAE is not
equivariant), which is why views are encoded: ``flip_error`` measures the difference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cdiff.data import CenterCrop
from cdiff.files import atomic_path, check_output
from cdiff.load import load_vae
from cdiff.progress import progress
from cdiff.train.config import RunConfig, to_dict
from cdiff.train.data import DEFAULT_CROPS, training_split
from cdiff.train.start import start_pipeline

FORMAT, VERSION = "cdiff-latents", 1
VIEWS = ("identity", "rot90", "rot180", "rot270", "hflip", "hflip+rot90", "hflip+rot180", "hflip+rot270")


def dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0..7, named in VIEWS) of images or latents (..., H, W): a horizontal flip
    (views 4-7) then a rotation by (view % 4) x 90 degrees."""
    if view >= 4:
        x = x.flip(-1)
    return torch.rot90(x, view % 4, dims=(-2, -1)) if view % 4 else x


def vae_fingerprint(vae: nn.Module) -> str:
    """SHA-256 of the VAE's weights (names, shapes and bytes): a latent cache records whose VAE made it."""
    digest = hashlib.sha256()
    for name, tensor in vae.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def frozen_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) -> the frozen VAE's scaled posterior means (B, 4, h, w), fp32.

    Autocast is off here and the images take the VAE's own dtype: the release encodes in fp32,
    and the trainer's bf16 autocast, left to reach the VAE, moves the latents by 0.3-2 % RMS.
    """
    dtype = next(vae.parameters(), images).dtype
    with torch.autocast(images.device.type, enabled=False):
        return vae.encode_latent(images.to(dtype)).float()


@torch.no_grad()
def batch_latents(vae, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(SAR latent, EO latent) of a training batch, each (B, 4, h, w) fp32 on ``device``: read from a
    latent cache's batch, or encoded now by the frozen ``vae`` (``frozen_latents``)."""
    if "sar_latent" in batch:
        return batch["sar_latent"].to(device).float(), batch["eo_latent"].to(device).float()
    images = torch.cat([batch["sar"], batch["eo"]]).to(device, non_blocking=True)  # (2B, 3, H, W)
    sar_latent, eo_latent = frozen_latents(vae, images).chunk(2)
    return sar_latent, eo_latent


def _rms(x: torch.Tensor) -> float:
    return float(x.double().square().mean().sqrt())


@torch.no_grad()
def flip_error(vae, images: torch.Tensor) -> dict[str, float]:
    """For each non-identity view T: RMS(T(E(x)) - E(T(x))) / RMS(E(T(x))), E the scaled posterior
    mean, over ``images`` (B, 3, H, W) in [-1, 1]: how far a transformed latent is from the latent
    of the transformed image, relative to the latent's size."""
    latent = frozen_latents(vae, images)
    errors = {}
    for view in range(1, len(VIEWS)):
        exact = frozen_latents(vae, dihedral(images, view))
        errors[VIEWS[view]] = _rms(dihedral(latent, view) - exact) / _rms(exact)
    return errors


@torch.no_grad()
def cache_latents(config: RunConfig, out_dir, dihedral_views: bool = False, batch_size: int = 8,
                  show_progress: bool = True, overwrite: bool = False) -> Path:
    """Encode the training pairs of ``config`` (without the val.holdout pairs held out for validation)
    with its model's VAE into ``out_dir`` (a new or empty folder; ``overwrite`` replaces a cache there
    once the new one is complete)."""
    if config.model.kind not in ("cdiffset", "distill"):
        raise ValueError(f"cache-latents encodes with a C-DiffSET model's VAE; model.kind {config.model.kind!r} "
                         "trains on images (no latents)")
    source = config.model.teacher if config.model.kind == "distill" else config.model.init
    out_dir = check_output(out_dir, "folder", overwrite, sources=(source, config.data.root or None))
    data = config.data
    if data.latents:
        raise ValueError("data.latents is set: cache-latents reads images; unset it (--set data.latents=\"\")")
    device = torch.device("cuda" if torch.cuda.is_available() and config.train.device != "cpu" else "cpu")
    # A distillation encodes with its teacher's VAE (cdiff.train.distill), a fine-tuning with its starting model's.
    model = config.model
    vae = load_vae(model.teacher, dtype=torch.float32) if model.kind == "distill" else start_pipeline(model).vae
    vae = vae.to(device).eval()
    pairs = training_split(data, config.val)[0]
    crop = data.crop or DEFAULT_CROPS.get(data.kind)
    views = len(VIEWS) if dihedral_views else 1
    shard_size = max(1, 4096 // views)
    index = {
        "format": FORMAT, "version": VERSION, "views": views, "crop": crop or 0, "cropped": False,
        "data": to_dict(config)["data"], "holdout": config.val.holdout, "model": source,
        "vae_sha256": vae_fingerprint(vae),
        "shards": [],
    }
    with atomic_path(out_dir, is_dir=True, overwrite=overwrite, sync=True) as tmp:
        sar_rows, eo_rows, names = [], [], []
        batches = DataLoader(pairs, batch_size=batch_size, num_workers=min(data.workers, 4), collate_fn=list)
        for batch in progress(batches, desc="cache-latents", enabled=show_progress):
            samples = []
            for sample in batch:
                if crop and min(sample["sar"].shape[-2:]) > crop:
                    index["cropped"] = True
                samples.append(CenterCrop(crop)(sample) if crop else sample)
            sar = torch.stack([s["sar"] for s in samples]).to(device)  # (b, 3, H, W)
            eo = torch.stack([s["eo"] for s in samples]).to(device)
            if "flip_error" not in index:
                index["flip_error"] = flip_error(vae, torch.cat([sar, eo])[:8])
            both = torch.cat([sar, eo])
            latents = torch.stack([frozen_latents(vae, dihedral(both, v)) for v in range(views)], dim=1)  # (2b, V, 4, h, w)
            sar_rows.extend(latents[: len(samples)].float().cpu())
            eo_rows.extend(latents[len(samples):].float().cpu())
            names.extend(s["name"] for s in samples)
            while len(names) >= shard_size:
                _write_shard(tmp, index, sar_rows[:shard_size], eo_rows[:shard_size], names[:shard_size])
                del sar_rows[:shard_size], eo_rows[:shard_size], names[:shard_size]
        if names:
            _write_shard(tmp, index, sar_rows, eo_rows, names)
        index["count"] = sum(s["count"] for s in index["shards"])
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
    return out_dir


def _write_shard(folder: Path, index: dict, sar: list, eo: list, names: list) -> None:
    from safetensors.torch import save_file

    name = f"shard-{len(index['shards']):05d}.safetensors"
    save_file({"sar": torch.stack(sar), "eo": torch.stack(eo)}, str(folder / name),
              metadata={"names": json.dumps(names)})
    index["shards"].append({"file": name, "count": len(names)})
    index["latent_shape"] = list(sar[0].shape[1:])


class LatentPairs(Dataset):
    """The pairs of a latent cache: ``{"sar_latent", "eo_latent": (views, 4, h, w), "name"}``.

    Shards are memory-mapped and read one row at a time (safetensors slices), in each process.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / "index.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"latent cache {self.folder}: no index.json (make one with `cdiff cache-latents`)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"latent cache {self.folder}/index.json: not valid JSON: {err}") from None
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ValueError(f"latent cache {self.folder}: not a cdiff latent cache of version {VERSION}")
        if not self.index.get("count"):
            raise ValueError(f"latent cache {self.folder} holds no pairs")
        self.rows = [(s["file"], i) for s in self.index["shards"] for i in range(s["count"])]
        self._files: dict[str, object] = {}
        self._names: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._files:
            handle = safe_open(str(self.folder / file), framework="pt")
            self._files[file] = handle
            self._names[file] = json.loads(handle.metadata()["names"])
        return self._files[file]

    def __getitem__(self, index: int) -> dict:
        file, row = self.rows[index]
        handle = self._open(file)
        return {
            "sar_latent": handle.get_slice("sar")[row], "eo_latent": handle.get_slice("eo")[row],
            "name": self._names[file][row],
        }

    def __getstate__(self):  # DataLoader workers open their own memory maps
        return {**self.__dict__, "_files": {}, "_names": {}}


def cached_samples(config: RunConfig, vae):
    """(LatentPairs, the view-picking augmentation or None) for training; the cache is checked
    against the config and the model's VAE, and a mismatch is an error that says what to change."""
    data = config.data
    pairs = LatentPairs(data.latents)
    index, where = pairs.index, f"latent cache {data.latents}"
    if index.get("holdout", 0) != config.val.holdout:
        raise ValueError(f"{where} was made with val.holdout = {index.get('holdout', 0)} pairs held out of the "
                         f"training list, the config holds out {config.val.holdout}: re-run cache-latents with "
                         "this config, so that no validation pair is trained on")
    if index["vae_sha256"] != vae_fingerprint(vae):
        raise ValueError(f"{where} was made with another VAE than this model's ({index['model']}); re-run cache-latents")
    crop = data.crop or DEFAULT_CROPS.get(data.kind) or 0
    if index["data"]["kind"] != data.kind or index["crop"] != crop:
        raise ValueError(f"{where} holds {index['data']['kind']} pairs at crop {index['crop']}, "
                         f"the config asks for {data.kind} at crop {crop}")
    if index["cropped"] and data.random_crop:
        raise ValueError(f"{where} holds the centre crop only: set data.random_crop = false to train from it")
    flips = (data.hflip, data.vflip, data.rot90)
    if any(flips) and not (all(flips) and index["views"] == len(VIEWS)):
        raise ValueError(f"{where} holds {index['views']} view(s) per pair: flips and rotations need all of "
                         "data.hflip, data.vflip, data.rot90 and a cache made with --dihedral; or set them false")
    if not any(flips):
        return pairs, _first_view
    return pairs, _random_view


def _first_view(sample: dict, gen: torch.Generator) -> dict:
    return {**sample, "sar_latent": sample["sar_latent"][0], "eo_latent": sample["eo_latent"][0]}


def _random_view(sample: dict, gen: torch.Generator) -> dict:
    view = int(torch.randint(len(VIEWS), (1,), generator=gen))
    return {**sample, "sar_latent": sample["sar_latent"][view], "eo_latent": sample["eo_latent"][view]}
