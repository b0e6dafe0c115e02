"""The diffusion process of SD 2.1: the DDPM forward process and the DDIM sampler.

DDPM (Ho et al. 2020) defines q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) with a_t the
cumulative product of (1 - beta) over SD's "scaled linear" betas. DDIM (Song et al. 2021,
Eq. 12) walks a subsequence of those timesteps back to x_0.

Numerics: every coefficient (sqrt(a_t), sqrt(1 - a_t), ...) is computed once in fp64 on the
CPU and kept on each device that asks for it, in fp32 (fp64 for fp64 latents); the arithmetic
on latents runs in fp32 whatever their dtype and only the result is rounded. In bf16,
sqrt(1 - a_t) computed from a bf16 a_t is 0 at t = 0 and 1 and half wrong at t = 2..5.
Sampling loops index device tensors with the step number, so a step makes no host-device copy
or sync (with eta > 0, draw the fresh noise from a generator on the latents' device).
"""

from __future__ import annotations

from typing import Callable

import torch

from cdiff.progress import progress

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


class DDIM:
    """DDIM sampling with SD 2.1's settings: 'leading' spacing, steps offset 1, the final
    step's a_prev taken from step 0 (not 1), no clipping of the predicted x_0.

    With 50 steps over 1000 training steps, ``timesteps`` runs 981, 961, ..., 1. ``eta`` in
    [0, 1]: 0 is deterministic DDIM, 1 is DDPM's ancestral variance (Eq. 16).
    """

    def __init__(
        self,
        process: DDPM | None = None,
        num_steps: int = 50,
        eta: float = 0.0,
        prediction_type: str = "epsilon",
        steps_offset: int = 1,
    ):
        if not 0 <= eta <= 1:  # also refuses NaN
            raise ValueError(
                f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), got {eta}; "
                "above 1 the variance exceeds 1 - a_prev and its square root is NaN"
            )
        self.process, self.prediction_type = process or DDPM(), check_prediction_type(prediction_type)
        self.timesteps = leading_timesteps(num_steps, self.process.num_train_timesteps, steps_offset)
        self.num_steps, self.eta, self.steps_offset = num_steps, eta, steps_offset
        self.step_ratio = self.process.num_train_timesteps // num_steps
        self._index = {t: i for i, t in enumerate(self.timesteps)}
        self.timestep_table = DeviceTable(torch.tensor(self.timesteps))  # (num_steps,) int64

        # Per step i (fp64): sqrt(a), sqrt(1 - a), sqrt(a_prev), the noise coefficient
        # sqrt(1 - a_prev - sigma^2) and sigma (Eq. 12 and 16).
        # SD 2.1 (set_alpha_to_one=False): the last step lands on a_0, not on 1.
        alphas = self.process.alphas_cumprod
        t = torch.tensor(self.timesteps)
        prev_t = t - self.step_ratio
        alpha = alphas[t]
        alpha_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], alphas[0])
        variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
        sigma = eta * variance.sqrt()
        columns = [alpha.sqrt(), (1 - alpha).sqrt(), alpha_prev.sqrt(), (1 - alpha_prev - sigma**2).sqrt(), sigma]
        self.coefficients = DeviceTable(torch.stack(columns, dim=1))  # (num_steps, 5)

    def step_index(self, t) -> int | torch.Tensor:
        """The step number of timestep ``t``: a Python int (checked against ``timesteps``) or an
        integer tensor (computed on its device without a sync, so not checked)."""
        if isinstance(t, torch.Tensor):
            index = (self.num_steps - 1) - torch.div(t - self.steps_offset, self.step_ratio, rounding_mode="floor")
            return index.clamp(0, self.num_steps - 1)
        if int(t) not in self._index:
            raise ValueError(f"t={t} is not a timestep of this {self.num_steps}-step DDIM: {self.timesteps[:3]}...")
        return self._index[int(t)]

    def step(
        self,
        model_output: torch.Tensor,
        t,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step x_t -> x_{t - step_ratio} (Song et al. Eq. 12).

        model_output, sample: (B, C, h, w). t: one of ``timesteps``, a Python int or an integer
        tensor (0-d, or (B,) for a timestep per sample) on sample's device. With eta > 0 the
        fresh noise is ``noise`` or drawn from ``generator``. Returns (previous sample,
        predicted x_0), in sample's dtype.
        """
        index = self.step_index(t.to(sample.device) if isinstance(t, torch.Tensor) else t)
        return self.step_at(index, model_output, sample, noise, generator)

    def step_at(self, index, model_output, sample, noise=None, generator=None):
        """``step`` by step number (an int, or an integer tensor on sample's device)."""
        dtype = compute_dtype(sample.dtype)
        rows = self.coefficients.on(sample.device, dtype)[index]  # (5,) or (B, 5)
        sqrt_alpha, sqrt_one_minus, sqrt_alpha_prev, noise_coef, sigma = (
            broadcast(c, sample) for c in rows.unbind(-1)
        )
        clean, eps = split_prediction(
            model_output.to(dtype), sample.to(dtype), sqrt_alpha, sqrt_one_minus, self.prediction_type
        )
        prev = sqrt_alpha_prev * clean + noise_coef * eps
        if self.eta > 0:
            if noise is None:
                device = generator.device if generator is not None else sample.device
                noise = torch.randn(sample.shape, generator=generator, device=device)
            prev = prev + sigma * noise.to(sample.device, dtype)
        return prev.to(sample.dtype), clean.to(sample.dtype)

    def sample(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """DDIM from pure noise: x = noise, then x <- step(model(x, t), t, x) for each t.

        ``model(latent, t)`` gets the latent in fp32 (fp64 for fp64 noise: the loop keeps its
        state there) and t as a 0-d int64 tensor on the latent's device, and returns the
        prediction shaped like ``latent`` (B, C, h, w). Returns the result in noise's dtype.
        """
        timesteps = self.timestep_table.on(noise.device, torch.int64)
        latent = noise.to(compute_dtype(noise.dtype))
        for i in progress(range(self.num_steps), desc="DDIM", enabled=show_progress):
            latent, _ = self.step_at(i, model(latent, timesteps[i]), latent, generator=generator)
        return latent.to(noise.dtype)
