"""A checkpoint's tensors (in cdiff's names) put into models: exactly, or partly with a report.

``compare_state_dicts`` says how a state dict meets a model's parameters and buffers, by name
and shape: what fits, what is missing, unexpected or of another shape (a ``LoadReport``);
``check_state_dict`` raises unless everything fits. Every loader (cdiff.load, cdiff.surgery,
cdiff.prompt, cdiff.npde) checks its state dicts this way.

``build_model`` makes ``cls(config)`` on the meta device and takes the checkpoint's tensors
with ``load_state_dict(assign=True)``: no second copy, the stored dtype kept unless a
``dtype`` is asked for, and every name and shape checked first.

``load_partial`` is for a model that differs from the stored one (a block added or changed):
it copies every tensor whose name and shape fit, leaves the rest of the model as initialised,
and returns the ``LoadReport``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cdiff.weightfile import CheckpointError


@dataclass(frozen=True)
class LoadReport:
    """How a checkpoint's tensors met a model's parameters and buffers, by name and shape."""

    loaded: tuple[str, ...]  # taken from the checkpoint
    missing: tuple[str, ...]  # the model's, absent from the checkpoint: left as they were
    unexpected: tuple[str, ...]  # the checkpoint's, absent from the model: ignored
    mismatched: tuple[tuple[str, tuple, tuple], ...]  # (name, checkpoint shape, model shape): left as they were

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def first(names):
            return f" (first: {', '.join(names[:5])})" if names else ""

        shapes = [f"{k} {tuple(a)} in the checkpoint, {tuple(b)} in the model" for k, a, b in self.mismatched]
        return (
            f"{len(self.loaded)} tensors loaded; {len(self.missing)} missing, left at their initialisation"
            f"{first(self.missing)}; {len(self.unexpected)} unexpected, ignored{first(self.unexpected)}; "
            f"{len(self.mismatched)} of another shape, left at their initialisation{first(shapes)}"
        )


def compare_state_dicts(expected: dict, state: dict) -> LoadReport:
    """Match ``state`` (a checkpoint's tensors) against ``expected`` (a model's state dict)."""
    fits, mismatched = [], []
    for key, value in state.items():
        if key in expected:
            if value.shape == expected[key].shape:
                fits.append(key)
            else:
                mismatched.append((key, tuple(value.shape), tuple(expected[key].shape)))
    return LoadReport(
        loaded=tuple(fits),
        missing=tuple(k for k in expected if k not in state),
        unexpected=tuple(k for k in state if k not in expected),
        mismatched=tuple(mismatched),
    )


def check_state_dict(expected: dict, state: dict, where, what: str) -> None:
    """Raise CheckpointError unless ``state`` has exactly ``expected``'s keys and shapes.

    Lists the first missing and unexpected keys with their counts, or names the key whose
    shape differs with both shapes.
    """
    report = compare_state_dicts(expected, state)
    missing, unexpected = list(report.missing), list(report.unexpected)
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: {what} state does not match: {len(missing)} missing keys "
            f"(first: {missing[:5]}), {len(unexpected)} unexpected keys (first: {unexpected[:5]})"
        )
    for key, stored, wanted in report.mismatched[:1]:
        raise CheckpointError(f"{where}: {key} has shape {stored} in the checkpoint, {what} expects {wanted}")


def cast_state(state: dict, dtype, device) -> dict:
    """``state`` on ``device``, its floating tensors in ``dtype`` (None keeps each tensor's own)."""
    return {
        k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
        for k, v in state.items()
    }


def build_model(cls, config, state: dict, where, dtype=None, device=None) -> nn.Module:
    """``cls(config)`` built on the meta device, holding exactly ``state`` (checked by name and shape)."""
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model.state_dict(), state, where, cls.__name__)
    model.load_state_dict(cast_state(state, dtype, device), assign=True)
    return model.eval()


@torch.no_grad()
def load_partial(model: nn.Module, state: dict) -> LoadReport:
    """Copy into ``model`` every tensor of ``state`` whose name and shape fit (cast to the model's
    dtype and device); leave every other parameter and buffer as it is. Returns the report."""
    report = compare_state_dicts(model.state_dict(), state)
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report


def stored_dtype(state: dict) -> torch.dtype:
    """The one floating dtype of ``state``'s tensors (fp32 if they have none or several)."""
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32
