"""Distillation of a trained C-DiffSET teacher into a student that translates in a few steps: the ``[model]``
section of ``kind = "distill"`` and the task that cdiff.train.loop runs (``cdiff distill``).

The student is a copy of the teacher's U-Net (same architecture, same prediction type, same VAE and
prompt embedding), trained to do in ``model.steps`` sampler steps what the teacher does in many.
Two methods (docs/distill.md says which was chosen, by measurement, and why):

- ``"consistency"``: latent consistency distillation (Luo et al. 2023, LCM; Song et al. 2023). Per
  sample at stream position g: n ~ U{0..49} on the consistency grid t_n = 20 (n + 1) - 1 (19 .. 999),
  t' = t_n - 20 (0 for n = 0); noise z ~ N(0, I); x = sqrt(a_t) x_0 + sqrt(1 - a_t) z. The teacher
  takes one DDIM step x -> x' (from t_n to t'); the student's clean-latent estimate
  f(x, t_n) = c_skip x + c_out x0_hat (cdiff.samplers.boundary_scalings) is pulled towards the
  target network's f(x', t') by the pseudo-Huber loss sqrt((f - f')^2 + c^2) - c (element mean,
  c = ``huber_c``). The target network is an EMA of the student (decay ``target_decay``), both
  starting as the teacher. The student samples with cdiff.samplers.LCM in 1, 2, 4 ... steps.
- ``"progressive"``: progressive distillation (Salimans and Ho 2022). Rounds halve the steps, from
  ``teacher_steps`` to ``steps``, each round one equal share of ``train.steps``; in round r the
  student learns one DDIM step of the trailing grid of n_r = teacher_steps / 2^(r + 1) steps from
  two DDIM steps of its teacher (the C-DiffSET teacher in round 0, the student as it ended the
  round before in the others): i ~ U{0..n_r - 1}, t = grid_n[i], the teacher lands on x'' at the
  grid's next timestep, and the student's x0_hat regresses the x_0 that lands there in one step,
  x~ = (x'' - (s''/s) x) / (a'' - (s''/s) a) (a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)),
  weighted by max(a^2 / s^2, 1) (truncated SNR). The student samples with DDIM on the trailing grid.

The confidence map: with ``confidence = "variance"`` the student's variance channel learns the
teacher's at the same input and timestep, (log var_student - log var_teacher)^2 times
``variance_weight``, on the noised x the step already gives the teacher (progressive: the C-DiffSET
teacher's, one more pass after round 0); translate then reads it at the first step with t <= T/2,
as for any model. ``"none"``: no such term.

Logged terms: ``loss_distill`` (the consistency or progressive term) and ``loss_variance``; they sum
to the loss. Validation samples the student as its file says (``val.steps`` is not used).

Checkpoint folder: ``model.safetensors``, the student as a native file that records its sampler and
steps (cdiff.native: ``cdiff translate`` samples it so) and its teacher's name and sha256;
``target.safetensors`` (consistency: the target network's U-Net) or ``round_teacher.safetensors``
(progressive, after round 0: the round's teacher). A resume checks that the teacher file is the same.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cdiff.load import load_pipeline, load_unet
from cdiff.loss import variance_from_raw
from cdiff.native import open_native, save_native
from cdiff.pipeline import Pipeline
from cdiff.samplers import CONSISTENCY_GRID_POINTS, boundary_scalings, consistency_grid
from cdiff.schedulers import DDPM, broadcast, split_prediction, trailing_timesteps
from cdiff.train.config import RunConfig
from cdiff.train.data import image_augment, latent_task_pairs
from cdiff.train.ema import EMA
from cdiff.train.latents import batch_latents, cached_samples
from cdiff.train.optim import adamw, lr_schedule
from cdiff.train.seeds import generator
from cdiff.train.start import MODEL_FILE
from cdiff.train.task import Phase
from cdiff.train.validation import score_pairs
from cdiff.weightfile import CheckpointError, WeightFile, sniff

# method -> the sampler its students use (cdiff.samplers.SAMPLERS)
METHODS = {"consistency": "lcm", "progressive": "ddim_trailing"}
CONFIDENCES = ("variance", "none")
TARGET_FILE = "target.safetensors"  # consistency: the target network (EMA of the student)
ROUND_TEACHER_FILE = "round_teacher.safetensors"  # progressive: the teacher of the current round (after round 0)


@dataclass(frozen=True)
class DistillConfig:
    kind: str = "distill"
    teacher: str = ""  # the trained C-DiffSET model to distil: any file cdiff.load_pipeline reads
    method: str = "consistency"  # "consistency" (LCM) or "progressive"
    steps: int = 4  # the student's sampler steps, recorded in its file (consistency students also run 1, 2, ...)
    confidence: str = "variance"  # "variance": the student's variance channel learns the teacher's; "none"
    variance_weight: float = 1.0  # weight of the variance term
    target_decay: float = 0.95  # consistency: the target network's EMA decay (LCM's)
    huber_c: float = 0.001  # consistency: the pseudo-Huber constant (LCM's, for SD latents)
    teacher_steps: int = 32  # progressive: the first round's teacher steps, steps x a power of two

    def __post_init__(self):
        if not self.teacher:
            raise ValueError("config: model.teacher is needed: the trained C-DiffSET model file to distil")
        if self.method not in METHODS:
            raise ValueError(f"config: model.method must be one of {tuple(METHODS)}, got {self.method!r}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"config: model.confidence must be one of {CONFIDENCES}, got {self.confidence!r}")
        if not 1 <= self.steps <= CONSISTENCY_GRID_POINTS:
            raise ValueError(f"config: model.steps must be in [1, {CONSISTENCY_GRID_POINTS}], got {self.steps}")
        if self.variance_weight < 0:
            raise ValueError(f"config: model.variance_weight must be >= 0, got {self.variance_weight}")
        if not 0 < self.target_decay < 1:
            raise ValueError(f"config: model.target_decay must be in (0, 1), got {self.target_decay}")
        if self.huber_c <= 0:
            raise ValueError(f"config: model.huber_c must be > 0, got {self.huber_c}")
        if self.method == "progressive":
            ratio = self.teacher_steps / self.steps
            if ratio < 2 or ratio != 2 ** round(math.log2(ratio)):
                raise ValueError(f"config: model.teacher_steps ({self.teacher_steps}) must be model.steps "
                                 f"({self.steps}) times a power of two, at least 2")

    @property
    def rounds(self) -> int:
        """Progressive distillation's rounds: teacher_steps -> steps, halving each round."""
        return round(math.log2(self.teacher_steps / self.steps))

    @property
    def sampling(self) -> tuple[str, int]:
        """(sampler, steps) the student samples with, recorded in its file."""
        return METHODS[self.method], self.steps


def is_student_file(path) -> bool:
    """Whether ``path`` is a native file written by a distillation (its metadata names the method)."""
    path = Path(path)
    if not path.is_file() or sniff(path) != "safetensors":
        return False
    try:
        return "distillation" in WeightFile(path).metadata
    except CheckpointError:
        return False


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Mean of sqrt((a - b)^2 + c^2) - c: L2-like near 0, L1-like beyond c."""
    return ((a.float() - b.float()).square() + c * c).sqrt().sub(c).mean()


class DistillTask:
    """A student being distilled from a C-DiffSET teacher (a cdiff.train.task.Task)."""

    best_metric = "psnr"
    single_process = False  # trains under torchrun too (DDP on the student)

    def __init__(self, config: RunConfig, device: torch.device, checkpoint: Path | None = None):
        self.config, self.device, self.model = config, device, config.model
        model = self.model
        path = Path(model.teacher)
        if not path.exists():
            raise FileNotFoundError(f"model.teacher: file not found: {path}")
        teacher = load_pipeline(path, dtype=torch.float32)
        self.teacher_record = json.dumps({"file": path.name, "sha256": file_sha256(path) if path.is_file() else ""})
        latent_channels = teacher.vae.config.latent_channels
        if model.confidence == "variance" and teacher.unet.config.out_channels <= latent_channels:
            raise ValueError(f"model.teacher {path}: its U-Net predicts no variance, so there is no map to distil: "
                             "set model.confidence = \"none\"")
        self.process, self.prompt, self.prediction = DDPM(), teacher.prompt, teacher.prediction_type
        self.latent_channels = latent_channels
        self.teacher = teacher.unet.to(device).eval().requires_grad_(False)
        self.vae = teacher.vae.to(device).eval().requires_grad_(False)
        self.context = teacher.context.to(device, torch.float32)  # (L, context_dim)
        if checkpoint is not None:
            self._check_teacher(checkpoint / MODEL_FILE)
            student = load_unet(checkpoint / MODEL_FILE, dtype=torch.float32)
        else:
            student = copy.deepcopy(self.teacher)
        self.student = student.to(device).train().requires_grad_(True)
        # consistency: the target network; progressive: the current round's teacher and its round.
        self.target = self.round_teacher = None
        self.round = 0
        if model.method == "consistency":
            self.target = EMA(self.student, model.target_decay)
            if checkpoint is not None:
                self.target.module.load_state_dict(load_unet(checkpoint / TARGET_FILE, dtype=torch.float32).state_dict())
        elif checkpoint is not None and (checkpoint / ROUND_TEACHER_FILE).is_file():
            self.round_teacher = load_unet(checkpoint / ROUND_TEACHER_FILE, dtype=torch.float32).to(device).eval()
            self.round = int(open_native(checkpoint / ROUND_TEACHER_FILE).metadata["round"])
        self.modules = {"student": self.student}
        self.wrapped = dict(self.modules)
        self.optimizers = {"student": adamw(self.student.parameters(), config.optim)}
        self.schedulers = {"student": lr_schedule(self.optimizers["student"], config.optim, config.train.steps)}
        self.phases = [Phase("student", "student", ("student",), self.loss)]
        self.train_pairs, self.val_pairs = latent_task_pairs(config.data, config.val)

    def _check_teacher(self, model_file: Path) -> None:
        recorded = open_native(model_file).metadata.get("distilled_from")
        if recorded is not None and json.loads(recorded)["sha256"] != json.loads(self.teacher_record)["sha256"]:
            raise ValueError(f"model.teacher {self.model.teacher}: not the file this run was distilling from "
                             f"({json.loads(recorded)['file']}, sha256 {json.loads(recorded)['sha256'][:16]}...); "
                             "resume with that teacher, or start a new run")

    # --- training ------------------------------------------------------------------------

    def training_samples(self):
        if self.config.data.latents:
            return cached_samples(self.config, self.vae)
        return self.train_pairs, image_augment(self.config.data)

    def _draw(self, positions: torch.Tensor, shape: torch.Size, choices: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (B,) in [0, choices), noise (B, *shape)) from one generator per sample, seeded by (seed, position)."""
        indices, noises = [], []
        for position in positions.tolist():
            gen = generator(self.config.train.seed, "distill", position)
            indices.append(torch.randint(0, choices, (1,), generator=gen))
            noises.append(torch.randn(shape, generator=gen))
        return torch.cat(indices).to(self.device), torch.stack(noises).to(self.device)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) shaped to broadcast against ``like``; t < 0 reads a_0 (DDIM's last step)."""
        a = self.process.alphas_cumprod.to(like.device)[t.clamp(min=0)].to(torch.float32)
        return broadcast(a.sqrt(), like), broadcast((1 - a).sqrt(), like)

    def _call(self, unet, sar_latent: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        """One U-Net call: (clean latent x0_hat, noise eps_hat, raw variance (B, 0 or 1, h, w)), fp32."""
        context = self.context.expand(len(x), -1, -1)  # (B, L, context_dim)
        out = unet(torch.cat([sar_latent, x], dim=1), t, context).float()  # (B, 4 [+1], h, w)
        sqrt_alpha, sqrt_one_minus = self._coefficients(t, x)
        clean, eps = split_prediction(out[:, : self.latent_channels], x, sqrt_alpha, sqrt_one_minus, self.prediction)
        return clean, eps, out[:, self.latent_channels:]

    def _ddim_step(self, clean: torch.Tensor, eps: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """x at t_next from the predicted clean latent and noise (deterministic DDIM; t_next < 0: a_0)."""
        sqrt_alpha, sqrt_one_minus = self._coefficients(t_next, clean)
        return sqrt_alpha * clean + sqrt_one_minus * eps

    def _variance_term(self, student_raw: torch.Tensor, teacher_raw: torch.Tensor) -> torch.Tensor:
        if self.model.confidence != "variance":
            return student_raw.new_zeros(())
        log_student, log_teacher = variance_from_raw(student_raw).log(), variance_from_raw(teacher_raw).log()
        return self.model.variance_weight * (log_student - log_teacher).square().mean()

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sar_latent, eo_latent = batch_latents(self.vae, batch, self.device)
        step = self.schedulers["student"].steps  # optimiser steps done (the schedule counts them; resumed with it)
        if self.model.method == "consistency":
            distill, variance = self._consistency(batch["position"], sar_latent, eo_latent)
        else:
            distill, variance = self._progressive(batch["position"], sar_latent, eo_latent, step)
        return distill + variance, {"loss_distill": distill.detach(), "loss_variance": variance.detach()}

    def _consistency(self, positions, sar_latent, eo_latent):
        grid = torch.tensor(consistency_grid(self.process.num_train_timesteps), device=self.device)  # (50,)
        index, noise = self._draw(positions, eo_latent.shape[1:], len(grid))
        t = grid[index]
        t_prev = (t - (grid[1] - grid[0])).clamp(min=0)  # one grid step down; 0 below the first
        x = self.process.add_noise(eo_latent, noise, t)
        c_skip, c_out = (broadcast(c, x) for c in boundary_scalings(t.float()))
        c_skip_prev, c_out_prev = (broadcast(c, x) for c in boundary_scalings(t_prev.float()))
        with torch.no_grad():
            clean, eps, teacher_raw = self._call(self.teacher, sar_latent, x, t)
            x_prev = self._ddim_step(clean, eps, t_prev)  # the teacher's DDIM step (to a_0 at t_prev = 0)
            target_clean, _, _ = self._call(self.target.module, sar_latent, x_prev, t_prev)
            target = c_skip_prev * x_prev + c_out_prev * target_clean  # f_target(x_prev, t_prev); = x_prev at t_prev 0
        student_clean, _, student_raw = self._call(self.wrapped["student"], sar_latent, x, t)
        estimate = c_skip * x + c_out * student_clean  # f(x, t)
        return pseudo_huber(estimate, target, self.model.huber_c), self._variance_term(student_raw, teacher_raw)

    def _round_of(self, step: int) -> int:
        return min(step * self.model.rounds // self.config.train.steps, self.model.rounds - 1)

    def _progressive(self, positions, sar_latent, eo_latent, step: int):
        current = self._round_of(step)
        if current != self.round:  # a new round: the student as it ended the last one becomes the teacher
            self.round_teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
            self.round = current
        teacher = self.teacher if self.round_teacher is None else self.round_teacher
        count = self.model.teacher_steps // 2 ** (self.round + 1)  # the student's steps this round
        fine = torch.tensor(trailing_timesteps(2 * count, self.process.num_train_timesteps) + [-1], device=self.device)
        index, noise = self._draw(positions, eo_latent.shape[1:], count)
        t, t_mid, t_next = fine[2 * index], fine[2 * index + 1], fine[2 * index + 2]  # t_next -1: the last step's a_0
        x = self.process.add_noise(eo_latent, noise, t)
        with torch.no_grad():
            clean, eps, teacher_raw = self._call(teacher, sar_latent, x, t)
            x_mid = self._ddim_step(clean, eps, t_mid)
            clean_mid, eps_mid, _ = self._call(teacher, sar_latent, x_mid, t_mid)
            x_next = self._ddim_step(clean_mid, eps_mid, t_next)
            if teacher is not self.teacher and self.model.confidence == "variance":
                _, _, teacher_raw = self._call(self.teacher, sar_latent, x, t)
            alpha, sigma = self._coefficients(t, x)
            alpha_next, sigma_next = self._coefficients(t_next, x)
            ratio = sigma_next / sigma
            target = (x_next - ratio * x) / (alpha_next - ratio * alpha)  # one DDIM step from x lands on x_next
        student_clean, _, student_raw = self._call(self.wrapped["student"], sar_latent, x, t)
        weight = (alpha.square() / sigma.square()).clamp(min=1)  # truncated SNR
        distill = (weight * (student_clean - target).square()).mean()
        return distill, self._variance_term(student_raw, teacher_raw)

    def after_step(self) -> None:
        if self.target is not None:
            self.target.update(self.student)

    # --- checkpoints and validation --------------------------------------------------------

    def _save_unet(self, path: Path, unet, **metadata) -> None:
        padding = "77" if self.context.shape[0] == 77 else "none"
        save_native(path, unet, self.vae, self.context, prompt=self.prompt, padding=padding,
                    prediction=self.prediction, sampling=self.model.sampling,
                    extra_metadata={"distilled_from": self.teacher_record, "distillation": self.model.method,
                                    **metadata})

    def save(self, folder: Path) -> None:
        self._save_unet(folder / MODEL_FILE, self.student)
        if self.target is not None:
            self._save_unet(folder / TARGET_FILE, self.target.module)
        if self.round_teacher is not None:
            self._save_unet(folder / ROUND_TEACHER_FILE, self.round_teacher, round=str(self.round))

    def pipeline(self) -> Pipeline:
        """The student as translate samples it (its sampler and steps)."""
        return Pipeline(self.student, self.vae, self.context, prompt=self.prompt, process=self.process,
                        prediction_type=self.prediction, sampling=self.model.sampling)

    @torch.no_grad()
    def validate(self, step: int):
        """The student's translations of the first val.images held-out pairs: mean PSNR, SSIM, SCC; grid columns."""
        self.student.eval()
        pipeline = self.pipeline()

        def predict(index, sar):
            result = pipeline.translate(sar, generator=generator(self.config.train.seed, "val", index))
            confidence = result.confidence if result.confidence is not None else torch.zeros_like(sar[:, :1])
            return result.eo, confidence

        out = score_pairs(self.val_pairs, predict, self.config.val.batch_size, self.config.val.grid_images, self.device)
        self.student.train()
        return out
