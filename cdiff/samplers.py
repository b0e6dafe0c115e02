"""The samplers: DDIM, DPM-Solver++(2M) and multistep consistency sampling (LCM), and ``make_sampler``,
the one way to pick one by name.

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
    trailing_timesteps,
)

# The names make_sampler takes: the release's DDIM, DPM-Solver++(2M), and the samplers of distilled
# students (cdiff.train.distill): DDIM on the trailing grid (progressive distillation), multistep
# consistency sampling (consistency distillation).
SAMPLERS = ("ddim", "dpmpp_2m", "ddim_trailing", "lcm")


class DDIM:
    """DDIM sampling with SD 2.1's settings: 'leading' spacing, steps offset 1, the final
    step's a_prev taken from step 0 (not 1), no clipping of the predicted x_0.

    With 50 steps over 1000 training steps, ``timesteps`` runs 981, 961, ..., 1. ``eta`` in
    [0, 1]: 0 is deterministic DDIM, 1 is DDPM's ancestral variance (Eq. 16). ``spacing =
    "trailing"`` steps on cdiff.schedulers.trailing_timesteps instead (4 steps: 999, 749, 499,
    249), the grid of a progressively distilled student (sampler name "ddim_trailing").
    """

    def __init__(
        self,
        process: DDPM | None = None,
        num_steps: int = 50,
        eta: float = 0.0,
        prediction_type: str = "epsilon",
        steps_offset: int = 1,
        spacing: str = "leading",
    ):
        if not 0 <= eta <= 1:  # also refuses NaN
            raise ValueError(
                f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), got {eta}; "
                "above 1 the variance exceeds 1 - a_prev and its square root is NaN"
            )
        self.process, self.prediction_type = process or DDPM(), check_prediction_type(prediction_type)
        total = self.process.num_train_timesteps
        if spacing == "leading":
            self.timesteps = leading_timesteps(num_steps, total, steps_offset)
        elif spacing == "trailing":
            self.timesteps = trailing_timesteps(num_steps, total)
        else:
            raise ValueError(f"DDIM: spacing must be 'leading' or 'trailing', got {spacing!r}")
        self.num_steps, self.eta, self.steps_offset, self.spacing = num_steps, eta, steps_offset, spacing
        self.step_ratio = total // num_steps
        self._index = {t: i for i, t in enumerate(self.timesteps)}
        self.timestep_table = DeviceTable(torch.tensor(self.timesteps))  # (num_steps,) int64

        # Per step i (fp64): sqrt(a), sqrt(1 - a), sqrt(a_prev), the noise coefficient
        # sqrt(1 - a_prev - sigma^2) and sigma (Eq. 12 and 16). a_prev is the next timestep's
        # (leading spacing: t - step_ratio); SD 2.1 (set_alpha_to_one=False): the last step
        # lands on a_0, not on 1.
        alphas = self.process.alphas_cumprod
        t = torch.tensor(self.timesteps)
        prev_t = torch.tensor(self.timesteps[1:] + [-1])
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
            if self.spacing == "trailing":  # the timesteps run down: t's index is how many lie above it
                table = self.timestep_table.on(t.device, torch.int64)
                return (table > t[..., None]).sum(-1).clamp(max=self.num_steps - 1)
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


# Consistency models (Song et al. 2023) as LCM (Luo et al. 2023) distils them: the grid of timesteps
# the student learns on, and the boundary condition f(x, 0) = x of its clean-latent estimate.
CONSISTENCY_GRID_POINTS = 50  # the grid (k + 1) T / 50 - 1, k = 0..49: 19, 39, ..., 999 (LCM's 50 "origin" steps)
SIGMA_DATA = 0.5  # the boundary scalings' sigma_data
TIMESTEP_SCALING = 10.0  # t is scaled by this in the boundary scalings: c_skip is 7e-6 at t = 19, 1 at t = 0


def consistency_grid(num_train_timesteps: int, points: int = CONSISTENCY_GRID_POINTS) -> list[int]:
    """The consistency grid, ascending: (k + 1) * (T // points) - 1 for k = 0..points-1 (19 .. 999)."""
    ratio = num_train_timesteps // points
    return [(k + 1) * ratio - 1 for k in range(points)]


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency function f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t), at
    timesteps ``t`` (any shape, float): c_skip = s^2 / ((10 t)^2 + s^2), c_out = 10 t / sqrt((10 t)^2 + s^2)
    with s = SIGMA_DATA; c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x exactly."""
    scaled = t * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


class LCM:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) with LCM's settings, for a
    consistency-distilled student (cdiff.train.distill): at each timestep the clean-latent estimate
    f = c_skip x + c_out x0_hat (``boundary_scalings``); after every step but the last, the latent
    is noised afresh to the next timestep: x <- sqrt(a_next) f + sqrt(1 - a_next) z, z ~ N(0, I)
    from ``generator``. The last step returns f.

    Timesteps: ``num_steps`` of the consistency grid, evenly spaced by index from the top (index
    floor(k * 50 / num_steps), as diffusers' LCMScheduler): 1 step: 999; 2: 999, 499; 4: 999, 759,
    499, 259.
    """

    def __init__(self, process: DDPM | None = None, num_steps: int = 4, prediction_type: str = "epsilon"):
        self.process, self.prediction_type = process or DDPM(), check_prediction_type(prediction_type)
        points = CONSISTENCY_GRID_POINTS
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= points:
            raise ValueError(f"LCM: num_steps must be an integer in [1, {points}], got {num_steps!r}")
        grid = consistency_grid(self.process.num_train_timesteps, points)
        self.timesteps = [grid[::-1][k * points // num_steps] for k in range(num_steps)]
        self.num_steps = num_steps
        self.timestep_table = DeviceTable(torch.tensor(self.timesteps))  # (num_steps,) int64
        # Per step i (fp64): sqrt(a), sqrt(1 - a) of the call, c_skip, c_out, and sqrt(a), sqrt(1 - a) of the
        # next timestep (after the last: 1 and 0, unused).
        a = self.process.alphas_cumprod[torch.tensor(self.timesteps)]
        c_skip, c_out = boundary_scalings(torch.tensor(self.timesteps, dtype=torch.float64))
        a_next = torch.cat([a[1:], a.new_ones(1)])
        columns = [a.sqrt(), (1 - a).sqrt(), c_skip, c_out, a_next.sqrt(), (1 - a_next).sqrt()]
        self.coefficients = DeviceTable(torch.stack(columns, dim=1))  # (num_steps, 6)

    def sample(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Multistep consistency sampling from pure noise (B, C, h, w); ``model`` as in ``DDIM.sample``.
        The fresh noise of each step is drawn from ``generator`` (on its device). Returns the result
        in noise's dtype."""
        dtype = compute_dtype(noise.dtype)
        timesteps = self.timestep_table.on(noise.device, torch.int64)
        table = self.coefficients.on(noise.device, dtype)
        latent = noise.to(dtype)
        for i in progress(range(self.num_steps), desc="LCM", enabled=show_progress):
            sqrt_alpha, sqrt_one_minus, c_skip, c_out, sqrt_alpha_next, sqrt_one_minus_next = (
                broadcast(c, latent) for c in table[i].unbind()
            )
            clean, _ = split_prediction(model(latent, timesteps[i]).to(dtype), latent, sqrt_alpha, sqrt_one_minus,
                                        self.prediction_type)
            latent = c_skip * latent + c_out * clean  # f(x_t, t)
            if i < self.num_steps - 1:
                device = generator.device if generator is not None else latent.device
                fresh = torch.randn(latent.shape, generator=generator, device=device).to(latent.device, dtype)
                latent = sqrt_alpha_next * latent + sqrt_one_minus_next * fresh
        return latent.to(noise.dtype)


def draws_fresh_noise(name: str, eta: float = 0.0) -> bool:
    """Whether sampler ``name`` draws noise after the start (so a batch shares one generator's draws)."""
    return name == "lcm" or (name in ("ddim", "ddim_trailing") and eta > 0)


def make_sampler(
    name: str, process: DDPM, num_steps: int, eta: float = 0.0, prediction_type: str = "epsilon"
) -> DDIM | DPMSolverPP2M | LCM:
    """The sampler called ``name`` (one of SAMPLERS); eta applies to DDIM only."""
    if name in ("ddim", "ddim_trailing"):
        spacing = "leading" if name == "ddim" else "trailing"
        return DDIM(process, num_steps=num_steps, eta=eta, prediction_type=prediction_type, spacing=spacing)
    if eta != 0 and name in SAMPLERS:
        raise ValueError(f"eta={eta}: {name} takes no eta; eta applies to sampler='ddim' only")
    if name == "dpmpp_2m":
        return DPMSolverPP2M(process, num_steps=num_steps, prediction_type=prediction_type)
    if name == "lcm":
        return LCM(process, num_steps=num_steps, prediction_type=prediction_type)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
