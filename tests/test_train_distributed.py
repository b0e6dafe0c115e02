"""cdiff train, part 4: two gloo processes (as torchrun runs them) train like one process with
the same global batch."""

import multiprocessing
import os
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from cdiff import cdiffset_surgery, load_unet
from cdiff.testing import micro_model
from cdiff.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = ("train.steps=4", "train.accumulation=2", "val.every=2", "train.save_every=4", "data.workers=0")
# Per weight tensor: max |two processes - one process| <= TOLERANCE x max |one process - start|,
# i.e. the updates of 4 AdamW steps agree to 0.1% (measured: 1.4e-4; float sums in another order).
TOLERANCE = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, config, run_dir, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    done = train(config, run_dir)
    save_file(done.task.unet.state_dict(), str(out / f"rank{rank}.safetensors"))
    os._exit(0)


def test_two_gloo_ranks_match_one_process(tmp_path, small_config):
    import torch._dynamo  # noqa: F401 (creating an optimiser imports it: once here, not in each child)

    model = micro_model(tmp_path / "micro.safetensors")
    port, context = _free_port(), multiprocessing.get_context("fork")
    config = small_config(model, *STEPS, "train.batch_size=2")
    ranks = [context.Process(target=_rank, args=(r, port, config, tmp_path / "two", tmp_path)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    assert [p.exitcode for p in ranks] == [0, 0]
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP keeps the ranks identical

    # One process, per-process batch 4 = 2 x 2 processes: the same samples, noise and timesteps.
    one = train(small_config(model, *STEPS, "train.batch_size=4"), tmp_path / "one").task.unet.state_dict()
    start = cdiffset_surgery(load_unet(model)).state_dict()  # the weights training began from
    worst = max(((rank0[k] - one[k]).abs().max() / (one[k] - start[k]).abs().max()).item() for k in one)
    print(f"two processes vs one: weight difference <= {worst:.1e} x the weights' change in training")
    assert worst <= TOLERANCE
    # Only rank 0 wrote: one start event, one log.
    log = (tmp_path / "two" / "log.jsonl").read_text()
    assert log.count('"event": "start"') == 1 and '"world_size": 2' in log and '"global_batch": 8' in log
