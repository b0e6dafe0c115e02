"""Rename tables between the diffusers layout and Stability's original single file.

The original layout numbers the U-Net's blocks sequentially (``input_blocks.4.1`` is the
attention of level 1's first res block), so its tables are generated from the block
structure (res blocks and attention per level, which ``unet_table_for`` reads off the
keys); the VAE's only need the level count. Both tables are written against diffusers key
names (the "cdiff" side of these RenameTables is the diffusers name): a file in the
original layout is read as original -> diffusers -> cdiff, with the diffusers tables of
``cdiff.layouts.diffusers`` doing the second step.

Inside the U-Net's spatial transformers the two layouts use the same names, so one rule
per attention block suffices. The original VAE's mid-block attention stores q, k, v and
the output projection as 1x1 convolutions, (C, C, 1, 1), where diffusers uses Linear
layers, (C, C): ``vae_to_diffusers`` / ``vae_to_original`` reshape those explicitly.

Prefixes in the single file: ``model.diffusion_model.`` (U-Net), ``first_stage_model.``
(VAE), ``cond_stage_model.model.`` (the OpenCLIP text tower, in open_clip's own names,
see cdiff.prompt).
"""

from __future__ import annotations

from typing import Mapping

import torch

from cdiff.layouts import RenameTable

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
CONTEXT_KEY = "cdiff.context"  # the prompt embedding, in cdiff's exports to this layout

# Res block parts: diffusers name -> original name (the original wraps them in Sequentials).
_RESNET_PARTS = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)


def _resnet_rules(diffusers: str, original: str) -> list[tuple[str, str]]:
    return [(f"{diffusers}.{d}", f"{original}.{o}") for d, o in _RESNET_PARTS]


def unet_table(res_blocks: tuple[int, ...], attention_levels: tuple[bool, ...]) -> RenameTable:
    """diffusers UNet2DConditionModel names <-> ``model.diffusion_model.*`` names (prefix not included),
    for a U-Net with ``res_blocks[i]`` res blocks on level i's way down (one more on the way up)
    and spatial transformers where ``attention_levels`` says (``UNetConfig.level_res_blocks``
    and ``UNetConfig.attention_levels``)."""
    levels = len(res_blocks)
    rules: list[tuple[str, str]] = [
        ("conv_in", "input_blocks.0.0"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ]
    # Down path: input_blocks are numbered on from 1, each holding res block j (.0) and its
    # attention (.1), and after each level but the last, the downsample (.0.op).
    n = 1
    for i in range(levels):
        for j in range(res_blocks[i]):
            rules += _resnet_rules(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0")
            if attention_levels[i]:
                rules.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1"))
            n += 1
        if i < levels - 1:
            rules.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op"))
            n += 1
    # Middle: res, attention, res.
    rules += _resnet_rules("mid_block.resnets.0", "middle_block.0")
    rules.append(("mid_block.attentions.0", "middle_block.1"))
    rules += _resnet_rules("mid_block.resnets.1", "middle_block.2")
    # Up path: up block k runs level (levels - 1 - k); output_blocks are numbered on from 0, and
    # the upsample sits in the last one of a level, after its attention if any.
    n = 0
    for k in range(levels):
        level = levels - 1 - k
        has_attention = attention_levels[level]
        for j in range(res_blocks[level] + 1):
            rules += _resnet_rules(f"up_blocks.{k}.resnets.{j}", f"output_blocks.{n}.0")
            if has_attention:
                rules.append((f"up_blocks.{k}.attentions.{j}", f"output_blocks.{n}.1"))
            n += 1
        if k < levels - 1:
            slot = 2 if has_attention else 1
            rules.append((f"up_blocks.{k}.upsamplers.0.conv", f"output_blocks.{n - 1}.{slot}.conv"))
    return RenameTable("original SD U-Net", rules=tuple(rules))


def unet_table_for(state: Mapping[str, torch.Tensor]) -> RenameTable:
    """The table for the block structure that ``state`` (original U-Net keys, prefix stripped) has,
    read off its ``input_blocks``: res blocks (``N.0.in_layers``), their attentions (``N.1``),
    and the downsamples (``N.0.op``) that end each level but the last."""
    kinds: dict[int, str] = {}
    attends: set[int] = set()
    for key in state:
        parts = key.split(".")
        if parts[0] != "input_blocks" or len(parts) < 4 or parts[1] == "0":
            continue
        n = int(parts[1])
        if parts[2] == "0" and parts[3] == "op":
            kinds[n] = "downsample"
        kinds.setdefault(n, "res")
        if parts[2] == "1":
            attends.add(n)
    res_blocks, attention, count, attend = [], [], 0, False
    for n in sorted(kinds):
        if kinds[n] == "downsample":
            res_blocks.append(count)
            attention.append(attend)
            count, attend = 0, False
        else:
            count, attend = count + 1, attend or n in attends
    if count == 0:
        raise ValueError("no res blocks (input_blocks.N.0.in_layers) after the last downsample of the U-Net")
    return unet_table(tuple(res_blocks + [count]), tuple(attention + [attend]))


# VAE res block parts that the layouts name differently (norm1/conv1/norm2/conv2 agree).
_VAE_RESNET_PARTS = (("conv_shortcut", "nin_shortcut"),)
# Mid-block attention: diffusers Linear name -> original 1x1 conv name.
_VAE_ATTENTION_PARTS = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)
_VAE_ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")


def vae_table(levels: int) -> RenameTable:
    """diffusers AutoencoderKL names <-> ``first_stage_model.*`` names (prefix not included), for
    an encoder of ``levels`` levels (``len(VAEConfig.block_channels)``)."""
    rules: list[tuple[str, str]] = [
        ("quant_conv", "quant_conv"),
        ("post_quant_conv", "post_quant_conv"),
    ]
    for side in ("encoder", "decoder"):
        rules += [
            (f"{side}.conv_in", f"{side}.conv_in"),
            (f"{side}.conv_norm_out", f"{side}.norm_out"),
            (f"{side}.conv_out", f"{side}.conv_out"),
            (f"{side}.mid_block.resnets.0", f"{side}.mid.block_1"),
            (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2"),
        ]
        rules += [(f"{side}.mid_block.attentions.0.{d}", f"{side}.mid.attn_1.{o}") for d, o in _VAE_ATTENTION_PARTS]
    for i in range(levels):
        rules.append((f"encoder.down_blocks.{i}.resnets.{{j}}", f"encoder.down.{i}.block.{{j}}"))
        rules += [(f"encoder.down_blocks.{i}.resnets.{{j}}.{d}", f"encoder.down.{i}.block.{{j}}.{o}") for d, o in _VAE_RESNET_PARTS]
        if i < levels - 1:
            rules.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        # The decoder's up blocks run from the deepest level: diffusers counts them in
        # running order, the original by level.
        level = levels - 1 - i
        rules.append((f"decoder.up_blocks.{i}.resnets.{{j}}", f"decoder.up.{level}.block.{{j}}"))
        rules += [(f"decoder.up_blocks.{i}.resnets.{{j}}.{d}", f"decoder.up.{level}.block.{{j}}.{o}") for d, o in _VAE_RESNET_PARTS]
        if i < levels - 1:
            rules.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv"))
    return RenameTable("original SD VAE", rules=tuple(rules))


def _is_attention_linear(diffusers_key: str) -> bool:
    return ".mid_block.attentions.0." in diffusers_key and any(
        diffusers_key.endswith(f".{part}.weight") for part in _VAE_ATTENTION_LINEARS
    )


def vae_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ``first_stage_model.*`` tensors (prefix stripped) -> diffusers AutoencoderKL keys."""
    levels = len({k.split(".")[2] for k in state if k.startswith("encoder.down.")})
    out = vae_table(levels).rename(state, to="cdiff")
    for key, value in out.items():
        if _is_attention_linear(key) and value.ndim == 4:
            out[key] = value.reshape(value.shape[0], value.shape[1])  # (C, C, 1, 1) conv -> (C, C) linear
    return out


def vae_to_original(state: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> original ``first_stage_model.*`` names (prefix not added)."""
    state = dict(state)
    for key, value in state.items():
        if _is_attention_linear(key) and value.ndim == 2:
            state[key] = value.reshape(*value.shape, 1, 1)  # (C, C) linear -> (C, C, 1, 1) conv
    return vae_table(levels).rename(state, to="foreign")
