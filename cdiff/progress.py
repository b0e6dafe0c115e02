"""A minimal progress bar on stderr (tqdm would be one more runtime dependency).

Bars nest: a bar made while another is open (DDIM steps inside a loop over images) draws on
its parent's line, after the parent's count: ``images 3/10 | DDIM [#####...] 17/50 ...``.

When stderr is not a terminal (a log file, a batch job, a pipe), a redrawn line would be
lost, so long work reports itself as plain lines instead: at most one every
``CDIFF_PROGRESS_SECONDS`` seconds (cdiff.flags; default 30) over all open bars, nested ones
included (``images 3/10 | DDIM 17/50 0:01:12 left 0:00:40``), and a last line when an
outermost bar that has printed one closes. Work shorter than that prints none.
"""

from __future__ import annotations

import sys
import time
import weakref
from typing import Iterable, Iterator, TypeVar

from cdiff import flags

T = TypeVar("T")

WIDTH = 24  # characters of the bar; a nested line still fits 80 columns
_open: list[weakref.ref] = []  # the bars being drawn, outermost first; one never closed drops out when freed
_last_line = [None]  # perf_counter of the last progress line off a terminal (None: none yet in this process)


def _drawn() -> list["Bar"]:
    _open[:] = [ref for ref in _open if ref() is not None]
    return [ref() for ref in _open]


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Bar:
    """``desc [#####.....] done/total  elapsed  left <postfix>``, redrawn on ``update``.

    Draws only when enabled: on a terminal, a line redrawn in place; elsewhere, a plain line now
    and then (module docstring), unless ``lines`` is False (for work that logs lines of its own,
    such as training). The time left extrapolates the rate since the bar was made from ``start``
    (e.g. the step a resumed run starts at).
    """

    def __init__(self, total: int | None, desc: str = "", enabled: bool = True, start: int = 0, lines: bool = True):
        self.total, self.desc, self.start = total, desc, start
        self.terminal = sys.stderr.isatty()
        self.show = enabled and (self.terminal or lines)
        self.began = time.perf_counter()
        self.done = 0
        self.printed = False  # a plain line was printed for this bar or a nested one
        if self.show:
            _open.append(weakref.ref(self))

    def _left(self, elapsed: float) -> str:
        if not self.total or self.done <= self.start:
            return ""
        return f" left {_clock(elapsed / (self.done - self.start) * (self.total - self.done))}"

    def update(self, done: int, postfix: str = "") -> None:
        self.done = done
        if not self.show:
            return
        now = time.perf_counter()
        elapsed = now - self.began
        if not self.terminal:
            self._line(now, postfix)
            return
        if self.total:
            filled = int(WIDTH * done / self.total)
            bar = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{self.total}" + self._left(elapsed)
        else:
            bar = f"{done}"
        parents = "".join(f"{b.desc} {b.done}/{b.total or '?'} | " for b in self._parents())
        sys.stderr.write(f"\r{parents}{self.desc} {bar} {elapsed:6.1f}s {postfix}\x1b[K")
        sys.stderr.flush()

    def _line(self, now: float, postfix: str = "", last: bool = False) -> None:
        """A plain progress line, if the last one (of any bar) is old enough, or ``last``."""
        if not last and _last_line[0] is not None and now - _last_line[0] < _line_seconds():
            return
        if not last and _last_line[0] is None and now - self._outermost().began < _line_seconds():
            return  # the first line only once the work has run that long
        _last_line[0] = now
        bars = self._parents() + [self]
        for bar in bars:
            bar.printed = True
        count = " | ".join(f"{b.desc} {b.done}/{b.total or '?'}" for b in bars)
        elapsed = now - bars[0].began
        text = f"{count} {_clock(elapsed)}{'' if last else bars[0]._left(elapsed)}" + (f" {postfix}" if postfix else "")
        print(text + (" done" if last else ""), file=sys.stderr, flush=True)

    def _outermost(self) -> "Bar":
        parents = self._parents()
        return parents[0] if parents else self

    def _parents(self) -> list["Bar"]:
        bars = _drawn()
        return bars[: bars.index(self)] if self in bars else []

    def close(self) -> None:
        if not self.show:
            return
        parents = self._parents()
        if not self.terminal and not parents and self.printed:
            self._line(time.perf_counter(), last=True)  # how the work ended, after its progress lines
        bars = _drawn()
        if self in bars:
            del _open[bars.index(self) :]
        if not parents and self.terminal:
            sys.stderr.write("\n")  # a nested bar leaves the line to its parent


def _line_seconds() -> float:
    return flags.get_seconds("CDIFF_PROGRESS_SECONDS", 30.0)


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
