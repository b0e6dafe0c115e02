"""``cdiff translate``: SAR files, folders and whole GeoTIFF scenes to EO images and confidence maps.

Inputs and outputs:
- INPUT is one file or a folder; a folder is searched recursively for images
  (cdiff.imagefiles: .png, .jpg, .jpeg, .bmp, .tif and .tiff, hidden ones skipped), taken in
  sorted order.
- Each output keeps the input's relative path: OUT/<name>.png, or OUT/<name>.tif for TIFF
  input, an RGB GeoTIFF with the source's CRS, transform and nodata (cdiff.geo).
- With a confidence folder: CONF/<name>.png, the release's grey map, and CONF/<name>_colour.png.
- Every file is written atomically. A rerun skips images whose outputs all exist, unless
  ``overwrite``, and removes the temporaries of cdiff's own naming that a killed run left beside
  its outputs (cdiff.files.leftovers; nothing else). A bad input (an unreadable file or
  subfolder, a name that is not UTF-8) stops the run with an error naming it, or, with
  ``skip_bad``, is logged and counted. The output folders may not lie inside the input folder
  (each rerun would translate its own outputs).
- Checked before the model loads: the device, the folders, and what the files need (rasterio
  for TIFFs). A full disk stops the run with one line naming the path, the image's partial
  outputs removed.
- SIGINT (Ctrl-C) and SIGTERM: the images in flight are finished and written, then the run stops
  with one line saying how many are done (exit status 130 / 143); the same signal again stops at
  once, dropping them. A rerun continues where it stopped (cdiff.signals).

Reproducibility: each image's starting noise is seeded by ``seed`` and its name, whatever the
order, shard or batch (cdiff.translators.image_seed).

Many GPUs: launched by torchrun (cdiff.torchrun), rank r takes images r, r + W, r + 2W, ... of
the sorted list and uses cuda:LOCAL_RANK. With a target folder, the ranks meet
at a barrier (gloo) and rank 0 evaluates every output.

Models (``open_model``): any model file of a kind in cdiff.train.kinds (a C-DiffSET model: anything
cdiff.load_pipeline reads; an S2O-NPDE model file, recognised by its metadata), or a ``cdiff
train`` run directory, which stands for its best checkpoint's ``model.safetensors`` (else its
newest; of a run of two stages, its last stage's), or ``RUN_DIR@step-N`` for the checkpoint of
step N. What each kind does with the images, any size, padded and tiled: cdiff.translators.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cdiff.confidence_map import colourize
from cdiff.config import DTYPES
from cdiff.data.imageio import write_png
from cdiff.devices import pick_device
from cdiff.evaluate import EvaluationOptions, run_evaluate
from cdiff.files import check_output, leftovers, out_of_space, remove
from cdiff.geo import SarScene, check_geotiff_support, read_sar, write_eo_geotiff
from cdiff.imagefiles import TIFF_SUFFIXES, check_name, list_images, skip_or_raise
from cdiff.matching import stem_of
from cdiff.progress import progress
from cdiff.signals import Interrupted, StopRequests
from cdiff.torchrun import Launch, launch
from cdiff.translators import Sampling, Translator

COLOUR_SUFFIX = "_colour"


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


def list_inputs(input_path: str | os.PathLike, skipped: list[str] | None = None) -> list[tuple[Path, str]]:
    """(file, name) of every input image, sorted by name (see the module docstring). Unreadable
    subfolders and names that are not UTF-8 raise, or with ``skipped`` are listed there."""
    root = Path(input_path)
    if root.is_file():
        return [(root, check_name(root, "input"))]
    return [(path, name) for name, path in list_images(root, "input", skipped).items()]


def plan_jobs(input_path, output_dir, conf_dir=None, skipped: list[str] | None = None) -> list[Job]:
    """Every input and its outputs. The output folders must be writable, distinct, outside the
    input folder, and no output may be its own input. ``skipped``: as for ``list_inputs``."""
    check_output(output_dir, "folder", overwrite=True)  # overwrite: a rerun writes into it
    if conf_dir is not None:
        check_output(conf_dir, "folder", overwrite=True)
        if Path(conf_dir).resolve() == Path(output_dir).resolve():
            raise ValueError(f"--conf-dir {conf_dir} is the output folder; give the confidence maps a folder of their own")
    root = Path(input_path)
    for flag, folder in (("--output", output_dir), ("--conf-dir", conf_dir)):
        if folder is None or not root.is_dir():
            continue
        where = Path(folder).resolve()
        if root.resolve() in (where, *where.parents):
            what = "is the --input folder" if root.resolve() == where else f"is inside --input {root}"
            raise ValueError(f"{flag} {folder}: {what}, so every rerun would translate its own outputs again; "
                             "choose a folder outside it")
    jobs = []
    for source, name in list_inputs(input_path, skipped):
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


_AT_STEP = re.compile(r"^(?P<run>.+)@step-?(?P<step>\d+)$")


def _run_of(path: Path) -> Path | None:
    """The run directory that holds the checkpoints of ``path``: ``path`` itself (config.toml and
    checkpoints/), the last stage folder of a run of several stages that has checkpoints, or None."""
    from cdiff.train.rundir import stage_dirs

    if not (path.is_dir() and (path / "config.toml").is_file()):
        return None
    if (path / "checkpoints").is_dir():
        return path
    stages = [stage for stage in stage_dirs(path) if (stage / "checkpoints").is_dir()]
    return stages[-1] if stages else None


def model_file(model) -> Path:
    """``--model`` as a path: a run directory (config.toml and checkpoints/; of a run of several
    stages, its last stage's folder) gives its best checkpoint's model.safetensors, else its
    newest; ``RUN_DIR@step-N`` the checkpoint of step N (e.g. ``runs/qxs@step-40000``, the field's
    published one); anything else is returned as it is."""
    path = Path(model)
    at = _AT_STEP.match(str(model)) if not path.exists() else None
    if at is not None:
        return _checkpoint_at(Path(at["run"]), int(at["step"]))
    run = _run_of(path)
    if run is None:
        return path
    from cdiff.train.rundir import RunDir

    if run != path and os.environ.get("RANK", "0") == "0":
        print(f"cdiff translate: run {path}: its last stage, {run.name}")
    path = run
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


def _checkpoint_at(path: Path, step: int) -> Path:
    """The model file of ``path``'s checkpoint of ``step`` (``--model RUN_DIR@step-N``)."""
    from cdiff.train.rundir import RunDir, step_name

    run = _run_of(path)
    if run is None:
        raise ValueError(f"--model {path}@step-{step}: {path} is not a training run directory (config.toml and "
                         "checkpoints/)")
    steps = RunDir(run).steps()
    if step not in steps:
        kept = ", ".join(str(s) for s in steps) or "none"
        raise ValueError(f"--model {path}@step-{step}: {run} holds no checkpoint of step {step} (it keeps: {kept}; "
                         "train.keep_every keeps every N-th step)")
    if os.environ.get("RANK", "0") == "0":
        print(f"cdiff translate: run {path}: checkpoint {step_name(step)} of {run}")
    return run / "checkpoints" / step_name(step) / "model.safetensors"


def open_model(model, sampling: Sampling, conf_dir, device, dtype: str, prompt: str | None,
               channels_last: bool = False, compile_unet: bool = False) -> tuple[Translator, Path]:
    """(the translator, the model file) of ``--model``, by the kind of its file (cdiff.train.kinds)."""
    from cdiff.train.kinds import kind_of_file

    path = model_file(model)
    translator = kind_of_file(path).open_translator(path, sampling, conf_dir, device, dtype, prompt,
                                                    channels_last, compile_unet)
    return translator, path


def remove_leftovers(jobs: list[Job]) -> list[Path]:
    """Remove the temporaries that a killed run left beside these jobs' outputs (cdiff's own
    names for exactly these outputs, nothing else; cdiff.files.leftovers); the paths removed."""
    names: dict[Path, set[str]] = {}
    for job in jobs:
        for output in job.outputs:
            names.setdefault(output.parent, set()).add(output.name)
    found = [path for folder, accepted in names.items() for path in leftovers(folder, accepted)]
    for path in found:
        remove(path)
    return found


def write_outputs(job: Job, scene: SarScene, eo: np.ndarray, grey: np.ndarray | None) -> None:
    """Write the job's outputs (each atomically). If one fails or a signal stops it, those written
    are removed, so a job's outputs exist all or none; a full disk is one error naming the path."""
    def write_eo(path: Path) -> None:
        if path.suffix == ".tif":
            write_eo_geotiff(path, eo, scene)
        else:
            write_png(path, eo)

    writes = [(job.eo, write_eo)]
    if job.confidence is not None and grey is not None:
        writes.append((job.confidence, lambda path: write_png(path, grey)))
        writes.append((colour_path(job.confidence), lambda path: write_png(path, colourize(grey))))
    written = []
    try:
        for path, write in writes:
            write(path)
            written.append(path)
    except BaseException as err:
        for done in written:
            remove(done)
        if isinstance(err, Exception) and out_of_space(err):
            raise OSError(f"{path}: no space left on its device; nothing of {job.name!r} was kept. Free space, "
                          "then run the same command again (finished images are skipped)") from None
        raise


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
    target=None,
    evaluation: EvaluationOptions = EvaluationOptions(),
    channels_last: bool = False,
    compile_unet: bool = False,
) -> Tally:
    """The ``cdiff translate`` command (module docstring). With a ``target`` folder, the outputs
    are then scored against it as ``evaluation`` says (cdiff.evaluate), as ``cdiff evaluate``
    would score them: only the images of this run's inputs (the other files of ``output_dir``
    are not looked at), with the input folder as the SAR images of the identity-collapse ratio
    (``with_sar_inputs``); what can be checked is checked before translating."""
    here = launch()
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    device = pick_device(device, here.local_rank)
    with StopRequests("the translation", notice=STOPPING) as stops:
        tally = Tally()
        skipped: list[str] = []
        all_jobs = plan_jobs(input_path, output_dir, conf_dir, skipped if skip_bad else None)
        check_geotiff_support([job.source for job in all_jobs], "input")  # a TIFF's output is a GeoTIFF too
        if target is not None:
            evaluation = with_sar_inputs(evaluation, input_path, all_jobs)
            evaluation.check(output_dir, target)  # now, not after hours of translation
            if here.world_size > 1:
                _join_ranks(here)  # now, so a launch without torchrun's rendezvous fails before the work
        jobs = shard(all_jobs, here.rank, here.world_size)
        if here.is_main:
            tally.bad += skipped  # found by every rank while planning; counted once
        removed = remove_leftovers(jobs)
        if removed:
            print(f"cdiff translate: removed {len(removed)} temporary file(s) that a stopped run left, "
                  f"e.g. {removed[0]}")
        translate, path = open_model(model, sampling, conf_dir, device, dtype, prompt, channels_last, compile_unet)
        if path != Path(model) and here.is_main:
            print(f"cdiff translate: model {path}")
        todo = []
        for job in jobs:
            if job.finished() and not overwrite:
                tally.already_done += 1
            else:
                todo.append(job)
        start = time.perf_counter()
        stops.defer()  # from here a first signal lets the images in flight finish
        try:
            finished = _translate_jobs(todo, translate, sampling, here.is_main, skip_bad, tally, stops)
        except Interrupted as stop:  # the same signal twice: the images in flight are dropped
            raise _stopped(stop.signum, tally, todo, output_dir, "at once by a second",
                           "; the images in flight were dropped") from None
        if not finished or (stops.signum is not None and target is not None):
            raise _stopped(stops.signum, tally, todo, output_dir, "by", "" if not finished else
                           "; the evaluation did not run")
    where = f"rank {here.rank}/{here.world_size}: " if here.world_size > 1 else ""
    print(f"cdiff translate: {where}{tally.translated} translated, {tally.already_done} already done, "
          f"{len(tally.bad)} bad, {time.perf_counter() - start:.1f} s -> {output_dir}")
    for line in tally.bad:
        print(f"  skipped {line}")
    if target is not None:
        _evaluate_outputs(all_jobs, output_dir, target, evaluation, here, device)
    return tally


STOPPING = ("cdiff translate: {signal}: stopping once the images in flight are written "
            "({signal} again stops at once, dropping them)")


def _translate_jobs(todo: list[Job], translate: Translator, sampling: Sampling, show: bool, skip_bad: bool,
                    tally: Tally, stops: StopRequests) -> bool:
    """Read, translate (in batches of same-sized images) and write every job of ``todo``,
    counting in ``tally``; False if a signal stopped it before the next image."""
    batch: list[tuple[Job, SarScene]] = []

    def flush():
        results = translate([s for _, s in batch], [j.name for j, _ in batch], sampling, show)
        for (job, scene), (eo, grey) in zip(batch, results):
            write_outputs(job, scene, eo, grey)
            tally.translated += 1
        batch.clear()

    for index, job in enumerate(progress(todo, desc="images", enabled=show)):
        if stops.signum is not None:
            return False  # a batch read but not yet translated is simply dropped
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
    return True


def _stopped(signum: int, tally: Tally, todo: list[Job], output_dir, how: str, extra: str = "") -> Interrupted:
    """The one line that ends a translation stopped by a signal: what is done, how to go on."""
    left = sum(not job.finished() for job in todo)
    return Interrupted(
        f"stopped {how} {signal.Signals(signum).name}: {tally.translated} image(s) translated in this run, "
        f"{tally.already_done} done before, {left} still to do{extra}; run the same command again to continue "
        f"(finished images are skipped) -> {output_dir}", signum)


def with_sar_inputs(evaluation: EvaluationOptions, input_path, jobs: list[Job]) -> EvaluationOptions:
    """``evaluation`` with the input folder as its SAR folder (the identity-collapse ratio of the
    field's protocol), when no SAR folder is given, the ratio is wanted, and every output's stem
    is its input's (as the evaluation matches them); otherwise ``evaluation`` as it is."""
    wanted = evaluation.metrics is None or "identity" in evaluation.field_metrics
    if evaluation.protocol != "field" or evaluation.sar_dir is not None or not wanted or not Path(input_path).is_dir():
        return evaluation
    stems = [Path(job.source).stem for job in jobs]
    if len(set(stems)) != len(stems) or any(stem_of(job.eo, prediction=True) != Path(job.source).stem for job in jobs):
        return evaluation
    return replace(evaluation, sar_dir=str(input_path))


def _join_ranks(here: Launch) -> None:
    """A gloo process group over torchrun's ranks, only to wait for each other before evaluating."""
    import datetime

    import torch.distributed as dist

    here.require_rendezvous("to evaluate a sharded run")
    # Ranks finish their shares at different times; torchrun stops every rank if one fails, so
    # a long timeout cannot leave a rank waiting for a dead one.
    dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=24))


def _evaluate_outputs(jobs: list[Job], output_dir, target, evaluation: EvaluationOptions, here: Launch,
                      device) -> None:
    """After every rank has finished, rank 0 scores every output against the target folder."""
    if here.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        if not here.is_main:
            return
    names = [job.name for job in jobs if job.eo.is_file()]
    if not names:
        raise ValueError(f"no translated image in {output_dir} to evaluate")
    run_evaluate(output_dir, target, evaluation, device, names=names)
