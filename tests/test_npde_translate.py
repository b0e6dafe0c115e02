"""S2O-NPDE model files, and `cdiff translate` / `cdiff evaluate` on a trained tiny run directory."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdiff import VAE, UNet, UNetConfig, VAEConfig, save_native
from cdiff.cli import main
from cdiff.config import config_from_json, config_to_json
from cdiff.data import write_synthetic
from cdiff.data.imageio import to_uint8, write_png
from cdiff.files import save_safetensors
from cdiff.geo import read_sar
from cdiff.npde import (
    GeneratorOutput, NPDEConfig, NPDEModel, is_model_file, load_generator, load_model, save_model, translate_image,
)
from cdiff.testing import one_thread
from cdiff.tiling import Tiling
from cdiff.train import load_config, train
from cdiff.weightfile import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny S2O-NPDE trained 4 steps, validated at steps 2 and 4 (so it has a best checkpoint)."""
    folder = tmp_path_factory.mktemp("npde") / "run"
    config = load_config(ROOT / "configs" / "s2o_npde-synthetic-tiny.toml", [
        "data.count=8", "train.steps=4", "train.save_every=2", "val.every=2", "val.images=2"])
    with one_thread():
        train(config, folder)
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """sar/ and eo/: 3 synthetic 64-px pairs, and one 70 x 90 SAR image (sides not multiples of 4)."""
    folder = write_synthetic(tmp_path_factory.mktemp("data") / "pairs", 3, size=64, show_progress=False)
    odd = np.asarray(Image.open(folder / "sar" / "synth_000000.png"))
    write_png(folder / "odd" / "odd.png", np.pad(odd, ((0, 6), (0, 26)), mode="reflect"))
    return folder


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path))


# --- the model file -------------------------------------------------------------------------


def test_model_file_round_trip(tmp_path):
    config = NPDEConfig.tiny(pmd=False, perceptual_layers=("relu1_1",), perceptual_layer_weights=(1.0,))
    assert config_from_json(config_to_json(config), (NPDEConfig,)) == config
    torch.manual_seed(0)
    model = NPDEModel(config)
    path = save_model(tmp_path / "npde.safetensors", model)
    assert is_model_file(path)
    loaded = load_model(path)
    assert loaded.config == config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    generator = load_generator(path)
    assert not generator.training and not generator.with_pmd
    sar = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(translate_image(generator, sar), model.translate(sar), rtol=0, atol=0)
    # Other networks can be asked for when their weights fit (e.g. other loss weights)...
    assert load_model(path, config=NPDEConfig.tiny(pmd=False, pixel_weight=1.0)).config.pixel_weight == 1.0
    with pytest.raises(CheckpointError, match="npde.safetensors: S2O-NPDE model state does not match"):
        load_model(path, config=NPDEConfig.tiny())  # ... not when they do not: the PMD module is missing


def test_files_that_are_not_npde_models(tmp_path):
    torch.manual_seed(0)
    native = save_native(tmp_path / "cdiffset.safetensors", UNet(UNetConfig.tiny(in_channels=8, out_channels=5)),
                         VAE(VAEConfig.tiny()), torch.randn(6, 1024))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n")
    for path in (native, tmp_path / "image.png", tmp_path, tmp_path / "missing.safetensors"):
        assert not is_model_file(path), path
    with pytest.raises(CheckpointError, match="cdiffset.safetensors: not an S2O-NPDE model file"):
        load_generator(native)
    future = tmp_path / "future.safetensors"
    save_safetensors({"x": torch.zeros(1)}, future, {"format": "cdiff-s2o-npde", "format_version": "9"})
    with pytest.raises(CheckpointError, match="future.safetensors: S2O-NPDE format version '9'"):
        load_generator(future)


class Pointwise(torch.nn.Module):
    """A stand-in generator with no spatial context: tiles cannot change its output."""

    config = NPDEConfig.tiny()

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, image, side_output=True):
        assert image.shape[-2] % 4 == 0 and image.shape[-1] % 4 == 0
        return GeneratorOutput(torch.tanh(self.gain * image), None)


def test_tiles_and_padding_cover_any_size():
    """Padding and blended tiles reassemble a context-free generator's output exactly; the real
    generator's InstanceNorms see each tile alone, which changes its output (measured below)."""
    sar = torch.rand(1, 3, 158, 94) * 2 - 1  # sides not multiples of 4
    expected = torch.tanh(2 * sar)
    for tiling in (None, Tiling(tile=64, overlap=16), Tiling(tile=128, overlap=32, batch=1)):
        torch.testing.assert_close(translate_image(Pointwise(), sar, tiling), expected, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    generator = NPDEModel(NPDEConfig.tiny()).generator.eval()
    whole = translate_image(generator, sar)
    tiled = translate_image(generator, sar, Tiling(tile=64, overlap=16))
    assert tiled.shape == whole.shape == (1, 3, 158, 94)
    error = ((tiled - whole).square().mean() / whole.square().mean()).sqrt().item()
    print(f"64-px tiles vs the whole image, random weights: relative RMS {error:.2f}")  # measured 0.30
    assert error > 0.01
    torch.testing.assert_close(translate_image(generator, sar, Tiling(tile=192, overlap=16)), whole, rtol=0, atol=0)


# --- cdiff translate and cdiff evaluate ----------------------------------------------------


def test_translate_and_evaluate_a_run_directory(run_dir, pairs, tmp_path, capsys):
    out = tmp_path / "eo"
    code, stdout, err = cli(capsys, "translate", "--model", run_dir, "--input", pairs / "sar", "--output", out,
                            "--target", pairs / "eo", "--metrics", "psnr,ssim,scc", "--batch-size", 2)
    assert code == 0, err
    best = (run_dir / "best").resolve() / "model.safetensors"
    assert f"model {run_dir / 'best' / 'model.safetensors'}" in stdout and "3 translated" in stdout
    # The outputs are the best checkpoint's generator on each SAR image.
    generator = load_generator(best)
    for name in ("synth_000000", "synth_000002"):
        sar = torch.from_numpy(read_sar(pairs / "sar" / f"{name}.png").sar).permute(2, 0, 1)[None]
        expected = to_uint8(translate_image(generator, sar)[0].permute(1, 2, 0).numpy())
        assert np.abs(read(out / f"{name}.png").astype(int) - expected.astype(int)).max() <= 1  # batch 2 vs 1
    report = json.loads((out / "evaluation.json").read_text())
    assert report["images"] == 3 and set(report["means"]) == {"psnr", "ssim", "scc"}

    code, stdout, err = cli(capsys, "evaluate", "--pred", out, "--target", pairs / "eo", "--metrics", "psnr,ssim,scc",
                            "--report-dir", tmp_path / "report")
    assert code == 0, err
    again = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    # translate --target scores as `evaluate --protocol release` without its (x + 0.5) scaling: the
    # same numbers as the field's protocol up to how the 8-bit files are divided (x / 127.5 - 1 vs x / 255).
    assert again["means"] == pytest.approx(report["means"], rel=1e-5)

    # The model file itself, an image whose sides are not multiples of 4, bf16.
    code, stdout, err = cli(capsys, "translate", "--model", best, "--input", pairs / "odd",
                            "--output", tmp_path / "odd", "--dtype", "bf16")
    assert code == 0, err
    assert read(tmp_path / "odd" / "odd.png").shape == (70, 90, 3) and "model " not in stdout


def test_options_that_do_not_apply_are_refused(run_dir, pairs, tmp_path, capsys):
    base = ["translate", "--model", run_dir, "--input", pairs / "sar", "--output", tmp_path / "eo"]
    code, _, err = cli(capsys, *base, "--steps", 10, "--eta", 0.5, "--sampler", "dpmpp_2m", "--seed", 3)
    assert code == 2 and "an S2O-NPDE model translates in one generator pass" in err
    assert "leave out --steps, --eta, --sampler, --seed" in err
    code, _, err = cli(capsys, *base, "--prompt", "optical", "--conf-dir", tmp_path / "conf")
    assert code == 2 and "leave out --prompt, --conf-dir" in err
    code, _, err = cli(capsys, *base, "--channels-last", "--compile")
    assert code == 2 and "leave out --channels-last, --compile" in err
    assert not (tmp_path / "eo").exists() or not any((tmp_path / "eo").iterdir())
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    (tmp_path / "fresh" / "config.toml").write_text("")
    code, _, err = cli(capsys, "translate", "--model", tmp_path / "fresh", "--input", pairs / "sar", "--output",
                       tmp_path / "eo")
    assert code == 2 and "fresh: a training run without a checkpoint yet" in err
