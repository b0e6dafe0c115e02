"""The run directory: the resolved config, the logs and the checkpoints of one training run.

    RUN_DIR/
      .lock                     while a process trains here: its pid, host and start (JSON)
      config.toml               the resolved config, every key; --resume compares against it
      log.jsonl                 one JSON object per line: training averages, validations, events
      tensorboard/              the same scalars, when the tensorboard package is installed
      val/step-000200.png       validation grids
      checkpoints/step-000200/  one complete checkpoint:
          <model files>         written by the model's task (C-DiffSET: model.safetensors, a
                                native file cdiff.load_pipeline reads; model_ema.safetensors)
          state.safetensors     optimiser tensors and the global RNG states
          state.json            step, data position, optimiser / scheduler / scaler settings,
                                RNG values, best metric, skipped steps, the config
      latest -> checkpoints/step-000200   (symbolic links, replaced atomically)
      best -> checkpoints/step-000200

A run of several stages (C-DiffSET's ``model.stages = [1, 2]``, cdiff.train.cdiffset.stage_runs)
holds ``.lock`` and ``config.toml`` (the whole recipe) at its top, and one such folder per stage,
``RUN_DIR/stage1/`` and ``RUN_DIR/stage2/`` (``stage_dirs``); ``--resume RUN_DIR`` continues
whichever stage was in progress.

One process trains in a run directory at a time: it holds ``.lock`` (under torchrun, rank 0 for
all). A second one is refused with the owner's pid and host; a lock whose owner died (kill -9, a
power cut) is reported as stale and taken over only when asked (``--force``): on a shared file
system a pid that is dead here may be alive on another machine of the same name.

A checkpoint is written into a temporary folder beside the others (cdiff.files.atomic_path),
flushed to disk, and renamed to ``step-NNNNNN`` in one step; old ones are renamed away before
they are deleted. So a process killed at any moment leaves every ``step-*`` folder complete, and
``latest_checkpoint`` finds the newest one even if the ``latest`` link was not updated yet; the
next run removes the temporaries it left (``clean``). A save that fails (a full disk) removes its
folder and leaves the previous checkpoint the newest. The last ``keep_last`` checkpoints, the
best one and, with ``keep_every`` N, those of every N-th step are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from cdiff.files import atomic_path, leftovers, out_of_space, remove, replace_link

CHECKPOINTS = "checkpoints"
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"
LOCK = ".lock"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STAGE_DIR = re.compile(r"^stage(\d+)$")
_STEP_PNG = re.compile(r"^step-\d+\.png$")
# Temporaries of cdiff's own naming that files.leftovers does not know: the probe of
# check_writable, and those of earlier cdiff versions (pid-named files, .tmp-/.trash- folders).
_OWN_TEMPORARIES = re.compile(r"^\.probe-[a-z0-9_]{8}$|^\.(config\.toml|latest|best)\.\d+\.tmp$")
_OLD_CHECKPOINT_TEMPORARIES = (".tmp-step-", ".trash-step-")

# Called with a stage name at each point of a save ("model", "state", "renamed", "linked",
# "pruned"); the tests set it to kill the process mid-save. None in normal use.
save_hook: Callable[[str], None] | None = None


def stage(name: str) -> None:
    """Mark a point of a checkpoint save (for ``save_hook``)."""
    if save_hook is not None:
        save_hook(name)


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def step_of(checkpoint: Path) -> int:
    """The step of a checkpoint folder ``step-NNNNNN``."""
    return int(_STEP_DIR.match(checkpoint.name).group(1))


def stage_dirs(path) -> list[Path]:
    """The stage folders (``stage1``, ``stage2``...) of a run directory of several stages, in order;
    [] for a run of one stage."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = [p for p in path.iterdir() if _STAGE_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_STAGE_DIR.match(p.name).group(1)))


def _remove(folder: Path) -> None:
    """Delete a folder so that no half-deleted ``step-*`` folder is ever visible: rename, then delete."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


class SaveFailed(OSError):
    """A checkpoint could not be written (a full disk); the previous one is still the newest."""


class RunDir:
    """One run's folder (see the module docstring). Only rank 0 writes to it."""

    def __init__(self, path, resume_path=None):
        self.path = Path(path)
        # What 'cdiff train --resume' takes to continue this run: the run directory of a stage's folder.
        self.resume_path = Path(resume_path) if resume_path is not None else self.path
        self.checkpoints = self.path / CHECKPOINTS
        self.config_file = self.path / "config.toml"
        self.log_file = self.path / "log.jsonl"
        self.val_dir = self.path / "val"
        self.lock_file = self.path / LOCK

    def check_writable(self, checkpoints: bool = True) -> None:
        """Create the folder (and, ``checkpoints``, its checkpoints/) and write a probe file; an error
        names the folder if that fails."""
        try:
            (self.checkpoints if checkpoints else self.path).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".probe-"):
                pass
        except OSError as err:
            raise OSError(f"run directory {self.path} is not writable: {err.strerror or err}") from None

    def write_config(self, text: str) -> None:
        with atomic_path(self.config_file, sync=True) as tmp:
            tmp.write_text(text)

    def clean(self) -> list[Path]:
        """Remove what a killed process left (temporary files and checkpoint folders of cdiff's own
        names, nothing else); the paths removed. Only under the lock: no other writer is here."""
        found = leftovers(self.path, {"config.toml", "latest", "best"})
        found += leftovers(self.checkpoints, lambda name: _STEP_DIR.match(name) is not None)
        found += leftovers(self.val_dir, lambda name: _STEP_PNG.match(name) is not None)
        if self.path.is_dir():
            found += [p for p in self.path.iterdir() if _OWN_TEMPORARIES.match(p.name)]
        if self.checkpoints.is_dir():
            found += [p for p in self.checkpoints.iterdir() if p.name.startswith(_OLD_CHECKPOINT_TEMPORARIES)]
        for path in found:
            remove(path)
        return found

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for entry in self.checkpoints.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and (entry / STATE_JSON).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        steps = self.steps()
        return self.checkpoints / step_name(steps[-1]) if steps else None

    def save(self, step: int, write: Callable[[Path], None], keep_last: int, best_step: int | None,
             keep_every: int = 0) -> Path:
        """Write checkpoint ``step`` with ``write(folder)``, atomically; update the links; prune.

        ``best_step`` is the step of the best checkpoint so far (kept, linked as ``best``); with
        ``keep_every`` N every checkpoint of a step that is a multiple of N is kept too. A full
        disk raises SaveFailed naming the folder, with nothing of this checkpoint left behind.
        """
        target = self.checkpoints / step_name(step)
        try:
            with atomic_path(target, is_dir=True, overwrite=True, sync=True) as tmp:
                write(tmp)
        except Exception as err:
            if not out_of_space(err):
                raise
            newest = self.latest_checkpoint()
            kept = f"the newest checkpoint is still {newest}" if newest else "no checkpoint was saved yet"
            raise SaveFailed(f"no space left on the device of {self.checkpoints}: checkpoint {target.name} was not "
                             f"written (nothing of it is left); {kept}. Free space, then continue with "
                             f"'cdiff train --resume {self.resume_path}'") from None
        stage("renamed")
        replace_link(self.path / "latest", f"{CHECKPOINTS}/{step_name(step)}")
        if best_step is not None and (self.checkpoints / step_name(best_step)).is_dir():
            replace_link(self.path / "best", f"{CHECKPOINTS}/{step_name(best_step)}")
        stage("linked")
        keep = set(self.steps()[-keep_last:]) | ({best_step} if best_step is not None else set())
        keep |= {s for s in self.steps() if keep_every and s % keep_every == 0}
        for old in self.steps():
            if old not in keep:
                _remove(self.checkpoints / step_name(old))
        stage("pruned")
        return target

    def forget_after(self, step: int) -> int:
        """Drop from log.jsonl every record of a step after ``step`` (the steps a killed run did
        past its newest checkpoint, which the resumed run does again), and a line cut short by
        the kill. Returns how many lines went."""
        if not self.log_file.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.log_file.read_text().splitlines(keepends=True):
            try:
                record = json.loads(line)
                later = isinstance(record, dict) and record.get("step", 0) > step
            except ValueError:
                later = True
            if later or not line.endswith("\n"):
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            with atomic_path(self.log_file, sync=True) as tmp:
                tmp.write_text("".join(kept))
        return dropped

    # --- the lock ------------------------------------------------------------------------

    def lock(self, force: bool = False) -> str | None:
        """Take the run directory for this process (its ``.lock``). Refused, in one line naming the
        owner, while another process holds it; a stale lock (its owner is not running) is taken
        over with ``force``. Returns a note on a lock taken over, else None."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            taken = self._create_lock()
        except OSError as err:
            raise OSError(f"run directory {self.path} is not writable: {err.strerror or err}") from None
        note = None
        if not taken:
            owner = self._read_lock()
            where = _describe(owner)
            state = _owner_state(owner)
            if state == "running":
                raise ValueError(f"{self.path} is in use by {where}: one run directory takes one process at a "
                                 f"time. Wait for it to end, or stop it (kill {owner['pid']} saves a checkpoint)")
            if not force:
                why = ("which is no longer running (killed?): a stale lock" if state == "dead"
                       else "which cannot be checked from this machine")
                raise ValueError(f"{self.path} is locked ({self.lock_file}) by {where}, {why}. If no other "
                                 f"process trains in it, pass --force to take it over")
            self.lock_file.unlink(missing_ok=True)
            if not self._create_lock():
                raise ValueError(f"{self.path}: another process took the lock ({self.lock_file}) just now")
            note = f"took over the lock of {where} ({'not running' if state == 'dead' else 'unchecked'})"
        return note

    def unlock(self) -> None:
        """Give the run directory back (only a lock this process holds)."""
        owner = self._read_lock()
        if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.lock_file.unlink(missing_ok=True)

    def _create_lock(self) -> bool:
        """Write this process's lock file if there is none; whether it was written."""
        try:
            fd = os.open(self.lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                 "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "cdiff train"}
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(owner) + "\n")
        return True

    def _read_lock(self) -> dict | None:
        try:
            owner = json.loads(self.lock_file.read_text())
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where unknown: with
    the pid it tells the lock's owner from a later process that reuses its pid."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rsplit(")", 1)[1].split()[19]  # field 22; the fields after "(name)" start at 3


def _owner_state(owner: dict | None) -> str:
    """"running", "dead" (no such process on this host, or its pid reused) or "unknown" (another
    host, or a lock file cut short)."""
    if owner is None or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return "unknown"
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        pass  # alive, another user's
    started = owner.get("process_start")
    if started is not None and _process_start(pid) not in (None, started):
        return "dead"
    return "running"


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "a process that left no readable owner in the lock file"
    return f"{owner.get('command', 'a process')} (pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')})"


# --- the training state: optimisers, schedulers, scaler, RNG, counters ---------------------------


def _split_optimizer(name: str, state: dict, tensors: dict) -> dict:
    """An optimiser state_dict as JSON; its tensors go into ``tensors`` under ``optimizer.NAME.*``."""
    scalars = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{name}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    indices = sorted(state["state"])
    return {"param_groups": state["param_groups"], "indices": indices, "scalars": scalars}


def _join_optimizer(name: str, saved: dict, tensors: dict) -> dict:
    state = {}
    for index in saved["indices"]:
        prefix = f"optimizer.{name}.{index}."
        values = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        values.update(saved["scalars"].get(str(index), {}))
        state[index] = values
    return {"state": state, "param_groups": saved["param_groups"]}


def write_state(folder: Path, values: dict, optimizers: dict, schedulers: dict, scaler, rng) -> None:
    """state.safetensors + state.json into ``folder``; ``values``: step, samples, best... (JSON-able)."""
    from safetensors.torch import save_file

    rng_tensors, rng_values = rng
    tensors = dict(rng_tensors)
    document = dict(values)
    document["optimizers"] = {n: _split_optimizer(n, o.state_dict(), tensors) for n, o in optimizers.items()}
    document["schedulers"] = {n: s.state_dict() for n, s in schedulers.items()}
    document["scaler"] = scaler.state_dict()
    document["rng"] = rng_values
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / STATE_TENSORS))
    stage("state")
    (folder / STATE_JSON).write_text(json.dumps(document, indent=1))


def read_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json, state.safetensors tensors) of a checkpoint folder; errors name the folder.
    The tensors are read as model weights are (cdiff.weightfile, in aligned memory)."""
    from cdiff.weightfile import read_state_dict

    try:
        document = json.loads((folder / STATE_JSON).read_text())
        tensors = read_state_dict(folder / STATE_TENSORS)
    except (OSError, ValueError) as err:
        raise ValueError(f"checkpoint {folder} cannot be read: {err}") from None
    return document, tensors


def _match_layouts(optimizer) -> None:
    """Give each per-parameter state tensor its parameter's memory layout. The state is saved
    contiguous; fused AdamW walks parameter, gradient and moments as flat memory, so a
    channels-last parameter beside contiguous moments mixes up elements (on the CPU silently,
    on CUDA it refuses)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def restore_state(document: dict, tensors: dict, optimizers: dict, schedulers: dict, scaler) -> None:
    """Load the optimisers, schedulers and scaler saved by ``write_state`` (by name).

    The optimisers' moments and step counts come from the checkpoint; their settings (lr, betas,
    weight decay...) stay those of the config they were made with (equal, unless --force).
    """
    for name, optimizer in optimizers.items():
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(_join_optimizer(name, document["optimizers"][name], tensors))
        for group, kept in zip(optimizer.param_groups, settings):
            group.update(kept)
        _match_layouts(optimizer)
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(document["schedulers"][name])
    if document["scaler"]:
        scaler.load_state_dict(document["scaler"])
