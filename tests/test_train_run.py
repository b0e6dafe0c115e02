"""cdiff train, part 2: the C-DiffSET step against the release's formula, learning, options,
precisions, the non-finite policy, and every bad input."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cdiff
from cdiff.cli import main
from cdiff.schedulers import split_prediction
from cdiff.testing import log_records as _records, micro_model
from cdiff.train import train
from cdiff.train.cdiffset import CDiffSETTask
from cdiff.train.latents import cache_latents
from cdiff.train.loop import NonFiniteLoss
from cdiff.train.seeds import generator

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("model") / "micro.safetensors")


def test_step_loss_is_the_release_formula(model_file, small_config):
    """The task's loss equals the release's training step written out eagerly on the same draws."""
    task = CDiffSETTask(small_config(model_file), torch.device("cpu"))
    assert task.unet.config.out_channels == 5 and not task.unet.conv_out.weight[4].any()  # surgery: var channel 0
    gen = torch.Generator().manual_seed(1)
    batch = {"sar": torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1, "eo": torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1,
             "position": torch.tensor([5, 11])}
    with torch.no_grad():
        task.unet.conv_out.weight[4].normal_(0, 0.05, generator=gen)  # a variance that is not 1 everywhere
        loss, terms = task.loss(batch)

        # The release: scaled posterior means, t and noise drawn per sample, q(x_t | x_0), the beta-NLL.
        vae, unet = task.vae, task.unet
        sar_latent = vae.encode(batch["sar"]).mean * vae.config.scaling_factor
        eo_latent = vae.encode(batch["eo"]).mean * vae.config.scaling_factor
        draws = [generator(2025, "noise", p) for p in (5, 11)]
        t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in draws])
        noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in draws])
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alpha = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * eo_latent + (1 - alpha).sqrt() * noise
        out = unet(torch.cat([sar_latent, noisy], 1), t, task.context.repeat(2, 1, 1))
        offset = math.log(math.exp(1 - 1e-6) - 1)
        var = torch.clamp(F.softplus(out[:, -1:] + offset) + 1e-6, 1e-6, 10).expand_as(noise)
        nll = -0.5 * ((noise - out[:, :-1]) ** 2 / var + torch.log(var) + math.log(2 * math.pi))
        expected = -torch.mean(nll * var.detach() ** alpha.sqrt())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["loss_residual"] + terms["loss_logvar"], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["mean_variance"], var.mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_each_prediction_type_reads_back_the_true_noise_and_clean_latent(prediction):
    """The training target of each prediction type, read by the samplers' split_prediction, gives
    back the true x0 and the true noise: x0 -> eps and v -> (x0, eps) are the inverse of the targets."""
    process = cdiff.DDPM()
    clean, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([401, 401])
    noisy = process.add_noise(clean, noise, t)
    target = {"epsilon": noise, "sample": clean, "v_prediction": process.velocity(clean, noise, t)}[prediction]
    a = process.alphas_cumprod[401].float()
    x0, eps = split_prediction(target, noisy, a.sqrt(), (1 - a).sqrt(), prediction)
    torch.testing.assert_close(x0, clean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps, noise, rtol=1e-4, atol=1e-5)


def test_200_steps_lower_the_loss(tmp_path, model_file, small_config):
    """On the tiny preset, the mean loss of the last 20 of 200 steps is below 80% of the
    first 20's. The run reads a latent cache with all 8 views (random flips and rotations)."""
    base = small_config(model_file, "data.count=32")
    cache = cache_latents(base, tmp_path / "latents", dihedral_views=True, show_progress=False)
    config = small_config(model_file, "data.count=32", f"data.latents={cache}", "train.steps=200",
                          "train.batch_size=4", "train.log_every=1", "train.save_every=200", "val.every=0")
    train(config, tmp_path / "run")
    losses = [r["loss"] for r in _records(tmp_path / "run")]
    assert len(losses) == 200
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"mean loss, first 20 steps {first:.4f}, last 20 {last:.4f} ({last / first:.0%})")
    assert last < 0.8 * first


@pytest.mark.parametrize("option, absent", [("model.prediction=sample", None), ("model.prediction=v_prediction", None),
                                            ("model.loss=mse", "loss_logvar")])
# (also: a DataLoader worker process, and an EMA)
def test_options_run_and_translate(tmp_path, model_file, option, absent, small_config):
    """--prediction sample / v_prediction and --loss mse train, validate, and the checkpoint loads
    as a pipeline that samples with the prediction type it was trained for."""
    done = train(small_config(model_file, option, "train.steps=3", "model.ema_decay=0.5", "data.workers=1"),
                 tmp_path / "run")
    record = _records(tmp_path / "run")[-1]
    assert math.isfinite(record["loss"]) and (absent is None or absent not in record)
    assert math.isfinite(_records(tmp_path / "run", "val")[-1]["psnr"])
    for name in ("model.safetensors", "model_ema.safetensors"):
        pipeline = cdiff.load_pipeline(done.checkpoint / name)
        # The file records what the U-Net predicts; the pipeline's sampler reads its output as such.
        expected = option.partition("=")[2] if option.startswith("model.prediction") else "epsilon"
        assert pipeline.prediction_type == expected and type(pipeline.unet) is cdiff.UNet
        result = pipeline.translate(torch.rand(1, 3, 64, 64) * 2 - 1, steps=2, generator=torch.Generator().manual_seed(0))
        assert result.eo.shape == (1, 3, 64, 64) and torch.isfinite(result.eo).all()
    trained = done.task.unet.state_dict()
    saved = cdiff.load_unet(done.checkpoint / "model.safetensors").state_dict()
    assert all(torch.equal(trained[k], saved[k]) for k in trained)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, model_file, precision, small_config):
    done = train(small_config(model_file, f"train.precision={precision}", "train.steps=2", "val.every=0"), tmp_path / "r")
    assert math.isfinite(_records(tmp_path / "r")[-1]["loss"])
    scaler = json.loads((done.checkpoint / "state.json").read_text())["scaler"]
    assert (scaler != {}) == (precision == "fp16")  # fp16 saves its gradient scaler's state
    assert all(p.dtype == torch.float32 for p in done.task.unet.parameters())  # fp32 master weights


def test_nonfinite_loss_is_skipped_then_stops_the_run(tmp_path, model_file, monkeypatch, small_config):
    real = CDiffSETTask.loss
    calls = {"n": 0}

    def poisoned(self, batch):  # the loss of steps 2 and 4 (micro-batches 2 and 4) is NaN
        calls["n"] += 1
        loss, terms = real(self, batch)
        return (loss * float("nan"), terms) if calls["n"] in (2, 4) else (loss, terms)

    monkeypatch.setattr(CDiffSETTask, "loss", poisoned)
    config = small_config(model_file, "train.skip_nonfinite=1", "train.save_every=1", "val.every=0")
    with pytest.raises(NonFiniteLoss) as err:
        train(config, tmp_path / "run")
    message = str(err.value)
    assert message.startswith("step 4: the unet loss is nan") and "step-000003" in message
    events = _records(tmp_path / "run", "event")
    assert [e["step"] for e in events if e["event"] == "nonfinite"] == [2]
    assert _records(tmp_path / "run")[-1]["skipped_nonfinite"] == 1


def test_release_unet_start_gets_the_variance_channel(tmp_path, model_file, small_config):
    """model.unet: a release U-Net file (8-in/4-out); the VAE and prompt come from model.init."""
    from cdiff.export import export

    native = micro_model(tmp_path / "tiny.safetensors", config={})  # the tiny preset: release files infer presets
    release = export(native, tmp_path / "model.safetensors", to="release", echo=lambda *a: None)
    task = CDiffSETTask(small_config(model_file, f"model.init={native}", f"model.unet={release}"), torch.device("cpu"))
    assert (task.unet.config.in_channels, task.unet.config.out_channels) == (8, 5)
    assert not task.unet.conv_out.weight[4].any() and task.unet.conv_out.bias[4] == 0


def test_gradient_checkpointing_gives_the_same_gradients(model_file, small_config):
    batch = {"sar": torch.rand(2, 3, 64, 64) * 2 - 1, "eo": torch.rand(2, 3, 64, 64) * 2 - 1, "position": torch.tensor([0, 1])}
    grads = []
    for switch in (False, True):
        task = CDiffSETTask(small_config(model_file, f"model.gradient_checkpointing={str(switch).lower()}"), torch.device("cpu"))
        assert task.unet.checkpointing is switch
        task.loss(batch)[0].backward()
        grads.append([p.grad for p in task.unet.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- bad input ------------------------------------------------------------------------------------


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_refuses_bad_input(tmp_path, model_file, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\ninit = "{model_file}"\n[train]\nsteps = 1\nbatch_size = 2\nprecision = "fp32"\n'
                      'device = "cpu"\n[data]\ncount = 4\nsize = 64\nworkers = 0\n[val]\nevery = 0\n')
    code, err = _cli(capsys, "train", "--config", config, "--run-dir", tmp_path / "r", "--set", "optim.lrr=1")
    assert code == 2 and "unknown key 'optim.lrr'; did you mean 'optim.lr'?" in err
    code, err = _cli(capsys, "train", "--config", config)
    assert code == 2 and "either --run-dir DIR" in err

    # An empty dataset.
    (tmp_path / "empty" / "sar").mkdir(parents=True)
    (tmp_path / "empty" / "eo").mkdir()
    code, err = _cli(capsys, "train", "--config", config, "--run-dir", tmp_path / "e", "--set", "data.kind=folders",
                     "--set", f"data.root={tmp_path / 'empty'}")
    assert code == 2 and "no EO images found under" in err and "empty" in err
    assert not (tmp_path / "e" / "config.toml").exists()  # a run that failed to start can start again there

    # A run directory that is not writable: under a file.
    (tmp_path / "file").write_text("")
    code, err = _cli(capsys, "train", "--config", config, "--run-dir", tmp_path / "file" / "run")
    assert code == 2 and f"run directory {tmp_path / 'file' / 'run'} is not writable" in err

    # A finished run: a new run into it is refused; resuming with a changed config needs --force.
    assert _cli(capsys, "train", "--config", config, "--run-dir", tmp_path / "r")[0] == 0
    code, err = _cli(capsys, "train", "--config", config, "--run-dir", tmp_path / "r")
    assert code == 2 and "already holds a run: continue it with --resume" in err
    code, err = _cli(capsys, "train", "--resume", tmp_path / "r", "--set", "optim.lr=1e-4")
    assert code == 2 and "optim.lr: 3e-05 -> 0.0001" in err and "--force" in err
    code, err = _cli(capsys, "train", "--resume", tmp_path / "r", "--set", "optim.lr=1e-4", "--set", "train.steps=2", "--force")
    assert code == 0, err
    assert _records(tmp_path / "r")[-1]["lr"] == pytest.approx(1e-4 * 2 / 100)  # the new lr, at warm-up step 2
    resumed = [e for e in _records(tmp_path / "r", "event") if e["event"] == "resume"]
    assert resumed[-1]["changed"] == ["optim.lr: 3e-05 -> 0.0001", "train.steps: 1 -> 2"]
    code, err = _cli(capsys, "train", "--resume", tmp_path / "nothing")
    assert code == 2 and "no config.toml, so not a run directory" in err

    # A missing model file.
    code, err = _cli(capsys, "train", "--config", config, "--run-dir", tmp_path / "m", "--set", "model.init=nope.safetensors")
    assert code == 2 and "model file not found: nope.safetensors" in err



def test_tiny_config_and_a_folder_dataset_run_from_the_cli(tmp_path, capsys):
    """configs/synthetic-tiny.toml (a fresh U-Net on the demo model's VAE, model.init a path from the
    repository's root), and pairs on disk read by cdiff.open_dataset."""
    from cdiff.data import write_synthetic

    short = ["--set", "train.steps=1", "--set", "val.every=1", "--set", "val.holdout=1", "--set", "val.images=1",
             "--set", "val.steps=1"]
    code, err = _cli(capsys, "train", "--config", ROOT / "configs" / "synthetic-tiny.toml", "--run-dir", tmp_path / "tiny", *short)
    assert code == 0, err
    assert err.startswith("cdiff train: note: a trial of the training machinery, about a minute on 2 CPU cores, "
                          "too short to learn a translation")  # what the trial is for, said first
    assert (tmp_path / "tiny" / "val" / "step-000001.png").is_file()
    write_synthetic(tmp_path / "pairs", 5, size=64, show_progress=False)
    code, err = _cli(capsys, "train", "--config", ROOT / "configs" / "synthetic-tiny.toml", "--run-dir", tmp_path / "folders",
                     *short, "--set", "data.kind=folders", "--set", f"data.root={tmp_path / 'pairs'}")
    assert code == 0, err
    assert _records(tmp_path / "folders", "val")[0]["psnr"] > 0
