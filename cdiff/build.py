"""Putting a checkpoint's tensors (in cdiff's names) into models: exactly, or partly with a report.

``build_model`` makes ``cls(config)`` on the meta device and takes the checkpoint's tensors
with ``load_state_dict(assign=True)``: no second copy, the stored dtype kept unless a
``dtype`` is asked for, and every name and shape checked first.

``load_partial`` is for a model that differs from the stored one (a block added or changed):
it copies every tensor whose name and shape fit, leaves the rest of the model as initialised,
and returns a ``LoadReport`` of what was missing, unexpected and of another shape.
"""

from __future__ import annotations

import torch
from torch import nn

from cdiff.checkpoint import LoadReport, check_state_dict, compare_state_dicts


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
