"""The C-DiffSET training step, as the official release trains: the ``[model]`` section, its two
stages, and the task that cdiff.train.loop runs.

The stages (``model.stages``; the release trains them as two runs, GeoSET's ``baselines/sd21-ft``
and ``baselines/c-diffset``):

    stage 1   "SD2.1 FT": SD 2.1's U-Net with conv_in widened to 8 channels (both halves the
              original x 0.5), 4 outputs, plain MSE on the prediction (cdiff.train.start)
    stage 2   C-DiffSET: stage 1's final U-Net + the variance channel (zero weights: variance
              exactly 1), the C-Diff loss (``model.loss``)

``stages = [1, 2]`` runs both in one run directory, each in a folder of its own (``stage_runs``):
``RUN_DIR/stage1`` and ``RUN_DIR/stage2``, each a complete run directory (cdiff.train.rundir) with
its own optimiser, warm-up and cosine schedule over its steps; stage 2 starts from the model file
of stage 1's last checkpoint. ``[1]`` or ``[2]`` runs one stage in the run directory itself;
``[2]`` (the default) from ``model.init`` is cdiff's one-step fine-tune.

Per sample at stream position g (cdiff.train.data):
1. SAR and EO are encoded by the frozen VAE as the scaled posterior mean, in fp32 whatever
   train.precision is (or read from a latent cache made by ``cdiff cache-latents``);
2. t ~ U{0..999} and noise ~ N(0, I) are drawn from a generator seeded by (seed, g); the EO
   latent is noised: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise (cdiff.DDPM);
3. the U-Net sees [SAR latent | x_t] (8 channels), t and the model's fixed prompt embedding, and
   returns 4 prediction channels (and, in stage 2, 1 raw-variance channel);
4. the loss: stage 1, plain L2 on the 4 channels; stage 2, ``confidence_nll(target, prediction,
   raw variance, a_t)`` (the C-Diff beta-NLL), or with ``loss = "mse"`` plain L2 on the 4 channels
   (the paper's Table 3); target = noise (``prediction = "epsilon"``), the clean EO latent
   (``"sample"``, the release's x0 option) or v (``"v_prediction"``, cdiff.DDPM.velocity). The
   checkpoint's native file records the prediction, and sampling reads the output as such
   (cdiff.schedulers.split_prediction).

Logged terms (means over elements, their sum is the loss): ``loss_residual`` = w (target -
prediction)^2 / (2 var), the confidence-weighted fit; ``loss_logvar`` = w (log var + log 2 pi) / 2,
the regulariser that keeps the variance from growing; with w = stopgrad(var)^sqrt(a_t).
``mean_variance`` is the mean predicted variance (1 at the start of fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from cdiff.load import load_unet
from cdiff.loss import LOG_2PI, confidence_nll, variance_from_raw
from cdiff.native import save_native
from cdiff.pipeline import DEFAULT_PROMPT, Pipeline
from cdiff.schedulers import DDPM, PREDICTION_TYPES
from cdiff.train.config import RunConfig
from cdiff.train.data import image_augment, latent_task_pairs
from cdiff.train.ema import EMA
from cdiff.train.latents import batch_latents, cached_samples
from cdiff.train.optim import adamw, lr_schedule
from cdiff.train.rundir import CHECKPOINTS, step_name
from cdiff.train.seeds import generator
from cdiff.train.start import MODEL_FILE, TINY, start_pipeline
from cdiff.train.task import Phase
from cdiff.train.validation import score_pairs

LOSSES = ("cdiff", "mse")
EMA_FILE = "model_ema.safetensors"
STAGE_RECIPES = ((1,), (2,), (1, 2))  # model.stages: stage 1 alone, stage 2 alone, or both in order


@dataclass(frozen=True)
class CDiffSETConfig:
    kind: str = "cdiffset"
    init: str = ""  # the starting model: any file cdiff.load_pipeline reads (a native file from `cdiff convert`),
    #                 or "tiny": cdiff's tiny stack with seeded random weights (for CPU trials)
    unet: str = ""  # optional: a release U-Net file (8-in/4-out or 8-in/5-out) to start from; VAE and prompt from init
    pad_to_77: bool = False  # init's prompt embedding is SD's 77-token padded one (the release's is unpadded)
    stages: tuple[int, ...] = (2,)  # [1, 2]: the release's two stages in order (stage 1, 8-in/4-out with MSE, then
    #                                 stage 2 from its final U-Net); [1] or [2]: one stage. See the module docstring
    stage1_steps: int = 0  # with stages = [1, 2]: stage 1's optimiser steps; 0 = train.steps (as stage 2)
    prediction: str = "epsilon"  # the U-Net predicts the noise (the paper), "sample": the clean EO latent (the
    #                              release's x0 option), or "v_prediction": sqrt(a_t) noise - sqrt(1 - a_t) x_0
    loss: str = "cdiff"  # stage 2's: "cdiff", the confidence-guided beta-NLL; "mse": L2 on the noise channels
    #                      (Table 3). Stage 1 has no variance channel and always trains with "mse"
    ema_decay: float = 0.0  # > 0: keep an EMA of the U-Net with this decay, validate and save it too
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% slower
    channels_last: bool = False  # U-Net weights and activations NHWC (tensor-core convolutions' layout); same results
    fresh_unet: bool = False  # replace init's U-Net by one of its config with seeded random weights (tiny_seed),
    #                           keeping init's VAE and prompt embedding: training from scratch
    tiny_seed: int = 0  # the weights of init = "tiny", or of the fresh U-Net

    def __post_init__(self):
        if not self.init:
            raise ValueError("config: model.init is needed: a model file (e.g. from `cdiff convert`) or \"tiny\"")
        if self.init == TINY and self.fresh_unet:
            raise ValueError("config: model.fresh_unet needs model.init to be a model file; model.init = \"tiny\" "
                             "makes a fresh U-Net already")
        if self.init == TINY and self.unet:
            # The tiny stack brings its own small VAE and prompt embedding, which no release U-Net fits.
            raise ValueError(f"config: model.unet ({self.unet}) needs model.init to be a model file, whose VAE and "
                             "prompt embedding it is used with; model.init = \"tiny\" makes its own U-Net")
        if self.stages not in STAGE_RECIPES:
            raise ValueError(f"config: model.stages must be one of {[list(r) for r in STAGE_RECIPES]}, "
                             f"got {list(self.stages)}")
        if self.stage1_steps < 0 or (self.stage1_steps and self.stages != (1, 2)):
            raise ValueError(f"config: model.stage1_steps ({self.stage1_steps}) sets stage 1's length in a run of both "
                             "stages (model.stages = [1, 2]); a run of one stage lasts train.steps")
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(f"config: model.prediction must be one of {PREDICTION_TYPES}, got {self.prediction!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"config: model.loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"config: model.ema_decay must be in [0, 1), got {self.ema_decay}")


def stage_runs(config: RunConfig, run_dir) -> list[tuple[str, RunConfig]]:
    """The runs that train ``config``, in order, as (folder, config of that run): ``[("", config)]``
    for one stage, trained in ``run_dir`` itself; for ``model.stages = [1, 2]``, ``("stage1", ...)``
    (``model.stage1_steps`` or train.steps long) and ``("stage2", ...)``, which starts from the model
    file of stage 1's last checkpoint in ``run_dir``."""
    model = config.model
    if len(model.stages) == 1:
        return [("", config)]
    steps1 = model.stage1_steps or config.train.steps
    stage1 = replace(config, model=replace(model, stages=(1,), stage1_steps=0),
                     train=replace(config.train, steps=steps1))
    final = Path(run_dir).resolve() / "stage1" / CHECKPOINTS / step_name(steps1) / MODEL_FILE
    stage2 = replace(config, model=replace(model, stages=(2,), stage1_steps=0, init=str(final), unet="",
                                           pad_to_77=False, tiny_seed=0))
    return [("stage1", stage1), ("stage2", stage2)]


class CDiffSETTask:
    """The C-DiffSET model in training, one stage of it (a cdiff.train.task.Task)."""

    best_metric = "psnr"
    single_process = False  # trains under torchrun too (DDP)

    def __init__(self, config: RunConfig, device: torch.device, checkpoint: Path | None = None,
                 pipeline: Pipeline | None = None):
        """The model comes from ``checkpoint`` (a resume), else ``pipeline`` (in memory), else model.init."""
        self.config, self.device, self.model = config, device, config.model
        if len(self.model.stages) != 1:
            raise ValueError(f"model.stages = {list(self.model.stages)}: a task trains one stage; cdiff.train.run "
                             "trains each in its own folder (stage_runs)")
        self.stage = self.model.stages[0]
        pipeline = pipeline if pipeline is not None and checkpoint is None else start_pipeline(self.model, checkpoint)
        self.prompt, self.process = pipeline.prompt, DDPM()
        self.unet = pipeline.unet.to(device).train().requires_grad_(True)
        self.vae = pipeline.vae.to(device).eval().requires_grad_(False)
        self.context = pipeline.context.to(device, torch.float32)  # (L, context_dim)
        if self.model.gradient_checkpointing:
            self.unet.gradient_checkpointing(True)
        self.memory_format = torch.channels_last if self.model.channels_last else torch.contiguous_format
        self.unet.to(memory_format=self.memory_format)
        self.ema = EMA(self.unet, self.model.ema_decay) if self.model.ema_decay else None
        if checkpoint is not None and self.ema is not None:
            self.ema.module.load_state_dict(load_unet(checkpoint / EMA_FILE, dtype=torch.float32).state_dict())
        self.modules = {"unet": self.unet}
        self.wrapped = dict(self.modules)
        self.optimizers = {"unet": adamw(self.unet.parameters(), config.optim)}
        self.schedulers = {"unet": lr_schedule(self.optimizers["unet"], config.optim, config.train.steps)}
        self.phases = [Phase("unet", "unet", ("unet",), self.loss)]
        self.train_pairs, self.val_pairs = latent_task_pairs(config.data, config.val)

    # --- training ------------------------------------------------------------------------

    def training_samples(self):
        if self.config.data.latents:
            return cached_samples(self.config, self.vae)
        return self.train_pairs, image_augment(self.config.data)

    def _draw(self, positions: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (B,), noise (B, *shape)) from one generator per sample, seeded by (seed, position)."""
        steps, noises = [], []
        for position in positions.tolist():
            gen = generator(self.config.train.seed, "noise", position)
            steps.append(torch.randint(0, self.process.num_train_timesteps, (1,), generator=gen))
            noises.append(torch.randn(shape, generator=gen))
        return torch.cat(steps).to(self.device), torch.stack(noises).to(self.device)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sar_latent, eo_latent = batch_latents(self.vae, batch, self.device)
        t, noise = self._draw(batch["position"], eo_latent.shape[1:])
        noisy = self.process.add_noise(eo_latent, noise, t)  # (B, 4, h, w)
        context = self.context.expand(len(t), -1, -1)  # (B, L, context_dim)
        unet_input = torch.cat([sar_latent, noisy], dim=1).contiguous(memory_format=self.memory_format)  # (B, 8, h, w)
        out = self.wrapped["unet"](unet_input, t, context)  # (B, 4 or 5, h, w): stage 1 or 2
        channels = eo_latent.shape[1]
        prediction, raw = out[:, :channels], out[:, channels:]  # raw: (B, 1, h, w), or (B, 0, h, w) in stage 1
        target = self._target(eo_latent, noise, t)
        alpha_bar = self.process.alpha_bar(t)
        if self.stage == 1:
            return F.mse_loss(prediction.float(), target), {}
        if self.model.loss == "mse":
            loss = F.mse_loss(prediction.float(), target)
            return loss, {"mean_variance": variance_from_raw(raw.detach()).mean()}
        loss = confidence_nll(target, prediction, raw, alpha_bar)
        return loss, self._terms(target, prediction.detach(), raw.detach(), alpha_bar)

    def _target(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the U-Net learns to predict (model.prediction): the noise, the clean latent, or v."""
        if self.model.prediction == "epsilon":
            return noise
        if self.model.prediction == "sample":
            return clean
        return self.process.velocity(clean, noise, t)

    @staticmethod
    def _terms(target, prediction, raw, alpha_bar) -> dict[str, torch.Tensor]:
        """The C-Diff loss's two terms (element means; they sum to the loss) and the mean variance."""
        var = variance_from_raw(raw)  # (B, 1, h, w)
        weight = var ** alpha_bar.sqrt().view(-1, 1, 1, 1)
        residual = (weight * (target - prediction.float()).square() / (2 * var)).mean()
        logvar = (weight * (var.log() + LOG_2PI) / 2).mean()  # broadcast over channels: the same mean
        return {"loss_residual": residual, "loss_logvar": logvar, "mean_variance": var.mean()}

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.unet)

    # --- checkpoints and validation --------------------------------------------------------

    def save(self, folder: Path) -> None:
        padding = "77" if self.context.shape[0] == 77 else "none"
        for name, unet in ((MODEL_FILE, self.unet), (EMA_FILE, self.ema.module if self.ema else None)):
            if unet is not None:
                save_native(folder / name, unet, self.vae, self.context, prompt=self.prompt, padding=padding,
                                  prediction=self.model.prediction)

    @torch.no_grad()
    def validate(self, step: int):
        """DDIM on the first val.images pairs held out of the training list: mean PSNR, SSIM, SCC; grid columns."""
        val = self.config.val
        unet = self.ema.module if self.ema is not None else self.unet
        unet.eval()
        pipeline = Pipeline(unet, self.vae, self.context, prompt=self.prompt or DEFAULT_PROMPT, process=self.process,
                            prediction_type=self.model.prediction)

        def predict(index, sar):
            result = pipeline.translate(sar, steps=val.steps, generator=generator(self.config.train.seed, "val", index))
            confidence = result.confidence if result.confidence is not None else torch.zeros_like(sar[:, :1])
            return result.eo, confidence

        out = score_pairs(self.val_pairs, predict, val.batch_size, val.grid_images, self.device)
        self.unet.train()
        return out
