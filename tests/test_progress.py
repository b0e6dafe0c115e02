"""cdiff.progress off a terminal: long work reports itself in plain lines, not in silence."""

import io
import sys

import pytest

from cdiff import progress
from tests.translating import run

pytestmark = pytest.mark.usefixtures("one_thread")


class Log(io.StringIO):
    def isatty(self):
        return False


def log_to_file(monkeypatch) -> Log:
    """stderr as a log file (in the test itself: pytest sets its own stderr after the fixtures)."""
    stream = Log()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(progress, "_last_line", [None])  # no line yet in this "process"
    return stream


def test_off_a_terminal_a_line_every_interval_and_one_at_the_end(monkeypatch):
    log = log_to_file(monkeypatch)
    now = [1000.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    monkeypatch.setenv("CDIFF_PROGRESS_SECONDS", "30")
    bar = progress.Bar(10, "images")
    for done, at in enumerate((10, 29, 31, 40, 60, 62, 65), 1):  # seconds since the bar began
        now[0] = 1000.0 + at
        bar.update(done)
    now[0] = 1070.0
    bar.close()
    lines = log.getvalue().splitlines()
    # at 31 s (3 done: 10.3 s each, 7 to go), at 62 s (30 s after the last line), and the end
    assert lines == ["images 3/10 0:00:31 left 0:01:12", "images 6/10 0:01:02 left 0:00:41", "images 7/10 0:01:10 done"]
    assert "\r" not in log.getvalue()


def test_work_shorter_than_the_interval_prints_no_line(monkeypatch):
    log = log_to_file(monkeypatch)
    monkeypatch.setenv("CDIFF_PROGRESS_SECONDS", "3600")
    for _ in progress.progress(range(5), desc="images"):
        pass
    assert log.getvalue() == ""


def test_translate_into_a_log_file_reports_its_progress(model, inputs, tmp_path, monkeypatch):
    log = log_to_file(monkeypatch)
    monkeypatch.setenv("CDIFF_PROGRESS_SECONDS", "0")  # a line at every update
    assert run("--model", model, "--input", inputs, "--output", tmp_path / "eo", "--steps", 2) == 0
    lines = log.getvalue().splitlines()
    assert "images 0/3 | DDIM 1/2 0:00:00" in [line[: len("images 0/3 | DDIM 1/2 0:00:00")] for line in lines]
    assert any(line.startswith("images 2/3 | DDIM 2/2 ") for line in lines)
    assert lines[-1].startswith("images 3/3 ") and lines[-1].endswith(" done") and "\r" not in log.getvalue()


def test_a_bad_interval_is_named(monkeypatch):
    monkeypatch.setenv("CDIFF_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match="CDIFF_PROGRESS_SECONDS='soon'"):
        progress._line_seconds()
