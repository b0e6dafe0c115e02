"""Rename tables between cdiff and the diffusers folder layout (``unet/``, ``vae/``)."""

from __future__ import annotations

from cdiff.layouts import RenameTable

CONTEXT_FILE = "cdiff_context.safetensors"  # the prompt embedding, in cdiff's exports to this layout

# --- U-Net: cdiff.unet.UNet <-> diffusers UNet2DConditionModel -----------------------------
UNET = RenameTable(
    "diffusers U-Net",
    rules=(
        ("conv_in", "conv_in"),
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("down.{i}.downsample", "down_blocks.{i}.downsamplers.0"),
        ("up.{i}.upsample", "up_blocks.{i}.upsamplers.0"),  # up.0 = up_blocks.0 = the deepest level
        ("norm_out", "conv_norm_out"),
        ("conv_out", "conv_out"),
        # Res blocks (cdiff.layers.ResBlock), wherever they sit.
        *(
            rule
            for ours, theirs in (
                ("down.{i}.res.{j}", "down_blocks.{i}.resnets.{j}"),
                ("mid.res.{j}", "mid_block.resnets.{j}"),
                ("up.{i}.res.{j}", "up_blocks.{i}.resnets.{j}"),
            )
            for rule in (
                (ours, theirs),
                (ours + ".time_proj", theirs + ".time_emb_proj"),
                (ours + ".skip", theirs + ".conv_shortcut"),
            )
        ),
        # Spatial transformers (norm, proj_in, proj_out keep their names) and their blocks.
        *(
            rule
            for ours, theirs in (
                ("down.{i}.attn.{j}", "down_blocks.{i}.attentions.{j}"),
                ("mid.attn", "mid_block.attentions.0"),
                ("up.{i}.attn.{j}", "up_blocks.{i}.attentions.{j}"),
            )
            for rule in (
                (ours, theirs),
                (ours + ".blocks.{k}", theirs + ".transformer_blocks.{k}"),
                (ours + ".blocks.{k}.self_attn", theirs + ".transformer_blocks.{k}.attn1"),
                (ours + ".blocks.{k}.self_attn.to_out", theirs + ".transformer_blocks.{k}.attn1.to_out.0"),
                (ours + ".blocks.{k}.cross_attn", theirs + ".transformer_blocks.{k}.attn2"),
                (ours + ".blocks.{k}.cross_attn.to_out", theirs + ".transformer_blocks.{k}.attn2.to_out.0"),
                (ours + ".blocks.{k}.ff.proj_in", theirs + ".transformer_blocks.{k}.ff.net.0.proj"),
                (ours + ".blocks.{k}.ff.proj_out", theirs + ".transformer_blocks.{k}.ff.net.2"),
            )
        ),
    ),
)

# --- VAE: cdiff.vae.VAE <-> diffusers AutoencoderKL ---------------------------------------
VAE = RenameTable(
    "diffusers VAE",
    rules=(
        # encoder: levels run top down; the last has no downsampler
        ("encoder.conv_in", "encoder.conv_in"),
        ("encoder.down.{i}.res.{j}", "encoder.down_blocks.{i}.resnets.{j}"),
        ("encoder.down.{i}.res.{j}.skip", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut"),
        ("encoder.down.{i}.downsample", "encoder.down_blocks.{i}.downsamplers.0"),
        ("encoder.mid.res.{j}", "encoder.mid_block.resnets.{j}"),
        ("encoder.mid.attn", "encoder.mid_block.attentions.0"),
        ("encoder.mid.attn.norm", "encoder.mid_block.attentions.0.group_norm"),
        ("encoder.mid.attn.to_out", "encoder.mid_block.attentions.0.to_out.0"),
        ("encoder.norm_out", "encoder.conv_norm_out"),
        ("encoder.conv_out", "encoder.conv_out"),
        ("quant_conv", "quant_conv"),
        # decoder: up.{i} is up_blocks.{i}, both in running order (deepest level first)
        ("post_quant_conv", "post_quant_conv"),
        ("decoder.conv_in", "decoder.conv_in"),
        ("decoder.mid.res.{j}", "decoder.mid_block.resnets.{j}"),
        ("decoder.mid.attn", "decoder.mid_block.attentions.0"),
        ("decoder.mid.attn.norm", "decoder.mid_block.attentions.0.group_norm"),
        ("decoder.mid.attn.to_out", "decoder.mid_block.attentions.0.to_out.0"),
        ("decoder.up.{i}.res.{j}", "decoder.up_blocks.{i}.resnets.{j}"),
        ("decoder.up.{i}.res.{j}.skip", "decoder.up_blocks.{i}.resnets.{j}.conv_shortcut"),
        ("decoder.up.{i}.upsample", "decoder.up_blocks.{i}.upsamplers.0"),
        ("decoder.norm_out", "decoder.conv_norm_out"),
        ("decoder.conv_out", "decoder.conv_out"),
    ),
)
