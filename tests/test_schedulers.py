"""DDPM / DDIM against diffusers' schedulers configured as SD 2.1's scheduler_config.json."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from cdiff.schedulers import DDIM, DDPM
from tests.helpers import assert_parity

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
    [(dict(num_steps=0), "num_steps"), (dict(eta=-1.0), "eta"), (dict(prediction_type="sample"), "prediction_type")],
)
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        DDIM(**kwargs)
