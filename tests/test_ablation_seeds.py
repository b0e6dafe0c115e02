"""studies/synthetic/ablation_seeds.py: which runs are done, the bundled model standing for C-Diff seed 0 only
when its recipe is the runs', and the spread over seeds."""

import json
import statistics

import pytest

from studies.synthetic import ablation_seeds
from studies.synthetic.ablation_seeds import record_of, summary


def fake_record(path, psnr, seed=0, prediction="epsilon", steps=None):
    from cdiff.train import load_config
    from cdiff.train.config import to_dict

    sets = ["model.init=x", "data.latents=x", f"train.seed={2025 + seed}"] + ([f"train.steps={steps}"] if steps else [])
    record = {
        "objective": {"prediction": prediction},
        "scores": {"heldout": {"model": {"psnr": psnr, "ssim": psnr / 40, "scc": 0.01}}},
        "training": {"config": json.loads(json.dumps(to_dict(load_config(ablation_seeds.CONFIG, sets)))),
                     "unet_seed": ablation_seeds.UNET_SEED + seed, "seed": seed, "command": f"train {path.stem}",
                     "cpu_seconds": 100, "vae_cpu_seconds": 0, "threads": 1},
    }
    path.write_text(json.dumps(record))
    return path


def test_summary_of_done_runs(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    bundled = fake_record(tmp_path / "bundled.json", 17.0)
    monkeypatch.setattr(ablation_seeds, "DEMO_RECORD", bundled)
    fake_record(runs / "cdiff-seed1.json", 17.4, seed=1)
    fake_record(runs / "l2-seed0.json", 16.0)
    fake_record(runs / "l2-seed2.json", 16.5, seed=2)

    assert record_of("cdiff", 0, runs) == bundled  # today's recipe: the bundled model is seed 0
    result = summary(runs, [0, 1, 2])
    assert result["missing"] == ["cdiff-seed2", "l2-seed1"]
    assert [(r["arm"], r["seed"]) for r in result["runs"]] == [("cdiff", 0), ("cdiff", 1), ("l2", 0), ("l2", 2)]
    assert result["arms"]["cdiff"]["psnr"]["mean"] == pytest.approx(17.2)
    assert result["arms"]["l2"]["psnr"]["std"] == pytest.approx(statistics.stdev([16.0, 16.5]))
    assert result["arms"]["l2"]["seeds_done"] == [0, 2]

    # A bundled model of another recipe (fewer steps, or x0 prediction) is not a run of this one.
    fake_record(bundled, 17.0, steps=1200)
    assert record_of("cdiff", 0, runs) is None
    fake_record(bundled, 17.0, prediction="sample")
    record = json.loads(bundled.read_text())
    record["training"]["config"]["model"]["prediction"] = "sample"
    bundled.write_text(json.dumps(record))
    assert record_of("cdiff", 0, runs) is None and "cdiff-seed0" in summary(runs, [0, 1, 2])["missing"]


def test_a_record_written_before_a_config_key_existed_is_the_same_recipe(tmp_path, monkeypatch):
    """Records keep the config of their day: a key added since counts at its default, a key removed since
    when it was off; anything else that differs makes it another recipe."""
    bundled = fake_record(tmp_path / "bundled.json", 17.0)
    monkeypatch.setattr(ablation_seeds, "DEMO_RECORD", bundled)
    record = json.loads(bundled.read_text())

    def with_config(change):
        edited = json.loads(json.dumps(record))
        change(edited["training"]["config"])
        bundled.write_text(json.dumps(edited))
        return record_of("cdiff", 0, tmp_path)

    assert with_config(lambda c: c["train"].pop("keep_every")) == bundled  # added since, default 0 today
    assert with_config(lambda c: c["data"].update(test_list="")) == bundled  # removed since, it was off
    assert with_config(lambda c: c["data"].update(test_list="lists/test.txt")) is None  # removed, but it was on
    assert with_config(lambda c: c["optim"].update(lr=2e-3)) is None  # a different recipe
    # A key added since that today's config sets away from its default: the old record cannot have had it.
    monkeypatch.setattr(ablation_seeds, "defaults", lambda config: {"train": {"keep_every": 5}})
    assert with_config(lambda c: c["train"].pop("keep_every")) is None
