"""Ctrl-C (SIGINT) and SIGTERM during long work: stop at a safe point, say what was kept.

While a ``StopRequests`` is active it owns both signals (in the main thread only; elsewhere it
does nothing and the signals keep their usual effect):

- before ``defer()`` (loading, opening data) a signal stops the work at once: ``Interrupted`` is
  raised where the program is, and ``finally`` blocks run (a lock is given back);
- after ``defer()`` the first signal is only noted (``requested``): the work polls it at its next
  safe point (the trainer: the end of a step, where it saves a checkpoint) and stops there with
  ``Interrupted`` and a message saying how to continue. The same signal again stops at once (the
  other one does not: torchrun sends SIGTERM to workers that already had the terminal's Ctrl-C).

``Interrupted`` derives from KeyboardInterrupt, not Exception: no ``except Exception`` on the way
(a reader that turns every failure into "corrupt file?") mistakes it for an error. ``cdiff``
prints its message in one line and exits with 128 + the signal number (130 for Ctrl-C, 143 for
SIGTERM), as a shell does for a process a signal ended.
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The work stopped on a signal; ``str()`` says what was kept and how to continue."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.message, self.signum = message, signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return self.message


class StopRequests:
    """A context that catches SIGINT and SIGTERM (module docstring)."""

    def __init__(self, what: str = "the work", notice: str | None = None):
        """``what``: the work, for messages ("training"); ``notice``: a line printed to stderr on a
        deferred first signal ("{signal}" stands for its name)."""
        self.what, self.notice = what, notice
        self.signum: int | None = None  # the first signal received after defer()
        self.deferred = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> str | None:
        """The name of the signal that asked to stop (e.g. "SIGINT"), or None."""
        return signal.Signals(self.signum).name if self.signum is not None else None

    def defer(self, deferred: bool = True) -> None:
        """From now on a first signal waits for the next safe point (``deferred=False``: stops at once)."""
        self.deferred = deferred

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.deferred:
            raise Interrupted(f"stopped by {name} before {self.what} began; nothing was saved", signum)
        if self.signum is not None:
            if signum == self.signum:
                raise Interrupted(f"stopped at once by a second {name}: {self.what} since the last save is lost",
                                  signum)
            return  # the other signal: torchrun answers Ctrl-C with SIGTERM to its workers, already stopping
        self.signum = signum
        if self.notice:
            try:
                print(self.notice.format(signal=name), file=sys.stderr, flush=True)
            except RuntimeError:  # stderr was being written when the signal came: skip the notice
                pass
