"""cdiff train, part 3: checkpoints. A resumed run ends bit-identical to an uninterrupted one; a
process killed mid-save leaves a loadable checkpoint; the run directory recovers and prunes."""

import json
import multiprocessing
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

import cdiff
from cdiff.testing import micro_model
from cdiff.train import rundir, train
from cdiff.train.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")
# Accumulation, EMA, augmentation (flips and rotations of the images) and a validation in the middle.
OPTIONS = ("train.accumulation=2", "model.ema_decay=0.9", "train.save_every=2", "val.every=3", "train.keep_last=2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_config):
    """(model file, run dir) of the uninterrupted 6-step run."""
    folder = tmp_path_factory.mktemp("reference")
    model = micro_model(folder / "micro.safetensors")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(small_config(model, *OPTIONS), folder / "run")
    torch.set_num_threads(threads)
    return model, folder / "run"


def _final(run_dir):
    """Every tensor of the last checkpoint: U-Net, EMA, optimiser state."""
    folder = run_dir / "checkpoints" / "step-000006"
    tensors = {}
    for name in ("model.safetensors", "model_ema.safetensors", "state.safetensors"):
        tensors.update({f"{name}/{k}": v for k, v in load_file(folder / name).items() if not k.startswith("rng.")})
    return tensors


def _assert_identical(run_dir, reference_dir):
    ours, theirs = _final(run_dir), _final(reference_dir)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    losses = [[json.loads(line)["loss"] for line in open(d / "log.jsonl") if '"kind": "train"' in line]
              for d in (run_dir, reference_dir)]
    assert losses[0][-1] == losses[1][-1]


def test_resume_is_bit_identical(tmp_path, reference, small_config):
    model, reference_dir = reference
    config = small_config(model, *OPTIONS)
    assert train(config, tmp_path / "run", stop_at=4).step == 4  # stops between checkpoints: saves step 4
    done = train(None, tmp_path / "run", resume=True)
    assert done.step == 6
    _assert_identical(tmp_path / "run", reference_dir)
    # keep_last 2 plus the best; the links; the validation grids; the checkpoint is a model.
    best = json.loads((done.checkpoint / "state.json").read_text())["best"]
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == sorted({"step-000004", "step-000006", f"step-{best['step']:06d}"})
    assert os.readlink(tmp_path / "run" / "latest") == "checkpoints/step-000006"
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (done.checkpoint, *done.checkpoint.iterdir()):  # the modes of any mkdir and open()
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~umask, path
    assert os.readlink(tmp_path / "run" / "best") == f"checkpoints/step-{best['step']:06d}"
    assert sorted(p.name for p in (tmp_path / "run" / "val").iterdir()) == ["step-000003.png", "step-000006.png"]
    pipeline = cdiff.load_pipeline(tmp_path / "run" / "best" / "model.safetensors")
    assert pipeline.translate(torch.rand(1, 3, 64, 64) * 2 - 1, steps=2).eo.shape == (1, 3, 64, 64)


def _train_and_die(config, run_dir, stage, occurrence):
    torch.set_num_threads(1)
    seen = {"n": 0}

    def hook(name):
        if name == stage:
            seen["n"] += 1
            if seen["n"] == occurrence:
                os._exit(17)  # as a kill: no cleanup, no flush

    rundir.save_hook = hook
    train(config, run_dir)
    os._exit(0)


@pytest.mark.parametrize("stage", ["state", "linked"])
def test_killed_mid_save_leaves_a_loadable_checkpoint(tmp_path, reference, small_config, stage):
    """Kill the process inside its second save (step 3's, the best; step 2's is done); resume; end
    like the reference. Stages: after the model file and the state tensors (before state.json),
    after the rename and the links (before old checkpoints are deleted)."""
    model, reference_dir = reference
    config = small_config(model, *OPTIONS)
    child = multiprocessing.get_context("fork").Process(target=_train_and_die,
                                                        args=(config, tmp_path / "run", stage, 2))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 17
    newest = RunDir(tmp_path / "run").latest_checkpoint()
    assert newest.name == ("step-000002" if stage == "state" else "step-000003")
    cdiff.load_pipeline(newest / "model.safetensors")  # loadable
    with pytest.raises(ValueError, match="no longer running"):  # the killed process's lock is left
        train(None, tmp_path / "run", resume=True)
    assert train(None, tmp_path / "run", resume=True, force=True).step == 6
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    _assert_identical(tmp_path / "run", reference_dir)


def test_run_directory_ignores_and_cleans_leftovers(tmp_path):
    run = RunDir(tmp_path)
    run.check_writable()

    def write(folder):
        (folder / "state.json").write_text("{}")

    for step in (1, 2, 3):
        run.save(step, write, keep_last=1, best_step=1)
    assert run.steps() == [1, 3]  # the last one and the best one
    (run.checkpoints / ".tmp-step-000004-x").mkdir()  # a save killed before its rename
    (run.checkpoints / ".trash-step-000002-9").mkdir()  # a deletion killed midway
    (run.checkpoints / "step-000005").mkdir()  # not a checkpoint: no state.json
    assert run.latest_checkpoint().name == "step-000003"
    run.clean()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-000001", "step-000003", "step-000005"]
