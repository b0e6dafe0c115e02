"""The `cdiff` command: version, help, and the demo's end-to-end smoke run."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cdiff
from cdiff.cli import main


def test_version_and_help():
    result = subprocess.run([sys.executable, "-m", "cdiff.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"cdiff {cdiff.__version__}"
    result = subprocess.run([sys.executable, "-m", "cdiff.cli", "--help"], capture_output=True, text=True)
    for command in ("demo", "synth", "convert"):
        assert command in result.stdout


def test_demo_is_reproducible(tmp_path):
    # Its outputs and printed table: tests/test_demo.py.
    for run in ("a", "b"):
        main(["demo", "--out", str(tmp_path / run), "--size", "64", "--steps", "2", "--scenes", "1", "--seed", "5"])
    for name in ("synth_1000000_eo.png", "synth_1000000_confidence.png"):
        a, b = (np.asarray(Image.open(tmp_path / run / name)) for run in ("a", "b"))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("argv, word", [(["--size", "60"], "--size"), (["--steps", "0"], "--steps")])
def test_demo_bad_arguments(tmp_path, capsys, argv, word):
    assert main(["demo", "--out", str(tmp_path), *argv]) == 2
    assert word in capsys.readouterr().err
