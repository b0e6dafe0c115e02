"""DPM-Solver++(2M) against its formula and diffusers; the students' samplers (DDIM on the trailing grid,
LCM) against diffusers; convergence on Gaussian data; sync-free loops."""

import inspect
import math

import pytest
import torch

from cdiff.samplers import DDIM, LCM, DPMSolverPP2M, make_sampler
from cdiff.schedulers import DDPM, trailing_timesteps
from cdiff.testing import assert_parity

CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA device (the CPU tests above check the same loops for Python-visible sync points)"


def wavy_model(x, t):
    """A smooth nonlinear 'network' of x and t (t a 0-d integer tensor), any dtype."""
    s = t.to(x.dtype) / 1000
    return 0.8 * torch.tanh(x) + 0.3 * torch.sin(3 * s) * x + 0.1 * s


def dpmpp_2m_by_the_paper(model, x, timesteps, alphas_cumprod, prediction_type):
    """Lu et al. 2022, Algorithm 2 (DPM-Solver++(2M)), written out in fp64 from the paper:

    lambda_t = log(alpha_t / sigma_t); h_i = lambda_{t_i} - lambda_{t_{i-1}}; r_i = h_{i-1} / h_i;
    first step: x_{t_1} = (sigma_{t_1} / sigma_{t_0}) x_{t_0} - alpha_{t_1} (e^{-h_1} - 1) x0(t_0);
    then D_i = (1 + 1/(2 r_i)) x0(t_{i-1}) - 1/(2 r_i) x0(t_{i-2}) and
    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i.
    The final step goes to sigma = 0 (lambda = inf, alpha = 1) at first order.
    """
    a = [float(alphas_cumprod[t]) for t in timesteps]
    alpha = [math.sqrt(v) for v in a] + [1.0]
    sigma = [math.sqrt(1 - v) for v in a] + [0.0]
    lam = [math.log(al / si) for al, si in zip(alpha[:-1], sigma[:-1])] + [math.inf]
    x0_before = None
    for i, t in enumerate(timesteps):
        out = model(x, torch.tensor(t))
        x0 = (x - sigma[i] * out) / alpha[i] if prediction_type == "epsilon" else alpha[i] * x - sigma[i] * out
        h = lam[i + 1] - lam[i]
        if x0_before is None or i == len(timesteps) - 1:
            d = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_before
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * (math.exp(-h) - 1) * d
        x0_before = x0
    return x


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_an_x0_model_samples_as_the_noise_predictor_it_implies(name):
    """prediction_type="sample" reads the output as x0; the same model turned into a noise predictor
    by hand, eps = (x_t - sqrt(a) x0) / sqrt(1 - a), and sampled as one, gives the same result."""
    process = DDPM()
    noise = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def as_noise(x, t):
        a = process.alphas_cumprod[t]
        return (x - a.sqrt() * wavy_model(x, t)) / (1 - a).sqrt()

    x0_run = make_sampler(name, process, 10, prediction_type="sample").sample(wavy_model, noise)
    eps_run = make_sampler(name, process, 10, prediction_type="epsilon").sample(as_noise, noise)
    torch.testing.assert_close(x0_run, eps_run, rtol=1e-10, atol=1e-10)
    assert (x0_run - make_sampler(name, process, 10).sample(wavy_model, noise)).abs().max() > 0.1  # the type matters


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_dpmpp_2m_matches_its_formula(steps, prediction_type):
    sampler = DPMSolverPP2M(num_steps=steps, prediction_type=prediction_type)
    noise = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    ours = sampler.sample(wavy_model, noise)
    expected = dpmpp_2m_by_the_paper(
        wavy_model, noise, sampler.timesteps, sampler.process.alphas_cumprod, prediction_type
    )
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [7, 20])
def test_dpmpp_2m_matches_diffusers(steps, prediction_type):
    from diffusers import DPMSolverMultistepScheduler

    sampler = DPMSolverPP2M(num_steps=steps, prediction_type=prediction_type)
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
        prediction_type=prediction_type,
    )  # fmt: skip
    ref.set_timesteps(timesteps=sampler.timesteps)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = noise
    for t in ref.timesteps:
        expected = ref.step(wavy_model(expected, t), t, expected).prev_sample
    assert_parity(sampler.sample(wavy_model, noise), expected, f"DPM-Solver++(2M) {steps} steps {prediction_type}")


# --- The distilled students' samplers -----------------------------------------------------------

SD21_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers(steps, prediction_type):
    """Multistep consistency sampling against diffusers' LCMScheduler (50 origin steps, its default
    boundary scalings), the fresh noise of each step drawn from the same seeded generator."""
    from diffusers import LCMScheduler

    sampler = LCM(num_steps=steps, prediction_type=prediction_type)
    ref = LCMScheduler(**SD21_BETAS, original_inference_steps=50, set_alpha_to_one=False, prediction_type=prediction_type)
    ref.set_timesteps(steps)
    assert sampler.timesteps == ref.timesteps.tolist()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected, generator = noise, torch.Generator().manual_seed(1)
    for t in ref.timesteps:
        expected = ref.step(wavy_model(expected, t), t, expected, generator=generator).prev_sample
    ours = sampler.sample(wavy_model, noise, generator=torch.Generator().manual_seed(1))
    assert_parity(ours, expected, f"LCM {steps} steps {prediction_type}")


def test_lcm_timesteps_and_its_boundary():
    assert [LCM(num_steps=n).timesteps for n in (1, 2, 4)] == [[999], [999, 499], [999, 759, 499, 259]]
    from cdiff.samplers import boundary_scalings

    c_skip, c_out = boundary_scalings(torch.tensor([0.0, 19.0, 999.0], dtype=torch.float64))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x
    assert c_skip[1] == pytest.approx(0.25 / (190**2 + 0.25)) and c_out[2] == pytest.approx(1, abs=1e-8)


@pytest.mark.parametrize("steps", [4, 8])
def test_ddim_on_the_trailing_grid_matches_diffusers(steps):
    from diffusers import DDIMScheduler

    sampler = make_sampler("ddim_trailing", DDPM(), steps)
    ref = DDIMScheduler(**SD21_BETAS, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    ref.set_timesteps(steps)
    assert sampler.timesteps == ref.timesteps.tolist() == trailing_timesteps(steps, 1000)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = noise
    for t in ref.timesteps:
        expected = ref.step(wavy_model(expected, t), t, expected).prev_sample
    assert_parity(sampler.sample(wavy_model, noise), expected, f"DDIM trailing {steps} steps")
    assert [int(sampler.step_index(torch.tensor(t))) for t in sampler.timesteps] == list(range(steps))


def test_the_trailing_grid_of_n_steps_is_every_other_of_2n():
    for n in (1, 2, 4, 8, 16, 32, 64):
        assert trailing_timesteps(2 * n, 1000)[::2] == trailing_timesteps(n, 1000)
    assert trailing_timesteps(4, 1000) == [999, 749, 499, 249]


# --- A known case: Gaussian data, whose exact denoiser and ODE solution are closed-form -----------

MU, SPREAD = 0.5, 0.2  # data x_0 ~ N(MU, SPREAD^2), per element


def gaussian_noise_model(alphas_cumprod):
    def model(x, t):
        a = alphas_cumprod[t].to(x.dtype)
        clean = MU + a.sqrt() * SPREAD**2 / (a * SPREAD**2 + 1 - a) * (x - a.sqrt() * MU)  # E[x_0 | x_t]
        return (x - a.sqrt() * clean) / (1 - a).sqrt()  # E[noise | x_t]

    return model


def test_samplers_converge_on_gaussian_data():
    # The probability-flow ODE keeps z = (x_t - sqrt(a_t) MU) / sqrt(a_t SPREAD^2 + 1 - a_t)
    # fixed. Check the state each sampler reaches at t = 501 (on every grid below): DDIM is first
    # order (error halves per doubling of steps), DPM-Solver++(2M) second order (quarters).
    process = DDPM()
    a = process.alphas_cumprod
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact_model = gaussian_noise_model(a)
    errors = {"ddim": [], "dpmpp_2m": []}
    for steps in (10, 20, 40):
        for name in errors:
            sampler = make_sampler(name, process, steps)
            seen = {}

            def model(x, t):
                if int(t) == 501:
                    seen["x"] = x.clone()
                return exact_model(x, t)

            sampler.sample(model, noise)
            a0 = a[sampler.timesteps[0]]
            z = (noise - a0.sqrt() * MU) / (a0 * SPREAD**2 + 1 - a0).sqrt()
            exact = a[501].sqrt() * MU + (a[501] * SPREAD**2 + 1 - a[501]).sqrt() * z
            errors[name].append((seen["x"] - exact).abs().max().item())
    print({name: [f"{e:.2e}" for e in errs] for name, errs in errors.items()})
    for coarse, fine in zip(errors["ddim"], errors["ddim"][1:]):
        assert 1.7 < coarse / fine < 2.5
    for coarse, fine in zip(errors["dpmpp_2m"], errors["dpmpp_2m"][1:]):
        assert coarse / fine > 3.5
    assert errors["dpmpp_2m"][-1] < 1e-4 and errors["dpmpp_2m"][1] < errors["ddim"][1] / 4


def test_samplers_share_one_signature():
    signatures = {cls.__name__: list(inspect.signature(cls.sample).parameters) for cls in (DDIM, DPMSolverPP2M, LCM)}
    assert signatures["DDIM"] == signatures["DPMSolverPP2M"] == signatures["LCM"] == [
        "self", "model", "noise", "generator", "show_progress"]
    for name in ("ddim", "dpmpp_2m"):
        assert make_sampler(name, DDPM(), 50).timesteps == DDIM(num_steps=50).timesteps


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("euler", {}, "sampler must be one of"),
        ("dpmpp_2m", dict(eta=0.5), "eta applies to sampler='ddim' only"),
        ("dpmpp_2m", dict(num_steps=1000), "past the last training timestep"),
    ],
)
def test_bad_sampler_arguments(name, kwargs, message):
    args = dict(num_steps=10) | kwargs
    with pytest.raises(ValueError, match=message):
        make_sampler(name, DDPM(), **args)


# --- No host sync inside the loops -------------------------------------------------------------

SYNC_POINTS = ["item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__"]


def make_samplers():
    return [DDIM(num_steps=6), DDIM(num_steps=6, eta=0.5), DPMSolverPP2M(num_steps=6), LCM(num_steps=4),
            DDIM(num_steps=4, spacing="trailing")]


@pytest.mark.parametrize("index", range(5))
def test_sampling_loops_have_no_sync_points(index, monkeypatch):
    # On the CPU nothing syncs, so this checks the code instead: during a whole loop, no call of
    # the Python methods that read a tensor back to the host (each one a sync on a GPU), and no
    # tensor built from Python values (an upload per step; as_tensor(t) blocks graph capture).
    # It cannot see syncs inside C++ ops; the CUDA test below checks those with sync debug mode.
    sampler = make_samplers()[index]
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    expected = sampler.sample(wavy_model, noise, generator=generator)  # also fills the device tables

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} called inside the sampling loop")

        return call

    for name in SYNC_POINTS:
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, forbidden(f"torch.{name}"))
    result = sampler.sample(wavy_model, noise, generator=generator.manual_seed(2))
    monkeypatch.undo()
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("index", range(5))
def test_sampling_loops_never_sync_on_cuda(index):
    sampler = make_samplers()[index]
    noise = torch.randn(2, 4, 8, 8, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)  # eta > 0 draws on the device
    sampler.sample(wavy_model, noise, generator=generator)  # the tables reach the device here, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler.sample(wavy_model, noise, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_sampling_loop_captures_in_a_cuda_graph(name):
    from cdiff.config import UNetConfig
    from cdiff.unet import UNet

    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).cuda().eval()
    context = torch.randn(2, 6, unet.config.context_dim, device="cuda")
    sampler = make_sampler(name, DDPM(), 10)
    static_noise = torch.randn(2, 4, 16, 16, device="cuda")

    def model(x, t):
        return unet(x, t, context)

    with torch.no_grad():
        eager = sampler.sample(model, static_noise)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            sampler.sample(model, static_noise)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = sampler.sample(model, static_noise)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, eager, rtol=1e-5, atol=1e-5)
        static_noise.copy_(torch.randn_like(static_noise))  # new input, same graph
        graph.replay()
        torch.testing.assert_close(static_out, sampler.sample(model, static_noise), rtol=1e-5, atol=1e-5)
