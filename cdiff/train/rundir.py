"""The run directory: the resolved config, the logs and the checkpoints of one training run.

    RUN_DIR/
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

A checkpoint is written into a temporary folder beside the others, flushed to disk, and renamed
to ``step-NNNNNN`` in one step; old ones are renamed away before they are deleted. So a process
killed at any moment leaves every ``step-*`` folder complete, and ``latest_checkpoint`` finds the
newest one even if the ``latest`` link was not updated yet. The last ``keep_last`` checkpoints and
the best one are kept.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

import torch

CHECKPOINTS = "checkpoints"
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Called with a stage name at each point of a save ("model", "state", "renamed", "linked",
# "pruned"); the tests set it to kill the process mid-save. None in normal use.
save_hook: Callable[[str], None] | None = None


def stage(name: str) -> None:
    """Mark a point of a checkpoint save (for ``save_hook``)."""
    if save_hook is not None:
        save_hook(name)


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def settle(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, and give each the mode open() would (the umask's:
    ``folder`` was made with mode 0o777 less the umask; safetensors leaves its files 0o600)."""
    mode = stat.S_IMODE(folder.stat().st_mode) & 0o666
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            os.chmod(path, mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent``, mode 0o777 less the umask (as mkdir gives)."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(folder, 0o777)
            return folder
        except FileExistsError:
            continue


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Delete a folder so that no half-deleted ``step-*`` folder is ever visible: rename, then delete."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _link(link: Path, target: str) -> None:
    """Point the symbolic link ``link`` at ``target`` (relative), replacing it atomically."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


class RunDir:
    """One run's folder (see the module docstring). Only rank 0 writes to it."""

    def __init__(self, path):
        self.path = Path(path)
        self.checkpoints = self.path / CHECKPOINTS
        self.config_file = self.path / "config.toml"
        self.log_file = self.path / "log.jsonl"
        self.val_dir = self.path / "val"

    def check_writable(self) -> None:
        """Create the folders and write a probe file; an error names the folder if that fails."""
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".probe-"):
                pass
        except OSError as err:
            raise OSError(f"run directory {self.path} is not writable: {err.strerror or err}") from None

    def write_config(self, text: str) -> None:
        tmp = self.config_file.with_name(f".config.toml.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_file)

    def clean(self) -> None:
        """Remove what a killed process left: temporary checkpoint folders, folders being deleted."""
        if not self.checkpoints.is_dir():
            return
        for entry in self.checkpoints.iterdir():
            if entry.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(entry, ignore_errors=True)

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

    def save(self, step: int, write: Callable[[Path], None], keep_last: int, best_step: int | None) -> Path:
        """Write checkpoint ``step`` with ``write(folder)``, atomically; update the links; prune.

        ``best_step`` is the step of the best checkpoint so far (kept, linked as ``best``).
        """
        tmp = _new_folder(self.checkpoints, f".tmp-{step_name(step)}-")
        write(tmp)
        settle(tmp)
        target = self.checkpoints / step_name(step)
        if target.exists():
            _remove(target)
        os.replace(tmp, target)
        _fsync_dir(self.checkpoints)
        stage("renamed")
        _link(self.path / "latest", f"{CHECKPOINTS}/{step_name(step)}")
        if best_step is not None and (self.checkpoints / step_name(best_step)).is_dir():
            _link(self.path / "best", f"{CHECKPOINTS}/{step_name(best_step)}")
        stage("linked")
        keep = set(self.steps()[-keep_last:]) | ({best_step} if best_step is not None else set())
        for old in self.steps():
            if old not in keep:
                _remove(self.checkpoints / step_name(old))
        stage("pruned")
        return target


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
    """(state.json, state.safetensors tensors) of a checkpoint folder; errors name the folder."""
    from safetensors.torch import load_file

    try:
        document = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
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
