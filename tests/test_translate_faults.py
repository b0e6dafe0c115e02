"""`cdiff translate` when things go wrong: signals, a full disk, leftovers of a killed run, a
missing extra, bad devices, folders and names, damaged model files; each gives one line naming
what is wrong, and nothing half-written stays behind."""

import errno
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import cdiff.translate
from cdiff import UNet, UNetConfig, save_native
from cdiff.load import load_pipeline
from cdiff.weightfile import WeightFile
from tests.translating import read, run, sar_png, tiny_modules

pytestmark = pytest.mark.usefixtures("one_thread")


def temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob(".*")]


def one_error_line(err: str, start: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(start), err
    return err


# --- signals ---------------------------------------------------------------------------------


@pytest.fixture
def sigterm_guard():
    """Without a handler of cdiff's, a SIGTERM raised in the test would end pytest itself."""
    def not_handled(signum, frame):
        raise AssertionError("SIGTERM reached the test: cdiff translate did not handle it")

    previous = signal.signal(signal.SIGTERM, not_handled)
    yield
    signal.signal(signal.SIGTERM, previous)


def signal_after_first_image(monkeypatch, signum, times=1):
    """Raise ``signum`` (``times`` times) as the first image's outputs are written, as a Ctrl-C or
    a `kill` arriving while the second image is about to start."""
    write = cdiff.translate.write_outputs
    calls = []

    def write_then_signal(*args):
        write(*args)
        calls.append(1)
        if len(calls) == 1:
            for _ in range(times):
                signal.raise_signal(signum)

    monkeypatch.setattr(cdiff.translate, "write_outputs", write_then_signal)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_image_in_flight_and_says_how_to_continue(model, inputs, tmp_path, capsys, monkeypatch,
                                                                       sigterm_guard, signum):
    out, conf = tmp_path / "eo", tmp_path / "conf"
    signal_after_first_image(monkeypatch, signum)
    argv = ["--model", model, "--input", inputs, "--output", out, "--conf-dir", conf, "--steps", 2]
    assert run(*argv) == 128 + signum
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert "Traceback" not in err
    assert err.splitlines()[0] == (f"cdiff translate: {name}: stopping once the images in flight are written "
                                   f"({name} again stops at once, dropping them)")
    assert err.splitlines()[-1] == (f"cdiff: stopped by {name}: 1 image(s) translated in this run, 0 done before, "
                                    "2 still to do; run the same command again to continue (finished images are "
                                    f"skipped) -> {out}")
    assert sorted(p.name for p in out.rglob("*.png")) == ["a.png"]  # the one in flight, finished whole
    assert sorted(p.name for p in conf.rglob("*.png")) == ["a.png", "a_colour.png"]
    assert temporaries(out, conf) == []
    monkeypatch.undo()
    assert run(*argv) == 0
    assert "2 translated, 1 already done" in capsys.readouterr().out


def test_the_same_signal_twice_drops_the_image_in_flight(model, inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eo"
    translated = []
    scenes = cdiff.translators.translate_scenes

    def translate_and_signal(*args, **kwargs):  # the second image: Ctrl-C twice while it is computed
        if translated:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        translated.append(1)
        return scenes(*args, **kwargs)

    monkeypatch.setattr(cdiff.translators, "translate_scenes", translate_and_signal)
    assert run("--model", model, "--input", inputs, "--output", out, "--steps", 2) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith(
        "cdiff: stopped at once by a second SIGINT: 1 image(s) translated in this run, 0 done before, 2 still to do; "
        "the images in flight were dropped; run the same command again")
    assert sorted(p.name for p in out.rglob("*.png")) == ["a.png"] and temporaries(out) == []


# --- the disk and what a killed run left ----------------------------------------------------


def test_a_full_disk_names_the_path_and_keeps_nothing_of_the_image(model, inputs, tmp_path, capsys, monkeypatch):
    out, conf = tmp_path / "eo", tmp_path / "conf"
    save = Image.Image.save

    def save_until_full(self, fp, *args, **kwargs):
        if "a_colour.png" in str(fp):  # the third output of the first image: the disk fills up mid-file
            Path(fp).write_bytes(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_full)
    assert run("--model", model, "--input", inputs, "--output", out, "--conf-dir", conf, "--steps", 1) == 2
    err = one_error_line(capsys.readouterr().err, f"cdiff: error: {conf / 'a_colour.png'}: no space left on its device")
    assert "run the same command again" in err
    # The image's outputs exist all or none: its EO image and grey map, written already, are gone too.
    assert list(out.rglob("*")) == [] and list(conf.rglob("*")) == []


def test_a_rerun_removes_the_temporaries_a_killed_run_left_and_nothing_else(model, inputs, tmp_path, capsys):
    out = tmp_path / "eo"
    (out / "sub").mkdir(parents=True)
    left = [out / ".a.png.0123abcd.tmp", out / "sub" / ".b.png.89abcdef.tmp"]  # cdiff's names for its outputs
    kept = [out / ".notes.tmp", out / ".x.png.0123abcd.tmp", out / "a.png.tmp", out / ".a.png.tmp"]  # anything else
    for path in left + kept:
        path.write_bytes(b"half a png")
    assert run("--model", model, "--input", inputs, "--output", out, "--steps", 1) == 0
    assert "removed 2 temporary file(s) that a stopped run left" in capsys.readouterr().out
    assert not any(p.exists() for p in left) and all(p.read_bytes() == b"half a png" for p in kept)


# --- checked before any work ------------------------------------------------------------------


def test_a_missing_rasterio_is_found_before_the_first_image(model, inputs, tmp_path, capsys, monkeypatch):
    sar_png(inputs / "z.tif", 64)  # sorted after every PNG: today's check came only when it was read
    monkeypatch.setitem(__import__("sys").modules, "rasterio", None)  # import rasterio -> ImportError
    out = tmp_path / "eo"
    assert run("--model", model, "--input", inputs, "--output", out, "--steps", 1) == 3
    one_error_line(capsys.readouterr().err, f"cdiff: error: 1 input is a TIFF (first: {inputs / 'z.tif'}), and "
                   "GeoTIFFs need rasterio: pip install 'cdiffset[geo]'")
    assert not out.exists() or list(out.rglob("*")) == []


@pytest.mark.parametrize("device, message", [
    ("foo", "--device 'foo': not a torch device (e.g. cpu, cuda, cuda:1, mps)"),
    ("cuda", "--device cuda: "),
    ("cuda:7", "--device cuda:7: "),
])
def test_a_device_that_is_not_there_is_one_line(inputs, tmp_path, capsys, device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("a machine with 8 GPUs has cuda:7")
    # The model does not exist: the device is checked before anything is loaded.
    code = run("--model", tmp_path / "nowhere.safetensors", "--input", inputs, "--output", tmp_path / "eo",
               "--device", device)
    assert code == 2
    one_error_line(capsys.readouterr().err, f"cdiff: error: {message}")


def test_an_output_inside_the_input_is_refused(model, inputs, tmp_path, capsys):
    for flag in ("--output", "--conf-dir"):
        folder = inputs / "sub" / "translated"
        argv = ["--output", folder] if flag == "--output" else ["--output", tmp_path / "eo", "--conf-dir", folder]
        assert run("--model", model, "--input", inputs, *argv) == 2
        one_error_line(capsys.readouterr().err, f"cdiff: error: {flag} {folder}: is inside --input {inputs}, so "
                       "every rerun would translate its own outputs again; choose a folder outside it")
        assert not folder.exists()


def test_an_unreadable_subfolder_stops_the_run_or_is_counted(model, inputs, tmp_path, capsys, monkeypatch):
    blocked, scandir = inputs / "sub", os.scandir

    def unreadable(path="."):  # root reads every folder: make one unreadable as it is for other users
        if Path(os.fsdecode(path)) == blocked:
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unreadable)
    out = tmp_path / "eo"
    assert run("--model", model, "--input", inputs, "--output", out, "--steps", 1) == 2
    one_error_line(capsys.readouterr().err, f"cdiff: error: input folder {inputs}: cannot read the folder {blocked}: "
                   "Permission denied")
    assert run("--model", model, "--input", inputs, "--output", out, "--steps", 1, "--skip-bad") == 0
    output = capsys.readouterr().out
    assert "2 translated, 0 already done, 1 bad" in output and f"  skipped {blocked}{os.sep}: " in output


def test_a_file_name_that_is_not_utf8_is_named_and_skipped(model, inputs, tmp_path, capsys):
    bad = os.path.join(os.fsencode(inputs), b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    with open(bad, "wb") as f:
        f.write((inputs / "a.png").read_bytes())
    out = tmp_path / "eo"
    assert run("--model", model, "--input", inputs, "--output", out, "--steps", 1) == 2
    err = one_error_line(capsys.readouterr().err, "cdiff: error: input folder ")
    assert f"the file name {bad!r} is not valid UTF-8; rename it" in err
    assert run("--model", model, "--input", inputs, "--output", out, "--steps", 1, "--skip-bad") == 0
    output = capsys.readouterr().out
    assert "3 translated, 0 already done, 1 bad" in output and f"  skipped {bad!r}: " in output
    assert run("--model", model, "--input", os.fsdecode(bad), "--output", out, "--steps", 1) == 2  # one file
    assert f"input {bad!r}: the file name is not valid UTF-8" in capsys.readouterr().err


# --- model files --------------------------------------------------------------------------------


def test_a_native_file_with_cut_config_metadata_is_named(model, inputs, tmp_path, capsys):
    damaged = tmp_path / "damaged.safetensors"
    metadata = dict(WeightFile(model).metadata)
    metadata["unet_config"] = metadata["unet_config"][:40]  # cut short
    save_file(load_file(model), str(damaged), metadata=metadata)
    assert run("--model", damaged, "--input", inputs, "--output", tmp_path / "eo") == 2
    err = one_error_line(capsys.readouterr().err, f"cdiff: error: {damaged}: the unet_config in its metadata is not "
                         "valid JSON (")
    assert "the file is damaged or cut short" in err
    del metadata["unet_config"]
    save_file(load_file(model), str(damaged), metadata=metadata)
    with pytest.raises(ValueError, match=f"{damaged}: no unet_config in its metadata"):
        load_pipeline(damaged)


def test_a_plain_sd21_model_is_told_the_command_that_converts_it(inputs, tmp_path, capsys):
    unet, vae, context = tiny_modules()
    plain = save_native(tmp_path / "plain.safetensors", UNet(UNetConfig.tiny(model_channels=16)), vae, context)
    assert run("--model", plain, "--input", inputs, "--output", tmp_path / "eo") == 2
    one_error_line(capsys.readouterr().err, f"cdiff: error: {plain}: its U-Net takes 4 channels, a plain SD 2.1 "
                   f"U-Net, not the C-DiffSET one; make the C-DiffSET model first: cdiff convert {plain} "
                   "model.safetensors")


def test_the_vae_runs_in_fp32_whatever_the_file_holds(inputs, tmp_path):
    """An fp16 file translates as the fp32 file of the same (rounded) weights: the VAE is fp32
    (in fp16 it overflows, and on a CPU it is many times slower)."""
    unet, vae, context = tiny_modules()
    half = save_native(tmp_path / "half.safetensors", unet.half(), vae.half(), context.half())  # .half() in place
    full = save_native(tmp_path / "full.safetensors", unet.float(), vae.float(), context.half().float())
    pipeline = load_pipeline(half)
    assert next(pipeline.vae.parameters()).dtype == torch.float32 and pipeline.unet.conv_in.weight.dtype == torch.float16
    assert next(load_pipeline(half, dtype=torch.bfloat16).vae.parameters()).dtype == torch.float32
    for path in (half, full):
        assert run("--model", path, "--input", inputs / "a.png", "--output", tmp_path / path.stem, "--steps", 2,
                   "--dtype", "fp32") == 0
    np.testing.assert_array_equal(read(tmp_path / "half" / "a.png"), read(tmp_path / "full" / "a.png"))
