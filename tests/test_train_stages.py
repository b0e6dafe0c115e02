"""cdiff train, part 6: the release's two stages, fixed-step checkpoints and validation held out of the
training list. A two-stage run end to end; each stage's starting U-Net tensor by tensor; both stages
resume bit-exactly after kill -9; keep_every; validation never reads the test list; bad starts refused.

The runs are the micro stack of cdiff.testing on 64-px synthetic pairs, on one thread; the stage-1
start is a micro U-Net of SD 2.1's shape (4-in/4-out).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cdiff
from cdiff.cli import main
from cdiff.config import UNetConfig, VAEConfig
from cdiff.convert import convert
from cdiff.data import frozen
from cdiff.export import export
from cdiff.native import save_native
from cdiff.testing import log_records as records, micro_model, MICRO_UNET, MICRO_VAE
from cdiff.train import load_config, train
from cdiff.train.cdiffset import CDiffSETTask, stage_runs
from cdiff.train.configfile import to_toml
from cdiff.train.data import holdout_indices, training_split
from cdiff.train.rundir import RunDir
from cdiff.train.start import start_pipeline
from cdiff.translate import model_file as translate_model_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
BOTH = ("model.stages=[1, 2]", "train.keep_every=3")


def sd_like(path, seed=0, in_channels=4, out_channels=4) -> Path:
    """A native file of the micro stack whose U-Net has SD 2.1's shape (4-in/4-out) unless told."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = cdiff.UNet(UNetConfig.tiny(in_channels=in_channels, out_channels=out_channels, **MICRO_UNET))
        vae = cdiff.VAE(VAEConfig.tiny(**MICRO_VAE))
        context = torch.randn(6, unet.config.context_dim)
    return save_native(path, unet, vae, context)


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    return sd_like(tmp_path_factory.mktemp("sd") / "sd.safetensors")


def unet_tensors(path) -> dict[str, torch.Tensor]:
    return dict(cdiff.load_unet(path).state_dict())




# --- the starts of the two stages --------------------------------------------------------------


def test_stage1_start_widens_sd21s_conv_in(tmp_path, sd_file, small_config):
    """Stage 1 starts from SD 2.1's U-Net with conv_in [SAR | EO] = [w/2 | w/2] and its own 4 outputs,
    every other tensor as it was; from cdiff convert's one-step start (8-in/5-out, variance zero) the
    very same U-Net; from a trained 8-in/5-out one, refused."""
    sd = unet_tensors(sd_file)
    start = start_pipeline(small_config(sd_file, "model.stages=[1]").model).unet
    assert (start.config.in_channels, start.config.out_channels) == (8, 4)
    ours = dict(start.state_dict())
    assert ours.keys() == sd.keys()
    for name, tensor in ours.items():
        expected = torch.cat([sd[name] / 2, sd[name] / 2], dim=1) if name == "conv_in.weight" else sd[name]
        assert torch.equal(tensor, expected), name

    one_step = tmp_path / "one-step.safetensors"
    convert(sd_file, one_step, echo=lambda line: None)  # SD 2.1 -> 8-in/5-out, the variance channel zero
    again = start_pipeline(small_config(one_step, "model.stages=[1]").model).unet.state_dict()
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)

    trained = micro_model(tmp_path / "trained.safetensors", out_channels=5, seed=3)  # a random variance channel
    with pytest.raises(ValueError, match=r"trained.safetensors: a stage-1 start, but its variance channel holds "
                                         r"trained weights"):
        start_pipeline(small_config(trained, "model.stages=[1]").model)


def test_stage2_starts_from_a_released_stage1_unet_folder(tmp_path, sd_file, small_config):
    """model.unet: a diffusers U-Net folder of 8-in/4-out (GeoSET's sd21-ft folders): the same U-Net
    plus a zero variance channel; VAE and prompt from model.init."""
    stage1 = micro_model(tmp_path / "stage1.safetensors", out_channels=4, seed=5)
    folder = export(stage1, tmp_path / "released", to="diffusers", echo=lambda line: None) / "unet"
    task = CDiffSETTask(small_config(sd_file, "model.stages=[2]", f"model.unet={folder}"), torch.device("cpu"))
    released = unet_tensors(stage1)
    ours = dict(task.unet.state_dict())
    assert ours.keys() == released.keys() and (task.unet.config.in_channels, task.unet.config.out_channels) == (8, 5)
    for name, tensor in ours.items():
        if name.startswith("conv_out."):
            assert torch.equal(tensor[:4], released[name]) and not tensor[4].any(), name
        else:
            assert torch.equal(tensor, released[name]), name


@pytest.mark.parametrize("shape, message", [
    ((4, 4), r"this one is 4-in/4-out \(SD 2.1 itself: train stage 1 first, model.stages = \[1, 2\]"),
    ((8, 6), r"this one is 8-in/6-out$"),
])
def test_a_stage2_start_of_another_shape_is_refused(tmp_path, small_config, shape, message):
    """A stage-2 start must be 8-in/4-out or 8-in/5-out: one error naming the file and its shape,
    before the run writes its config."""
    path = sd_like(tmp_path / "wrong.safetensors", in_channels=shape[0], out_channels=shape[1])
    with pytest.raises(ValueError, match=rf"wrong.safetensors: stage 2 starts from an 8-in/4-out U-Net .*{message}"):
        train(small_config(path, "model.stages=[2]"), tmp_path / "run")
    assert not (tmp_path / "run" / "config.toml").exists()


# --- a two-stage run ------------------------------------------------------------------------------


def test_two_stages_end_to_end(tmp_path, sd_file, small_config):
    """model.stages = [1, 2]: stage 1 (8-in/4-out, MSE) then stage 2 from stage 1's final U-Net plus a
    zero variance channel (C-Diff loss), each in its folder with its own checkpoints, validation on
    pairs held out of the training list, keep_every; stage 2 of the run ends with the tensors of a
    stage-2 run started on its own from stage 1's final file; cdiff translate finds the steps."""
    config = small_config(sd_file, *BOTH)
    run = tmp_path / "run"
    done = train(config, run)
    assert load_config(run / "config.toml") == config  # the recipe, at the top
    for stage, channels in (("stage1", 4), ("stage2", 5)):
        assert RunDir(run / stage).steps() == [3, 6]  # keep_last 1 + keep_every 3
        assert cdiff.load_unet(run / stage / "checkpoints" / "step-000006" / "model.safetensors").config.out_channels \
            == channels
        assert [r["step"] for r in records(run / stage, "val")] == [3, 6]
    assert not (run / "checkpoints").exists()
    assert "loss_residual" not in records(run / "stage1")[-1] and "loss_residual" in records(run / "stage2")[-1]
    assert done.checkpoint == run / "stage2" / "checkpoints" / "step-000006"

    # Stage 2's start: stage 1's final U-Net, tensor by tensor, and the variance channel zero.
    final1 = run / "stage1" / "checkpoints" / "step-000006" / "model.safetensors"
    stage2_config = stage_runs(config, run)[1][1]
    assert stage2_config.model.init == str(final1.resolve()) and stage2_config.model.stages == (2,)
    start = start_pipeline(stage2_config.model)
    final = unet_tensors(final1)
    for name, tensor in start.unet.state_dict().items():
        if name.startswith("conv_out."):
            assert torch.equal(tensor[:4], final[name]) and not tensor[4].any(), name
        else:
            assert torch.equal(tensor, final[name]), name
    assert torch.equal(start.context, cdiff.load_pipeline(final1).context)
    # ... and the run's stage 2 trained from exactly that start.
    alone = train(small_config(final1, "model.stages=[2]", "train.keep_every=3"), tmp_path / "alone")
    theirs = load_file(alone.checkpoint / "model.safetensors")
    ours = load_file(done.checkpoint / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # cdiff translate: the run means stage 2's newest/best; RUN@step-N a kept step.
    assert str(translate_model_file(run)).startswith(str(run / "stage2"))
    assert translate_model_file(f"{run}@step-3") == run / "stage2" / "checkpoints" / "step-000003" / "model.safetensors"
    assert translate_model_file(f"{run / 'stage1'}@step-6") == final1
    with pytest.raises(ValueError, match=r"holds no checkpoint of step 4 \(it keeps: 3, 6;"):
        translate_model_file(f"{run}@step-4")


def test_keep_every_keeps_the_named_checkpoints(tmp_path):
    """keep_last newest + every keep_every-th step + the best one; the others go."""
    run = RunDir(tmp_path)
    run.check_writable()
    for step in range(2, 26, 2):
        run.save(step, lambda folder: (folder / "state.json").write_text("{}"), keep_last=2, best_step=6,
                 keep_every=8)
    assert run.steps() == [6, 8, 16, 22, 24]
    with pytest.raises(ValueError, match=r"train.keep_every must be 0 or a multiple of train.save_every \(2000\)"):
        load_config(None, ["train.keep_every=3000"])


# --- kill -9 in each stage -------------------------------------------------------------------

KILL_RUN = ["train.steps=12", "train.save_every=4", "train.keep_every=4", "train.log_every=1", "val.every=6"]
# cdiff train, each step 0.15 s slower: room for the test to kill the process between steps (the
# pause changes no number).
SLOW_CLI = """import sys, time
import torch
torch.manual_seed(0)  # the global RNG state the reference run starts with (checkpoints record it)
from cdiff.train import loop
step = loop.Loop._step
loop.Loop._step = lambda self, batches: (time.sleep(0.15), step(self, batches))[1]
from cdiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(tmp_path: Path, *argv) -> subprocess.Popen:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "cli.err", "a") as err:
        return subprocess.Popen([sys.executable, str(script), "train", *map(str, argv)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def _kill_at(process: subprocess.Popen, stage_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before {stage_dir.name} step {step}"
        done = [r["step"] for r in records(stage_dir)]
        if done and done[-1] >= step:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no {stage_dir.name} step {step} within {timeout} s")


def _checkpoint(stage_dir: Path, step: int) -> tuple[dict, dict]:
    """Every tensor of a checkpoint (U-Net, VAE, optimiser moments, RNG states) and state.json, without
    the path of stage 2's starting file (the run directory's own)."""
    folder = stage_dir / "checkpoints" / f"step-{step:06d}"
    tensors = {f"{f.name}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    state = json.loads((folder / "state.json").read_text())
    state["config"]["model"].pop("init")
    return tensors, state


@pytest.mark.slow  # three cdiff train processes and a reference run: 30 s at a load average of 5
def test_both_stages_resume_bit_exactly_after_kill_9(tmp_path, sd_file, small_config):
    """kill -9 in stage 1 after its checkpoint 4; resume; kill -9 in stage 2 before its first
    checkpoint; resume; kill -9 in stage 2 after its checkpoint 4; resume to the end: both stages'
    checkpoints (4, 8, 12) hold every tensor and state of the uninterrupted run, and each log
    holds each step once, with the same losses."""
    config = small_config(sd_file, "model.stages=[1, 2]", *KILL_RUN)
    reference = tmp_path / "reference"
    torch.manual_seed(0)  # as the killed run's processes start: the global RNG state is in every checkpoint
    train(config, reference)
    path = tmp_path / "run.toml"
    path.write_text(to_toml(config))
    run = tmp_path / "run"

    _kill_at(_start(tmp_path, "--config", path, "--run-dir", run), run / "stage1", 5)
    assert RunDir(run / "stage1").latest_checkpoint().name in ("step-000004", "step-000008")
    _kill_at(_start(tmp_path, "--resume", run, "--force"), run / "stage2", 1)
    assert RunDir(run / "stage1").latest_checkpoint().name == "step-000012"
    assert RunDir(run / "stage2").latest_checkpoint() is None  # stage 2 starts again from stage 1's end
    _kill_at(_start(tmp_path, "--resume", run, "--force"), run / "stage2", 5)
    assert RunDir(run / "stage2").latest_checkpoint().name in ("step-000004", "step-000008")
    assert train(None, run, resume=True, force=True).step == 12
    assert "Traceback" not in (tmp_path / "cli.err").read_text()

    for stage in ("stage1", "stage2"):
        for step in (4, 8, 12):
            (ours, our_state), (theirs, their_state) = _checkpoint(run / stage, step), _checkpoint(reference / stage, step)
            assert ours.keys() == theirs.keys() and len(ours) > 200
            different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
            assert not different, f"{stage} step {step}: {len(different)} of {len(ours)} tensors differ, e.g. {different[:3]}"
            assert our_state == their_state
        assert [r["step"] for r in records(run / stage)] == list(range(1, 13)), f"{stage}: each step once"
        assert [r["loss"] for r in records(run / stage)] == [r["loss"] for r in records(reference / stage)]
        assert [r["psnr"] for r in records(run / stage, "val")] == [r["psnr"] for r in records(reference / stage, "val")]


def test_a_resume_keeps_the_stages_and_the_cli_picks_them(tmp_path, sd_file, small_config, capsys):
    """--stage sets model.stages; a resume that would change the stages is refused."""
    config = tmp_path / "run.toml"
    config.write_text(to_toml(small_config(sd_file, "train.steps=1", "val.every=0")))
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--stage", "both"]) == 0
    assert load_config(tmp_path / "run" / "config.toml").model.stages == (1, 2)
    assert RunDir(tmp_path / "run" / "stage2").steps() == [1]
    code = main(["train", "--resume", str(tmp_path / "run"), "--stage", "2", "--force"])
    assert code == 2 and "model.stages: (1, 2) -> (2,): the stages decide how the run directory is laid out" in \
        capsys.readouterr().err


@pytest.mark.parametrize("sets, message", [
    (["model.stages=[2, 1]"], r"model.stages must be one of \[\[1\], \[2\], \[1, 2\]\], got \[2, 1\]"),
    (["model.stage1_steps=5"], "model.stage1_steps .* sets stage 1's length in a run of both stages"),
    (["val.holdout=0"], r"val.every = 3 needs val.holdout > 0: .* never the test split"),
    (["val.holdout=1"], r"val.images \(2\) must be <= val.holdout \(1\)"),
    (["data.force=true"], r"data.force applies to the datasets with published lists \(qxs, sar2opt, spacenet6"),
])
def test_bad_stage_and_validation_settings_name_the_key(sd_file, small_config, sets, message):
    with pytest.raises(ValueError, match=message):
        small_config(sd_file, *sets)


# --- validation: held out of the training list, never the test list ----------------------------


def test_holdout_is_fixed_and_disjoint_from_training(small_config, sd_file):
    config = small_config(sd_file, "data.count=10", "val.holdout=3", "val.images=2")
    kept, validated = training_split(config.data, config.val)
    held = holdout_indices(10, 3)
    assert held == holdout_indices(10, 3) and len(set(held)) == 3  # the same pairs in every run on the list
    assert sorted(kept.indices + held) == list(range(10))
    assert validated.indices == held[:2]
    with pytest.raises(ValueError, match="val.holdout = 10: the training list has 10 pairs; hold out fewer"):
        holdout_indices(10, 10)


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


def test_validation_never_reads_a_file_of_the_test_list(tmp_path, monkeypatch, small_config):
    """SAR2Opt with a user's training list of 6 pairs (data.force) and every file of the frozen test
    list present but not an image: a run that validates reads the 6 training pairs (2 of them held
    out) and not one file of the test list; the reader is asked for the training split only."""
    root = tmp_path / "sar2opt"
    names = [f"trainB/{i}_{i}.jpg" for i in range(6)]
    for i, name in enumerate(names):
        _png(root / name, i)
        _png(root / name.replace("trainB", "trainA"), 100 + i)
    for name in frozen.read_frozen("sar2opt", "test"):  # 627 EO files and their SAR partners, unreadable
        for path in (root / name, root / name.replace("testB", "testA")):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not an image")
    user_list = tmp_path / "train_eo_list.txt"
    user_list.write_text("".join(f"{n}\n" for n in names))
    read, splits = [], []
    from cdiff.data import imageio
    from cdiff.train import data

    real_read, real_open = imageio.read_image, data.open_dataset
    monkeypatch.setattr(imageio, "read_image", lambda path, *a, **k: (read.append(Path(path)), real_read(path, *a, **k))[1])
    monkeypatch.setattr(data, "open_dataset", lambda *a, **k: (splits.append(k.get("split")), real_open(*a, **k))[1])
    sets = [f"data.root={root}", f"data.train_list={user_list}", "data.crop=64", "train.steps=2",
            "val.every=1", "val.holdout=2"]
    with pytest.raises(ValueError, match="is not the published sar2opt train list .* pass force=True"):
        train(small_config(micro_model(tmp_path / "m.safetensors"), "data.kind=sar2opt", *sets), tmp_path / "refused")
    read.clear()
    train(small_config(tmp_path / "m.safetensors", "data.kind=sar2opt", *sets, "data.force=true"), tmp_path / "run")
    assert [r["step"] for r in records(tmp_path / "run", "val")] == [1, 2]  # validation ran
    assert read and not [p for p in read if p.parent.name in ("testA", "testB")]
    assert {p.relative_to(root).as_posix() for p in read if p.parent.name == "trainB"} == set(names)
    assert set(splits) == {"train"}


# --- the documented commands ---------------------------------------------------------------------


def _commands(text: str) -> list[list[str]]:
    """Every `cdiff ...` command line of ``text`` (a leading "# " dropped, continuations joined,
    trailing comments and "..." dropped), split as the shell would."""
    import shlex

    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.lstrip("# ").strip()
        if line.startswith("cdiff "):
            out.append([word for word in shlex.split(line, comments=True)[1:] if word != "..."])
    return out


@pytest.mark.parametrize("source", ["docs/training.md", "configs/qxs-saropt.toml", "configs/sar2opt.toml",
                                    "configs/sar2eo.toml", "configs/spacenet6.toml"])
def test_the_documented_training_commands_parse(source):
    """The commands of training.md and of the dataset configs' comments are the real CLI's, their
    fetch names cdiff's, and --config names a config that exists."""
    from cdiff import zoo
    from cdiff.cli import build_parser

    text = (ROOT / source).read_text()
    if source.endswith(".md"):  # the ```text blocks only
        text = "\n".join(re.findall(r"```text\n(.*?)```", text, flags=re.S))
    commands = _commands(text.replace("\\\n#", " "))
    assert len(commands) >= 4
    for argv in commands:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{source}: `cdiff {' '.join(argv)}` is not a valid command")
        if argv[0] == "fetch":
            assert all(name in zoo.MODELS for name in args.names), argv
        if getattr(args, "config", None):
            assert (ROOT / args.config).is_file(), argv
