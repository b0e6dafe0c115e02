"""`cdiff train` with model.kind = "s2o_npde": the config, the loop's two phases against
cdiff.npde.training_step, a short CLI run that learns, exact resume, ablations, bad input."""

import math
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdiff.cli import main
from cdiff.npde import TABLE2_ROWS, NPDEConfig, NPDELoss, lr_factor, make_optimizers, training_step
from cdiff.testing import log_records as records, one_thread
from cdiff.train import load_config, train
from cdiff.train.configfile import from_dict, to_toml
from cdiff.train.data import StreamSamples, image_augment, training_split
from cdiff.train.optim import WarmupLinearDecay
from cdiff.train.s2o_npde import fake_pools, initial_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "s2o_npde-synthetic-tiny.toml"
# 6 steps on 8 synthetic 64-px pairs; pools of 2, so that stored fakes come back.
SMALL = ["data.count=8", "model.pool_size=2", "train.steps=6", "train.log_every=1", "train.save_every=2",
         "val.every=3", "val.images=2", "val.grid_images=2"]


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield




def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# --- the config -----------------------------------------------------------------------------


def test_sen12_config_holds_the_papers_training():
    config = load_config(ROOT / "configs" / "s2o_npde_sen12.toml")
    assert config.model.kind == "s2o_npde" and config.model.network() == NPDEConfig.paper()
    assert (config.data.kind, config.data.crop, config.data.hflip, config.data.vflip, config.data.rot90) == (
        "sen12", 0, True, False, False)
    optim, run = config.optim, config.train
    assert (optim.lr, optim.betas, optim.weight_decay, optim.warmup_steps, optim.clip_grad_norm) == (
        2e-4, (0.5, 0.999), 0.0, 0, 0.0)
    assert (optim.schedule, run.steps, run.batch_size, run.precision) == ("linear_decay", 200 * 1600, 1, "fp32")
    # The same numbers are this kind's defaults: a [model] section alone trains as the paper.
    bare = from_dict({"model": {"kind": "s2o_npde"}, "data": {"kind": "sen12", "root": "/data"}})
    assert bare.optim == config.optim and bare.model.network() == NPDEConfig.paper()
    assert (bare.train.steps, bare.train.batch_size, bare.train.precision) == (320_000, 1, "fp32")
    # 2e-4 for the first half of the steps, then linearly to 0 (paper: from the 100th of 200 epochs).
    schedule = WarmupLinearDecay(0, 320_000)
    assert [schedule(n) for n in (0, 159_999, 160_000, 240_000, 320_000)] == [1, 1, 1, 0.5, 0]
    assert schedule(1600 * 150) == lr_factor(150, 200)  # at an epoch's start, the paper's per-epoch value


def test_config_round_trips_and_table2_rows_are_set_switches():
    config = load_config(TINY, ["model.perceptual_layers=[\"relu1_1\", \"relu2_1\"]",
                                "model.perceptual_layer_weights=[0.5, 1.0]", "model.vgg=/weights/vgg19.pth"])
    text = to_toml(config)
    assert text.startswith("[model]\nkind = \"s2o_npde\"\n")
    assert from_dict(tomllib.loads(text)) == config
    assert config.model.perceptual_layers == ("relu1_1", "relu2_1") and config.model.vgg == "/weights/vgg19.pth"
    tiny = NPDEConfig.tiny()
    for row, switches in TABLE2_ROWS.items():
        sets = [f"model.{k}={str(v).lower()}" for k, v in switches.items()]
        assert load_config(TINY, sets).model.network() == NPDEConfig.ablation(row, tiny), row


# --- the step -------------------------------------------------------------------------------


def test_the_loops_two_phases_equal_training_step(tmp_path):
    """6 steps of `cdiff train` end with the weights of 6 cdiff.npde.training_step calls on the
    same samples, init, pools and lr schedule: the same bits."""
    config = load_config(TINY, SMALL + ["val.every=0"])
    done = train(config, tmp_path / "run")

    network, seed = config.model.network(), config.train.seed
    model, pools = initial_model(network, seed), fake_pools(network, seed)
    optimizers = make_optimizers(model, lr=config.optim.lr, betas=config.optim.betas)
    stream = StreamSamples(training_split(config.data, config.val)[0], seed, image_augment(config.data))
    losses = NPDELoss(network)
    for step in range(6):
        for optimizer in optimizers:
            optimizer.param_groups[0]["lr"] = config.optim.lr * lr_factor(step, 6)
        sample = stream[step]
        terms = training_step(model, losses, optimizers, {k: sample[k][None] for k in ("sar", "eo")}, pools)
    trained = done.task.model.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in model.state_dict().items())
    assert terms["pixel"] == records(tmp_path / "run")[-1]["pixel"]


def test_a_short_cli_run_lowers_the_pixel_and_pde_losses(tmp_path, capsys, caplog):
    """32 steps on 16 pairs: the mean of the last 8 steps against the first 8. Measured (seeds
    2025 / 1 / 2): pixel x 0.63 / 0.61 / 0.80, L_TCD x 0.45 / 0.40 / 0.43, L_PMD x 0.16 / 0.17 / 0.19."""
    code, err = cli(capsys, "train", "--config", TINY, "--run-dir", tmp_path / "run", "--set", "data.count=16",
                    "--set", "train.steps=32", "--set", "train.log_every=1", "--set", "val.every=0")
    assert code == 0, err
    assert "no VGG weights given, so the perceptual loss (weight 10) is off" in caplog.text
    history = records(tmp_path / "run")
    assert len(history) == 32 and "perceptual" not in history[0]
    assert {"loss_generator", "loss_discriminator", "lr_generator", "lr_discriminator"} <= set(history[0])
    for term, bound in (("pixel", 0.85), ("pde_tcd", 0.6), ("pde_pmd", 0.6)):
        first, last = (sum(r[term] for r in part) / 8 for part in (history[:8], history[-8:]))
        print(f"{term}: {first:.4f} -> {last:.4f}")
        assert last < bound * first, (term, first, last)


def _final_tensors(run_dir) -> dict:
    folder = Path(run_dir) / "checkpoints" / "step-000006"
    tensors = {}
    for name in ("model.safetensors", "pools.safetensors", "state.safetensors"):
        tensors.update({f"{name}/{k}": v for k, v in load_file(folder / name).items() if not k.startswith("rng.")})
    return tensors


def test_resume_is_bit_identical(tmp_path):
    """Stopped at step 3 and resumed: the weights, Adam moments, pools and losses of an
    uninterrupted run. With accumulation 2 (the fakes of both micro-batches wait for the
    discriminator phase) and a validation at step 3."""
    config = load_config(TINY, SMALL + ["train.accumulation=2"])
    train(config, tmp_path / "whole")
    assert train(config, tmp_path / "part", stop_at=3).step == 3
    assert train(None, tmp_path / "part", resume=True).step == 6
    ours, theirs = _final_tensors(tmp_path / "part"), _final_tensors(tmp_path / "whole")
    assert ours.keys() == theirs.keys() and any(k.startswith("pools.safetensors/eo.images") for k in ours)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    assert records(tmp_path / "part")[-1]["loss_generator"] == records(tmp_path / "whole")[-1]["loss_generator"]
    validations = [[r["psnr"] for r in records(tmp_path / run, "val")] for run in ("part", "whole")]
    assert validations[0] == validations[1]


def test_the_base_row_and_a_vgg_file(tmp_path):
    """Table 2's Base (no TCD, no PMD, no PDE loss) trains and saves no PMD module; a VGG16 file
    given as model.vgg turns the perceptual term on."""
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    vgg16 = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    save_file(vgg16, tmp_path / "vgg16.safetensors")
    config = load_config(TINY, SMALL + ["train.steps=2", "val.every=2", "model.tcd=false", "model.pmd=false",
                                        "model.pde_loss=false", f"model.vgg={tmp_path / 'vgg16.safetensors'}"])
    done = train(config, tmp_path / "run")
    record = records(tmp_path / "run")[-1]
    assert "perceptual" in record and not any(k.startswith("pde") for k in record)
    keys = load_file(done.checkpoint / "model.safetensors").keys()
    assert not any(k.startswith("generator.pmd_") or k.startswith("generator.fusions") for k in keys)
    assert math.isfinite(records(tmp_path / "run", "val")[-1]["psnr"])


# --- bad input ------------------------------------------------------------------------------


def test_bad_input_is_refused_with_one_line(tmp_path, capsys):
    run = ["train", "--config", TINY, "--run-dir", tmp_path / "r"]
    code, err = cli(capsys, *run, "--set", "model.kind=npde")
    assert code == 2 and "model.kind must be one of ['cdiffset', 'distill', 's2o_npde'], got 'npde'" in err
    code, err = cli(capsys, *run, "--prediction", "sample")  # a C-DiffSET option
    assert code == 2 and "model.prediction is an option of model.kind 'cdiffset', not of 's2o_npde'" in err
    code, err = cli(capsys, *run, "--set", "model.ema_decay=0.9")
    assert code == 2 and "model.ema_decay is an option of model.kind 'cdiffset'" in err
    code, err = cli(capsys, *run, "--set", "model.base_chanels=8")
    assert code == 2 and "did you mean 'model.base_channels'?" in err
    code, err = cli(capsys, *run, "--set", "model.norm=group")
    assert code == 2 and "norm must be one of" in err
    code, err = cli(capsys, *run, "--set", "model.vgg=missing/vgg16.pth")
    assert code == 2 and "missing/vgg16.pth" in err
    code, err = cli(capsys, *run, "--set", "data.latents=cache")
    assert code == 2 and "a latent cache is for C-DiffSET" in err
    code, err = cli(capsys, "cache-latents", tmp_path / "cache", "--config", TINY)
    assert code == 2 and "model.kind 's2o_npde' trains on images" in err
    code, err = cli(capsys, *run, "--set", "data.crop=30")
    assert code == 2 and "data.crop 30 must be a multiple of 4" in err
    assert not (tmp_path / "r" / "config.toml").exists()
