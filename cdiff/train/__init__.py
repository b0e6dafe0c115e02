"""Training: ``cdiff train`` and ``cdiff cache-latents`` (see docs/training.md and
docs/s2o-npde.md).

    config.py       the run config: one frozen dataclass per section
    configfile.py   run configs as TOML files, with --set overrides
    kinds.py        the table of model kinds: [model] section, task, stages, and how cdiff translate opens one
    run.py          train(): start or resume a run (of one stage or several in order), in one process or under torchrun
    task.py         what a model provides to the loop: the Task protocol and its Phases
    loop.py         the model-agnostic loop: phases, accumulation, precision, clipping, NaN policy,
                    logging, validation and checkpoint schedule
    rundir.py       the run directory: atomic checkpoints, keep-last-N, keep-every-N and best, training state
    data.py         the training list and the pairs held out of it for validation; the data stream: order,
                    per-process shards, seeded augmentation
    seeds.py        seeded random streams; the global RNG states
    optim.py        AdamW and the lr schedules (warm-up + cosine, constant, linear decay)
    ema.py          the EMA of the weights
    logs.py         log.jsonl, TensorBoard, validation grids
    validation.py   held-out PSNR, SSIM, SCC and the grid's columns, for every model
    distributed.py  torch.distributed as torchrun launches it
    start.py        the model a C-DiffSET stage starts from (checkpoint, model.init, or the tiny stack)
    cdiffset.py     the C-DiffSET model: its [model] section, its two stages, training step and validation
    s2o_npde.py     the S2O-NPDE baseline (cdiff.npde): its [model] section, two phases, validation
    distill.py      ``cdiff distill``: a few-step student of a C-DiffSET teacher (consistency or progressive)
    latents.py      the latent cache
"""

from cdiff.train.config import RunConfig
from cdiff.train.configfile import load_config
from cdiff.train.run import train

__all__ = ["RunConfig", "load_config", "train"]
