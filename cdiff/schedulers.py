"""The diffusion process of SD 2.1: the DDPM forward process and the DDIM sampler.

DDPM (Ho et al. 2020) defines q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) with a_t the
cumulative product of (1 - beta) over SD's "scaled linear" betas. DDIM (Song et al. 2021,
Eq. 12) walks a subsequence of those timesteps back to x_0.
"""

from __future__ import annotations

from typing import Callable

import torch

from cdiff.progress import progress

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, ...) to broadcast against ``like``, in like's dtype."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


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

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform training timesteps, (batch,) int64 in [0, T)."""
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=device)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """a_t for a (B,) tensor of timesteps, as float32 (B,) (the C-Diff loss's beta uses it)."""
        return self.alphas_cumprod.to(t.device)[t].float()

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise; clean, noise (B, C, h, w), t (B,)."""
        alpha = _per_sample(self.alphas_cumprod, t, clean)
        return alpha.sqrt() * clean + (1 - alpha).sqrt() * noise

    def velocity(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x_0."""
        alpha = _per_sample(self.alphas_cumprod, t, clean)
        return alpha.sqrt() * noise - (1 - alpha).sqrt() * clean


class DDIM:
    """DDIM sampling with SD 2.1's settings: 'leading' spacing, steps offset 1, the final
    step's a_prev taken from step 0 (not 1), no clipping of the predicted x_0.

    With 50 steps over 1000 training steps, ``timesteps`` runs 981, 961, ..., 1.
    """

    def __init__(
        self,
        process: DDPM | None = None,
        num_steps: int = 50,
        eta: float = 0.0,
        prediction_type: str = "epsilon",
        steps_offset: int = 1,
    ):
        self.process = process or DDPM()
        total = self.process.num_train_timesteps
        if not 1 <= num_steps <= total:
            raise ValueError(f"num_steps must be in [1, {total}], got {num_steps}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.num_steps, self.eta, self.prediction_type = num_steps, eta, prediction_type
        self.step_ratio = total // num_steps
        self.timesteps = (torch.arange(num_steps - 1, -1, -1) * self.step_ratio + steps_offset).tolist()
        # SD 2.1 (set_alpha_to_one=False): the last step lands on a_0, not on 1.
        self.final_alpha_cumprod = self.process.alphas_cumprod[0].item()

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step x_t -> x_{t - step_ratio} (Song et al. Eq. 12).

        model_output, sample: (B, C, h, w). With eta > 0 the fresh noise is ``noise`` or drawn
        from ``generator``. Returns (previous sample, predicted x_0).
        """
        t = int(t)
        alphas = self.process.alphas_cumprod
        alpha = alphas[t].item()
        prev_t = t - self.step_ratio
        alpha_prev = alphas[prev_t].item() if prev_t >= 0 else self.final_alpha_cumprod

        if self.prediction_type == "epsilon":
            eps = model_output
            clean = (sample - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        else:  # v_prediction
            clean = alpha**0.5 * sample - (1 - alpha) ** 0.5 * model_output
            eps = alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample

        # sigma_t(eta), Eq. 16: eta = 0 is deterministic DDIM, eta = 1 is DDPM's ancestral variance.
        variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
        sigma = self.eta * variance**0.5
        prev = alpha_prev**0.5 * clean + (1 - alpha_prev - sigma**2) ** 0.5 * eps
        if self.eta > 0:
            if noise is None:
                device = generator.device if generator is not None else sample.device
                noise = torch.randn(sample.shape, generator=generator, device=device).to(sample.device, sample.dtype)
            prev = prev + sigma * noise
        return prev, clean

    def sample(
        self,
        model: Callable[[torch.Tensor, int], torch.Tensor],
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """DDIM from pure noise: x_T = noise, then x <- step(model(x, t), t, x) for each t.

        ``model(latent, t)`` returns the prediction, shaped like ``latent`` (B, C, h, w).
        """
        latent = noise
        for t in progress(self.timesteps, desc="DDIM", enabled=show_progress):
            latent, _ = self.step(model(latent, t), t, latent, generator=generator)
        return latent
