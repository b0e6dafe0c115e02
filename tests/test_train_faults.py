"""cdiff train, part 5: faults. A run killed with SIGKILL resumes to the uninterrupted run's tensors,
every one; one process per run directory (the lock); SIGINT / SIGTERM save the step and say how
to continue; a full disk during a save keeps the previous checkpoint; leftovers of a killed write
are removed by the next run; configs that would be ignored or surprise are refused or warned of.

The runs are cdiff's tiny C-DiffSET stack (init = "tiny") on 64-px synthetic pairs, on one thread.
"""

import errno
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cdiff
from cdiff.cli import main
from cdiff.signals import Interrupted, StopRequests
from cdiff.train import load_config, train
from cdiff.train.configfile import to_toml
from cdiff.train.rundir import RunDir, read_state
from cdiff.weightfile import read_state_dict
from cdiff.testing import log_records as records

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "synthetic-tiny.toml"
# The tiny stack with random weights, 20 steps of batch 1 on 4 pairs (4 more held out) with an EMA, a
# checkpoint every 5 steps, a log line every step.
RUN = ["model.init=tiny", "model.fresh_unet=false", "model.prediction=epsilon", "optim.lr=1e-3",
       "data.hflip=true", "data.vflip=true", "data.rot90=true", "data.count=8", "train.batch_size=1",
       "train.steps=20", "train.save_every=5", "train.keep_last=2", "train.log_every=1", "optim.warmup_steps=5",
       "model.ema_decay=0.9", "val.every=0", "val.holdout=4", "val.images=4", "val.batch_size=4"]
# As long as a test may need: it is stopped by a signal long before its end.
LONG = [*RUN, "train.steps=100000", "train.save_every=100000"]


def tiny_config(*sets):
    return load_config(TINY, [*RUN, *sets])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 20-step run."""
    folder = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(tiny_config(), folder / "run")
    torch.set_num_threads(threads)
    return folder / "run"


def start_cli(tmp_path: Path, run_dir: Path, sets=RUN) -> subprocess.Popen:
    """``cdiff train`` of the tiny config in a process of its own (one thread), stderr to a file."""
    config = tmp_path / f"{run_dir.name}.toml"
    config.write_text(to_toml(load_config(TINY, sets)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / f"{run_dir.name}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "cdiff", "train", "--config", str(config), "--run-dir",
                                 str(run_dir)], env=env, stdout=subprocess.DEVNULL, stderr=err)




def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before step {step}"
        done = [r["step"] for r in records(run_dir)]
        if done and done[-1] >= step:
            return done[-1]
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


def checkpoint_tensors(run_dir: Path, step: int) -> dict:
    """Every tensor of a checkpoint (U-Net, VAE, EMA, optimiser moments, RNG states) and state.json."""
    folder = run_dir / "checkpoints" / f"step-{step:06d}"
    tensors = {f"{f.name}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    return tensors, json.loads((folder / "state.json").read_text())


def assert_same_run(run_dir: Path, reference_dir: Path, step: int = 20) -> None:
    (ours, our_state), (theirs, their_state) = checkpoint_tensors(run_dir, step), checkpoint_tensors(reference_dir, step)
    assert ours.keys() == theirs.keys() and len(ours) > 2000
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} of {len(ours)} tensors differ, e.g. {different[:3]}"
    assert our_state == their_state
    steps = [r["step"] for r in records(run_dir)]
    assert steps == list(range(1, step + 1)), "log.jsonl: each step once, in order"
    assert [r["loss"] for r in records(run_dir)] == [r["loss"] for r in records(reference_dir)]


# --- a kill, the lock, signals ---------------------------------------------------------------


def test_killed_run_resumes_bit_identical(tmp_path, reference):
    """kill -9 after step 7 (a checkpoint at 5): the lock is left, named as stale; with --force the
    run resumes from step 5 and ends with every tensor of the uninterrupted run; the steps 6-7 the
    killed run logged are logged once; temporaries of cdiff's naming are removed, a user's kept."""
    run_dir = tmp_path / "run"
    process = start_cli(tmp_path, run_dir)
    wait_for_step(process, run_dir, 7)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert RunDir(run_dir).latest_checkpoint().name in ("step-000005", "step-000010", "step-000015")
    owner = json.loads((run_dir / ".lock").read_text())
    assert owner["pid"] == process.pid and owner["host"] == socket.gethostname()
    leftovers = [run_dir / ".config.toml.0123abcd.tmp", run_dir / "checkpoints" / ".step-000015.89abcdef.tmp",
                 run_dir / "checkpoints" / ".tmp-step-000015-x"]
    leftovers[0].write_text("half a config")
    for folder in leftovers[1:]:
        folder.mkdir()
    users = [run_dir / "notes.tmp", run_dir / ".results.0123abcd.tmp", run_dir / "checkpoints" / "my-copy"]
    users[0].write_text("mine")
    users[1].write_text("mine")
    users[2].mkdir()

    with pytest.raises(ValueError, match=rf"locked .* by cdiff train \(pid {process.pid} on .*no longer running"):
        train(None, run_dir, resume=True)
    assert all(p.exists() for p in leftovers)  # refused: nothing touched
    assert train(None, run_dir, resume=True, force=True).step == 20
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in users)
    assert not (run_dir / ".lock").exists()
    assert_same_run(run_dir, reference)


def test_a_second_trainer_is_refused_and_sigterm_saves_the_step(tmp_path):
    """While a run trains, a new run in its folder, a resume, and a resume with --force are refused
    with the owner's pid, and touch nothing (a temporary folder of the live run stays). SIGTERM
    then stops it at the end of a step with a checkpoint of that step, one line saying how to
    continue, exit status 143, the lock given back; --resume continues from that step."""
    run_dir = tmp_path / "run"
    process = start_cli(tmp_path, run_dir, LONG)
    wait_for_step(process, run_dir, 2)
    live_temporary = run_dir / "checkpoints" / ".tmp-step-000020-x"  # as a save in flight would have it
    live_temporary.mkdir()
    config = load_config(TINY, LONG)
    for attempt in (lambda: train(config, run_dir), lambda: train(None, run_dir, resume=True),
                    lambda: train(None, run_dir, resume=True, force=True)):
        with pytest.raises(ValueError, match=rf"{run_dir} is in use by cdiff train \(pid {process.pid} on "):
            attempt()
    assert live_temporary.exists() and process.poll() is None
    live_temporary.rmdir()

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    err = (tmp_path / "run.err").read_text()
    assert "Traceback" not in err
    last = records(run_dir, "event")[-1]
    step = last["step"]
    assert last["event"] == "interrupted" and last["signal"] == "SIGTERM"
    assert err.splitlines()[-1] == (f"cdiff: stopped by SIGTERM after step {step}, saved in {run_dir}/checkpoints/"
                                    f"step-{step:06d}; continue with 'cdiff train --resume {run_dir}'")
    assert RunDir(run_dir).latest_checkpoint().name == f"step-{step:06d}" and not (run_dir / ".lock").exists()
    assert train(None, run_dir, resume=True, stop_at=step + 1).step == step + 1
    assert [r["step"] for r in records(run_dir)] == list(range(1, step + 2))


def test_ctrl_c_saves_the_step(tmp_path):
    """SIGINT (Ctrl-C): the same as SIGTERM, exit status 130."""
    run_dir = tmp_path / "run"
    process = start_cli(tmp_path, run_dir, LONG)
    wait_for_step(process, run_dir, 1)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 128 + signal.SIGINT
    err = (tmp_path / "run.err").read_text()
    step = records(run_dir)[-1]["step"]
    assert "Traceback" not in err and f"cdiff: stopped by SIGINT after step {step}, saved in" in err.splitlines()[-1]
    document, _ = read_state(RunDir(run_dir).latest_checkpoint())
    assert document["step"] == step and not (run_dir / ".lock").exists()


def test_stop_requests_wait_for_a_safe_point_and_a_repeat_stops_at_once():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequests("the work") as stops:
        with pytest.raises(Interrupted, match="stopped by SIGTERM before the work began; nothing was saved") as stop:
            signal.raise_signal(signal.SIGTERM)  # not deferred yet: at once
        assert stop.value.exit_code == 143
        stops.defer()
        signal.raise_signal(signal.SIGINT)
        assert stops.requested == "SIGINT"  # noted, not raised
        signal.raise_signal(signal.SIGTERM)  # the other signal (torchrun's SIGTERM after a Ctrl-C): still waits
        with pytest.raises(Interrupted, match="stopped at once by a second SIGINT") as stop:
            signal.raise_signal(signal.SIGINT)
        assert stop.value.exit_code == 130
    assert signal.getsignal(signal.SIGTERM) is previous


def _s2o_rank(rank: int, port: int, run_dir: Path, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        train(load_config(ROOT / "configs" / "s2o_npde-synthetic-tiny.toml"), run_dir)
    except ValueError as err:
        (out / f"rank{rank}.txt").write_text(str(err))
        os._exit(2)
    os._exit(0)


def test_s2o_npde_under_torchrun_is_refused_before_anything_is_written(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=_s2o_rank, args=(r, port, tmp_path / "run", tmp_path)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    assert [p.exitcode for p in ranks] == [2, 2]
    assert "model.kind = 's2o_npde' trains in one process" in (tmp_path / "rank0.txt").read_text()
    assert not (tmp_path / "run").exists()


# --- a full disk, leftovers, a resume without a checkpoint -----------------------------------


def _fail_second_save(monkeypatch, how: str) -> None:
    """Make the save of step 2 fail for want of space, as safetensors reports it or as Python does."""
    import safetensors.torch

    if how == "safetensors":
        from safetensors import SafetensorError

        real = safetensors.torch.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if "step-000002" in str(filename):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    else:
        real = Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name == "state.json" and "step-000002" in str(self):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("how", ["safetensors", "python"])
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, how):
    """The save of step 2 runs out of space: one line names the folder and the checkpoint that stays
    the newest; nothing of step 2 is left; --resume continues from step 1."""
    run_dir = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(to_toml(tiny_config("train.steps=2", "train.save_every=1")))
    _fail_second_save(monkeypatch, how)
    assert main(["train", "--config", str(config), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"cdiff: error: no space left on the device of {run_dir}/checkpoints: checkpoint step-000002" in err
    assert f"the newest checkpoint is still {run_dir}/checkpoints/step-000001" in err
    assert "Traceback" not in err and "SafetensorError" not in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001"]  # no temporary left
    assert os.readlink(run_dir / "latest") == "checkpoints/step-000001" and not (run_dir / ".lock").exists()
    monkeypatch.undo()
    if how == "safetensors":  # once is enough
        assert train(None, run_dir, resume=True).step == 2


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    run = RunDir(tmp_path / "run")
    run.check_writable()
    run.write_config(to_toml(tiny_config()))  # a run stopped before its first save
    with pytest.raises(ValueError, match=r"run: no checkpoint to resume from \(the run stopped before its first save"):
        train(None, run.path, resume=True)
    assert not (run.path / ".lock").exists() and not (run.path / "log.jsonl").exists()


def test_the_next_run_removes_only_cdiffs_own_leftovers(tmp_path):
    run = RunDir(tmp_path)
    run.check_writable()
    run.val_dir.mkdir()
    ours = [tmp_path / ".config.toml.0123abcd.tmp", tmp_path / ".config.toml.1234.tmp", tmp_path / ".latest.89abcdef.tmp",
            tmp_path / ".probe-ab_cd123", run.checkpoints / ".step-000004.0123abcd.tmp", run.checkpoints / ".step-000002.0123abcd.old",
            run.val_dir / ".step-000003.png.0123abcd.tmp"]
    theirs = [tmp_path / ".data.0123abcd.tmp", tmp_path / "config.toml.tmp", tmp_path / ".config.toml.xyz.tmp",
              run.checkpoints / ".backup.0123abcd.tmp", run.val_dir / ".mine.png.0123abcd.tmp", tmp_path / "x.tmp"]
    for path in ours + theirs:
        path.mkdir() if "step-00000" in path.name and path.parent == run.checkpoints else path.write_text("")
    assert sorted(run.clean()) == sorted(ours)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


# --- configs that would be ignored, or surprise ------------------------------------------------


def test_model_unet_with_the_tiny_stack_is_refused_and_a_resume_does_not_change_the_start(tmp_path):
    with pytest.raises(ValueError, match=r"model.unet \(release.safetensors\) needs model.init to be a model file"):
        tiny_config("model.unet=release.safetensors")
    run = RunDir(tmp_path / "run")
    run.check_writable()
    run.write_config(to_toml(tiny_config()))
    changed = tiny_config("model.tiny_seed=3")
    with pytest.raises(ValueError, match=r"model.tiny_seed: 0 -> 3: these choose the weights a new run starts from"):
        train(changed, run.path, resume=True, force=True)


def test_a_warm_up_longer_than_the_run_is_warned_of_once(tmp_path, capsys):
    train(tiny_config("train.steps=2", "optim.warmup_steps=8", "optim.lr=1e-3"), tmp_path / "run")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cdiff train: warning")]
    assert warnings == ["cdiff train: warning: optim.warmup_steps 8 is longer than the run (train.steps 2): the lr "
                        "rises to 0.000125 at most, never to optim.lr 0.001"]
    assert records(tmp_path / "run")[-1]["lr"] == pytest.approx(1e-3 * 2 / 8)  # the lr set after the last step


def test_translate_says_which_checkpoint_of_a_run_directory_it_uses(tmp_path, capsys):
    from cdiff.translate import model_file

    run = RunDir(tmp_path / "run")
    run.check_writable()
    run.write_config(to_toml(tiny_config()))
    for step in (2, 4):
        run.save(step, lambda folder: (folder / "state.json").write_text("{}"), keep_last=2, best_step=None)
    assert model_file(run.path) == run.checkpoints / "step-000004" / "model.safetensors"
    assert capsys.readouterr().out == (f"cdiff translate: run {run.path}: checkpoint step-000004, the run's newest "
                                       "(no validation chose a best)\n")
    run.save(6, lambda folder: (folder / "state.json").write_text("{}"), keep_last=2, best_step=2)
    assert model_file(run.path) == run.path / "best" / "model.safetensors"
    assert capsys.readouterr().out == (f"cdiff translate: run {run.path}: checkpoint step-000002, the run's best "
                                       "(by validation); its newest is step-000006\n")


# --- where loaded weights sit -----------------------------------------------------------------


def test_loaded_tensors_sit_in_aligned_memory(tmp_path):
    """Read tensors sit at their file offsets (not 64-byte aligned); the CPU's 1x1 convolution sums
    in an order that depends on the weights' address, so a model loaded for a resume would compute
    ~1e-7 apart from the one that trained. Every tensor the one reader returns is 64-byte aligned."""
    path = cdiff.save_native(tmp_path / "tiny.safetensors", *_tiny_parts())
    for name, tensor in read_state_dict(path).items():
        assert tensor.data_ptr() % 64 == 0, name
    pipeline = cdiff.load_pipeline(path, dtype=torch.float32)
    assert all(p.data_ptr() % 64 == 0 for p in pipeline.unet.parameters())


def _tiny_parts():
    from cdiff.testing import tiny_pipeline

    pipeline = tiny_pipeline(0)
    return pipeline.unet, pipeline.vae, pipeline.context
