"""The training loop, the same for every model: steps, accumulation, precision, clipping, the
non-finite policy, logging, validation and checkpoints.

A model plugs in as a *task* with its *phases* (cdiff.train.task). Per phase and step:
``train.accumulation`` micro-batches, each forward in the precision's autocast and backward
through the gradient scaler (fp16), DDP's gradient averaging only on the last; unscale; clip the
global norm; step. A step whose loss (or, without fp16's scaler, gradient norm) is not finite on
any process is skipped while fewer than ``train.skip_nonfinite`` were, else the run stops with
NonFiniteLoss naming the step and the last good checkpoint. Schedulers step every step, skipped
or not, so the lr is a function of the step.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import time

import torch

from cdiff import __version__
from cdiff.config import DTYPES
from cdiff.progress import Bar
from cdiff.signals import Interrupted, StopRequests
from cdiff.train import distributed
from cdiff.train.config import RunConfig, to_dict
from cdiff.train.data import MicroBatches, StreamSamples, loader
from cdiff.train.logs import Log, write_grid
from cdiff.train.rundir import RunDir, read_state, restore_state, stage, step_name, write_state
from cdiff.train.seeds import capture_rng, restore_rng
from cdiff.train.task import Phase, Task


class NonFiniteLoss(ValueError):
    """The loss (or the gradient) became NaN or Inf more often than train.skip_nonfinite allows."""


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return round(peak, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # kB on Linux


class Loop:
    def __init__(self, task: Task, config: RunConfig, rundir: RunDir, world: distributed.World, log: Log):
        self.task, self.config, self.rundir, self.world, self.log = task, config, rundir, world, log
        self.scaler = torch.amp.GradScaler(world.device.type, enabled=config.train.precision == "fp16")
        task.wrapped = {name: distributed.wrap(module, world) for name, module in task.modules.items()}
        self.step = 0  # optimiser steps done
        self.samples = 0  # global stream positions read (the data position)
        self.skipped = 0
        self.best: dict | None = None  # {"step", "metric", "value"} of the best validation

    @property
    def samples_per_step(self) -> int:
        return self.config.global_batch * self.world.size

    # --- state ---------------------------------------------------------------------------

    def restore(self, folder) -> None:
        document, tensors = read_state(folder)
        restore_state(document, tensors, self.task.optimizers, self.task.schedulers, self.scaler)
        restore_rng(tensors, document["rng"])
        self.step, self.samples = document["step"], document["samples"]
        self.skipped, self.best = document["skipped_nonfinite"], document["best"]

    def _save(self) -> None:
        if self.world.is_main:
            values = {
                "step": self.step, "samples": self.samples, "world_size": self.world.size,
                "skipped_nonfinite": self.skipped, "best": self.best, "config": to_dict(self.config),
                "cdiff_version": __version__,
            }

            def write(folder):
                self.task.save(folder)
                stage("model")
                write_state(folder, values, self.task.optimizers, self.task.schedulers, self.scaler, capture_rng())

            best = self.best["step"] if self.best else None
            train = self.config.train
            folder = self.rundir.save(self.step, write, train.keep_last, best, train.keep_every)
            self.log.write("event", event="checkpoint", step=self.step, path=str(folder.relative_to(self.rundir.path)))
        distributed.barrier()

    # --- one step ------------------------------------------------------------------------

    def _phase(self, phase: Phase, micro_batches: list[dict]):
        task, count = self.task, len(micro_batches)
        optimizer = task.optimizers[phase.optimizer]
        wrapped = [task.wrapped[name] for name in phase.modules]
        params = [p for name in phase.modules for p in task.modules[name].parameters() if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)
        total, sums = 0.0, {}
        for i, batch in enumerate(micro_batches):
            with distributed.no_sync(wrapped, skip=i < count - 1):
                with autocast(self.config.train.precision, self.world.device):
                    loss, logs = phase.loss(batch)
                self.scaler.scale(loss / count).backward()
            total = total + loss.detach()
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value.detach()
        self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.optim.clip_grad_norm or float("inf"))
        return total / count, {k: v / count for k, v in sums.items()}, norm

    def _nonfinite(self, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        bad = ~torch.isfinite(loss)
        if not self.scaler.is_enabled():  # with fp16, the scaler skips steps with Inf gradients itself
            bad = bad | ~torch.isfinite(norm)
        return distributed.all_reduce(bad.float().reshape(1), "max").item() > 0

    def _step(self, micro_batches: list[dict]) -> dict | None:
        """One optimiser step of every phase; the values to log, or None when the step was skipped."""
        out = {}
        single = len(self.task.phases) == 1
        for phase in self.task.phases:
            loss, logs, norm = self._phase(phase, micro_batches)
            if self._nonfinite(loss, norm):
                self._skip_or_stop(phase, loss)
                out = None
                break
            self.scaler.step(self.task.optimizers[phase.optimizer])
            suffix = "" if single else f"_{phase.name}"
            out[f"loss{suffix}"] = loss
            out[f"grad_norm{suffix}"] = norm
            out.update(logs)  # the phase's own terms keep their names (distinct across phases)
        self.scaler.update()
        for scheduler in self.task.schedulers.values():
            scheduler.step()
        if out is not None:
            self.task.after_step()
        return out

    def _skip_or_stop(self, phase: Phase, loss: torch.Tensor) -> None:
        step = self.step + 1
        self.task.optimizers[phase.optimizer].zero_grad(set_to_none=True)
        if self.skipped < self.config.train.skip_nonfinite:
            self.skipped += 1
            self.log.write("event", event="nonfinite", step=step, phase=phase.name, loss=float(loss), skipped=self.skipped)
            return
        last = self.rundir.latest_checkpoint()
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise NonFiniteLoss(
            f"step {step}: the {phase.name} loss is {float(loss)} (or its gradient is not finite) and "
            f"{self.skipped} of --skip-nonfinite {self.config.train.skip_nonfinite} skips are used; {where}. "
            f"Resume with 'cdiff train --resume {self.rundir.resume_path}' (e.g. with a lower optim.lr or "
            "--skip-nonfinite N)"
        )

    # --- logging and validation ------------------------------------------------------------

    def _log(self, window: dict, finite_steps: int, steps: int, seconds: float) -> dict:
        """Averages of ``window`` (sums over the ``finite_steps`` not skipped) over every process."""
        names = sorted(window)
        values = torch.stack([window[n].float().reshape(()) for n in names]) if names else torch.zeros(0)
        values = distributed.all_reduce(values.to(self.world.device), "sum") / (max(finite_steps, 1) * self.world.size)
        record = {"step": self.step, **{n: float(v) for n, v in zip(names, values.tolist())}}
        for name, optimizer in self.task.optimizers.items():
            record["lr" if len(self.task.optimizers) == 1 else f"lr_{name}"] = optimizer.param_groups[0]["lr"]
        images = steps * self.samples_per_step
        record.update(
            images_per_s=round(images / max(seconds, 1e-9), 3), peak_memory_mb=_peak_memory_mb(self.world.device),
            skipped_nonfinite=self.skipped,
        )
        self.log.write("train", **record)
        return record

    def _validate(self) -> bool:
        """Validate on rank 0; True when the result is the best so far."""
        improved = False
        if self.world.is_main:
            with autocast(self.config.train.precision, self.world.device):
                metrics, columns = self.task.validate(self.step)
            grid = None
            if columns:
                grid = write_grid(self.rundir.val_dir / f"{step_name(self.step)}.png", columns)
            value = metrics[self.task.best_metric]
            improved = self.best is None or value > self.best["value"]
            if improved:
                self.best = {"step": self.step, "metric": self.task.best_metric, "value": value}
            grid_name = str(grid.relative_to(self.rundir.path)) if grid else None
            self.log.write("val", step=self.step, **metrics, best=improved, grid=grid_name)
        return distributed.broadcast_object(improved, self.world)  # every process then saves, or none

    # --- the loop --------------------------------------------------------------------------

    def _stop_requested(self, stops: StopRequests) -> bool:
        asked = stops.requested is not None
        if self.world.size > 1:  # a signal may reach some processes only: all stop at the same step
            flag = torch.tensor([float(asked)], device=self.world.device)
            asked = distributed.all_reduce(flag, "max").item() > 0
        return asked

    def _interrupted(self, stops: StopRequests, saved: bool) -> Interrupted:
        """Save the step just done (unless it was), and the exception that ends the run."""
        if not saved:
            self._save()
        signum = stops.signum or signal.SIGTERM  # a process that saw no signal stops with the others
        name = signal.Signals(signum).name
        self.log.write("event", event="interrupted", step=self.step, signal=name)
        checkpoint = self.rundir.checkpoints / step_name(self.step)
        return Interrupted(f"stopped by {name} after step {self.step}, saved in {checkpoint}; continue with "
                           f"'cdiff train --resume {self.rundir.resume_path}'", signum)

    def run(self, samples: tuple, stop_at: int | None = None, stops: StopRequests | None = None) -> None:
        """Train from the current step to train.steps (or ``stop_at``) on ``samples``: the task's
        (items, augment), as ``task.training_samples()`` gives them. ``stops``: the signals that
        end the run early, at a step's end with a checkpoint (raising Interrupted)."""
        train, val = self.config.train, self.config.val
        end = min(train.steps, stop_at) if stop_at is not None else train.steps
        items, augment = samples
        batches = MicroBatches(self.samples, (end - self.step) * train.accumulation, train.batch_size,
                               self.world.rank, self.world.size)
        pin = self.world.device.type == "cuda"
        batch_iter = iter(loader(StreamSamples(items, train.seed, augment), batches, self.config.data.workers, pin,
                                 train.seed))
        bar = Bar(train.steps, "train", enabled=self.world.is_main, start=self.step, lines=False)  # logs its own
        window, finite_steps, window_steps, clock = {}, 0, 0, time.perf_counter()
        postfix = ""
        shown = "loss" if len(self.task.phases) == 1 else f"loss_{self.task.phases[0].name}"  # in the progress bar
        if stops is not None:
            stops.defer()  # from here a signal waits for the end of the step in flight
        try:
            while self.step < end:
                micro_batches = [next(batch_iter) for _ in range(train.accumulation)]
                values = self._step(micro_batches)
                self.step += 1
                self.samples += self.samples_per_step
                window_steps += 1
                if values is not None:
                    finite_steps += 1
                    for key, value in values.items():
                        window[key] = window.get(key, 0.0) + value.detach()
                if self.step % train.log_every == 0 or self.step == end:
                    record = self._log(window, finite_steps, window_steps, time.perf_counter() - clock)
                    postfix = f"{shown} {record.get(shown, float('nan')):.4g} {record['images_per_s']:.1f} img/s"
                    window, finite_steps, window_steps, clock = {}, 0, 0, time.perf_counter()
                bar.update(self.step, postfix)
                pause = time.perf_counter()
                validate = val.every > 0 and (self.step % val.every == 0 or self.step == train.steps)
                improved = self._validate() if validate else False
                saved = improved or self.step % train.save_every == 0 or self.step == end
                if saved:
                    self._save()
                clock += time.perf_counter() - pause  # the window times training alone
                if stops is not None and self.step < end and self._stop_requested(stops):
                    if window_steps:  # the steps since the last log line, as a run ending here logs them
                        self._log(window, finite_steps, window_steps, time.perf_counter() - clock)
                    raise self._interrupted(stops, saved)
        finally:
            bar.close()
