"""benchmarks/bench_train.py runs end to end (at the tiny size, on the CPU), and the two steps it
times train the same model: the release's and cdiff's each start from the one set of weights and
take a real AdamW step."""

import importlib.util
from pathlib import Path

import pytest
import torch

from cdiff.testing import assert_parity

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_train_runs_both_steps(capsys, tmp_path):
    bench = load_bench()
    report = bench.main(["--device", "cpu", "--tiny", "--size", "64", "--batch", "2", "--steps", "2", "--warmup", "1",
                         "--csv", str(tmp_path / "results.csv")])
    out = capsys.readouterr().out
    assert "release" in out and "cdiff / release" in out
    assert report["batch"] == 2
    for impl in ("release", "cdiff"):
        assert report[impl]["images_per_s"] > 0 and report[impl]["peak_mb"] > 0
        assert report[impl]["images_per_s"] * report[impl]["ms"] == pytest.approx(2 * 1000)  # batch 2 per step
    assert report["speedup"] == pytest.approx(report["cdiff"]["images_per_s"] / report["release"]["images_per_s"])
    assert (tmp_path / "results.csv").read_text().count("train_step") == len(bench.IMPLEMENTATIONS) - 1  # no GPU variant


def test_the_timed_steps_train_one_model():
    """Both U-Nets compute the same output before training (the rename into cdiff's names is right),
    and one step of each moves the weights by an AdamW step of lr: |update| = lr (1 + eps / |grad|)^-1
    per element on the first step, whatever the gradient's scale (so clipping does not change it)."""
    bench = load_bench()
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=gen)  # [SAR | EO] latents of 2 pairs at 64 px
    context = torch.randn(1, 6, 1024, generator=gen).expand(2, -1, -1)
    model = bench.diffusers_unet(tiny=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    steps = bench.build_steps(("release", "cdiff"), state, model.train(), True, latents, context, "fp32")
    ours = steps["cdiff"].modules[0]
    x, t = torch.randn(2, 8, 8, 8, generator=gen), torch.tensor([10, 900])
    with torch.no_grad():
        assert_parity(ours(x, t, context), model(x, t, context).sample, "cdiff's copy of the benchmark's U-Net")
    before = {"release": {n: p.detach().clone() for n, p in model.named_parameters()},
              "cdiff": {n: p.detach().clone() for n, p in ours.named_parameters()}}
    for name, unet in (("release", model), ("cdiff", ours)):
        steps[name]()
        moved = torch.cat([(p.detach() - before[name][n]).abs().flatten() for n, p in unet.named_parameters()])
        lr = 3e-5
        # Adam's first step is at most lr per element; weight decay (0.01 lr |w|, |w| < 1.5) and the
        # rounding of fp32 weights near 1 (1.2e-7) add at most 2% and 0.4%.
        assert moved.max() <= lr * 1.03, name
        assert moved.median() == pytest.approx(lr, rel=0.02), name  # lr where the gradient is not tiny
