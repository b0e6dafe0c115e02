"""Building models from state dicts in cdiff's names.

``build_model`` makes ``cls(config)`` on the meta device and takes the checkpoint's tensors
with ``load_state_dict(assign=True)``: no second copy, the stored dtype kept unless a
``dtype`` is asked for, and every name and shape checked first.
"""

from __future__ import annotations

import torch
from torch import nn

from cdiff.checkpoint import check_state_dict


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
