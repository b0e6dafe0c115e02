"""Changing the U-Net: blocks swapped through the skip protocol, partial loading into a changed
model (U-Net and VAE), and gradient checkpointing (tiny preset)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from cdiff.config import UNetConfig, VAEConfig
from cdiff.load import load_unet, load_vae, load_weights
from cdiff.native import save_native
from cdiff.testing import randomize_
from cdiff.unet import DownBlock, UNet
from cdiff.vae import VAE
from cdiff.weightfile import CheckpointError

CONFIG = UNetConfig.tiny(in_channels=8, out_channels=5)


def inputs(batch=2, side=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 8, side, side, generator=gen), torch.tensor([3, 600])[:batch],
            torch.randn(batch, 6, 1024, generator=gen))


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A native file of a seeded tiny model, and its U-Net and VAE."""
    unet, vae = randomize_(UNet(CONFIG), 0).eval(), randomize_(VAE(VAEConfig.tiny()), 1).eval()
    path = tmp_path_factory.mktemp("stored") / "tiny.safetensors"
    save_native(path, unet, vae, torch.randn(6, 1024))
    return path, unet, vae


# --- the skip protocol ------------------------------------------------------------------------


class DenoisedSkips(DownBlock):
    """A changed down block: an extra 1x1 conv on every skip it emits (same widths)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_conv = nn.Conv2d(self.out_channels, self.out_channels, 1)

    def forward(self, sample, time_emb, context, mask=None):
        sample, skips = super().forward(sample, time_emb, context, mask)
        return sample, tuple(self.skip_conv(s) for s in skips)


class ChangedUNet(UNet):
    def make_down_block(self, level, in_channels, out_channels):
        if level != 1:
            return super().make_down_block(level, in_channels, out_channels)
        return DenoisedSkips(in_channels, out_channels, self.config, level, downsample=True)


def test_a_changed_block_fits_and_runs():
    model = ChangedUNet(CONFIG)
    assert isinstance(model.down[1], DenoisedSkips) and model.down[1].skip_channels == (64, 64, 64)
    assert model(*inputs()).shape == (2, 5, 16, 16)


@pytest.mark.parametrize("case", ["wider output", "one more skip", "one skip fewer", "another skip width"])
def test_a_block_that_does_not_fit_is_named(case):
    class Broken(UNet):
        def make_down_block(self, level, in_channels, out_channels):
            block = super().make_down_block(level, in_channels, out_channels)
            if level == 1 and case == "wider output":
                block.out_channels += 8
            if level == 1 and case == "one more skip":
                block.skip_channels += (out_channels,)
            if level == 0 and case == "one skip fewer":
                block.skip_channels = block.skip_channels[1:]
            return block

        def make_up_block(self, level, in_channels, skip_channels, out_channels):
            if level == 1 and case == "another skip width":
                skip_channels = (48,) + skip_channels[1:]
            return super().make_up_block(level, in_channels, skip_channels, out_channels)

    messages = {
        "wider output": r"UNet block down\.2 \(DownBlock\): takes 64 channels, but down\.1 gives 72",
        "one more skip": r"the down path makes 1 skips more than the up path consumes \(made: conv_in 1, down\.0 3, "
                         r"down\.1 4, down\.2 3, down\.3 2; consumed: up\.0 3, up\.1 3, up\.2 3, up\.3 3\)",
        "one skip fewer": r"UNet: up level 0 takes 3 skips, but only 2 are left \(made: conv_in 1, down\.0 2, down\.1 3",
        "another skip width": r"UNet block up\.2 \(UpBlock\): consumes skips of widths \(48, 64, 64\), but the down path "
                              r"leaves it \(32 from down\.0, 64 from down\.1, 64 from down\.1\)",
    }
    with pytest.raises(ValueError, match=messages[case]):
        Broken(CONFIG)


def test_replacing_a_block_in_place_is_checked_on_demand():
    model = UNet(CONFIG)
    model.down[2] = DownBlock(64, 48, replace(CONFIG, norm_groups=8), 2, downsample=True)
    with pytest.raises(ValueError, match=r"UNet block down\.3 \(DownBlock\): takes 64 channels, but down\.2 gives 48"):
        model.check_blocks()


# --- partial loading --------------------------------------------------------------------------


def test_load_into_a_config_with_added_blocks(stored):
    """A second transformer block per spatial transformer: the stored tensors load, the added
    ones keep their initialisation, and the report names them."""
    path, original, _ = stored
    deeper = replace(CONFIG, transformer_depth=2)
    with pytest.raises(CheckpointError, match=r"UNet state does not match: 320 missing keys"):
        load_unet(path, config=deeper)  # strict stays the default
    torch.manual_seed(7)
    initial = UNet(deeper).state_dict()
    torch.manual_seed(7)
    model = load_unet(path, config=deeper, strict=False)
    old = original.state_dict()
    added = [k for k in model.state_dict() if k not in old]
    assert len(added) == 320 and all(".blocks.1." in k for k in added)  # 16 transformers x 20 tensors
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, old[key] if key in old else initial[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(initial["mid.attn.blocks.0.ff.proj_in.weight"], old["mid.attn.blocks.0.ff.proj_in.weight"])


def test_load_weights_into_a_subclass_reports_what_it_did(stored):
    path, original, _ = stored
    torch.manual_seed(3)
    model = ChangedUNet(CONFIG)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"2 missing keys \(first: \['down\.1\.skip_conv\.weight'"):
        load_weights(model, path)
    report = load_weights(model, path, strict=False)
    assert report.missing == ("down.1.skip_conv.weight", "down.1.skip_conv.bias")
    assert not report.unexpected and not report.mismatched and len(report.loaded) == len(original.state_dict())
    assert "2 missing, left at their initialisation (first: down.1.skip_conv.weight" in str(report)
    for key, value in model.state_dict().items():
        expected = initial[key] if key.startswith("down.1.skip_conv") else original.state_dict()[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)


def test_shape_mismatches_stay_at_their_initialisation(stored, caplog):
    path, original, _ = stored
    plain = UNetConfig.tiny()  # 4 in / 4 out: conv_in and conv_out do not fit the 8-in / 5-out file
    torch.manual_seed(5)
    initial = UNet(plain).state_dict()
    torch.manual_seed(5)
    with caplog.at_level("WARNING", logger="cdiff.load"):
        model = load_unet(path, config=plain, strict=False, dtype=torch.bfloat16)
    assert "3 of another shape" in caplog.text and "conv_in.weight (32, 8, 3, 3) in the checkpoint, (32, 4, 3, 3) in the model" in caplog.text
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for key, value in model.state_dict().items():
        source = initial if key in ("conv_in.weight", "conv_out.weight", "conv_out.bias") else original.state_dict()
        torch.testing.assert_close(value, source[key].to(torch.bfloat16), rtol=0, atol=0, msg=key)


def test_vae_partial_loading(stored):
    path, _, vae = stored
    deeper = VAEConfig.tiny(layers_per_block=2)
    with pytest.raises(CheckpointError, match=r"VAE state does not match"):
        load_vae(path, config=deeper)
    model = load_vae(path, config=deeper, strict=False)
    old = vae.state_dict()
    added = [k for k in model.state_dict() if k not in old]
    assert added and all(".res.1." in k or ".res.2." in k for k in added)
    for key in old:
        assert torch.equal(model.state_dict()[key], old[key]), key
    report = load_weights(VAE(VAEConfig.tiny()), path)
    assert report.exact and len(report.loaded) == len(old)


# --- gradient checkpointing -------------------------------------------------------------------


@pytest.mark.slow  # forward and backward of the SD 2.1-sized blocks, twice: about a minute
def test_gradient_checkpointing_gives_the_same_forward_and_gradients():
    plain = randomize_(UNet(CONFIG), 4)
    checkpointed = randomize_(UNet(CONFIG), 4).gradient_checkpointing(True)
    assert checkpointed.checkpointing and not plain.checkpointing
    sample, t, context = inputs()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 5] = False
    weights = torch.randn(2, 5, 16, 16, generator=torch.Generator().manual_seed(9))
    runs = {}

    def count_runs(module, args):
        runs[id(module)] = runs.get(id(module), 0) + 1

    for block in checkpointed.down:
        block.register_forward_pre_hook(count_runs)
    outputs = []
    for model in (plain, checkpointed):
        x, c = sample.clone().requires_grad_(True), context.clone().requires_grad_(True)
        out = model(x, t, c, context_mask=mask)
        (out * weights).sum().backward()
        outputs.append((out, x.grad, c.grad, {k: p.grad for k, p in model.named_parameters()}))
    assert set(runs.values()) == {2}  # each down block ran again in the backward pass
    (out_a, x_a, c_a, g_a), (out_b, x_b, c_b, g_b) = outputs
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    torch.testing.assert_close(x_b, x_a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_b, c_a, rtol=1e-6, atol=1e-7)
    assert g_a.keys() == g_b.keys()
    for key in g_a:
        torch.testing.assert_close(g_b[key], g_a[key], rtol=1e-6, atol=1e-7, msg=key)
    with torch.no_grad():  # no recomputation without gradients
        runs.clear()
        checkpointed(sample, t, context)
    assert set(runs.values()) == {1}
    assert checkpointed.gradient_checkpointing(False) is checkpointed and not checkpointed.checkpointing
