"""Step caching (cdiff.stepcache, DeepCache): the outer level around its own inside is the whole U-Net,
bit for bit; interval 1 is the uncached path; a cached run is DeepCache as written out by hand."""

import pytest
import torch

from cdiff.config import UNetConfig
from cdiff.loss import confidence_from_raw
from cdiff.samplers import DDIM
from cdiff.stepcache import DeepCache, whole_steps
from cdiff.testing import randomize_, tiny_pipeline
from cdiff.tiling import Tiling
from cdiff.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")


def inside_by_hand(unet: UNet, sample, t, context) -> torch.Tensor:
    """The input of the last up block, from the blocks themselves: conv_in, every down block, the
    mid block, every up block but the last, each taking its skips as the U-Net's docstring says."""
    time_emb, mask = unet.conditioning(sample, t)
    x = unet.conv_in(sample)
    skips = [x]
    for block in unet.down:
        x, made = block(x, time_emb, context)
        skips += made
    x = unet.mid(x, time_emb, context)
    for block in unet.up[:-1]:
        taken = len(block.skip_channels)
        x = block(x, tuple(skips[-taken:]), time_emb, context)
        del skips[-taken:]
    return x


@pytest.fixture(scope="module")
def pipeline():
    pipe = tiny_pipeline(0)
    randomize_(pipe.unet, 1)  # no zero-initialised layer (the variance channel) can hide a wrong skip
    return pipe


def test_the_outer_level_around_its_own_inside_is_the_whole_unet(pipeline):
    unet = pipeline.unet
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 8, 16, 16, generator=gen), torch.randn(2, 6, 1024, generator=gen)
    t = torch.tensor([981, 481])
    with torch.no_grad():
        whole = unet(sample, t, context)
        inner = inside_by_hand(unet, sample, t, context)
        assert torch.equal(unet.forward_outer(sample, t, context, inner), whole)
        # Another inside gives another output: forward_outer does use it.
        assert not torch.allclose(unet.forward_outer(sample, t, context, inner * 0.5), whole)


def test_interval_1_is_the_uncached_path_bit_for_bit(pipeline):
    sar = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for sampler in ("ddim", "dpmpp_2m"):
        plain = pipeline.translate(sar, steps=6, sampler=sampler, generator=torch.Generator().manual_seed(3))
        cached = pipeline.translate(sar, steps=6, sampler=sampler, generator=torch.Generator().manual_seed(3),
                                    cache_interval=1)
        assert torch.equal(cached.eo, plain.eo) and torch.equal(cached.confidence, plain.confidence)
    # DeepCache itself with every step whole: the plain U-Net's outputs.
    unet = pipeline.unet
    x, context = torch.randn(1, 8, 16, 16), torch.randn(1, 6, 1024)
    cache = DeepCache(unet, [True, True])
    with torch.no_grad():
        for step, t in enumerate((900, 500)):
            assert torch.equal(cache(step, x, torch.tensor(t), context), unet(x, torch.tensor(t), context))
    assert (cache.whole_passes, cache.outer_passes) == (2, 0)


def test_a_cached_run_is_deepcache_written_out(pipeline):
    """Interval 3 over 8 DDIM steps: whole passes at steps 0, 3, 6 and at the confidence step (t <= 500:
    step 4); between them the outer level around the last whole pass's inside, computed by hand."""
    assert whole_steps(8, 3, (4,)) == [True, False, False, True, True, False, True, False]
    sar = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(4)) * 2 - 1
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    result = pipeline.translate(sar, steps=8, latents=noise, cache_interval=3)

    unet, whole = pipeline.unet, [True, False, False, True, True, False, True, False]
    sar_latent = pipeline.vae.encode_latent(sar)
    context = pipeline.context.expand(1, -1, -1)
    kept, calls, variance = {}, [0], {}

    def model(latent, t):
        step = calls[0]
        calls[0] += 1
        x = torch.cat([sar_latent, latent], dim=1)
        if whole[step]:
            kept["inside"] = inside_by_hand(unet, x, t, context)
            out = unet(x, t, context)
        else:
            out = unet.forward_outer(x, t, context, kept["inside"])
        variance[step] = out[:, 4:]
        return out[:, :4]

    with torch.no_grad():
        latent = DDIM(num_steps=8).sample(model, noise)
        eo = pipeline.vae.decode_latent(latent).clamp(-1, 1)
    assert torch.equal(result.eo, eo)
    assert torch.equal(result.confidence, confidence_from_raw(variance[4]))  # a whole pass's map
    uncached = pipeline.translate(sar, steps=8, latents=noise)
    assert not torch.equal(result.eo, uncached.eo)  # the cache did change the computation


def test_cache_options_are_checked(pipeline):
    sar = torch.full((1, 3, 128, 128), -0.5)
    with pytest.raises(ValueError, match="cache_interval must be an integer >= 1"):
        pipeline.translate(sar, steps=2, cache_interval=0)
    with pytest.raises(ValueError, match="fits one tile"):
        pipeline.translate(sar, steps=2, cache_interval=2, tiling=Tiling(tile=64, overlap=16))
    with pytest.raises(ValueError, match="first step must be a whole pass"):
        DeepCache(pipeline.unet, [False, True])


def test_the_outer_level_needs_the_skips_of_the_first_level():
    """A U-Net whose last up block takes more skips than conv_in and down.0 make is refused by name."""
    unet = UNet(UNetConfig.tiny(in_channels=8, out_channels=5, num_res_blocks=(1, 2, 2, 2)))
    unet.up[-1].skip_channels = unet.up[-1].skip_channels + (32, 32)  # as a changed block could declare
    x = torch.zeros(1, 8, 16, 16)
    with pytest.raises(ValueError, match=r"up.3 takes 4 skips, more than conv_in and down.0 make \(3\)"):
        unet.forward_outer(x, 1, torch.zeros(1, 6, 1024), torch.zeros(1, 32, 16, 16))
