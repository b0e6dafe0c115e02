"""The diffusion process of SD 2.1: the DDPM forward process, and what every sampler shares.

DDPM (Ho et al. 2020) defines q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) with a_t the
cumulative product of (1 - beta) over SD's "scaled linear" betas. The samplers that walk it back
(DDIM, DPM-Solver++(2M): cdiff.samplers) share its coefficient tables, SD 2.1's timestep spacing
and the reading of a model's output (``split_prediction``).

Numerics: every coefficient (sqrt(a_t), sqrt(1 - a_t), ...) is computed once in fp64 on the
CPU and kept on each device that asks for it, in fp32 (fp64 for fp64 latents); the arithmetic
on latents runs in fp32 whatever their dtype and only the result is rounded. In bf16,
sqrt(1 - a_t) computed from a bf16 a_t is 0 at t = 0 and 1 and half wrong at t = 2..5.
Sampling loops index device tensors with the step number, so a step makes no host-device copy
or sync (with eta > 0, draw the fresh noise from a generator on the latents' device).
"""

from __future__ import annotations

import torch

# What a denoiser's output predicts: the noise (SD 2.1 base, C-DiffSET), the clean sample x_0 (the
# release's x0 option), or v = sqrt(a_t) noise - sqrt(1 - a_t) x_0 (SD 2.1-768). Every sampler takes
# each of them, through ``split_prediction``.
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class DeviceTable:
    """An fp64 table made once on the CPU, copied to each (device, dtype) once, then reused."""

    def __init__(self, values: torch.Tensor):
        self.values = values
        self._copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def on(self, device, dtype: torch.dtype) -> torch.Tensor:
        key = (torch.device(device), dtype)
        if key not in self._copies:
            self._copies[key] = self.values.to(device=key[0], dtype=dtype)
        return self._copies[key]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision latents (fp64 stays fp64): the dtype the schedule arithmetic runs in."""
    return torch.promote_types(dtype, torch.float32)


def broadcast(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-d or (B,) coefficient shaped (B or 1, 1, 1, ...) to broadcast against ``like``."""
    return coefficient.reshape(-1, *([1] * (like.ndim - 1)))


def split_prediction(output, sample, sqrt_alpha, sqrt_one_minus, prediction_type):
    """(predicted x_0, predicted noise) from the model output at a_t; all in one dtype. The one
    place where an x_0 or v prediction becomes a noise prediction (and the reverse).

    epsilon: x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a). sample: eps = (x_t - sqrt(a) x_0) / sqrt(1 - a).
    v (Salimans & Ho 2022): x_0 = sqrt(a) x_t - sqrt(1 - a) v, eps = sqrt(a) v + sqrt(1 - a) x_t.
    """
    if prediction_type == "epsilon":
        return (sample - sqrt_one_minus * output) / sqrt_alpha, output
    if prediction_type == "sample":
        return output, (sample - sqrt_alpha * output) / sqrt_one_minus
    return sqrt_alpha * sample - sqrt_one_minus * output, sqrt_alpha * output + sqrt_one_minus * sample


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def leading_timesteps(num_steps: int, num_train_timesteps: int, steps_offset: int = 1) -> list[int]:
    """SD 2.1's "leading" spacing: (num_steps - 1 - i) * (T // num_steps) + steps_offset, i = 0..n-1.

    With 50 of 1000 steps: 981, 961, ..., 1. Raises ValueError when a timestep would fall
    outside [0, T) (num_steps = 1000 with offset 1 puts the first at 1000).
    """
    total = num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= total:
        raise ValueError(f"num_steps must be an integer in [1, {total}], got {num_steps!r}")
    if steps_offset < 0:
        raise ValueError(f"steps_offset must be >= 0, got {steps_offset}")
    ratio = total // num_steps
    first = (num_steps - 1) * ratio + steps_offset
    if first > total - 1:
        raise ValueError(
            f"num_steps={num_steps} with steps_offset={steps_offset}: the first timestep would be {first}, "
            f"past the last training timestep {total - 1}; use at most {total - 1} steps"
        )
    return [(num_steps - 1 - i) * ratio + steps_offset for i in range(num_steps)]


def trailing_timesteps(num_steps: int, num_train_timesteps: int) -> list[int]:
    """"Trailing" spacing: (num_steps - i) * T // num_steps - 1, i = 0..n-1; it starts at T - 1.

    With 4 of 1000 steps: 999, 749, 499, 249. The grid of n steps is every other timestep of the
    grid of 2n (exact integer division), as progressive distillation needs: one student step
    spans two of its teacher's.
    """
    total = num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= total:
        raise ValueError(f"num_steps must be an integer in [1, {total}], got {num_steps!r}")
    return [(num_steps - i) * total // num_steps - 1 for i in range(num_steps)]


class DDPM:
    """The forward (noising) process used for training.

    ``alphas_cumprod`` (num_train_timesteps,) float64 holds a_t for t = 0..T-1.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        self.num_train_timesteps = num_train_timesteps
        # "scaled linear": linear in sqrt(beta). float64 keeps a_t exact to ~1e-16 over 1000 products.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        a = self.alphas_cumprod
        self.coefficients = DeviceTable(torch.stack([a, a.sqrt(), (1 - a).sqrt()], dim=1))  # (T, 3)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform training timesteps, (batch,) int64 in [0, T)."""
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=device)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """a_t for a (B,) tensor of timesteps, as float32 (B,) (the C-Diff loss's beta uses it)."""
        return self.coefficients.on(t.device, torch.float32)[t, 0]

    def _sqrt_alphas(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (sqrt(a_t), sqrt(1 - a_t)) shaped to broadcast against ``like``, in its compute dtype.
        rows = self.coefficients.on(like.device, compute_dtype(like.dtype))[t.to(like.device)]  # (B, 3)
        return broadcast(rows[:, 1], like), broadcast(rows[:, 2], like)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise; clean, noise (B, C, h, w), t (B,) on their device."""
        sqrt_alpha, sqrt_one_minus = self._sqrt_alphas(t, clean)
        return (sqrt_alpha * clean + sqrt_one_minus * noise).to(clean.dtype)

    def velocity(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x_0."""
        sqrt_alpha, sqrt_one_minus = self._sqrt_alphas(t, clean)
        return (sqrt_alpha * noise - sqrt_one_minus * clean).to(clean.dtype)
