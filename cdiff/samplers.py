"""Samplers beside DDIM, and the one way the pipeline picks a sampler by name.

Every sampler is built as ``Sampler(process, num_steps, ..., prediction_type)``, lists the
timesteps at which it calls the model in ``timesteps`` (one call per step, in order) and runs
with the same signature: ``sample(model, noise, generator=None, show_progress=False)``, where
``model(latent, t)`` gets the latent in fp32 (the loop's state stays in fp32 whatever the
noise's dtype) and t as a 0-d int64 tensor on the latent's device, and returns the prediction
(the noise, x_0 or v, as ``prediction_type`` says: cdiff.schedulers.PREDICTION_TYPES). Per-step coefficients live on the device, indexed by the step number:
a step makes no host-device copy or sync, and the loop has no data-dependent control flow. The
tables reach a device during the first run there, so capture a loop in a CUDA graph after one
warm-up run (tests/test_samplers.py does).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from cdiff.progress import progress
from cdiff.schedulers import (
    DDIM,
    DDPM,
    DeviceTable,
    broadcast,
    check_prediction_type,
    compute_dtype,
    leading_timesteps,
    split_prediction,
)

SAMPLERS = ("ddim", "dpmpp_2m")  # the names make_sampler takes


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
