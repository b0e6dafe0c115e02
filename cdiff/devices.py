"""The torch device a command runs on, checked before anything is loaded: ``--device cuda`` on a
machine without a GPU, or a name torch does not know, is one line naming the argument, not a
traceback minutes later."""

from __future__ import annotations

import torch


def pick_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """``requested`` (e.g. "cpu", "cuda", "cuda:1", "mps"), checked; None: cuda:``local_rank``
    (the GPU torchrun gave this process) when CUDA is available, else the CPU."""
    if requested is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {requested!r}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {requested}: {why}; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {requested}: there {'is' if count == 1 else 'are'} {count} CUDA "
                             f"device{'s' * (count != 1)} (cuda:0 .. cuda:{count - 1})")
        return device
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise ValueError(f"--device {requested}: the meta device holds no data; use cpu or cuda")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {requested}: no Apple GPU (MPS) here; use --device cpu")
    try:  # another backend (mps, xpu, ...): can a tensor live there?
        torch.empty(0, device=device)
    except Exception as err:  # torch raises RuntimeError, AssertionError, ImportError... by backend
        text = str(err).strip() or type(err).__name__
        first = text.splitlines()[0].split(". ")[0][:160]  # torch's messages run on for lines
        raise ValueError(f"--device {requested}: not usable here ({first})") from None
    return device
