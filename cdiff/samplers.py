"""The samplers: DDIM and DPM-Solver++(2M), and ``make_sampler``, the one way to pick one by name.

Every sampler is built as ``Sampler(process, num_steps, ..., prediction_type)``, lists the
timesteps at which it calls the model in ``timesteps`` (one call per step, in order) and runs
with the same signature: ``sample(model, noise, generator=None, show_progress=False)``, where
``model(latent, t)`` gets the latent in fp32 (the loop's state stays in fp32 whatever the
noise's dtype) and t as a 0-d int64 tensor on the latent's device, and returns the prediction
(the noise, x_0 or v, as ``prediction_type`` says: cdiff.schedulers.PREDICTION_TYPES).
Per-step coefficients live on the device, indexed by the step number: a step makes no
host-device copy or sync, and the loop has no data-dependent control flow. The tables reach a
device during the first run there, so capture a loop in a CUDA graph after one warm-up run
(tests/test_samplers.py does). The forward process they invert, DDPM, and what they share are
in cdiff.schedulers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from cdiff.progress import progress
from cdiff.schedulers import (
    DDPM,
    DeviceTable,
    broadcast,
    check_prediction_type,
    compute_dtype,
    leading_timesteps,
    split_prediction,
)

SAMPLERS = ("ddim", "dpmpp_2m")  # the names make_sampler takes


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


class DPMSolverPP2M:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), multistep, data prediction:
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i,
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},  h_i = lambda_i - lambda_{i-1},
    r_i = h_{i-1} / h_i,  lambda = log(alpha / sigma),  alpha = sqrt(a_t), sigma = sqrt(1 - a_t).

    The model is called at the DDIM timesteps of the same step count (SD 2.1's 'leading'
    spacing); after the last call the solver steps to sigma = 0, so it returns the data
    prediction there. The first and that last update are first order (D = x0 of the step), as
    the paper's algorithm and diffusers' DPMSolverMultistepScheduler (final_sigmas_type="zero").
    """

    def __init__(
        self,
        process: DDPM | None = None,
        num_steps: int = 20,
        prediction_type: str = "epsilon",
        steps_offset: int = 1,
    ):
        self.process, self.prediction_type = process or DDPM(), check_prediction_type(prediction_type)
        self.timesteps = leading_timesteps(num_steps, self.process.num_train_timesteps, steps_offset)
        self.num_steps = num_steps
        self.timestep_table = DeviceTable(torch.tensor(self.timesteps))  # (num_steps,) int64

        # Per step i (fp64): alpha_i, sigma_i of the model call, then the update to level i + 1
        # (sigma = 0 after the last call): x <- c_x x + c_d (w_now x0_i + w_prev x0_{i-1}).
        a = self.process.alphas_cumprod[torch.tensor(self.timesteps)]
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        lam = alpha.log() - sigma.log()  # lambda = log(alpha / sigma)
        end = torch.tensor([1.0, 0.0, math.inf], dtype=torch.float64)  # alpha, sigma, lambda at sigma = 0
        alpha_next, sigma_next, lam_next = (torch.cat([v[1:], e[None]]) for v, e in zip((alpha, sigma, lam), end))
        h = lam_next - lam  # this step's h_i
        c_x, c_d = sigma_next / sigma, -alpha_next * torch.expm1(-h)  # the last: 0 and 1
        r = torch.cat([h.new_ones(1), lam[1:] - lam[:-1]]) / h  # h_{i-1} / h_i
        step = torch.arange(num_steps)
        second_order = (step > 0) & (step < num_steps - 1)
        w_now = torch.where(second_order, 1 + 1 / (2 * r), 1.0)
        w_prev = torch.where(second_order, -1 / (2 * r), 0.0)
        columns = [alpha, sigma, c_x, c_d, w_now, w_prev]
        self.coefficients = DeviceTable(torch.stack(columns, dim=1))  # (num_steps, 6)

    def sample(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """DPM-Solver++(2M) from pure noise (B, C, h, w); deterministic (``generator`` unused).

        ``model`` as in ``DDIM.sample``: the latent in fp32 (fp64 for fp64 noise), t a 0-d int64
        tensor on its device. Returns the result in noise's dtype.
        """
        dtype = compute_dtype(noise.dtype)
        timesteps = self.timestep_table.on(noise.device, torch.int64)
        table = self.coefficients.on(noise.device, dtype)
        latent, previous = noise.to(dtype), None
        for i in progress(range(self.num_steps), desc="DPM-Solver++(2M)", enabled=show_progress):
            alpha, sigma, c_x, c_d, w_now, w_prev = (broadcast(c, latent) for c in table[i].unbind())
            output = model(latent, timesteps[i]).to(dtype)
            clean, _ = split_prediction(output, latent, alpha, sigma, self.prediction_type)
            earlier = clean if previous is None else previous
            latent = c_x * latent + c_d * (w_now * clean + w_prev * earlier)
            previous = clean
        return latent.to(noise.dtype)


def make_sampler(
    name: str, process: DDPM, num_steps: int, eta: float = 0.0, prediction_type: str = "epsilon"
) -> DDIM | DPMSolverPP2M:
    """The sampler called ``name`` (one of SAMPLERS); eta applies to DDIM only."""
    if name == "ddim":
        return DDIM(process, num_steps=num_steps, eta=eta, prediction_type=prediction_type)
    if name == "dpmpp_2m":
        if eta != 0:
            raise ValueError(f"eta={eta}: DPM-Solver++(2M) is deterministic; eta applies to sampler='ddim' only")
        return DPMSolverPP2M(process, num_steps=num_steps, prediction_type=prediction_type)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
