"""A minimal progress bar on stderr (tqdm would be one more runtime dependency)."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """Yield from ``items`` while drawing ``desc [#####.....] k/total  elapsed``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    show = enabled and sys.stderr.isatty()
    start = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        if show:
            elapsed = time.perf_counter() - start
            if total:
                filled = int(30 * done / total)
                bar = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}"
            else:
                bar = f"{done}"
            sys.stderr.write(f"\r{desc} {bar} {elapsed:6.1f}s")
            sys.stderr.flush()
    if show:
        sys.stderr.write("\n")
