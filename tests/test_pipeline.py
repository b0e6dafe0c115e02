"""Pipeline.translate: confidence step, reproducible starting noise, per-module dtypes, bad input."""

import warnings

import pytest
import torch
from torch import nn

from cdiff.config import UNetConfig
from cdiff.loss import confidence_from_raw
from cdiff.pipeline import Pipeline, confidence_step
from cdiff.samplers import make_sampler
from cdiff.samplers import DDIM
from cdiff.schedulers import DDPM, leading_timesteps
from cdiff.testing import tiny_pipeline

SIDE = 64  # the smallest image the SD 2.1 layout takes: latent 8x8, U-Net bottom 1x1


class RecordingUNet(nn.Module):
    """A cheap stand-in for the U-Net (one 1x1 convolution plus a term in t).

    ``record``: keep (t, output) of every call (reading t back to the host); ``nan_at``: the
    timestep from which it returns NaN.
    """

    def __init__(self, record: bool = True, nan_at: int | None = None):
        super().__init__()
        self.config = UNetConfig.tiny(in_channels=8, out_channels=5)
        self.mix = nn.Conv2d(8, 5, 1)
        self.calls, self.record, self.nan_at = [], record, nan_at

    def forward(self, sample, t, context):
        output = 0.1 * self.mix(sample) + t.to(sample.dtype) / 1000
        if self.nan_at is not None and int(t) <= self.nan_at:
            output = output * float("nan")
        if self.record:
            self.calls.append((int(t), output.detach().clone()))
        return output


def pipeline_with(unet) -> Pipeline:
    real = tiny_pipeline(0)
    return Pipeline(unet, real.vae, real.context)


def sar_batch(batch=1, seed=0):
    return torch.rand(batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- The confidence map keeps its meaning at any step count ----------------------------------


def test_confidence_step_is_the_release_step_at_ddim_50():
    # The release keeps step steps // 2 = 25 of DDIM-50, t = 481: the first step at or below
    # T/2 = 500. (The step nearest 500 would be 24, t = 501: not the release's.)
    timesteps = DDIM(num_steps=50).timesteps
    assert confidence_step(timesteps, 1000) == 25 == 50 // 2 and timesteps[25] == 481
    # At other counts steps // 2 drifts (6 steps: t = 333); the rule stays at t <= 500.
    six = DDIM(num_steps=6).timesteps
    assert confidence_step(six, 1000) == 2 and six[2] == 499 and six[6 // 2] == 333
    for steps in range(1, 1000):
        grid = leading_timesteps(steps, 1000)
        k = confidence_step(grid, 1000)
        assert grid[k] <= 500 and (k == 0 or grid[k - 1] > 500), steps


@pytest.mark.parametrize(
    "sampler, steps, index, t", [("ddim", 50, 25, 481), ("ddim", 6, 2, 499), ("dpmpp_2m", 12, 5, 499)]
)
def test_translate_reads_confidence_at_the_step_nearest_t_half(sampler, steps, index, t):
    unet = RecordingUNet()
    result = pipeline_with(unet).translate(sar_batch(), steps=steps, sampler=sampler)
    assert len(unet.calls) == steps
    assert unet.calls[index][0] == t == make_sampler(sampler, DDPM(), steps).timesteps[index]
    expected = confidence_from_raw(unet.calls[index][1][:, 4:])
    torch.testing.assert_close(result.confidence, expected, rtol=0, atol=0)


# --- the starting noise as an argument ----------------------------------------------


@pytest.mark.slow  # several whole translations per sampler: 20-25 s each
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_latents_reproduce_the_seeded_run(sampler):
    pipe, sar = tiny_pipeline(0), sar_batch(batch=2)
    seeded = pipe.translate(sar, steps=2, sampler=sampler, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(2, 4, SIDE // 8, SIDE // 8, generator=torch.Generator().manual_seed(7))
    given = pipe.translate(sar, steps=2, sampler=sampler, latents=noise)
    assert torch.equal(seeded.eo, given.eo) and torch.equal(seeded.confidence, given.confidence)
    other = pipe.translate(sar, steps=2, sampler=sampler, latents=torch.randn_like(noise))
    assert not torch.equal(other.eo, given.eo)


def test_latents_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"latents must have the SAR latent's shape \(1, 4, 8, 8\)"):
        tiny_pipeline(0).translate(sar_batch(), steps=1, latents=torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="latents contain NaN"):
        tiny_pipeline(0).translate(sar_batch(), steps=1, latents=torch.full((1, 4, 8, 8), float("nan")))


# --- each module keeps its own dtype --------------------------------------------------


@pytest.mark.parametrize("unet_dtype, vae_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_each_module_keeps_its_own_dtype(unet_dtype, vae_dtype):
    pipe = tiny_pipeline(0)
    pipe.unet.to(unet_dtype)
    pipe.vae.to(vae_dtype)
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0].dtype)  # returns None: the input is left alone

        return hook

    for name, module in (("unet", pipe.unet), ("encoder", pipe.vae.encoder), ("decoder", pipe.vae.decoder)):
        module.register_forward_pre_hook(record(name))
    result = pipe.translate(sar_batch(), steps=2, generator=torch.Generator().manual_seed(0))
    assert seen == {"encoder": vae_dtype, "unet": unet_dtype, "decoder": vae_dtype}
    assert result.eo.dtype == vae_dtype and result.confidence.dtype == torch.float32
    reference = tiny_pipeline(0).translate(sar_batch(), steps=2, generator=torch.Generator().manual_seed(0))
    assert (result.eo.float() - reference.eo).abs().max() < 0.1  # bf16 rounding, not a different image


# --- input that is wrong without being malformed -------------------------------------


@pytest.mark.parametrize(
    "sar, message",
    [
        (torch.zeros(1, 3, SIDE, SIDE, dtype=torch.uint8), r"scaled to \[-1, 1\], got torch.uint8 .*/ 127.5 - 1"),
        (torch.zeros(1, 3, SIDE, SIDE, dtype=torch.int64), "float tensor"),
        (torch.zeros(1, 1, SIDE, SIDE), r"sar must have 3 channels.*repeat the channel: sar.repeat\(1, 3, 1, 1\)"),
        (torch.zeros(1, 3, 96, 96), "multiples of 64 .*got 96x96"),
        (torch.zeros(3, SIDE, SIDE), r"sar must be SAR images of shape \(B, 3, H, W\)"),
        (torch.zeros(0, 3, SIDE, SIDE), "sar holds no images"),
    ],
)
def test_translate_refuses_bad_input(sar, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(0).translate(sar, steps=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(sampler="euler"), "sampler must be one of"), (dict(steps=1000), "past the last training timestep"),
     (dict(eta=2.0), r"eta must be in \[0, 1\]"), (dict(sampler="dpmpp_2m", eta=0.5), "eta applies to")],
)
def test_translate_refuses_bad_sampler_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(0).translate(sar_batch(), **kwargs)


def test_nan_in_the_input_is_refused_naming_the_sample():
    sar = sar_batch(batch=3)
    sar[1, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match=r"sar contains NaN or Inf \(samples \[1\]\)"):
        tiny_pipeline(0).translate(sar, steps=1)


@pytest.mark.slow  # a translation per range it tries: about 20 s
def test_values_outside_the_unit_range_warn_once():
    pipe = tiny_pipeline(0)
    with pytest.warns(UserWarning, match=r"lie in \[0, 255\]; translate expects SAR scaled to \[-1, 1\]"):
        pipe.translate(torch.full((1, 3, SIDE, SIDE), 255.0).index_fill_(2, torch.tensor([0]), 0.0), steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.translate(torch.full((1, 3, SIDE, SIDE), 255.0), steps=1)  # once per pipeline
        tiny_pipeline(0).translate(sar_batch(), steps=1)  # in range: no warning
    with pytest.warns(UserWarning, match=r"from \[0, 1\]: 2 x - 1"):
        tiny_pipeline(0).translate(torch.rand(1, 3, SIDE, SIDE), steps=1)


def test_nan_from_the_unet_names_the_step():
    steps = 6
    bad_t = DDIM(num_steps=steps).timesteps[3]
    with pytest.raises(ValueError, match=rf"U-Net's output has NaN or Inf from step 3 of 6 \(t={bad_t}\)"):
        pipeline_with(RecordingUNet(nan_at=bad_t)).translate(sar_batch(), steps=steps)


@pytest.mark.parametrize("module, message", [("encoder", "VAE encoder's output"), ("decoder", "VAE decoder's output")])
def test_nan_from_the_vae_names_the_module(module, message):
    pipe = tiny_pipeline(0)
    with torch.no_grad():
        getattr(pipe.vae, module).conv_out.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=message):
        pipe.translate(sar_batch(), steps=1)


def test_host_syncs_do_not_grow_with_the_step_count(monkeypatch):
    # On a GPU each read-back below is a host sync; the count must not depend on the steps
    # (input check once, outcome check once), so the loop itself has none.
    counts = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def call(self, *args, **kwargs):
            counts[-1] += 1
            return original(self, *args, **kwargs)

        return call

    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    for steps, sampler in ((2, "ddim"), (8, "ddim"), (8, "dpmpp_2m")):
        pipe = pipeline_with(RecordingUNet(record=False))
        counts.append(0)
        pipe.translate(sar_batch(), steps=steps, sampler=sampler)
    assert counts[0] == counts[1] == counts[2], counts
