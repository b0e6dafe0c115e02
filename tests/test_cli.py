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


def test_demo_writes_the_translation(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--size", "64", "--steps", "3", "--seed", "1"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["confidence.png", "eo.png", "eo_reference.png", "sar.png"]  # no temporary leftovers
    for name in names:
        assert Image.open(tmp_path / name).size == (64, 64)
    eo = np.asarray(Image.open(tmp_path / "eo.png"))
    assert eo.shape == (64, 64, 3) and eo.std() > 0
    assert "3 DDIM steps" in capsys.readouterr().out


def test_demo_is_reproducible(tmp_path):
    for run in ("a", "b"):
        main(["demo", "--out", str(tmp_path / run), "--size", "64", "--steps", "2", "--seed", "5"])
    for name in ("eo.png", "confidence.png"):
        a, b = (np.asarray(Image.open(tmp_path / run / name)) for run in ("a", "b"))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("argv, word", [(["--size", "60"], "--size"), (["--steps", "0"], "--steps")])
def test_demo_bad_arguments(tmp_path, capsys, argv, word):
    assert main(["demo", "--out", str(tmp_path), *argv]) == 2
    assert word in capsys.readouterr().err
