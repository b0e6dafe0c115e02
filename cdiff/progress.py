"""A minimal progress bar on stderr (tqdm would be one more runtime dependency)."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


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

    def update(self, done: int, postfix: str = "") -> None:
        if not self.show:
            return
        elapsed = time.perf_counter() - self.began
        if self.total:
            filled = int(30 * done / self.total)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}"
            if done > self.start:
                bar += f" left {_clock(elapsed / (done - self.start) * (self.total - done))}"
        else:
            bar = f"{done}"
        sys.stderr.write(f"\r{self.desc} {bar} {elapsed:6.1f}s {postfix}\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.show:
            sys.stderr.write("\n")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """Yield from ``items`` while drawing ``desc [#####.....] k/total  elapsed``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    bar = Bar(total, desc, enabled)
    done = 0
    for item in items:
        yield item
        done += 1
        bar.update(done)
    bar.close()
