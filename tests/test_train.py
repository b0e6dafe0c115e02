"""cdiff train, part 1: the config (TOML, --set, errors), the schedule, the progress bar."""

import math
from pathlib import Path

import pytest
import torch

from cdiff.demo import DEMO_MODEL
from cdiff.train.config import differences
from cdiff.train.configfile import from_dict, load_config, to_toml
from cdiff.train.optim import WarmupCosine

ROOT = Path(__file__).resolve().parents[1]
# --- the config -------------------------------------------------------------------------------


# The field's settings (KAIST-VICLab/GeoSET baselines/sd21-ft and baselines/c-diffset configs): data kind,
# batch, crop, steps per stage.
FIELD = [("qxs-saropt", "qxs", 64, 0, 50_000), ("sar2opt", "sar2opt", 16, 512, 50_000),
         ("sar2eo", "sar2eo", 64, 0, 40_000), ("spacenet6", "spacenet6_chips", 64, 0, 40_000)]


@pytest.mark.parametrize("name, kind, batch, crop, steps", FIELD)
def test_dataset_configs_hold_the_fields_settings(name, kind, batch, crop, steps):
    config = load_config(ROOT / "configs" / f"{name}.toml")
    assert (config.data.kind, config.train.batch_size, config.data.crop, config.train.steps) == (kind, batch, crop, steps)
    assert (config.optim.lr, config.optim.weight_decay, config.optim.warmup_steps) == (3e-5, 0.01, 100)
    assert (config.optim.schedule, config.optim.betas, config.optim.clip_grad_norm) == ("cosine", (0.9, 0.999), 0.0)
    assert (config.train.precision, config.train.seed, config.train.accumulation) == ("fp32", 2024, 1)
    assert config.data.hflip and config.data.vflip and config.data.rot90 and config.data.random_crop
    assert config.data.train_list == "" and not config.data.force  # the frozen list, checked
    assert config.model.stages == (1, 2) and config.model.stage1_steps == 0  # both stages, equally long
    assert (config.model.prediction, config.model.loss, config.model.ema_decay) == ("epsilon", "cdiff", 0.0)
    assert config.train.keep_every and 40_000 % config.train.keep_every == 0  # the published step-040000 is kept
    assert config.val.every == 0 and config.val.holdout == 0  # the whole training list; never the test split
    text = (ROOT / "configs" / f"{name}.toml").read_text()
    assert "GPU-HOURS: AN ESTIMATE" in text and "bf16" in text


def test_tiny_config_parses():
    config = load_config(ROOT / "configs" / "synthetic-tiny.toml")
    assert config.train.device == "cpu" and config.data.size == 64
    # The trial trains a fresh U-Net on the demo model's trained VAE: a random VAE only makes colour noise.
    assert config.model.fresh_unet and (ROOT / config.model.init).resolve() == DEMO_MODEL


def test_a_fresh_unet_keeps_the_init_vae_and_prompt(tmp_path):
    from cdiff.load import load_pipeline
    from cdiff.testing import micro_model
    from cdiff.train.start import start_pipeline

    init = micro_model(tmp_path / "init.safetensors", out_channels=5, seed=3)
    stored = load_pipeline(init, dtype=torch.float32)
    config = load_config(ROOT / "configs" / "synthetic-tiny.toml", [f"model.init={init}", "model.tiny_seed=7"])
    fresh, again = start_pipeline(config.model), start_pipeline(config.model)
    assert fresh.unet.config == stored.unet.config
    assert not torch.equal(fresh.unet.conv_in.weight, stored.unet.conv_in.weight)
    torch.testing.assert_close(fresh.unet.conv_in.weight, again.unet.conv_in.weight, rtol=0, atol=0)  # seeded
    assert (fresh.unet.conv_out.weight[4:] == 0).all() and (fresh.unet.conv_out.bias[4:] == 0).all()  # variance
    for key, value in stored.vae.state_dict().items():
        assert torch.equal(fresh.vae.state_dict()[key], value), key
    assert torch.equal(fresh.context, stored.context)
    with pytest.raises(ValueError, match="model.fresh_unet needs model.init to be a model file"):
        load_config(ROOT / "configs" / "synthetic-tiny.toml", ["model.init=tiny"])


def test_set_overrides_parse_toml_values_and_bare_strings():
    config = load_config(ROOT / "configs" / "qxs-saropt.toml", [
        "optim.lr=1e-5", "optim.betas=[0.9, 0.99]", "data.root=/data/QXS SAROPT", "train.precision=fp16",
        "model.ema_decay=0.999", "data.hflip=false", "optim.clip_grad_norm=1", "model.stages=[2]",
    ])
    assert config.optim.lr == 1e-5 and config.optim.betas == (0.9, 0.99)
    assert config.data.root == "/data/QXS SAROPT" and config.train.precision == "fp16"
    assert config.model.ema_decay == 0.999 and config.data.hflip is False and config.optim.clip_grad_norm == 1.0
    assert config.model.stages == (2,)
    changed = differences(load_config(ROOT / "configs" / "qxs-saropt.toml"), config)
    assert len(changed) == 8 and "data.hflip: True -> False" in changed


@pytest.mark.parametrize("sets, message", [
    (["optim.lrr=1"], "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    (["train.batchsize=2"], "did you mean 'train.batch_size'?"),
    (["optimizer.lr=1"], "unknown key 'optimizer'; did you mean 'optim'?"),
    (["optim.lr"], "expected section.key=value"),
    (["optim.lr=fast"], "optim.lr must be float, got 'fast'"),
    (["train.steps=1.5"], "train.steps must be int"),
    (["train.precision=fp8"], "train.precision must be one of"),
    (["model.loss=l1"], "model.loss must be one of"),
    (["data.kind=qxs"], "data.root is needed"),
    (["model.init="], "model.init is needed"),
    (["model.kind=gan"], "model.kind must be one of"),
])
def test_bad_overrides_name_the_key(sets, message):
    with pytest.raises(ValueError) as err:
        load_config(ROOT / "configs" / "synthetic-tiny.toml", sets)
    assert message in str(err.value)


def test_bad_files_name_the_file_and_key(tmp_path):
    typo = tmp_path / "typo.toml"
    typo.write_text('[model]\ninit = "tiny"\n[optim]\nwarmup = 5\n')
    with pytest.raises(ValueError, match=r"typo.toml: unknown key 'optim.warmup'; did you mean 'optim.warmup_steps'"):
        load_config(typo)
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\ninit = 1\n")
    with pytest.raises(ValueError, match=r"broken.toml: not a valid TOML file"):
        load_config(broken)
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_config(tmp_path / "missing.toml")


def test_resolved_config_round_trips_through_toml():
    config = load_config(ROOT / "configs" / "sar2opt.toml", ["optim.betas=[0.8, 0.9]", "data.root=a \"quoted\" path"])
    import tomllib

    assert from_dict(tomllib.loads(to_toml(config))) == config


# --- the schedule -----------------------------------------------------------------------------


def test_warmup_cosine_matches_the_release_schedule():
    """The release's lr schedule is diffusers' get_scheduler("cosine", ...)."""
    optimization = pytest.importorskip("diffusers.optimization")
    theirs = optimization.get_scheduler(
        "cosine", optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), num_warmup_steps=100,
        num_training_steps=1000,
    )
    ours = WarmupCosine(100, 1000)
    for step in range(1001):
        assert math.isclose(theirs.get_last_lr()[0], ours(step), rel_tol=1e-12, abs_tol=1e-15), step
        theirs.optimizer.step()
        theirs.step()
    assert WarmupCosine(10, 100, cosine=False)(50) == 1.0


# --- the progress bar ---------------------------------------------------------------------------


def test_progress_bar_shows_postfix_and_time_left(monkeypatch, capsys):
    from cdiff import progress

    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True)
    clock = iter([100.0, 110.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.Bar(total=100, desc="train", start=20)
    bar.update(30, "loss 0.5 12.0 img/s")  # 10 steps in 10 s, 70 to go
    out = capsys.readouterr().err
    assert "30/100 left 0:01:10" in out and out.rstrip("\x1b[K").endswith("loss 0.5 12.0 img/s")
