"""``cdiff translate``: SAR files, folders and whole GeoTIFF scenes to EO images and confidence maps.

Inputs and outputs:
- INPUT is one file or a folder; a folder is searched recursively for .png, .jpg, .jpeg,
  .bmp, .tif and .tiff files (hidden ones skipped), taken in sorted order.
- Each output keeps the input's relative path: OUT/<name>.png, or OUT/<name>.tif for TIFF
  input, an RGB GeoTIFF with the source's CRS, transform and nodata (cdiff.geo).
- With a confidence folder: CONF/<name>.png, the release's grey map, and CONF/<name>_colour.png.
- Every file is written atomically. A rerun skips images whose outputs all exist, unless
  ``overwrite``; a bad input stops the run with an error naming it, or, with ``skip_bad``,
  is logged and counted.

Reproducibility: image ``name`` (its path relative to INPUT, without suffix) starts from
noise drawn with the seed ``image_seed(seed, name)``, the first 63 bits of
sha256("<seed>:<name>"). It does not depend on the other images, their order, the shard
or the batch, so a rerun, a resumed run or a sharded run draws the same noise as a single
run, and at batch size 1 gives the same bits on the same device (larger batches agree to
float rounding: batched convolutions may sum in another order). With eta > 0, DDIM draws
fresh noise every step from the image's generator, which a batch would share: batch size 1
is required then.

Many GPUs: launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK), rank r takes images r, r + W,
r + 2W, ... of the sorted list and uses cuda:LOCAL_RANK. With a target folder, the ranks meet
at a barrier (gloo) and rank 0 evaluates every output.

Any size: sides are reflect-padded to multiples of 64 and cropped back; images larger than a
tile go through overlapping tiles (cdiff.tiling).

Models (``open_model``): a C-DiffSET model (anything cdiff.load_pipeline reads), an S2O-NPDE
model file (cdiff.npde.files, recognised by its metadata), or a ``cdiff train`` run directory,
which stands for its best checkpoint's ``model.safetensors`` (else its newest). S2O-NPDE
translates in one generator pass (cdiff.npde.inference): there are no steps, no noise and no
confidence map, so the sampling options (steps, eta, sampler, seed), a prompt and a confidence
folder are refused for it; batch size, tiles, dtype and device apply as for C-DiffSET.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cdiff.confidence_map import colourize, release_grey
from cdiff.data.imageio import to_uint8, write_png
from cdiff.evaluate import list_images, skip_or_raise
from cdiff.files import check_output
from cdiff.geo import TIFF_SUFFIXES, SarScene, read_sar, write_eo_geotiff
from cdiff.progress import progress
from cdiff.tiling import Tiling, crop, pad_to_multiple


COLOUR_SUFFIX = "_colour"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Job:
    """One input image and the files it becomes."""

    source: Path
    name: str  # path relative to INPUT, without suffix, "/"-separated
    eo: Path
    confidence: Path | None  # the grey map; its colour view sits beside it

    @property
    def outputs(self) -> list[Path]:
        if self.confidence is None:
            return [self.eo]
        return [self.eo, self.confidence, colour_path(self.confidence)]

    def finished(self) -> bool:
        return all(p.is_file() for p in self.outputs)


def colour_path(grey: Path) -> Path:
    return grey.with_name(grey.stem + COLOUR_SUFFIX + ".png")


def list_inputs(input_path: str | os.PathLike) -> list[tuple[Path, str]]:
    """(file, name) of every input image, sorted by name (see the module docstring)."""
    root = Path(input_path)
    if root.is_file():
        return [(root, root.stem)]
    return [(path, name) for name, path in list_images(root, "input").items()]


def plan_jobs(input_path, output_dir, conf_dir=None) -> list[Job]:
    """Every input and its outputs. The output folders must be writable, distinct, and no
    output may be its own input (OUT = INPUT would write over the PNGs being read)."""
    check_output(output_dir, "folder", overwrite=True)  # overwrite: a rerun writes into it
    if conf_dir is not None:
        check_output(conf_dir, "folder", overwrite=True)
        if Path(conf_dir).resolve() == Path(output_dir).resolve():
            raise ValueError(f"--conf-dir {conf_dir} is the output folder; give the confidence maps a folder of their own")
    jobs = []
    for source, name in list_inputs(input_path):
        suffix = ".tif" if source.suffix.lower() in TIFF_SUFFIXES else ".png"
        eo = Path(output_dir) / f"{name}{suffix}"
        confidence = Path(conf_dir) / f"{name}.png" if conf_dir is not None else None
        job = Job(source, name, eo, confidence)
        for output in job.outputs:
            check_output(output, "file", overwrite=True, sources=[source])
        jobs.append(job)
    return jobs


def shard(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """The jobs of ``rank`` among ``world``: every world-th job from the rank-th."""
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return jobs[rank::world]


def image_seed(seed: int, name: str) -> int:
    """The noise seed of image ``name``: the first 63 bits of sha256("<seed>:<name>")."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from err
    return rank, world, local


@dataclass(frozen=True)
class Sampling:
    """How every image is sampled (defaults: the release's 50 DDIM steps, eta 0)."""

    steps: int = 50
    eta: float = 0.0
    seed: int = 0  # with the image's name, the seed of its starting noise (image_seed)
    batch_size: int = 1  # same-sized images per pipeline call
    tiling: Tiling | None = Tiling()  # None: images of any size are translated whole
    sampler: str = "ddim"  # or "dpmpp_2m" (cdiff.samplers)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.eta > 0 and self.batch_size > 1:
            raise ValueError(
                "--eta > 0 draws fresh noise every step from one generator per batch, so an image's "
                "result would depend on its batch: use --batch-size 1"
            )


def translate_scenes(pipeline, scenes: list[SarScene], names: list[str], sampling: Sampling,
                     show_progress: bool = False) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Translate same-sized scenes in one batch: (EO uint8 (H, W, 3), confidence grey uint8
    (H, W) or None) per scene."""
    height, width = scenes[0].sar.shape[:2]
    sar = torch.stack([torch.from_numpy(s.sar).permute(2, 0, 1) for s in scenes])  # (B, 3, H, W)
    sar = pad_to_multiple(sar, pipeline.size_multiple)
    scale = pipeline.vae.config.downsample_factor
    latent_shape = (1, pipeline.vae.config.latent_channels, sar.shape[-2] // scale, sar.shape[-1] // scale)
    generators = [torch.Generator().manual_seed(image_seed(sampling.seed, n)) for n in names]
    latents = torch.cat([torch.randn(latent_shape, generator=g) for g in generators])  # (B, 4, h, w) fp32, on the CPU
    result = pipeline.translate(sar, steps=sampling.steps, eta=sampling.eta, generator=generators[0], latents=latents,
                                sampler=sampling.sampler, show_progress=show_progress, tiling=sampling.tiling)
    eo = crop(result.eo, height, width).float().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    out = []
    for i in range(len(scenes)):
        grey = None if result.confidence is None else release_grey(result.confidence[i], height, width, scale)
        out.append((to_uint8(eo[i]), grey))
    return out


def translate_npde_scenes(generator, scenes: list[SarScene], names: list[str], sampling: Sampling,
                          show_progress: bool = False) -> list[tuple[np.ndarray, None]]:
    """``translate_scenes`` for an S2O-NPDE generator: one pass, no noise, no confidence map."""
    from cdiff.npde import translate_image

    sar = torch.stack([torch.from_numpy(s.sar).permute(2, 0, 1) for s in scenes])  # (B, 3, H, W)
    eo = translate_image(generator, sar, sampling.tiling).float().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [(to_uint8(eo[i]), None) for i in range(len(scenes))]


def model_file(model) -> Path:
    """``--model`` as a path: a run directory (config.toml and checkpoints/) gives its best
    checkpoint's model.safetensors, else its newest; anything else is returned as it is."""
    path = Path(model)
    if not (path.is_dir() and (path / "config.toml").is_file() and (path / "checkpoints").is_dir()):
        return path
    from cdiff.train.rundir import RunDir

    newest, best = RunDir(path).latest_checkpoint(), path / "best"
    checkpoint = best if best.is_dir() else newest
    if checkpoint is None:
        raise ValueError(f"{path}: a training run without a checkpoint yet")
    name = checkpoint.resolve().name  # best is a link to checkpoints/step-N
    if best.is_dir():
        which = "best (by validation), also its newest" if name == newest.name else \
            f"best (by validation); its newest is {newest.name}"
    else:
        which = "newest (no validation chose a best)"
    if os.environ.get("RANK", "0") == "0":
        print(f"cdiff translate: run {path}: checkpoint {name}, the run's {which}")
    return checkpoint / "model.safetensors"


NPDE_REFUSED = {"steps": "--steps", "eta": "--eta", "sampler": "--sampler", "seed": "--seed"}


def open_model(model, sampling: Sampling, conf_dir, device, dtype: str, prompt: str | None,
               channels_last: bool = False, compile_unet: bool = False) -> tuple[Callable, Path]:
    """(translate(scenes, names, sampling, show_progress) -> [(EO, grey or None)], the model file)
    for ``--model``: a C-DiffSET pipeline or an S2O-NPDE generator (module docstring).
    ``channels_last`` / ``compile_unet``: the C-DiffSET speed switches (Pipeline.to(memory_format=),
    Pipeline.compile()), same results as without them."""
    from cdiff import load_pipeline
    from cdiff.npde import is_model_file, load_generator

    path = model_file(model)
    if is_model_file(path):
        given = [flag for key, flag in NPDE_REFUSED.items() if getattr(sampling, key) != getattr(Sampling(), key)]
        given += ["--prompt"] * (prompt is not None) + ["--conf-dir"] * (conf_dir is not None)
        given += ["--channels-last"] * channels_last + ["--compile"] * compile_unet
        if given:
            raise ValueError(f"{path}: an S2O-NPDE model translates in one generator pass, with no sampler, noise, "
                             f"prompt or confidence map: leave out {', '.join(given)}")
        return functools.partial(translate_npde_scenes, load_generator(path, device, DTYPES[dtype])), path
    pipeline = load_pipeline(path, prompt=prompt, device=device)
    if conf_dir is not None and pipeline.unet.config.out_channels <= pipeline.vae.config.latent_channels:
        raise ValueError(f"{path}: its U-Net predicts no variance ({pipeline.unet.config.out_channels} outputs), "
                         "so there is no confidence map: leave out --conf-dir")
    # The SD VAE overflows in fp16, so --dtype applies to the U-Net; the VAE stays fp32.
    pipeline.unet.to(DTYPES[dtype])
    if channels_last:
        pipeline.to(memory_format=torch.channels_last)
    if compile_unet:
        pipeline.compile()
    return functools.partial(translate_scenes, pipeline), path


def write_outputs(job: Job, scene: SarScene, eo: np.ndarray, grey: np.ndarray | None) -> None:
    if job.eo.suffix == ".tif":
        write_eo_geotiff(job.eo, eo, scene)
    else:
        write_png(job.eo, eo)
    if job.confidence is not None and grey is not None:
        write_png(job.confidence, grey)
        write_png(colour_path(job.confidence), colourize(grey))


@dataclass
class Tally:
    """What one rank did."""

    translated: int = 0
    already_done: int = 0
    bad: list[str] = field(default_factory=list)  # "file: reason" of inputs skipped with skip_bad


def run_translate(
    model,
    input_path,
    output_dir,
    conf_dir=None,
    sampling: Sampling = Sampling(),
    device=None,
    dtype: str = "fp32",
    prompt: str | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    evaluation: dict | None = None,
    channels_last: bool = False,
    compile_unet: bool = False,
) -> Tally:
    """The ``cdiff translate`` command (module docstring). ``evaluation``: the keyword
    arguments of cdiff.evaluate.evaluate plus ``target`` and ``report_dir``, or None."""
    from cdiff.evaluate import Networks

    rank, world, local_rank = distributed_env()
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if evaluation is not None:
        Networks.check(evaluation["metrics"], evaluation.get("lpips_vgg"), evaluation.get("fid_weights"))
        if world > 1:
            _join_ranks()  # now, so a launch without torchrun's rendezvous fails before the work
    all_jobs = plan_jobs(input_path, output_dir, conf_dir)
    jobs = shard(all_jobs, rank, world)
    device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    translate, path = open_model(model, sampling, conf_dir, device, dtype, prompt, channels_last, compile_unet)
    if path != Path(model) and rank == 0:
        print(f"cdiff translate: model {path}")

    tally = Tally()
    todo = []
    for job in jobs:
        if job.finished() and not overwrite:
            tally.already_done += 1
        else:
            todo.append(job)
    start = time.perf_counter()
    batch: list[tuple[Job, SarScene]] = []
    show = rank == 0

    def flush():
        results = translate([s for _, s in batch], [j.name for j, _ in batch], sampling, show)
        for (job, scene), (eo, grey) in zip(batch, results):
            write_outputs(job, scene, eo, grey)
            tally.translated += 1
        batch.clear()

    for index, job in enumerate(progress(todo, desc="images", enabled=show)):
        try:
            scene = read_sar(job.source)
        except ValueError as err:
            skip_or_raise(err, str(job.source), skip_bad, tally.bad)
            continue
        if batch and batch[0][1].sar.shape != scene.sar.shape:
            flush()
        batch.append((job, scene))
        if len(batch) == sampling.batch_size or index == len(todo) - 1:
            flush()  # inside the loop, so the step bar nests in the image bar
    if batch:  # the last input was bad
        flush()
    where = f"rank {rank}/{world}: " if world > 1 else ""
    print(f"cdiff translate: {where}{tally.translated} translated, {tally.already_done} already done, "
          f"{len(tally.bad)} bad, {time.perf_counter() - start:.1f} s -> {output_dir}")
    for line in tally.bad:
        print(f"  skipped {line}")
    if evaluation is not None:
        _evaluate_outputs(all_jobs, output_dir, evaluation, rank, world, device)
    return tally


def _join_ranks() -> None:
    """A gloo process group over torchrun's ranks, only to wait for each other before evaluating."""
    import datetime

    import torch.distributed as dist

    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE > 1 but {name} is not set: launch with torchrun to evaluate a sharded run")
    # Ranks finish their shares at different times; torchrun stops every rank if one fails, so
    # a long timeout cannot leave a rank waiting for a dead one.
    dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=24))


def _evaluate_outputs(jobs: list[Job], output_dir, evaluation: dict, rank: int, world: int, device) -> None:
    """After every rank has finished, rank 0 scores every output against the target folder."""
    from cdiff.evaluate import evaluate, match_pairs

    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:
            return
    options = dict(evaluation)
    target, report_dir = options.pop("target"), options.pop("report_dir", None)
    names = [job.name for job in jobs if job.eo.is_file()]
    if not names:
        raise ValueError(f"no translated image in {output_dir} to evaluate")
    result = evaluate(match_pairs(output_dir, target, names=names), output_dir, target, device=device, **options)
    print(result.table())
    for path in result.write(report_dir or output_dir):
        print(f"  {path}")
