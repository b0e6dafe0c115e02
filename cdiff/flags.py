"""Environment switches, all in one place. Each is read when it is used, never at import.

CDIFF_ATTENTION   "sdpa" (default) or "math": the attention backend (see cdiff.attention).
CDIFF_LOSS        "auto" (default), "triton" or "torch": the C-Diff loss backend (see cdiff.loss).
"""

from __future__ import annotations

import os

_CHOICES = {
    "CDIFF_ATTENTION": ("sdpa", "math"),
    "CDIFF_LOSS": ("auto", "triton", "torch"),
}


def get(name: str) -> str:
    """The value of switch ``name``, or its default (the first choice); a bad value raises."""
    choices = _CHOICES[name]
    value = os.environ.get(name, choices[0]).strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"environment variable {name}={value!r}: expected one of {choices}")
    return value
