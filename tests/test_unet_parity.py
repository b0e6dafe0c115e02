"""cdiff's U-Net against diffusers' UNet2DConditionModel in the full SD 2.1 architecture.

Seeded random weights are put into the diffusers model, renamed with the UNET table and loaded
strictly into cdiff; both run in fp32 on CPU at a 32x32 latent, batch 2, two timesteps.
The full model is ~865M parameters (3.5 GB in fp32). To hold one copy only, cdiff's parameters
are the diffusers tensors themselves (``load_state_dict(assign=True)``); a fixture builds one
pair per channel layout and frees it before the next.
"""

from __future__ import annotations

import gc
import time
from dataclasses import replace

import pytest
import torch

from cdiff.attention import use_attention_backend
from cdiff.config import UNetConfig
from cdiff.layouts.diffusers import UNET
from cdiff.testing import SD21_UNET, assert_parity, randomize_
from cdiff.unet import UNet

diffusers = pytest.importorskip("diffusers")

CHANNELS = {"8in5out": (8, 5), "4in4out": (4, 4)}
TIMESTEPS = torch.tensor([37, 781])


def _diffusers_model(in_channels: int, out_channels: int, device: str):
    with torch.device(device):
        return diffusers.UNet2DConditionModel(**dict(SD21_UNET, in_channels=in_channels, out_channels=out_channels))


def test_rename_table_round_trips_every_sd21_key():
    """Every key of the diffusers SD 2.1 U-Net (both channel layouts) renames to a cdiff key of
    the same shape and back to itself, and the renamed set is exactly cdiff's state dict."""
    for in_channels, out_channels in CHANNELS.values():
        theirs = _diffusers_model(in_channels, out_channels, "meta").state_dict()
        with torch.device("meta"):
            ours = UNet(replace(UNetConfig.sd21(), in_channels=in_channels, out_channels=out_channels)).state_dict()
        renamed = UNET.rename(theirs, to="cdiff")
        assert len(renamed) == len(theirs) == len(ours) == 686
        assert set(renamed) == set(ours)
        assert all(renamed[k].shape == ours[k].shape for k in ours)
        back = UNET.rename(renamed, to="foreign")
        assert list(back) == list(theirs)
        for key in theirs:
            assert UNET.to_foreign(UNET.to_cdiff(key)) == key


@pytest.fixture(scope="module", params=list(CHANNELS), ids=list(CHANNELS))
def models(request):
    """(diffusers model, cdiff model, reference outputs cache); one pair alive at a time."""
    in_channels, out_channels = CHANNELS[request.param]
    start = time.perf_counter()
    theirs = _diffusers_model(in_channels, out_channels, "meta").to_empty(device="cpu")
    randomize_(theirs, seed=2024 + in_channels).eval()
    with torch.device("meta"):
        ours = UNet(replace(UNetConfig.sd21(), in_channels=in_channels, out_channels=out_channels))
    ours.load_state_dict(UNET.rename(theirs.state_dict(), to="cdiff"), strict=True, assign=True)
    ours.eval()
    print(f"\n[{request.param}] built and randomised in {time.perf_counter() - start:.1f} s, "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters")
    yield theirs, ours, {}
    del theirs, ours
    gc.collect()


def _inputs(in_channels: int, context_len: int):
    gen = torch.Generator().manual_seed(7 + context_len)
    sample = torch.randn(2, in_channels, 32, 32, generator=gen)
    context = torch.randn(2, context_len, 1024, generator=gen)
    return sample, context


@pytest.mark.slow  # the full-size SD 2.1 U-Net (865M parameters) in fp32, both libraries: 15-35 s per case
@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("context_len", [77, 6], ids=["77tok", "6tok"])
@torch.no_grad()
def test_sd21_matches_diffusers(models, context_len, backend):
    theirs, ours, reference = models
    sample, context = _inputs(ours.config.in_channels, context_len)
    if context_len not in reference:
        start = time.perf_counter()
        reference[context_len] = theirs(sample, TIMESTEPS, encoder_hidden_states=context).sample
        print(f"diffusers forward {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    with use_attention_backend(backend):
        out = ours(sample, TIMESTEPS, context)
    print(f"cdiff forward {time.perf_counter() - start:.1f} s")
    expected = reference[context_len]
    assert out.shape == (2, ours.config.out_channels, 32, 32)
    assert expected.abs().max() > 1e-2  # a live output, not a collapsed one
    assert_parity(out, expected, f"SD 2.1 U-Net {ours.config.in_channels}in/{ours.config.out_channels}out, "
                                 f"{context_len}-token context, {backend}")
