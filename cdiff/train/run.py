"""``cdiff train``: start a run or resume one, in one process or under torchrun."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cdiff.train import distributed
from cdiff.train.config import RunConfig, differences
from cdiff.train.configfile import load_config, to_toml
from cdiff.train.kinds import model_kind
from cdiff.train.logs import Log
from cdiff.train.loop import Loop
from cdiff.train.rundir import RunDir


def _resolve(rundir: RunDir, config: RunConfig | None, resume: bool, force: bool) -> tuple[RunConfig, list[str]]:
    """The config to run with, and how it differs from the saved one (a resume with --force)."""
    if not resume:
        if config is None:
            raise ValueError("cdiff train: give --config (a new run) or --resume RUN_DIR")
        return config, []
    if not rundir.config_file.is_file():
        raise FileNotFoundError(f"{rundir.path}: no config.toml, so not a run directory to resume")
    saved = load_config(rundir.config_file)
    if config is None:
        return saved, []
    changed = differences(saved, config)
    if changed and not force:
        raise ValueError(f"{rundir.path}: the config differs from the run's ({'; '.join(changed)}); "
                         "resuming would not continue the same run. Pass --force to resume with the new config")
    return config, changed


@dataclass
class Finished:
    checkpoint: Path | None  # the newest checkpoint folder
    task: object  # the trained task: its modules hold the final weights (e.g. task.modules["unet"])
    step: int


def _prepare(rundir: RunDir, resume: bool) -> None:
    """Rank 0: check and create the run directory, remove what a killed save left."""
    if not resume and rundir.config_file.exists():
        raise ValueError(f"{rundir.path} already holds a run: continue it with --resume {rundir.path}, "
                         "or give a new run directory")
    rundir.check_writable()
    rundir.clean()


def _on_rank0(world: distributed.World, action) -> None:
    """Run ``action`` on rank 0; every process raises its error (so none waits forever)."""
    error = None
    if world.is_main:
        try:
            action()
        except (OSError, ValueError) as err:
            error = err
    error = distributed.broadcast_object(error, world)
    if error is not None:
        raise error


def build_task(config: RunConfig, world: distributed.World, checkpoint: Path | None):
    """The task of ``model.kind`` (cdiff.train.kinds)."""
    return model_kind(config.model.kind).task(config, world.device, checkpoint)


def train(config: RunConfig | None, run_dir, resume: bool = False, force: bool = False,
          stop_at: int | None = None) -> Finished:
    """Train ``config`` into ``run_dir``, or continue the run there (``resume``; ``config`` None
    keeps its saved config, another one needs ``force``). ``stop_at``: stop after that step with
    a checkpoint."""
    rundir = RunDir(run_dir)
    config, changed = _resolve(rundir, config, resume, force)
    world = distributed.setup(config.train.device)
    try:
        _on_rank0(world, lambda: _prepare(rundir, resume))
        checkpoint = rundir.latest_checkpoint() if resume else None
        task = build_task(config, world, checkpoint)
        samples = task.training_samples()
        # The config is written once the model and the data have opened: a run that fails to start
        # leaves no config.toml, and can be started again in the same folder.
        _on_rank0(world, lambda: rundir.write_config(to_toml(config)))
        log = Log(rundir.log_file, enabled=world.is_main)
        try:
            loop = Loop(task, config, rundir, world, log)
            if checkpoint is not None:
                loop.restore(checkpoint)
            log.write("event", event="resume" if resume else "start", step=loop.step, world_size=world.size,
                      global_batch=loop.samples_per_step, device=str(world.device), changed=changed)
            loop.run(samples, stop_at)
            log.write("event", event="end", step=loop.step)
        finally:
            log.close()
        return Finished(rundir.latest_checkpoint(), loop.task, loop.step)
    finally:
        distributed.teardown()
