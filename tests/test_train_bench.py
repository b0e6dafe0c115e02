"""benchmarks/bench_train.py runs end to end (at the tiny size, on the CPU)."""

import importlib.util
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.usefixtures("one_thread")
def test_bench_train_runs_both_steps(capsys, tmp_path):
    pytest.importorskip("diffusers")
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--device", "cpu", "--tiny", "--size", "64", "--batch", "2", "--steps", "2", "--warmup", "1",
                         "--csv", str(tmp_path / "results.csv")])
    out = capsys.readouterr().out
    assert "release" in out and "cdiff / release" in out
    for impl in ("release", "cdiff"):
        assert report[impl]["images_per_s"] > 0 and report[impl]["peak_mb"] > 0
    assert report["speedup"] > 0
    assert (tmp_path / "results.csv").read_text().count("train_step") == len(bench.IMPLEMENTATIONS) - 1  # no GPU variant
