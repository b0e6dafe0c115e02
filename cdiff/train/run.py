"""``cdiff train``: start a run or resume one, in one process or under torchrun.

A config whose kind trains it in several runs (C-DiffSET's ``model.stages = [1, 2]``; the
kind's ``stages`` in cdiff.train.kinds) trains them in order, each in its folder of the run
directory (``RUN_DIR/stage1``, ``RUN_DIR/stage2``), under one lock and one ``config.toml``;
``--resume RUN_DIR`` continues the stage in progress, or starts the next one, exactly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def stage_plan(config: RunConfig, run_dir) -> list[tuple[str, RunConfig]]:
    """The runs that train ``config`` in order, as (folder of the run directory, config); one run
    (folder "": the run directory itself) unless the kind trains in stages."""
    stages = model_kind(config.model.kind).stages
    return stages(config, Path(run_dir)) if stages is not None else [("", config)]


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
    layout = [c for c in changed if c.split(":")[0] == "model.stages"]
    if layout:
        raise ValueError(f"{rundir.path}: {layout[0]}: the stages decide how the run directory is laid out; a resumed "
                         "run keeps its own. Start a new run for other stages (its model.init can be a checkpoint's "
                         "model.safetensors of this one)")
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


def _prepare(rundir: RunDir, resume: bool, force: bool, runs: list[tuple[str, RunConfig]]) -> None:
    """Rank 0: take the run directory's lock, check it, remove what a killed process left; on a
    resume of one run, forget the log lines of steps past the newest checkpoint (they are done
    again; the stages of a run of several do it in ``_prepare_stage``)."""
    note = rundir.lock(force)
    try:
        if note:
            _say(f"{rundir.path}: {note}")
        if not resume and rundir.config_file.exists():
            raise ValueError(f"{rundir.path} already holds a run: continue it with --resume {rundir.path}, "
                             "or give a new run directory")
        staged = len(runs) > 1
        rundir.check_writable(checkpoints=not staged)
        removed = rundir.clean() + [p for name, _ in runs if name for p in RunDir(rundir.path / name).clean()]
        if removed:
            _say(f"removed {len(removed)} temporary file(s) that an interrupted run left in {rundir.path}")
        if resume:
            checkpoints = [RunDir(rundir.path / name).latest_checkpoint() for name, _ in runs]
            if not any(checkpoints):
                raise ValueError(f"{rundir.path}: no checkpoint to resume from (the run stopped before its first "
                                 f"save); start it again: cdiff train --config {rundir.config_file} --run-dir NEW_DIR")
            if not staged:
                rundir.forget_after(step_of(checkpoints[0]))
    except BaseException:
        rundir.unlock()
        raise


def _prepare_stage(stage: RunDir, resume: bool) -> None:
    """Rank 0, before a stage of a run of several trains (``_prepare`` cleaned it): its folder
    checked; the log lines past its newest checkpoint forgotten, or, for a stage that starts
    (again), all of them."""
    stage.check_writable()
    newest = stage.latest_checkpoint()
    stage.forget_after(step_of(newest) if resume and newest is not None else -1)


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
    runs = stage_plan(config, rundir.path)
    with StopRequests("training", notice="cdiff train: {signal}: stopping at the end of this step, with a "
                      "checkpoint ({signal} again stops at once, without one)") as stops:
        world = distributed.setup(config.train.device)
        try:
            for _, run_config in runs:
                _check_before_start(run_config, world, rundir.path)
            _on_rank0(world, lambda: _prepare(rundir, resume, force, runs))
            try:
                if len(runs) == 1:
                    return _train(rundir, config, changed, world, resume, stop_at, stops)
                return _train_stages(rundir, config, runs, changed, world, stop_at, stops)
            finally:
                if world.is_main:
                    rundir.unlock()
        finally:
            distributed.teardown()


def _train_stages(rundir: RunDir, config: RunConfig, runs: list[tuple[str, RunConfig]], changed: list[str],
                  world: distributed.World, stop_at: int | None, stops: StopRequests) -> Finished:
    """Train the runs of a config of several stages in order, each in its folder, from the last one
    that has a checkpoint: a finished stage is skipped, one in progress resumed, the next started.
    ``stop_at`` stops the first stage trained here after that step of its own, and no later one starts."""
    folders = [RunDir(rundir.path / name, resume_path=rundir.path) for name, _ in runs]
    begun = [i for i, folder in enumerate(folders) if folder.latest_checkpoint() is not None]
    finished = None
    for i in range(begun[-1] if begun else 0, len(runs)):
        folder, stage_config = folders[i], runs[i][1]
        newest = folder.latest_checkpoint()
        if newest is not None and step_of(newest) >= stage_config.train.steps and i < len(runs) - 1:
            continue  # complete; the last stage runs anyway (0 steps), as a resumed finished run does
        _on_rank0(world, lambda: _prepare_stage(folder, newest is not None))
        finished = _train(folder, stage_config, changed, world, newest is not None, stop_at, stops,
                          started=lambda: rundir.write_config(to_toml(config)))
        changed = []
        if stop_at is not None:
            break
    return finished


def _train(rundir: RunDir, config: RunConfig, changed: list[str], world: distributed.World, resume: bool,
           stop_at: int | None, stops: StopRequests, started: Callable[[], None] | None = None) -> Finished:
    """Train ``config`` in ``rundir`` (a run, or one stage's folder); ``started`` is called on rank 0
    once its model and data have opened (a run of stages writes its own config.toml then)."""
    seed_globals(config.train.seed)  # numpy's and python's: a resume restores them from the checkpoint
    checkpoint = rundir.latest_checkpoint() if resume else None
    task = build_task(config, world, checkpoint)
    samples = task.training_samples()
    # The config is written once the model and the data have opened: a run that fails to start
    # leaves no config.toml, and can be started again in the same folder.
    _on_rank0(world, lambda: rundir.write_config(to_toml(config)))
    if started is not None:
        _on_rank0(world, started)
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
