"""cdiff distill (cdiff.train.distill): each method's loss on a known case against its formula written out here;
a tiny run killed mid-save and resumed ends bit-identical to an uninterrupted one; the student file records its
sampler and steps and translates with them; the command's checks."""

import json
import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cdiff
from cdiff.cli import main
from cdiff.testing import SMALL_RUN, micro_model, randomize_
from cdiff.train import load_config, rundir, train
from cdiff.train.distill import DistillTask
from cdiff.train.rundir import RunDir
from cdiff.translators import Sampling, open_cdiffset
from cdiff.weightfile import WeightFile
from cdiff.train.seeds import generator

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A micro C-DiffSET teacher (8-in/5-out U-Net with seeded random weights, variance channel included)."""
    path = micro_model(tmp_path_factory.mktemp("teacher") / "teacher.safetensors", out_channels=5)
    pipeline = cdiff.load_pipeline(path)
    randomize_(pipeline.unet, 3)  # a variance channel that varies, unlike the surgery's zero one
    return cdiff.save_native(path, pipeline.unet, pipeline.vae, pipeline.context)


def distill_config(teacher, *sets):
    return load_config(None, [*SMALL_RUN, "model.kind=distill", f"model.teacher={teacher}", *sets])


def a_batch(count=2, first=5):
    pairs = [cdiff.make_pair(i, size=64) for i in range(count)]
    sar = torch.stack([torch.from_numpy(p.sar)[None].expand(3, -1, -1) for p in pairs])
    eo = torch.stack([torch.from_numpy(np.ascontiguousarray(p.eo.transpose(2, 0, 1))) for p in pairs])
    return {"sar": sar, "eo": eo, "position": torch.arange(first, first + count)}


def draws(seed, positions, choices):
    """What the step draws per sample: an index in [0, choices) and the noise, from the generator of (seed, position)."""
    out = []
    for p in positions:
        gen = generator(seed, "distill", p)
        out.append((int(torch.randint(0, choices, (1,), generator=gen)), torch.randn(4, 8, 8, generator=gen)))
    return out


def unet_call(unet, sar_latent, x, t, context):
    """(x0_hat, eps_hat, log variance) of one call of an epsilon U-Net at timestep t, in fp64."""
    from cdiff.loss import variance_from_raw

    out = unet(torch.cat([sar_latent, x])[None].float(), torch.tensor([t]), context[None]).double()[0]
    a = DDPM_ALPHAS[t]
    eps = out[:4]
    return (x - math.sqrt(1 - a) * eps) / math.sqrt(a), eps, variance_from_raw(out[4:]).log()


DDPM_ALPHAS = cdiff.DDPM().alphas_cumprod.tolist()


def test_consistency_loss_is_the_lcm_formula(teacher):
    """The consistency step's loss, by the formula: x = sqrt(a) x0 + sqrt(1 - a) z at t = 20 (n + 1) - 1;
    the teacher's DDIM step to t' = t - 20 (0 below 19); the target network's f(x', t') with f = c_skip x +
    c_out x0_hat, c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25); the pseudo-Huber
    distance to the student's f(x, t), c = 0.001; plus (log var_s - log var_teacher)^2."""
    task = DistillTask(distill_config(teacher, "val.every=0", "model.variance_weight=0.5"), torch.device("cpu"))
    randomize_(task.student, 7)  # the student has moved away from the teacher and the target network
    batch = a_batch()
    loss, logs = task.loss(batch)

    def f(unet, x, t, sar_latent):
        clean, _, log_var = unet_call(unet, sar_latent, x, t, task.context)
        scaled = 10.0 * t
        return 0.25 / (scaled**2 + 0.25) * x + scaled / math.sqrt(scaled**2 + 0.25) * clean, log_var

    huber, variance = [], []
    with torch.no_grad():
        latents = task.vae.encode_latent(torch.cat([batch["sar"], batch["eo"]])).double()
        for k, (n, z) in enumerate(draws(task.config.train.seed, batch["position"].tolist(), 50)):
            sar_latent, x0 = latents[k], latents[2 + k]
            t, t_prev = 20 * (n + 1) - 1, max(20 * n - 1, 0)
            a, a_prev = DDPM_ALPHAS[t], DDPM_ALPHAS[t_prev]
            x = math.sqrt(a) * x0 + math.sqrt(1 - a) * z.double()
            clean, eps, log_var_teacher = unet_call(task.teacher, sar_latent, x, t, task.context)
            x_prev = math.sqrt(a_prev) * clean + math.sqrt(1 - a_prev) * eps
            target, _ = f(task.target.module, x_prev, t_prev, sar_latent)
            estimate, log_var_student = f(task.student, x, t, sar_latent)
            huber.append(((estimate - target).square() + 0.001**2).sqrt() - 0.001)
            variance.append((log_var_student - log_var_teacher).square())
    expected_distill, expected_variance = torch.stack(huber).mean(), 0.5 * torch.stack(variance).mean()
    torch.testing.assert_close(logs["loss_distill"].double(), expected_distill, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(logs["loss_variance"].double(), expected_variance, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(loss.double(), expected_distill + expected_variance, rtol=2e-4, atol=1e-7)
    assert expected_variance > 1e-3 and expected_distill > 1e-3  # neither term is trivially zero here


def test_progressive_loss_is_the_formula(teacher):
    """Round 0 of 8 -> 4 steps: t on the trailing grid of 4 (999, 749, 499, 249), two teacher DDIM steps on the
    grid of 8 to the next timestep (a_0 after the last); the student's x0_hat regresses
    x~ = (x'' - (s''/s) x) / (a'' - (s''/s) a), weighted by max(a^2 / s^2, 1)."""
    task = DistillTask(distill_config(teacher, "val.every=0", "model.method=progressive", "model.teacher_steps=8",
                                      "model.confidence=none"), torch.device("cpu"))
    randomize_(task.student, 8)
    batch = a_batch(count=3)
    loss, logs = task.loss(batch)
    coarse, fine = [999, 749, 499, 249, 0], [999, 874, 749, 624, 499, 374, 249, 124, 0]  # 0: a_0 after the last step
    terms = []
    with torch.no_grad():
        latents = task.vae.encode_latent(torch.cat([batch["sar"], batch["eo"]])).double()
        for k, (i, z) in enumerate(draws(task.config.train.seed, batch["position"].tolist(), 4)):
            sar_latent, x0 = latents[k], latents[3 + k]
            t, t_mid, t_next = coarse[i], fine[2 * i + 1], coarse[i + 1]
            a, a_mid, a_next = DDPM_ALPHAS[t], DDPM_ALPHAS[t_mid], DDPM_ALPHAS[t_next]
            x = math.sqrt(a) * x0 + math.sqrt(1 - a) * z.double()
            clean, eps, _ = unet_call(task.teacher, sar_latent, x, t, task.context)
            x_mid = math.sqrt(a_mid) * clean + math.sqrt(1 - a_mid) * eps
            clean, eps, _ = unet_call(task.teacher, sar_latent, x_mid, t_mid, task.context)
            x_next = math.sqrt(a_next) * clean + math.sqrt(1 - a_next) * eps
            ratio = math.sqrt(1 - a_next) / math.sqrt(1 - a)
            target = (x_next - ratio * x) / (math.sqrt(a_next) - ratio * math.sqrt(a))
            student, _, _ = unet_call(task.student, sar_latent, x, t, task.context)
            terms.append(max(a / (1 - a), 1.0) * (student - target).square())
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(logs["loss_distill"].double(), expected, rtol=2e-4, atol=1e-7)
    assert logs["loss_variance"] == 0 and loss == logs["loss_distill"]


# --- a run: killed, resumed, its student translated -----------------------------------------------

RUN = ("train.steps=6", "train.save_every=2", "train.keep_last=3", "train.log_every=1", "val.every=3",
       "model.steps=2")
OPTIONS = {"consistency": (), "progressive": ("model.method=progressive", "model.teacher_steps=8")}


def _final(run_dir):
    folder = run_dir / "checkpoints" / "step-000006"
    tensors = {f"{f.name}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    return tensors, json.loads((folder / "state.json").read_text())


def _train_and_die(config, run_dir, occurrence):
    torch.set_num_threads(1)
    seen = {"n": 0}

    def hook(name):
        if name == "state":
            seen["n"] += 1
            if seen["n"] == occurrence:
                os._exit(17)  # as kill -9: no cleanup, no flush

    rundir.save_hook = hook
    train(config, run_dir)
    os._exit(0)


@pytest.mark.parametrize("method", list(OPTIONS))
def test_a_killed_distillation_resumes_bit_identical(tmp_path, teacher, method):
    """Killed inside its third save (step 6's; step 4's is done: after progressive's round boundary at step 3,
    so its round teacher comes back from the checkpoint; consistency's target network likewise); resumed,
    it ends with every tensor and the state of the uninterrupted run."""
    config = distill_config(teacher, *RUN, *OPTIONS[method], "val.every=0")  # saves at steps 2, 4, 6
    reference = train(config, tmp_path / "reference")
    child = multiprocessing.get_context("fork").Process(target=_train_and_die, args=(config, tmp_path / "run", 3))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == 17
    assert RunDir(tmp_path / "run").latest_checkpoint().name == "step-000004"
    extra = "target.safetensors" if method == "consistency" else "round_teacher.safetensors"
    assert (tmp_path / "run" / "checkpoints" / "step-000004" / extra).is_file()
    assert train(None, tmp_path / "run", resume=True, force=True).step == 6
    (ours, our_state), (theirs, their_state) = _final(tmp_path / "run"), _final(reference.checkpoint.parents[1])
    assert ours.keys() == theirs.keys() and any(k.startswith(extra) for k in ours)
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} of {len(ours)} tensors differ, e.g. {different[:3]}"
    assert our_state == their_state
    # The student moved away from its teacher.
    student, start = load_file(tmp_path / "run" / "latest" / "model.safetensors"), load_file(teacher)
    assert not torch.equal(student["unet.conv_out.weight"], start["unet.conv_out.weight"])


def test_the_student_file_translates_with_the_steps_it_records(tmp_path, teacher, monkeypatch):
    done = train(distill_config(teacher, *RUN, "train.steps=2", "model.steps=2"), tmp_path / "run")
    student_file = done.checkpoint / "model.safetensors"
    pipeline = cdiff.load_pipeline(student_file)
    assert pipeline.sampling == ("lcm", 2)
    metadata = WeightFile(student_file).metadata
    assert metadata["sampler"] == "lcm" and metadata["steps"] == "2" and metadata["distillation"] == "consistency"
    assert json.loads(metadata["distilled_from"])["file"] == "teacher.safetensors"

    timesteps = []
    pipeline.unet.register_forward_pre_hook(lambda module, args: timesteps.append(int(args[1])))
    sar = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pipeline.translate(sar, generator=torch.Generator().manual_seed(1))
    assert timesteps == [999, 499]  # its sampler (LCM) and step count, from the file
    timesteps.clear()
    with pytest.warns(UserWarning, match="distilled student made to sample with lcm in 2 steps"):
        pipeline.translate(sar, steps=4)
    assert timesteps == [999, 759, 499, 259]  # the override runs, warned of

    # cdiff translate on the run directory: the best checkpoint's student, sampled as recorded.
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(image)
    called = []
    forward = cdiff.UNet.forward
    monkeypatch.setattr(cdiff.UNet, "forward", lambda self, x, t, *a, **k: called.append(int(t)) or forward(self, x, t, *a, **k))
    assert main(["translate", "--model", str(tmp_path / "run"), "--input", str(image.parent), "--output",
                 str(tmp_path / "out"), "--conf-dir", str(tmp_path / "conf")]) == 0
    assert called == [999, 499] and (tmp_path / "out" / "a.png").is_file() and (tmp_path / "conf" / "a.png").is_file()
    called.clear()
    with pytest.warns(UserWarning, match="running lcm in 1 steps instead"):
        assert main(["translate", "--model", str(student_file), "--input", str(image.parent), "--output",
                     str(tmp_path / "out2"), "--steps", "1"]) == 0
    assert called == [999]
    with pytest.raises(ValueError, match="the lcm sampler draws fresh noise"):  # a batch would share its draws
        open_cdiffset(student_file, Sampling(batch_size=2), None, "cpu", "fp32", None)


def test_distill_command_checks_its_input(tmp_path, teacher, capsys):
    assert main(["distill", "--run-dir", str(tmp_path / "a"), "--config", str(ROOT / "configs" / "distill-synthetic-tiny.toml")]) == 2
    assert "a new run needs --teacher MODEL and --config TOML" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(teacher), "--config", str(ROOT / "configs" / "synthetic-tiny.toml"),
                 "--run-dir", str(tmp_path / "b")]) == 2
    assert "model.teacher is an option of model.kind 'distill', not of 'cdiffset'" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(tmp_path / "missing.safetensors"), "--config",
                 str(ROOT / "configs" / "distill-synthetic-tiny.toml"), "--run-dir", str(tmp_path / "c")]) == 2
    assert "model.teacher: file not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model.teacher_steps \\(12\\) must be model.steps \\(4\\) times a power of two"):
        distill_config(teacher, "model.method=progressive", "model.teacher_steps=12")
    no_variance = micro_model(tmp_path / "four.safetensors", out_channels=4)
    with pytest.raises(ValueError, match="predicts no variance"):
        DistillTask(distill_config(no_variance, "val.every=0"), torch.device("cpu"))


def test_a_resume_with_another_teacher_is_refused(tmp_path, teacher):
    train(distill_config(teacher, *RUN, "train.steps=2", "val.every=0"), tmp_path / "run")
    other = micro_model(tmp_path / "teacher.safetensors", out_channels=5, seed=4)
    config = distill_config(other, *RUN, "train.steps=4", "val.every=0")
    with pytest.raises(ValueError, match="not the file this run was distilling from"):
        train(config, tmp_path / "run", resume=True, force=True)


def test_the_distill_configs_parse():
    found = sorted((ROOT / "configs").glob("distill-*.toml"))
    assert len(found) >= 4
    for path in found:
        config = load_config(path)
        assert config.model.kind == "distill" and config.model.teacher and config.model.steps == 4, path
