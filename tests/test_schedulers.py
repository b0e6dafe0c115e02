"""DDPM / DDIM against diffusers' schedulers configured as SD 2.1's scheduler_config.json."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from cdiff.samplers import DDIM
from cdiff.schedulers import DDPM
from cdiff.testing import assert_parity

SD21 = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def reference_ddim(prediction_type, steps):
    ref = DDIMScheduler(**SD21, prediction_type=prediction_type)
    ref.set_timesteps(steps)
    return ref


def test_ddim_timesteps_match_sd21():
    ours = DDIM(num_steps=50)
    assert ours.timesteps[:3] == [981, 961, 941] and ours.timesteps[-1] == 1
    for steps in (1, 7, 25, 50, 999):
        assert DDIM(num_steps=steps).timesteps == reference_ddim("epsilon", steps).timesteps.tolist()


def test_alphas_cumprod_match():
    ref = DDPMScheduler(**{k: v for k, v in SD21.items() if k != "set_alpha_to_one"})
    assert_parity(DDPM().alphas_cumprod.float(), ref.alphas_cumprod, "alphas_cumprod", rel_tol=1e-6)


def test_add_noise_and_velocity_match():
    gen = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 500, 999])
    ref = DDPMScheduler(**{k: v for k, v in SD21.items() if k != "set_alpha_to_one"})
    ours = DDPM()
    assert_parity(ours.add_noise(clean, noise, t), ref.add_noise(clean, noise, t), "add_noise")
    assert_parity(ours.velocity(clean, noise, t), ref.get_velocity(clean, noise, t), "velocity")
    assert ours.alpha_bar(t).shape == (4,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches(prediction_type, eta):
    gen = torch.Generator().manual_seed(1)
    ours, ref = DDIM(num_steps=50, eta=eta, prediction_type=prediction_type), reference_ddim(prediction_type, 50)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    for t in ours.timesteps:  # every step, the last one (a_prev = a_0) included
        output = torch.randn(2, 4, 8, 8, generator=gen)
        noise = torch.randn(2, 4, 8, 8, generator=gen)
        expected = ref.step(output, t, sample, eta=eta, variance_noise=noise if eta > 0 else None)
        prev, clean = ours.step(output, t, sample, noise=noise)
        assert_parity(prev, expected.prev_sample, f"DDIM {prediction_type} eta={eta} t={t} prev")
        assert_parity(clean, expected.pred_original_sample, f"DDIM {prediction_type} eta={eta} t={t} x0")
        sample = expected.prev_sample


def test_ddim_sample_loop_is_the_steps():
    # a fake "model" predicting a fixed fraction of the latent: the loop must equal manual stepping
    ours = DDIM(num_steps=5)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    manual = noise
    for t in ours.timesteps:
        manual, _ = ours.step(0.3 * manual, t, manual)
    torch.testing.assert_close(ours.sample(lambda x, t: 0.3 * x, noise), manual, rtol=0, atol=0)


def test_eta_noise_from_generator_is_reproducible():
    ddim = DDIM(num_steps=10, eta=1.0)
    x = torch.ones(1, 4, 4, 4)
    a, _ = ddim.step(x, 901, x, generator=torch.Generator().manual_seed(3))
    b, _ = ddim.step(x, 901, x, generator=torch.Generator().manual_seed(3))
    c, _ = DDIM(num_steps=10).step(x, 901, x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3  # eta > 0 really adds noise


@pytest.mark.parametrize(
    "kwargs, word",
    [(dict(num_steps=0), "num_steps"), (dict(eta=-1.0), "eta"), (dict(prediction_type="x0"), "prediction_type")],
)
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        DDIM(**kwargs)


# --- half-precision latents, no syncs, DDIM's edge cases --------------------------------

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def assert_one_rounding(actual, expected, dtype, what):
    """actual (dtype) is expected (fp64) rounded once: within half an ulp plus fp32 arithmetic."""
    unit = torch.finfo(dtype).eps  # 2 x the unit roundoff: one ulp, for the interpreter-free CPU rounding
    err = (actual.double() - expected).abs()
    bound = unit * expected.abs() + 1e-5 + torch.finfo(dtype).tiny
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.2f}x the one-rounding bound (max abs error {err.max().item():.2e})"


@pytest.mark.parametrize("dtype_name", list(HALF))
def test_noise_schedule_in_half_precision_at_every_t(dtype_name):
    # One sample per training timestep, t = 0..999, against the same formulas in fp64. Before
    # the fix a_t was rounded to bf16 first: sqrt(1 - a_t) was 0 at t = 0, 1 (no noise at all).
    dtype = HALF[dtype_name]
    ddpm = DDPM()
    t = torch.arange(ddpm.num_train_timesteps)
    gen = torch.Generator().manual_seed(4)
    clean = torch.randn(len(t), 4, 2, 2, generator=gen).to(dtype)
    noise = torch.randn(len(t), 4, 2, 2, generator=gen).to(dtype)
    a = ddpm.alphas_cumprod.view(-1, 1, 1, 1)  # fp64
    x0, eps = clean.double(), noise.double()
    noisy, velocity = ddpm.add_noise(clean, noise, t), ddpm.velocity(clean, noise, t)
    assert noisy.dtype == dtype and velocity.dtype == dtype
    assert_one_rounding(noisy, a.sqrt() * x0 + (1 - a).sqrt() * eps, dtype, f"add_noise {dtype_name}")
    assert_one_rounding(velocity, a.sqrt() * eps - (1 - a).sqrt() * x0, dtype, f"velocity {dtype_name}")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("dtype_name", list(HALF))
def test_ddim_step_in_half_precision_at_every_t(dtype_name, prediction_type):
    # 999 steps visit every timestep 999..1; one sample per step, each with its own t (a (B,)
    # tensor of timesteps), against Eq. 12 written out in fp64.
    dtype = HALF[dtype_name]
    ddim = DDIM(num_steps=999, eta=0.5, prediction_type=prediction_type)
    t = torch.tensor(ddim.timesteps)
    gen = torch.Generator().manual_seed(5)
    sample = torch.randn(len(t), 4, 2, 2, generator=gen).to(dtype)
    output = torch.randn(len(t), 4, 2, 2, generator=gen).to(dtype)
    noise = torch.randn(len(t), 4, 2, 2, generator=gen).to(dtype)
    prev, clean = ddim.step(output, t, sample, noise=noise)
    assert prev.dtype == dtype and clean.dtype == dtype

    alphas = ddim.process.alphas_cumprod
    a = alphas[t].view(-1, 1, 1, 1)
    a_prev = alphas[(t - ddim.step_ratio).clamp(min=0)].view(-1, 1, 1, 1)
    x, out = sample.double(), output.double()
    if prediction_type == "epsilon":
        eps, x0 = out, (x - (1 - a).sqrt() * out) / a.sqrt()
    else:
        eps, x0 = a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out
    sigma = 0.5 * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    expected = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps + sigma * noise.double()
    assert_one_rounding(clean, x0, dtype, f"DDIM x0 {dtype_name} {prediction_type}")
    assert_one_rounding(prev, expected, dtype, f"DDIM prev {dtype_name} {prediction_type}")


def test_ddim_step_takes_tensor_timesteps():
    ddim = DDIM(num_steps=50, eta=0.3)
    gen = torch.Generator().manual_seed(6)
    sample, output, noise = (torch.randn(3, 4, 4, 4, generator=gen) for _ in range(3))
    t = torch.tensor([981, 481, 1])
    prev, clean = ddim.step(output, t, sample, noise=noise)
    for b in range(3):
        expected = ddim.step(output[b : b + 1], int(t[b]), sample[b : b + 1], noise=noise[b : b + 1])
        torch.testing.assert_close(prev[b : b + 1], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(clean[b : b + 1], expected[1], rtol=0, atol=0)
    scalar = ddim.step(output, torch.tensor(481), sample, noise=noise)
    torch.testing.assert_close(scalar[0], ddim.step(output, 481, sample, noise=noise)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="t=480 is not a timestep"):
        ddim.step(output, 480, sample)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_steps=1000), "first timestep would be 1000, past the last training timestep 999"),
        (dict(num_steps=1001), "num_steps must be an integer in"),
        (dict(num_steps=2.5), "num_steps must be an integer in"),
        (dict(eta=1.5), r"eta must be in \[0, 1\]"),
        (dict(eta=float("nan")), r"eta must be in \[0, 1\]"),
    ],
)
def test_ddim_edge_cases_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDIM(**kwargs)


def test_ddim_999_steps_and_eta_one_still_work():
    ddim = DDIM(num_steps=999, eta=1.0)
    assert ddim.timesteps[0] == 999 and ddim.timesteps[-1] == 1
    x = torch.ones(1, 4, 2, 2)
    for t in (999, 500, 1):
        prev, _ = ddim.step(x, t, x, noise=x)
        assert torch.isfinite(prev).all()


def test_schedule_tables_stay_on_the_device_once():
    ddpm, ddim = DDPM(), DDIM(num_steps=10)
    x, t = torch.randn(2, 4, 2, 2), torch.tensor([3, 700])
    first = ddpm.coefficients.on(x.device, torch.float32)
    ddpm.add_noise(x, x, t)
    ddpm.velocity(x, x, t)
    ddim.sample(lambda latent, t: latent, x)
    assert ddpm.coefficients.on(x.device, torch.float32) is first  # reused, not copied per call
    assert len(ddpm.coefficients._copies) == 1 and len(ddim.coefficients._copies) == 1
