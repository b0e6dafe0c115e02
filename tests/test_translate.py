"""`cdiff translate` on the tiny stack with seeded random weights: files written, reruns,
reproducibility, sharding, confidence maps, any size and tiles, and bad input.

With random weights the EO images are noise-like; these tests check the plumbing and the
numerics of tiling, not translation quality.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdiff import Pipeline, UNet, UNetConfig, save_native
from cdiff.cli import main
from cdiff.confidence_map import colour_table, colourize, release_grey
from cdiff.data.imageio import write_png
from cdiff.data.synth import make_pair
from cdiff.testing import one_thread
from cdiff.tiling import Tiling, tile_starts
from cdiff.translate import list_inputs, plan_jobs, shard
from cdiff.translators import image_seed
from tests.translating import PROMPT, read, run, sar_png, tiny_modules

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def test_a_folder_run_writes_every_output_and_a_rerun_skips_them(model, inputs, tmp_path, capsys):
    out, conf = tmp_path / "eo", tmp_path / "conf"
    assert run("--model", model, "--input", inputs, "--output", out, "--conf-dir", conf, "--steps", 2) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["a.png", "c.png", "sub", "sub/b.png"]
    assert sorted(p.relative_to(conf).as_posix() for p in conf.rglob("*.png")) == [
        "a.png", "a_colour.png", "c.png", "c_colour.png", "sub/b.png", "sub/b_colour.png"]
    assert read(out / "sub" / "b.png").shape == (72, 100, 3) and read(conf / "sub" / "b.png").shape == (72, 100)
    assert read(conf / "sub" / "b_colour.png").shape == (72, 100, 3)
    assert read(out / "a.png").std() > 0 and read(conf / "a.png").max() == 255 and read(conf / "a.png").min() == 0
    assert "3 translated, 0 already done, 0 bad" in capsys.readouterr().out

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert run("--model", model, "--input", inputs, "--output", out, "--conf-dir", conf, "--steps", 2) == 0
    assert "0 translated, 3 already done" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    # --overwrite translates again, to the same bits: each image's noise comes from its name.
    old = read(out / "sub" / "b.png")
    (out / "a.png").unlink()
    assert run("--model", model, "--input", inputs, "--output", out, "--steps", 2, "--overwrite") == 0
    assert "3 translated" in capsys.readouterr().out
    np.testing.assert_array_equal(read(out / "sub" / "b.png"), old)


def test_seeds_follow_the_name_not_the_position():
    assert image_seed(0, "sub/b") == image_seed(0, "sub/b") != image_seed(0, "a") != image_seed(1, "a")
    assert 0 <= image_seed(7, "x") < 2**63
    jobs = list(range(7))
    assert shard(jobs, 0, 2) + shard(jobs, 1, 2) == [0, 2, 4, 6, 1, 3, 5]
    with pytest.raises(ValueError, match="RANK=2"):
        shard(jobs, 2, 2)


def test_two_ranks_shard_the_folder_and_match_a_single_run(model, inputs, tmp_path):
    single = tmp_path / "single"
    assert run("--model", model, "--input", inputs, "--output", single, "--steps", 2) == 0
    target = tmp_path / "target"
    for name in ("a", "c", "sub/b"):  # the outputs themselves as targets: PSNR is infinite
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / f"{name}.png").write_bytes((single / f"{name}.png").read_bytes())
    sharded = tmp_path / "sharded"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "cdiff", "translate", "--model", str(model), "--input", str(inputs), "--output", str(sharded),
               "--steps", "2", "--target", str(target), "--metrics", "psnr,ssim",
               "--protocol", "release"]  # the images differ in size: the release pairs them by name
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/2: 2 translated" in result.stdout and "rank 1/2: 1 translated" in result.stdout
    for name in ("a", "c", "sub/b"):
        np.testing.assert_array_equal(read(sharded / f"{name}.png"), read(single / f"{name}.png"), err_msg=name)
    report = json.loads((sharded / "evaluation.json").read_text())
    assert report["images"] == 3 and report["means"]["ssim"] == pytest.approx(1.0)
    assert report["means"]["psnr"] is None and "means.psnr: inf" in report["non_finite"]["values"]


def test_confidence_maps_are_saved_as_the_release_saves_them():
    confidence = torch.rand(1, 1, 9, 13, generator=torch.Generator().manual_seed(0)) * 5 + 0.1
    # The release's steps, written out: min-max with 1e-8, to [-1, 1], bicubic, to [0, 1], ToPILImage (x 255, truncated).
    low, high = confidence.amin(), confidence.amax()
    signed = (confidence - low) / (high - low + 1e-8) * 2.0 - 1.0
    expected = (F.interpolate(signed, size=(72, 104), mode="bicubic") * 0.5 + 0.5).clamp(0, 1).mul(255).byte()
    np.testing.assert_array_equal(release_grey(confidence, 72, 104), expected[0, 0].numpy())
    np.testing.assert_array_equal(release_grey(confidence, 70, 100), expected[0, 0, :70, :100].numpy())  # cropped, not stretched


def test_the_colour_table_runs_from_dark_blue_to_yellow():
    table = colour_table()
    luminance = table.astype(float) @ [0.299, 0.587, 0.114]
    assert table.shape == (256, 3) and np.all(np.diff(luminance) >= 0)  # brighter = more confident
    assert table[0, 2] > table[0, 0] and table[-1, 0] > 200 and table[-1, 1] > 200 and table[-1, 2] < 100
    np.testing.assert_array_equal(colourize(np.array([[0, 255]], np.uint8))[0], table[[0, 255]])


def test_the_python_api_reproduces_a_seeded_run(model):
    from cdiff import load_pipeline

    pipe = load_pipeline(model)
    assert pipe.prompt == PROMPT
    sar = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    a = pipe.translate(sar, steps=2, latents=latents)
    b = pipe.translate(sar, steps=2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.eo, b.eo, rtol=0, atol=0)


# --- any size: tiles ------------------------------------------------------------------------


SCENE, TILE, OVERLAP, STEPS = 256, 128, 64, 4  # the scene has 4x the tile's area


@pytest.fixture(scope="module")
def scene_runs():
    """The synthetic scene translated untiled (seeds 0 and 1), with blended tiles, and with hard
    (overlap 0) tiles as a control that has seams."""
    pipe = Pipeline(*tiny_modules())
    sar = torch.from_numpy(make_pair(0, size=SCENE).sar)[None, None].repeat(1, 3, 1, 1)

    def translate(seed, tiling):
        latents = torch.randn(1, 4, SCENE // 8, SCENE // 8, generator=torch.Generator().manual_seed(seed))
        return pipe.translate(sar, steps=STEPS, latents=latents, tiling=tiling).eo

    with one_thread():
            return {"untiled": translate(0, None), "other seed": translate(1, None),
                "tiled": translate(0, Tiling(TILE, OVERLAP, batch=9)), "hard": translate(0, Tiling(TILE, 0))}


def _rms(x):
    return x.square().mean().sqrt().item()


def test_a_scene_4x_the_tile_matches_the_untiled_translation(scene_runs):
    """Tiles change the result (the U-Net, GroupNorm and attention see a tile, not the scene),
    but far less than the sampling noise does: the tiled image's RMS distance to the untiled
    one is under 15% of the distance between two seeds (measured: 0.034 vs 0.48, 7%)."""
    untiled = scene_runs["untiled"]
    tiled_error, seed_spread = _rms(scene_runs["tiled"] - untiled), _rms(scene_runs["other seed"] - untiled)
    print(f"tiled vs untiled RMS {tiled_error:.4f}; seed 0 vs seed 1 RMS {seed_spread:.4f}")
    assert tiled_error < 0.15 * seed_spread


def _border_energy_ratio(image, overlap):
    """Mean squared pixel difference across tile borders / across other lines at the same
    8-pixel phase (the decoder's nearest-neighbour upsampling leaves an 8-px pattern)."""
    gx = (image[..., :, 1:] - image[..., :, :-1]).square().mean(dim=(0, 1, 2))  # (W - 1,) between columns j, j + 1
    gy = (image[..., 1:, :] - image[..., :-1, :]).square().mean(dim=(0, 1, 3))
    energy = gx + gy  # the square scene has the same tile lines on both axes
    starts = [8 * s for s in tile_starts(SCENE // 8, TILE // 8, overlap // 8)]
    borders = sorted({s for s in starts[1:]} | {s + TILE for s in starts[:-1]})
    others = [p for p in range(8, SCENE, 8) if p not in borders]
    return (energy[[p - 1 for p in borders]].mean() / energy[[p - 1 for p in others]].mean()).item()


def test_blended_tiles_leave_no_seam(scene_runs):
    """Gradient energy along tile borders is within 10% of that along other lines (measured
    0.95); the hard-tiled control shows its seam (measured 1.64), so the measure can see one."""
    blended, hard = _border_energy_ratio(scene_runs["tiled"], OVERLAP), _border_energy_ratio(scene_runs["hard"], 0)
    untiled = _border_energy_ratio(scene_runs["untiled"], OVERLAP)
    print(f"border / other gradient energy: blended {blended:.3f}, hard {hard:.3f}, untiled {untiled:.3f}")
    assert abs(blended - 1) < 0.1 and abs(untiled - 1) < 0.1
    assert hard > 1.3


# --- bad input ------------------------------------------------------------------------------


def test_a_truncated_image_stops_the_run_or_is_skipped(model, inputs, tmp_path, capsys):
    data = (inputs / "c.jpg").read_bytes()
    (inputs / "c.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "eo"
    assert run("--model", model, "--input", inputs, "--output", out, "--steps", 1) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdiff: error: cannot read image") and "c.jpg" in err
    assert run("--model", model, "--input", inputs, "--output", out, "--steps", 1, "--skip-bad") == 0
    output = capsys.readouterr().out
    # a.png was written before the first run stopped at c.jpg; the rerun goes past it.
    assert "1 translated, 1 already done, 1 bad" in output and "skipped" in output and "c.jpg" in output
    assert not (out / "c.png").exists() and (out / "a.png").is_file() and (out / "sub" / "b.png").is_file()


def test_an_empty_folder_and_a_missing_input(model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run("--model", model, "--input", tmp_path / "empty", "--output", tmp_path / "eo") == 2
    assert "input folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_inputs(tmp_path / "nowhere")


def test_a_model_file_of_the_wrong_kind(inputs, tmp_path, capsys):
    not_a_model = sar_png(tmp_path / "model.png", 64)
    assert run("--model", not_a_model, "--input", inputs, "--output", tmp_path / "eo") == 2
    assert "model.png" in capsys.readouterr().err
    unet, vae, context = tiny_modules()
    plain = UNet(UNetConfig.tiny(model_channels=16))  # SD's 4-in U-Net: no SAR input
    save_native(tmp_path / "plain.safetensors", plain, vae, context)
    assert run("--model", tmp_path / "plain.safetensors", "--input", inputs, "--output", tmp_path / "eo") == 2
    err = capsys.readouterr().err
    assert "plain.safetensors" in err and "takes 4 channels" in err
    no_variance = UNet(UNetConfig.tiny(in_channels=8, model_channels=16))  # 8-in/4-out: no confidence
    save_native(tmp_path / "eps.safetensors", no_variance, vae, context)
    argv = ["--model", tmp_path / "eps.safetensors", "--input", inputs, "--output", tmp_path / "eo"]
    assert run(*argv, "--conf-dir", tmp_path / "conf") == 2
    assert "eps.safetensors: its U-Net predicts no variance" in capsys.readouterr().err


def test_bad_sampling_options(model, inputs, tmp_path, capsys):
    assert run("--model", model, "--input", inputs, "--output", tmp_path / "eo", "--eta", 0.5, "--batch-size", 2) == 2
    assert "--batch-size 1" in capsys.readouterr().err
    assert run("--model", model, "--input", inputs, "--output", tmp_path / "eo", "--tile", 100) == 2
    assert "tile" in capsys.readouterr().err


def test_a_batch_of_same_sized_images(model, inputs, tmp_path, capsys):
    out = tmp_path / "eo"
    assert run("--model", model, "--input", inputs, "--output", out, "--steps", 2, "--batch-size", 2) == 0
    single = tmp_path / "single"
    assert run("--model", model, "--input", inputs / "a.png", "--output", single, "--steps", 2) == 0
    # a.png and c.jpg (both 64 px) share a batch; a's result equals its run alone to rounding.
    difference = np.abs(read(out / "a.png").astype(int) - read(single / "a.png").astype(int))
    assert difference.max() <= 1
    assert plan_jobs(inputs / "a.png", out)[0].name == "a"


def test_the_speed_switches_give_the_same_images(model, inputs, tmp_path, monkeypatch):
    import cdiff.pipeline

    compiled = []
    monkeypatch.setattr(cdiff.pipeline.Pipeline, "compile", lambda self: compiled.append(self) or self)
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    assert run("--model", model, "--input", inputs, "--output", plain, "--conf-dir", plain / "conf", "--steps", 2) == 0
    assert run("--model", model, "--input", inputs, "--output", fast, "--conf-dir", fast / "conf", "--steps", 2,
               "--channels-last", "--compile") == 0
    assert len(compiled) == 1  # Pipeline.compile() asked for (tests/test_compiled.py checks what it does)
    assert compiled[0].unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for name in ("a.png", "sub/b.png", "conf/a.png"):  # channels-last: fp32 results equal to rounding
        difference = np.abs(read(plain / name).astype(int) - read(fast / name).astype(int))
        assert difference.max() <= 1, name


def test_outputs_that_would_overwrite_the_inputs_are_refused(model, inputs, tmp_path, capsys):
    assert run("--model", model, "--input", inputs, "--output", inputs) == 2
    assert "is the --input folder, so every rerun would translate its own outputs" in capsys.readouterr().err
    assert run("--model", model, "--input", inputs, "--output", tmp_path / "eo", "--conf-dir", tmp_path / "eo") == 2
    assert "a folder of their own" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert run("--model", model, "--input", inputs, "--output", tmp_path / "file") == 2
    assert "not a folder" in capsys.readouterr().err


def test_the_progress_bar_nests_steps_inside_images(model, inputs, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert run("--model", model, "--input", inputs, "--output", tmp_path / "eo", "--steps", 2,
               "--sampler", "dpmpp_2m") == 0
    lines = terminal.getvalue().split("\r")
    steps = [line for line in lines if "| DPM-Solver++(2M) [" in line]
    assert len(steps) == 3 * 2 and all(line.startswith("images ") for line in steps)  # every step, nested
    assert steps[0].startswith("images 0/3 | DPM-Solver++(2M) [")
    assert lines[-1].startswith("images [") and " 3/3 " in lines[-1] and terminal.getvalue().endswith("\n")


def test_a_prompt_other_than_the_stored_one_is_refused(model, inputs, tmp_path, capsys):
    # The model holds no text encoder: only the prompt it was converted with can be used.
    assert run("--model", model, "--input", inputs / "a.png", "--output", tmp_path / "eo", "--prompt", "other") == 2
    err = capsys.readouterr().err
    assert "tiny.safetensors" in err and f"prompt {PROMPT!r}" in err and "not 'other'" in err


def test_a_geotiff_scene_becomes_a_georeferenced_eo_geotiff(model, tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    bands = np.random.default_rng(0).gamma(2.0, 0.05, (96, 80, 4)).astype(np.float32)  # SpaceNet6 full-pol
    bands[:, :16] = 0  # nodata at the swath edge
    transform = Affine(0.5, 0.0, 594000.0, 0.0, -0.5, 5762000.0)
    with rasterio.open(tmp_path / "scene.tif", "w", driver="GTiff", height=96, width=80, count=4, dtype="float32",
                       crs=CRS.from_epsg(32631), transform=transform, nodata=0) as f:
        f.write(np.moveaxis(bands, -1, 0))
    assert run("--model", model, "--input", tmp_path / "scene.tif", "--output", tmp_path / "eo", "--steps", 1,
               "--tile", 64, "--tile-overlap", 32) == 0  # larger than a tile: tiled
    with rasterio.open(tmp_path / "eo" / "scene.tif") as f:
        assert (f.count, f.dtypes[0], f.width, f.height) == (3, "uint8", 80, 96)
        assert f.crs == CRS.from_epsg(32631) and f.transform == transform and f.nodata == 0
        mask = f.dataset_mask()
    assert (mask[:, :16] == 0).all() and (mask[:, 16:] == 255).all()


def test_target_scores_the_run_as_cdiff_evaluate_does(tmp_path, monkeypatch, capsys):
    """`translate --target` under the field protocol: only this run's images are scored (not an
    older image of the output folder), the input folder gives the identity-collapse ratio, and
    the numbers are those of `cdiff evaluate --sar INPUT` on the same images; what can be checked
    is checked before anything is translated."""
    from cdiff.testing import micro_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no metric network anywhere
    monkeypatch.setenv("CDIFF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("CDIFF_LPIPS_VGG", "CDIFF_FID_INCEPTION", "CDIFF_DISTS", "CDIFF_DINO"):
        monkeypatch.delenv(name, raising=False)
    model = micro_model(tmp_path / "micro.safetensors")
    sar = tmp_path / "sar"
    for seed, name in enumerate(("a", "b")):
        sar_png(sar / f"{name}.png", 64, seed=seed)
    rng = np.random.default_rng(0)
    target = tmp_path / "eo"
    for name in ("a", "b", "c", "old"):
        write_png(target / f"{name}.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = tmp_path / "out"
    write_png(out / "old.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # not of this run's inputs

    # Checked before translating: a weights file given that is not there, the output as the ground truth.
    missing = tmp_path / "missing.pth"
    assert run("--model", model, "--input", sar, "--output", out, "--steps", 1, "--target", target,
               "--lpips-vgg", missing) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    assert run("--model", model, "--input", sar, "--output", target, "--steps", 1, "--target", target) == 2
    assert "same folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["old.png"]  # nothing translated so far
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before

    assert run("--model", model, "--input", sar, "--output", out, "--steps", 1, "--target", target) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["protocol"] == "field" and report["sar"] == str(sar)
    assert [row["name"] for row in report["per_image"]] == ["a", "b"] and report["missing"] == ["c", "old"]
    assert set(report["means"]) == {"psnr", "ssim", "identity"}

    # `cdiff evaluate` on the same two images, with the inputs as --sar: the same numbers.
    alone = tmp_path / "alone"
    for name in ("a", "b"):
        write_png(alone / f"{name}.png", read(out / f"{name}.png"))
    assert main(["evaluate", "--pred", str(alone), "--target", str(target), "--sar", str(sar)]) == 0
    assert json.loads((alone / "evaluation.json").read_text())["means"] == report["means"]
