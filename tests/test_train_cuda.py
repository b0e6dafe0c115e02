"""cdiff train on a GPU: the step in bf16 and fp16 (gradient scaler) with fused AdamW, against the
fp32 step on the CPU; a whole run with a resume; two NCCL processes against one.

The GPU tests skip without a CUDA device (tests/test_train*.py run the same loop on the CPU);
benchmarks/gpu_check.sh runs them on a GPU. One case of the step test also runs on the CPU, so
that its comparisons are exercised (and its tolerances calibrated) where the suite runs.
"""

import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cdiff
from cdiff.train import train
from cdiff.train.cdiffset import CDiffSETTask
from cdiff.train.distributed import World
from cdiff.train.logs import Log
from cdiff.train.loop import Loop
from cdiff.train.rundir import RunDir
from cdiff.testing import SMALL_RUN, micro_model, one_thread, relative_error
from cdiff.train.configfile import load_config

CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (tests/test_train*.py run the loop on the CPU)")

# Half-precision step against the fp32 step on the CPU, as max |half - fp32| / max |fp32|: the loss,
# and the U-Net's gradients (after the scaler's unscale). Measured on the CPU's autocast (torch
# 2.14): loss 3e-4 (bf16) and 2e-5 (fp16); gradients 1.1e-2 (bf16) and 1.5e-3 (fp16). The bounds
# leave 5-100x for the GPU's other kernels; a wrong step is off by far more: a gradient left
# scaled by fp16's 65536, a missing term, a step in the wrong precision.
def small_config(model_path, *sets: str):
    # As the conftest fixture; a plain function, for the spawned NCCL ranks.
    return load_config(None, [f"model.init={model_path}", *SMALL_RUN, *sets])


LOSS_TOL = {"bf16": 5e-3, "fp16": 2e-3}
GRAD_TOL = {"bf16": 6e-2, "fp16": 2e-2}


def make_loop(model: Path, folder: Path, *sets: str) -> Loop:
    """The training loop of the micro model (cdiff.train.loop.Loop), no validation, no warm-up
    (so that the first step's lr is the full lr), no clipping (which would hide a gradient's scale)."""
    config = small_config(model, "val.every=0", "optim.warmup_steps=0", "optim.clip_grad_norm=0", *sets)
    device = torch.device("cuda", 0) if config.train.device == "cuda" else torch.device("cpu")
    task = CDiffSETTask(config, device)
    folder.mkdir(parents=True, exist_ok=True)
    return Loop(task, config, RunDir(folder), World(0, 1, device), Log(folder / "log.jsonl", enabled=False))


def batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 2, 3, 64, 64, generator=gen) * 2 - 1
    return {"sar": images[0], "eo": images[1], "position": torch.tensor([0, 1])}


STEP_CASES = [pytest.param("cpu", "fp16", True, id="cpu-fp16-channels-last")] + [
    pytest.param("cuda", precision, channels_last, marks=NEEDS_CUDA,
                 id=f"cuda-{precision}-{'channels-last' if channels_last else 'nchw'}")
    for precision in ("bf16", "fp16") for channels_last in (False, True)
]


@pytest.mark.parametrize("device, precision, channels_last", STEP_CASES)
def test_training_step_matches_fp32_and_fused_adamw_matches_plain(device, precision, channels_last, tmp_path):
    model = micro_model(tmp_path / "micro.safetensors")
    reference = make_loop(model, tmp_path / "ref", "train.precision=fp32")  # on the CPU
    loop = make_loop(model, tmp_path / "run", f"train.device={device}", f"train.precision={precision}",
                     f"model.channels_last={str(channels_last).lower()}")
    with one_thread():
        ref_loss, _, _ = reference._phase(reference.task.phases[0], [batch()])
        loss, _, norm = loop._phase(loop.task.phases[0], [batch()])  # forward in autocast, backward, unscale, clip
    unet = loop.task.unet
    assert loss.device.type == device and torch.isfinite(loss) and torch.isfinite(norm)
    assert loop.scaler.is_enabled() == (precision == "fp16")
    assert relative_error(loss.cpu(), ref_loss) <= LOSS_TOL[precision], (loss, ref_loss)
    grads = torch.cat([p.grad.float().flatten().cpu() for p in unet.parameters()])
    ref_grads = torch.cat([p.grad.flatten() for p in reference.task.unet.parameters()])
    error = relative_error(grads, ref_grads)
    print(f"{precision} {'channels-last' if channels_last else 'NCHW'}: loss {loss.item():.5f} vs fp32 "
          f"{ref_loss.item():.5f}; gradients {error:.1e} x max|fp32 gradient|")
    assert error <= GRAD_TOL[precision]

    # The trainer's fused AdamW (through the scaler, as the loop steps it) against torch's plain
    # single-tensor AdamW on copies of the same parameters and gradients.
    optimizer = loop.task.optimizers["unet"]
    assert optimizer.defaults["fused"] is True
    start = [p.detach().clone() for p in unet.parameters()]
    copies = [s.clone().requires_grad_() for s in start]
    for copy, p in zip(copies, unet.parameters()):
        copy.grad = p.grad.clone()
    group = optimizer.param_groups[0]
    plain = torch.optim.AdamW(copies, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                              weight_decay=group["weight_decay"], foreach=False, fused=False)
    with one_thread():
        loop.scaler.step(optimizer)
        plain.step()
    change = max((c.detach() - s).abs().max().item() for c, s in zip(copies, start))
    worst = max((p.detach() - c.detach()).abs().max().item() for p, c in zip(unet.parameters(), copies))
    print(f"fused vs plain AdamW: {worst:.1e} (largest update {change:.1e})")
    # The two compute the same fp32 formula in another order: a few ulp of the weights (~1e-7).
    assert change > 0 and worst <= 1e-3 * change, f"fused AdamW differs from plain AdamW by {worst:.1e}"


@NEEDS_CUDA
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_run_with_channels_last_resumes_close_to_uninterrupted(precision, tmp_path):
    # A whole run on the GPU: data loading with pinned memory, validation, checkpoints with the
    # CUDA RNG states, and a resume whose optimiser moments must take the channels-last layout of
    # their parameters (fused AdamW on CUDA refuses a mix). GPU kernels are not bit-deterministic
    # (atomic adds in convolution backward), so the resumed run ends close to, not equal to, the
    # uninterrupted one: within 5% of the weights' change, where a lost optimiser state, RNG
    # state or data position changes the last steps' updates by their whole size.
    model = micro_model(tmp_path / "micro.safetensors")
    options = (f"train.precision={precision}", "train.device=cuda", "model.channels_last=true", "train.save_every=3")
    whole = train(small_config(model, *options), tmp_path / "whole").task.unet.state_dict()
    assert train(small_config(model, *options), tmp_path / "resumed", stop_at=3).step == 3
    resumed = train(None, tmp_path / "resumed", resume=True)
    assert resumed.step == 6
    start = cdiff.cdiffset_surgery(cdiff.load_unet(model)).state_dict()
    ours = resumed.task.unet.state_dict()
    worst = max(((ours[k] - whole[k]).abs().max() / (whole[k] - start[k].cuda()).abs().max().clamp_min(1e-12)).item()
                for k in whole)
    print(f"{precision}: resumed vs uninterrupted, {worst:.1e} x the weights' change")
    assert worst <= 5e-2
    records = [line for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines() if '"train"' in line]
    assert records and all('"peak_memory_mb"' in line and "NaN" not in line for line in records)
    loaded = cdiff.load_pipeline(tmp_path / "whole" / "checkpoints" / "latest" / "model.safetensors")
    assert torch.equal(loaded.unet.conv_in.weight, whole["conv_in.weight"].cpu())


# --- two NCCL processes ---------------------------------------------------------------------------

STEPS = ("train.steps=4", "train.accumulation=2", "val.every=2", "train.save_every=4", "data.workers=0",
         "train.device=cuda", "train.precision=fp32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_tf32() -> None:
    # fp32 throughout, so that one process and two differ by the order of sums alone.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _rank(rank: int, port: int, model, run_dir, out) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    _no_tf32()
    done = train(small_config(model, *STEPS, "train.batch_size=2"), run_dir)
    save_file({k: v.cpu() for k, v in done.task.unet.state_dict().items()}, str(out / f"rank{rank}.safetensors"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_nccl_ranks_match_one_cuda_process(tmp_path):
    # As tests/test_train_distributed.py with gloo: 2 processes of batch 2 train like 1 of batch 4.
    # Spawned, not forked: this process has already initialised CUDA.
    model = micro_model(tmp_path / "micro.safetensors")
    port, context = _free_port(), multiprocessing.get_context("spawn")
    ranks = [context.Process(target=_rank, args=(r, port, model, tmp_path / "two", tmp_path)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=240)
    assert [p.exitcode for p in ranks] == [0, 0]
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP keeps the ranks identical
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    _no_tf32()
    try:
        one = train(small_config(model, *STEPS, "train.batch_size=4"), tmp_path / "one").task.unet.state_dict()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    start = cdiff.cdiffset_surgery(cdiff.load_unet(model)).state_dict()
    worst = max(((rank0[k] - one[k].cpu()).abs().max() / (one[k].cpu() - start[k]).abs().max()).item() for k in one)
    print(f"two NCCL processes vs one: weight difference <= {worst:.1e} x the weights' change in training")
    assert worst <= 1e-3
    log = (tmp_path / "two" / "log.jsonl").read_text()
    assert log.count('"event": "start"') == 1 and '"world_size": 2' in log and '"global_batch": 8' in log
