"""A minimal progress bar on stderr (tqdm would be one more runtime dependency).

Bars nest: a bar started while another is running (DDIM steps inside a loop over images)
draws on the same line after its parent, ``images [##....] 3/10 | DDIM [#####...] 17/50``,
and leaves the line to its parent when it ends.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_drawn: list[str] = []  # the text of every bar being drawn, outermost first


WIDTH = 16  # two nested bars fit an 80-column terminal


def _bar(desc: str, done: int, total: int | None, elapsed: float) -> str:
    if total:
        filled = int(WIDTH * done / total)
        return f"{desc} [{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{total} {elapsed:.1f}s"
    return f"{desc} {done} {elapsed:.1f}s"


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """Yield from ``items`` while drawing ``desc [#####.....] k/total  elapsed``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    show = enabled and sys.stderr.isatty()
    start = time.perf_counter()
    done = 0
    depth = len(_drawn)
    if show:
        _drawn.append(_bar(desc, 0, total, 0.0))
    try:
        for item in items:
            yield item
            done += 1
            if show:
                _drawn[depth] = _bar(desc, done, total, time.perf_counter() - start)
                sys.stderr.write("\r" + " | ".join(_drawn[: depth + 1]) + "\x1b[K")  # \x1b[K: clear the rest
                sys.stderr.flush()
    finally:
        if show:
            del _drawn[depth:]
            if depth == 0:
                sys.stderr.write("\n")
