"""A minimal progress bar on stderr (tqdm would be one more runtime dependency).

Bars nest: a bar made while another is open (DDIM steps inside a loop over images) draws on
its parent's line, after the parent's count: ``images 3/10 | DDIM [#####...] 17/50 ...``.
"""

from __future__ import annotations

import sys
import time
import weakref
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

WIDTH = 24  # characters of the bar; a nested line still fits 80 columns
_open: list[weakref.ref] = []  # the bars being drawn, outermost first; one never closed drops out when freed


def _drawn() -> list["Bar"]:
    _open[:] = [ref for ref in _open if ref() is not None]
    return [ref() for ref in _open]


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Bar:
    """``desc [#####.....] done/total  elapsed  left <postfix>``, redrawn on ``update``.

    Draws only when enabled and stderr is a terminal. The time left extrapolates the rate since
    the bar was made from ``start`` (e.g. the step a resumed run starts at).
    """

    def __init__(self, total: int | None, desc: str = "", enabled: bool = True, start: int = 0):
        self.total, self.desc, self.start = total, desc, start
        self.show = enabled and sys.stderr.isatty()
        self.began = time.perf_counter()
        self.done = 0
        if self.show:
            _open.append(weakref.ref(self))

    def update(self, done: int, postfix: str = "") -> None:
        self.done = done
        if not self.show:
            return
        elapsed = time.perf_counter() - self.began
        if self.total:
            filled = int(WIDTH * done / self.total)
            bar = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{self.total}"
            if done > self.start:
                bar += f" left {_clock(elapsed / (done - self.start) * (self.total - done))}"
        else:
            bar = f"{done}"
        parents = "".join(f"{b.desc} {b.done}/{b.total or '?'} | " for b in self._parents())
        sys.stderr.write(f"\r{parents}{self.desc} {bar} {elapsed:6.1f}s {postfix}\x1b[K")
        sys.stderr.flush()

    def _parents(self) -> list["Bar"]:
        bars = _drawn()
        return bars[: bars.index(self)] if self in bars else []

    def close(self) -> None:
        if not self.show:
            return
        parents = self._parents()
        bars = _drawn()
        if self in bars:
            del _open[bars.index(self) :]
        if not parents:
            sys.stderr.write("\n")  # a nested bar leaves the line to its parent


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """Yield from ``items`` while drawing ``desc [#####.....] k/total  elapsed``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    bar = Bar(total, desc, enabled)
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            bar.update(done)
    finally:
        bar.close()
