"""Every benchmark script runs end to end at a tiny size on the CPU, and writes its CSV rows.

bench_train.py has its own test (tests/test_train_bench.py). Timings here mean nothing; the
tests check that each script runs, measures what it says (the same work for every
implementation it compares), and records it consistently (each ratio is the times' ratio).
"""

import csv
import importlib.util
from pathlib import Path

import pytest

from cdiff.testing import one_thread

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("diffusers")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_bench_unet(tmp_path):
    table = tmp_path / "results.csv"
    with one_thread():
        load("bench_unet").main(["--device", "cpu", "--part", "all", "--preset", "tiny", "--side", "8",
                                 "--batches", "1", "--repeats", "1", "--warmup", "0", "--train-batch", "1",
                                 "--csv", str(table)])
    written = rows(table)
    forward = {r["impl"]: r for r in written if r["figure"] == "unet_forward"}
    assert set(forward) == {"diffusers", "diffusers-cl", "cdiff", "cdiff-cl"}
    assert all(float(r["ms"]) > 0 and float(r["ratio"]) > 0 and float(r["tflops"]) > 0 for r in forward.values())
    assert float(forward["diffusers"]["ratio"]) == 1.0  # each ratio is against diffusers in the same layout
    for impl, reference in (("cdiff", "diffusers"), ("cdiff-cl", "diffusers-cl"), ("diffusers-cl", "diffusers-cl")):
        ratio = float(forward[reference]["ms"]) / float(forward[impl]["ms"])
        assert float(forward[impl]["ratio"]) == pytest.approx(ratio, rel=1e-4), impl
    # Every forward is the same work: TFLOP/s x ms (the FLOPs counted) is one number for all four.
    work = [float(r["tflops"]) * float(r["ms"]) for r in forward.values()]
    assert max(work) == pytest.approx(min(work), rel=1e-4)
    assert {r["impl"] for r in written if r["figure"] == "unet_attention_backend"} == {"sdpa", "math"}
    assert {r["impl"] for r in written if r["figure"] == "unet_checkpointing"} == {"off", "on"}
    assert all(r["torch"] and r["device"].startswith("CPU") for r in written)


def test_bench_translate_times_the_same_work(tmp_path):
    table = tmp_path / "results.csv"
    with one_thread():
        report = load("bench_translate").main(["--device", "cpu", "--preset", "tiny", "--size", "64", "--steps", "2",
                                               "--batches", "1", "--repeats", "1", "--warmup", "0", "--csv", str(table)])
    assert report[(1, "difference")] < 1e-5  # the diffusers loop and cdiff make the same images
    assert {r["impl"] for r in rows(table)} == {"diffusers", "cdiff", "cdiff-cl"}
    assert not report["failures"]


def test_bench_group_norm_runs_the_kernel_in_the_interpreter(tmp_path):
    table = tmp_path / "results.csv"
    with one_thread():
        load("bench_group_norm").main(["--device", "cpu", "--shapes", "unet-level-2", "--scale", "8", "--backward",
                                       "--repeats", "1", "--warmup", "0", "--csv", str(table)])
    written = {r["impl"]: r for r in rows(table)}
    assert set(written) == {"torch-nchw", "torch-cl", "triton-nchw", "triton-cl"}
    for impl, row in written.items():  # each ratio is against PyTorch's channels-last GroupNorm
        assert float(row["ratio"]) == pytest.approx(float(written["torch-cl"]["ms"]) / float(row["ms"]), rel=1e-4), impl


def test_bench_quality_steps(tmp_path):
    table = tmp_path / "results.csv"
    with one_thread():
        report = load("bench_quality_steps").main(["--model", "tiny", "--device", "cpu", "--pairs", "1", "--size", "64",
                                                   "--steps", "2", "50", "--samplers", "ddim", "dpmpp_2m",
                                                   "--csv", str(table)])
    assert report[("ddim", 50)]["psnr_vs_ddim50"] == 99.0  # the reference against itself (clamped from +inf)
    assert report[("dpmpp_2m", 2)]["psnr_vs_ddim50"] < 99.0
    assert len(rows(table)) == 4


def test_bench_loss_and_bench_tiling(capsys):
    with one_thread():
        assert load("bench_loss").main(["--sizes", "2x4x8x8", "--cpu-iters", "1"]) == 0
        assert load("bench_tiling").main(["--sizes", "64", "--untiled-max", "0", "--tile", "64", "--overlap", "0",
                                          "--steps", "1", "--error-size", "128", "--error-tile", "64"]) == 0
    out = capsys.readouterr().out
    assert "(2, 4, 8, 8)" in out and "relative RMS error at 128 px" in out


def test_bench_evaluate_times_every_metric_of_the_field_protocol(tmp_path):
    pytest.importorskip("lpips")
    pytest.importorskip("pytorch_fid")
    table = tmp_path / "results.csv"
    with one_thread():
        report = load("bench_evaluate").main(["--device", "cpu", "--images", "3", "--size", "32", "--repeats", "1",
                                              "--csv", str(table)])
    assert set(report["means"]) == {"fid", "dists", "kid", "lpips", "ssim", "psnr"}
    parts = report["parts"]
    assert all(parts[name] > 0 for name in ("LPIPS (VGG)", "DISTS", "Inception (FID, KID features)", "SSIM",
                                            "FID formula", "KID formula", "reading images"))
    assert report["images_per_s"] > 0
    [row] = rows(table)
    assert row["figure"] == "evaluate" and float(row["ms"]) > 0 and "images=3" in row["settings"]


def test_bench_demo_model(tmp_path):
    table = tmp_path / "results.csv"
    with one_thread():
        load("bench_demo_model").main(["--size", "64", "--steps", "1", "--repeats", "1", "--warmup", "0",
                                       "--csv", str(table)])
    written = {r["impl"]: r for r in rows(table)}
    assert set(written) == {"translate", "demo"} and written["translate"]["settings"].startswith("64px steps=1")
    ratio = float(written["translate"]["ms"]) / float(written["demo"]["ms"])
    assert float(written["translate"]["ratio"]) == pytest.approx(ratio, rel=1e-4)
