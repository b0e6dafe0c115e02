"""Any SD 2.x-style U-Net a diffusers config.json describes: read, refused by name when cdiff
cannot build it, carried by the native file, exported back; and the same weights give the same
config from every layout."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cdiff.export as ex  # noqa: E402
from cdiff.config import UNetConfig, VAEConfig, config_from_json, config_to_json  # noqa: E402
from cdiff.layouts.diffusers_config import (  # noqa: E402
    diffusers_unet_config,
    unet_config_from_diffusers,
    vae_config_from_diffusers,
)
from cdiff.load import load_unet, read_unet  # noqa: E402
from cdiff.native import save_native  # noqa: E402
from cdiff.testing import SD21_UNET, SD21_VAE, assert_parity, randomize_, tiny_configs  # noqa: E402
from cdiff.vae import VAE  # noqa: E402
from cdiff.weightfile import CheckpointError, WeightFile  # noqa: E402

# A researcher's own U-Net, written as diffusers writes it: three levels, the middle one
# without attention; widths 16/32/48; res blocks 1/2/1; head counts 2/4/3 (head sizes
# 8/8/16); two transformer blocks at the last level (and the mid block); a 24-wide context.
CUSTOM = dict(
    SD21_UNET,
    block_out_channels=[16, 32, 48],
    layers_per_block=[1, 2, 1],
    attention_head_dim=[2, 4, 3],
    transformer_layers_per_block=[1, 1, 2],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=24,
    norm_num_groups=8,
    in_channels=8,
    out_channels=5,
    upcast_attention=True,
)
CUSTOM_CONFIG = UNetConfig(
    in_channels=8, out_channels=5, model_channels=16, channel_mult=(1, 2, 3), num_res_blocks=(1, 2, 1),
    attention_levels=(True, False, True), head_dim=(8, 8, 16), transformer_depth=(1, 1, 2), context_dim=24,
    norm_groups=8,
)


def test_sd2_configs_are_the_sd21_preset():
    """SD 2.0, 2.1 base and 2.1-768 (upcast_attention true, sample size 96) are one architecture."""
    assert unet_config_from_diffusers(SD21_UNET) == UNetConfig.sd21()
    assert unet_config_from_diffusers(dict(SD21_UNET, upcast_attention=True, sample_size=96)) == UNetConfig.sd21()
    assert unet_config_from_diffusers(dict(SD21_UNET, sample_size=96)) == UNetConfig.sd21()  # SD 2.0 (768-v)
    assert vae_config_from_diffusers(SD21_VAE) == VAEConfig.sd21()
    assert unet_config_from_diffusers(CUSTOM) == CUSTOM_CONFIG


@pytest.mark.parametrize("config", [UNetConfig.sd21(), UNetConfig.tiny(in_channels=8, out_channels=5), CUSTOM_CONFIG],
                         ids=["sd21", "tiny-cdiffset", "custom"])
def test_configs_round_trip_through_diffusers_json_and_native_metadata(config):
    assert unet_config_from_diffusers(json.loads(json.dumps(diffusers_unet_config(config)))) == config
    assert config_from_json(config_to_json(config)) == config


def test_per_level_numbers_that_agree_are_one_number():
    assert UNetConfig(num_res_blocks=(2, 2, 2, 2), head_dim=[64] * 4) == UNetConfig.sd21()
    assert UNetConfig.sd21().level_head_dims == (64, 64, 64, 64)
    with pytest.raises(ValueError, match=r"num_res_blocks needs one entry per level \(4\), got \(2, 2\)"):
        UNetConfig(num_res_blocks=(2, 2))
    with pytest.raises(ValueError, match=r"level 2's 48 channels do not split into heads of 32"):
        replace(CUSTOM_CONFIG, head_dim=(8, 8, 32))


def test_older_native_metadata_with_upcast_attention_still_reads():
    old = json.loads(config_to_json(UNetConfig.sd21()))
    old["upcast_attention"] = True  # written by cdiff before the flag was retired
    assert config_from_json(json.dumps(old)) == UNetConfig.sd21()


REFUSED = {
    "use_linear_projection": (dict(use_linear_projection=False), r"use_linear_projection=False asks for 1x1 conv projections"),
    "missing use_linear_projection": ({"use_linear_projection": None}, r"use_linear_projection=False .*Stable Diffusion 1\.x"),
    "class embedding": (dict(class_embed_type="timestep"), r"class_embed_type='timestep' asks for a class embedding"),
    "cross-attention only, one level": (dict(only_cross_attention=[False, True, False, False]),
                                        r"only_cross_attention=\[False, True, False, False\] asks for transformers without self"),
    "block type": (dict(down_block_types=["SimpleCrossAttnDownBlock2D"] * 4),
                   r"down_block_types \['SimpleCrossAttnDownBlock2D'.*cdiff builds 4 levels of \['CrossAttnDownBlock2D', 'DownBlock2D'\]"),
    "unmirrored": (dict(up_block_types=["CrossAttnUpBlock2D"] * 4), r"up_block_types .* do not mirror down_block_types"),
    "heads": (dict(attention_head_dim=[5, 10, 20, 30]), r"1280 channels do not split into 30 heads"),
    "widths": (dict(block_out_channels=[320, 480, 1280, 1280]), r"cdiff needs every width a multiple of the first"),
    "nested depth": (dict(transformer_layers_per_block=[[1, 1], 1, 1, 1]), r"cdiff takes one depth per level"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_cannot_be_built_is_refused_by_name(case):
    change, message = REFUSED[case]
    config = {k: v for k, v in dict(SD21_UNET, **change).items() if v is not None}
    with pytest.raises(ValueError, match=message):
        unet_config_from_diffusers(config, where="unet/config.json")


def test_exporter_refuses_what_diffusers_cannot_say():
    with pytest.raises(ValueError, match=r"UNetConfig.ff_mult=2: diffusers' UNet2DConditionModel fixes it at 4"):
        diffusers_unet_config(replace(UNetConfig.tiny(), ff_mult=2))


# --- end to end with diffusers ---------------------------------------------------------------


def _inputs(config, side=16, context_len=5):
    gen = torch.Generator().manual_seed(11)
    sample = torch.randn(2, config.in_channels, side, side, generator=gen)
    return sample, torch.tensor([21, 950]), torch.randn(2, context_len, config.context_dim, generator=gen)


def _parity(ours, theirs, what):
    sample, t, context = _inputs(ours.config)
    with torch.no_grad():
        return assert_parity(ours(sample, t, context), theirs(sample, t, encoder_hidden_states=context).sample, what)


@pytest.mark.slow  # a custom U-Net through diffusers, native and back: about 25 s
def test_custom_config_end_to_end(tmp_path):
    """diffusers folder -> cdiff -> native -> diffusers folder, each equal to diffusers' own model."""
    diffusers = pytest.importorskip("diffusers")
    theirs = randomize_(diffusers.UNet2DConditionModel(**CUSTOM), 3).eval()
    theirs.save_pretrained(tmp_path / "custom" / "unet", safe_serialization=True)
    vae_folder = tmp_path / "custom" / "vae"
    randomize_(diffusers.AutoencoderKL(**tiny_configs()[1]), 4).save_pretrained(vae_folder, safe_serialization=True)

    ours = load_unet(tmp_path / "custom")
    assert ours.config == CUSTOM_CONFIG
    _parity(ours, theirs, "custom U-Net from its diffusers folder")

    native = save_native(tmp_path / "custom.safetensors", ours, VAE(VAEConfig.tiny()), torch.randn(5, 24))
    assert config_from_json(WeightFile(native).metadata["unet_config"]) == CUSTOM_CONFIG
    again = load_unet(native)
    assert again.config == CUSTOM_CONFIG

    folder = ex.export_diffusers(native, tmp_path / "exported")
    back = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    _parity(again, back, "custom U-Net exported to diffusers, read by diffusers")
    _parity(load_unet(folder), theirs, "custom U-Net: diffusers -> cdiff -> native -> diffusers -> cdiff")

    # The original single file has no config: the custom U-Net is refused without one, read with it.
    single = ex.export_original(native, tmp_path / "single.safetensors")
    with pytest.raises(CheckpointError, match=r"single\.safetensors: this U-Net is not Stable Diffusion 2\.1 .*config="):
        load_unet(single)
    _parity(load_unet(single, config=CUSTOM_CONFIG), theirs, "custom U-Net from an original single file, config given")


def test_config_json_that_does_not_fit_the_weights(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    randomize_(diffusers.UNet2DConditionModel(**CUSTOM), 3).save_pretrained(tmp_path / "unet", safe_serialization=True)
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps(dict(config, layers_per_block=2)))
    with pytest.raises(CheckpointError, match=r"config\.json does not fit the weights: level_res_blocks \(2, 2, 2\) "
                                              r"in config\.json, \(1, 2, 1\) in the weights"):
        load_unet(tmp_path / "unet")


def test_same_weights_same_config_from_every_layout(tmp_path):
    """SD 2.1-768's config.json says upcast_attention: true; the original single file and the bare
    weights file of the same weights say nothing. All three give one config and one model."""
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    config_768 = dict(tiny_configs()[0], upcast_attention=True, sample_size=96)
    theirs = randomize_(diffusers.UNet2DConditionModel(**config_768), 8).eval()
    theirs.save_pretrained(tmp_path / "768" / "unet", safe_serialization=True)
    randomize_(diffusers.AutoencoderKL(**tiny_configs()[1]), 4).save_pretrained(tmp_path / "768" / "vae", safe_serialization=True)
    bare = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(bare))
    native = save_native(tmp_path / "n.safetensors", load_unet(tmp_path / "768"), VAE(VAEConfig.tiny()), torch.randn(6, 1024))
    single = ex.export_original(native, tmp_path / "single.safetensors")
    configs = {layout: read_unet(source)[1] for layout, source in
               (("diffusers", tmp_path / "768"), ("bare", bare), ("original", single), ("native", native))}
    assert set(configs.values()) == {UNetConfig.tiny()}, configs
    _parity(load_unet(single), theirs, "SD 2.1-768-style tiny U-Net from the original single file")
