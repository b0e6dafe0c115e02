"""``cdiff train``: start a run or resume one, in one process or under torchrun."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from cdiff.signals import StopRequests
from cdiff.train import distributed
from cdiff.train.config import RunConfig, differences
from cdiff.train.configfile import load_config, to_toml
from cdiff.train.kinds import model_kind
from cdiff.train.logs import Log
from cdiff.train.loop import Loop
from cdiff.train.rundir import RunDir, step_of
from cdiff.train.seeds import seed_globals


# Keys that only choose the weights a new run starts from: a resumed run starts from its checkpoint.
STARTING_POINT = ("model.init", "model.unet", "model.pad_to_77", "model.tiny_seed", "model.fresh_unet")


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
    ignored = [c for c in changed if c.split(":")[0] in STARTING_POINT]
    if ignored:
        raise ValueError(f"{rundir.path}: {'; '.join(ignored)}: these choose the weights a new run starts from; a "
                         "resumed run continues from its checkpoint's, so they would have no effect. Start a new run "
                         "for another starting model")
    if changed and not force:
        raise ValueError(f"{rundir.path}: the config differs from the run's ({'; '.join(changed)}); "
                         "resuming would not continue the same run. Pass --force to resume with the new config")
    return config, changed


@dataclass
class Finished:
    checkpoint: Path | None  # the newest checkpoint folder
    task: object  # the trained task: its modules hold the final weights (e.g. task.modules["unet"])
    step: int


def _say(line: str) -> None:
    print(f"cdiff train: {line}", file=sys.stderr)


def _prepare(rundir: RunDir, resume: bool, force: bool) -> None:
    """Rank 0: take the run directory's lock, check it, remove what a killed process left; on a
    resume, forget the log lines of steps past the newest checkpoint (they are done again)."""
    note = rundir.lock(force)
    try:
        if note:
            _say(f"{rundir.path}: {note}")
        if not resume and rundir.config_file.exists():
            raise ValueError(f"{rundir.path} already holds a run: continue it with --resume {rundir.path}, "
                             "or give a new run directory")
        rundir.check_writable()
        removed = rundir.clean()
        if removed:
            _say(f"removed {len(removed)} temporary file(s) that an interrupted run left in {rundir.path}")
        if resume:
            newest = rundir.latest_checkpoint()
            if newest is None:
                raise ValueError(f"{rundir.path}: no checkpoint to resume from (the run stopped before its first "
                                 f"save); start it again: cdiff train --config {rundir.config_file} --run-dir NEW_DIR")
            rundir.forget_after(step_of(newest))
    except BaseException:
        rundir.unlock()
        raise


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


def _check_before_start(config: RunConfig, world: distributed.World, run_dir) -> None:
    """Refuse what cannot run before anything is written; warn once about what runs but surprises."""
    if world.size > 1 and model_kind(config.model.kind).task.single_process:
        raise ValueError(f"model.kind = {config.model.kind!r} trains in one process: run 'cdiff train' without "
                         f"torchrun (nothing was written to {run_dir})")
    if config.train.note and world.is_main:
        _say(f"note: {config.train.note}")
    optim, steps = config.optim, config.train.steps
    if optim.warmup_steps > steps and world.is_main:
        # The factor is n / warmup at step n + 1 (cdiff.train.optim): the last step's is (steps - 1) / warmup.
        peak = optim.lr * (steps - 1) / optim.warmup_steps
        _say(f"warning: optim.warmup_steps {optim.warmup_steps} is longer than the run (train.steps {steps}): "
             f"the lr rises to {peak:.3g} at most, never to optim.lr {optim.lr:.3g}")


def train(config: RunConfig | None, run_dir, resume: bool = False, force: bool = False,
          stop_at: int | None = None) -> Finished:
    """Train ``config`` into ``run_dir``, or continue the run there (``resume``; ``config`` None
    keeps its saved config, another one needs ``force``). ``stop_at``: stop after that step with
    a checkpoint. ``force`` also takes over the lock of a process that is not running.

    SIGINT and SIGTERM stop the run at the end of the step in flight, with a checkpoint of it,
    raising cdiff.signals.Interrupted (whose message says how to resume); before the first step
    they stop it at once."""
    rundir = RunDir(run_dir)
    config, changed = _resolve(rundir, config, resume, force)
    with StopRequests("training", notice="cdiff train: {signal}: stopping at the end of this step, with a "
                      "checkpoint ({signal} again stops at once, without one)") as stops:
        world = distributed.setup(config.train.device)
        try:
            _check_before_start(config, world, rundir.path)
            _on_rank0(world, lambda: _prepare(rundir, resume, force))
            try:
                return _train(rundir, config, changed, world, resume, stop_at, stops)
            finally:
                if world.is_main:
                    rundir.unlock()
        finally:
            distributed.teardown()


def _train(rundir: RunDir, config: RunConfig, changed: list[str], world: distributed.World, resume: bool,
           stop_at: int | None, stops: StopRequests) -> Finished:
    seed_globals(config.train.seed)  # numpy's and python's: a resume restores them from the checkpoint
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
        loop.run(samples, stop_at, stops)
        log.write("event", event="end", step=loop.step)
    finally:
        log.close()
    return Finished(rundir.latest_checkpoint(), loop.task, loop.step)
