"""Writes that never surprise: output paths checked before the work starts (cdiff.files.
check_output, used by convert, export, demo and synth), --overwrite, the mode of written
files, and ``python -m cdiff``. Models are the tiny preset, written with save_native."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cdiff
from cdiff import VAE, UNet, UNetConfig, VAEConfig, save_native
from cdiff.cli import main
from cdiff.data.imageio import write_png
from cdiff.files import atomic_path, check_output, save_safetensors
from cdiff.layouts.detect import detect_layout
from cdiff.weightfile import WeightFile
from cdiff.testing import deny_writes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    """A tiny C-DiffSET model in cdiff's native file (its prompt embedding stored, so
    convert needs no text encoder)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("native") / "model.safetensors"
    save_native(path, UNet(UNetConfig.tiny(in_channels=8, out_channels=5)), VAE(VAEConfig.tiny()), torch.randn(6, 1024))
    return path


def run_cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)




# --- modes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_written_files_get_the_mode_a_plain_open_would_give(tmp_path, umask, mask):
    umask(mask)
    expected_file, expected_folder = 0o666 & ~mask, 0o777 & ~mask
    with open(tmp_path / "plain.txt", "w"):
        pass
    assert mode(tmp_path / "plain.txt") == expected_file  # what open() gives, the reference
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    with atomic_path(tmp_path / "folder", is_dir=True) as tmp:
        (tmp / "inside.txt").write_text("y")
    save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    write_png(tmp_path / "new" / "sub" / "i.png", np.zeros((4, 4), np.uint8))
    assert mode(tmp_path / "a.txt") == expected_file
    assert mode(tmp_path / "w.safetensors") == expected_file
    assert mode(tmp_path / "new" / "sub" / "i.png") == expected_file
    assert mode(tmp_path / "folder") == expected_folder and mode(tmp_path / "new" / "sub") == expected_folder
    # A whole dataset: every folder and file, as the user's own files would be.
    assert main(["synth", str(tmp_path / "syn"), "--count", "1", "--size", "64"]) == 0
    for path in [tmp_path / "syn", *(tmp_path / "syn").rglob("*")]:
        assert mode(path) == (expected_folder if path.is_dir() else expected_file), path


# --- check_output --------------------------------------------------------------------------------


def test_check_output_names_the_real_problem(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        (dict(path=tmp_path / "file.txt" / "out.safetensors"), ValueError, r"file.txt/out.safetensors: cannot be created: .*file.txt is a file"),
        (dict(path=tmp_path / "file.txt" / "a" / "b" / "out"), ValueError, r"cannot be created: .*file.txt is a file"),
        (dict(path=tmp_path / "folder"), ValueError, r"folder: is a folder; the output is a file"),
        (dict(path=tmp_path / "file.txt", kind="folder"), ValueError, r"file.txt: exists and is not a folder"),
        (dict(path=tmp_path / "file.txt"), FileExistsError, r"file.txt: already exists; pass --overwrite"),
        (dict(path=tmp_path / "folder", kind="folder"), FileExistsError, r"folder: is a folder that is not empty; pass --overwrite"),
        (dict(path=tmp_path / "x.ckpt", suffix=".safetensors"), ValueError, r"x.ckpt: the output must be a .safetensors file"),
        (dict(path=tmp_path / "folder" / "..", kind="folder", overwrite=True), ValueError, r"give the output a name"),
        (dict(path=tmp_path / "folder", kind="folder", overwrite=True, sources=[tmp_path / "folder" / "keep"]),
         ValueError, r"folder: holds the source .*keep; replacing the folder would delete it"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            check_output(**kwargs)
    # What is fine: a new path (parents made later), an empty folder, an existing one with overwrite.
    assert check_output(tmp_path / "new" / "deeper" / "out.safetensors") == tmp_path / "new" / "deeper" / "out.safetensors"
    check_output(tmp_path / "empty", "folder")
    check_output(tmp_path / "file.txt", overwrite=True)
    check_output(tmp_path / "folder", "folder", overwrite=True)
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes(monkeypatch, locked)
    with pytest.raises(PermissionError, match=r"locked/new/out: cannot write into .*locked: permission denied"):
        check_output(locked / "new" / "out")


def test_check_output_finds_the_source_through_another_path(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"weights")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(src)
    os.link(src, tmp_path / "hard.safetensors")
    for out in (src, tmp_path / "sub" / ".." / "model.safetensors", tmp_path / "link.safetensors", tmp_path / "hard.safetensors"):
        with pytest.raises(ValueError, match=r": is the source .*model.safetensors; write the output to another path"):
            check_output(out, overwrite=True, sources=[src])
    assert src.read_bytes() == b"weights"


# --- convert and export --------------------------------------------------------------------------


def test_convert_refuses_src_equal_out(native, tmp_path, capsys):
    src = tmp_path / "m.safetensors"
    src.write_bytes(native.read_bytes())
    (tmp_path / "sub").mkdir()
    (tmp_path / "alias.safetensors").symlink_to(src)
    for out in (src, tmp_path / "sub" / ".." / "m.safetensors", tmp_path / "alias.safetensors"):
        for extra in ([], ["--overwrite"]):
            code, err = run_cli(["convert", src, out, *extra], capsys)
            assert code == 2 and "is the source" in err and err.count("\n") == 1
    code, err = run_cli(["export", src, src, "--to", "release", "--overwrite"], capsys)
    assert code == 2 and "is the source" in err
    assert src.read_bytes() == native.read_bytes()


def test_convert_and_export_refuse_an_existing_out_unless_overwrite(native, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    code, err = run_cli(["convert", native, out], capsys)
    assert code == 2 and f"{out}: already exists; pass --overwrite to replace it" in err
    assert out.read_bytes() == b"precious"
    assert run_cli(["convert", native, out, "--overwrite"], capsys)[0] == 0
    assert detect_layout(out) == "native" and WeightFile(out).keys()
    for to in ("original", "release"):
        target = tmp_path / f"{to}.safetensors"
        target.write_bytes(b"precious")
        code, err = run_cli(["export", out, target, "--to", to], capsys)
        assert code == 2 and "already exists; pass --overwrite" in err and target.read_bytes() == b"precious"
        assert run_cli(["export", out, target, "--to", to, "--overwrite"], capsys)[0] == 0
        assert detect_layout(target) == ("original" if to == "original" else "diffusers-unet")
    folder = tmp_path / "diffusers"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    code, err = run_cli(["export", out, folder, "--to", "diffusers"], capsys)
    assert code == 2 and "is a folder that is not empty; pass --overwrite" in err
    assert (folder / "notes.txt").read_text() == "precious"
    assert run_cli(["export", out, folder, "--to", "diffusers", "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["cdiff_context.safetensors", "model_index.json", "scheduler", "unet", "vae"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary or old copy left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["export", out, empty, "--to", "diffusers"], capsys)[0] == 0  # an empty folder needs no --overwrite
    assert detect_layout(empty) == "diffusers"


def test_export_original_refuses_a_ckpt_name(native, tmp_path, capsys):
    for to in ("original", "release"):
        code, err = run_cli(["export", native, tmp_path / "out.ckpt", "--to", to], capsys)
        assert code == 2 and "out.ckpt: the output must be a .safetensors file" in err
    assert list(tmp_path.iterdir()) == []


# --- every writer checks its output before the work ---------------------------------------------


def bad_outputs(tmp_path: Path, monkeypatch, kind: str) -> dict[str, tuple[Path, str]]:
    """Output paths that cannot be written as a ``kind``, with the words the error must use."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder.safetensors").mkdir()
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes(monkeypatch, locked)
    name = "out.safetensors" if kind == "file" else "out"
    cases = {
        "parent is a file": (tmp_path / "a_file" / name, "a_file is a file, not a folder"),
        "parent not writable": (locked / name, "locked: permission denied"),
    }
    if kind == "file":
        cases["a folder where a file is wanted"] = (tmp_path / "a_folder.safetensors", "is a folder; the output is a file")
    else:
        cases["a file where a folder is wanted"] = (tmp_path / "a_file", "exists and is not a folder")
    return cases


COMMANDS = {
    "convert": (lambda src, out: ["convert", src, out], "file"),
    "export-release": (lambda src, out: ["export", src, out, "--to", "release"], "file"),
    "export-diffusers": (lambda src, out: ["export", src, out, "--to", "diffusers"], "folder"),
    "demo": (lambda src, out: ["demo", "--out", out, "--size", "64"], "folder"),
    "synth": (lambda src, out: ["synth", out, "--size", "64"], "folder"),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_output_paths_are_checked_before_the_work(native, tmp_path, monkeypatch, capsys, command):
    def work_started(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    # The first slow step of each command.
    monkeypatch.setattr("cdiff.convert.read_vae", work_started)
    monkeypatch.setattr("cdiff.export.read_unet", work_started)
    monkeypatch.setattr("cdiff.demo.make_pair", work_started)
    monkeypatch.setattr("cdiff.data.synth.make_pair", work_started)
    argv, kind = COMMANDS[command]
    for case, (out, message) in bad_outputs(tmp_path, monkeypatch, kind).items():
        code, err = run_cli(argv(native, out), capsys)
        assert code == 2, (case, err)
        assert err.startswith("cdiff: error: ") and message in err and err.count("\n") == 1, (case, err)
        assert "Errno" not in err, (case, err)


# --- python -m cdiff -----------------------------------------------------------------------------


def test_python_dash_m_cdiff_works_like_cdiff(tmp_path):
    # Two runs (each imports torch, seconds): the output of a success, and the exit status
    # and one-line message of an error, both as the cdiff command gives them.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *argv: subprocess.run([sys.executable, "-m", "cdiff", *argv], capture_output=True, text=True, cwd=tmp_path, env=env)  # noqa: E731
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"cdiff {cdiff.__version__}"
    (tmp_path / "a_file").write_text("x")
    error = run("synth", str(tmp_path / "a_file" / "out"))
    assert error.returncode == 2 and error.stderr.startswith("cdiff: error: ") and "a_file is a file" in error.stderr
