"""The fixed prompt embedding: OpenCLIP ViT-H/14 text features, computed once.

SD 2.1 conditions its U-Net on the tokens of a prompt run through all but the last of
the 24 blocks of OpenCLIP ViT-H/14's text transformer, then its final LayerNorm. C-DiffSET
uses one fixed prompt, "electro-optical image", and the official release encodes it
without padding: [start, prompt tokens..., end], so its context is (n, 1024) with n = 6,
not SD's (77, 1024). The causal attention mask makes the first n rows of the padded
version equal to the unpadded one; ``pad_to_77=True`` gives the padded SD convention.

The tower is open_clip's own ``TextTransformer`` class (the text tower only; the 632M-param
vision tower is never built), built on the meta device with 23 blocks and given the
weights of either layout's text encoder:

- original single file: ``cond_stage_model.model.*`` in open_clip's names, 24 blocks; the
  last block, ``text_projection`` and ``logit_scale`` are not needed and not loaded;
- diffusers ``text_encoder/``: a transformers CLIPTextModel with 23 layers; its separate
  q/k/v projections are stacked into open_clip's ``in_proj`` (q, k, v order).

open_clip (the ``clip`` extra) is imported only inside the functions that need it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cdiff.layouts import RenameTable
from cdiff.layouts.detect import detect_layout, find_weights
from cdiff.layouts.original import TEXT_PREFIX
from cdiff.pipeline import DEFAULT_PROMPT  # the one home of the fixed prompt
from cdiff.statedict import check_state_dict
from cdiff.weightfile import CheckpointError, WeightFile

CONTEXT_LENGTH = 77  # OpenCLIP's positional table, and SD's padded length
HEAD_WIDTH = 64  # OpenCLIP ViT-H/14: width 1024 = 16 heads of 64

# open_clip TextTransformer names ("cdiff" side) <-> transformers CLIPTextModel names.
# q/k/v are stacked into ``qkv_proj`` before renaming (see ``_stack_qkv``).
TEXT = RenameTable(
    "transformers CLIP text encoder",
    rules=(
        ("token_embedding", "text_model.embeddings.token_embedding"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ("transformer.resblocks.{i}.ln_1", "text_model.encoder.layers.{i}.layer_norm1"),
        ("transformer.resblocks.{i}.ln_2", "text_model.encoder.layers.{i}.layer_norm2"),
        ("transformer.resblocks.{i}.mlp.c_fc", "text_model.encoder.layers.{i}.mlp.fc1"),
        ("transformer.resblocks.{i}.mlp.c_proj", "text_model.encoder.layers.{i}.mlp.fc2"),
        ("transformer.resblocks.{i}.attn.out_proj", "text_model.encoder.layers.{i}.self_attn.out_proj"),
        ("transformer.resblocks.{i}.attn.in_proj_weight", "text_model.encoder.layers.{i}.self_attn.qkv_proj.weight"),
        ("transformer.resblocks.{i}.attn.in_proj_bias", "text_model.encoder.layers.{i}.self_attn.qkv_proj.bias"),
        ("ln_final", "text_model.final_layer_norm"),
    ),
)


def _require_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "encoding the prompt needs open_clip: pip install 'cdiffset[clip]' "
            "(or give a source that already holds a prompt embedding)"
        ) from err
    return open_clip


def tokenize(prompt: str, pad_to_77: bool = False) -> torch.Tensor:
    """Token ids (n,) of ``prompt``: [start, bpe tokens..., end], zero-padded to 77 if asked.

    Uses open_clip's tokenizer for ViT-H/14 (the BPE vocabulary ships with open_clip).
    """
    open_clip = _require_open_clip()
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    ids = [tokenizer.sot_token_id, *tokenizer.encode(prompt), tokenizer.eot_token_id]
    if len(ids) > CONTEXT_LENGTH:
        raise ValueError(f"prompt: {len(ids)} tokens, at most {CONTEXT_LENGTH} fit: {prompt[:60]!r}")
    if pad_to_77:
        ids += [0] * (CONTEXT_LENGTH - len(ids))  # open_clip pads with id 0, as SD 2.1 does
    return torch.tensor(ids, dtype=torch.long)


def _stack_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' separate q/k/v projections -> one stacked ``qkv_proj`` per layer."""
    out = {}
    for key, value in state.items():
        if ".self_attn.q_proj." in key:
            stem, kind = key.split(".self_attn.q_proj.")
            parts = [state.get(f"{stem}.self_attn.{p}_proj.{kind}") for p in "qkv"]
            if any(p is None for p in parts):
                raise CheckpointError(f"text encoder: {stem} lacks one of q/k/v_proj.{kind}")
            out[f"{stem}.self_attn.qkv_proj.{kind}"] = torch.cat(parts, dim=0)  # (3W, W) or (3W,)
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        elif key.endswith("position_ids"):
            continue  # a buffer older transformers versions saved
        else:
            out[key] = value
    return out


def text_state_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel weights -> open_clip names (all layers are used).

    Keys carry ``text_model.`` (transformers 4, and SD 2.1's files) or not (transformers 5).
    """
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    return TEXT.rename(_stack_qkv(state), to="cdiff")


def text_state_from_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cond_stage_model.model.*`` (prefix stripped) -> the weights of all but the last block."""
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")}
    if not blocks:
        raise CheckpointError("original text encoder: no transformer.resblocks.* keys")
    last = max(blocks)
    keep = ("token_embedding.", "positional_embedding", "ln_final.", "transformer.resblocks.")
    return {
        k: v
        for k, v in state.items()
        if k.startswith(keep) and not k.startswith(f"transformer.resblocks.{last}.")
    }


def build_text_tower(state: dict[str, torch.Tensor], heads: int | None = None):
    """open_clip ``TextTransformer`` holding exactly ``state`` (open_clip names), no projection.

    Width, depth, vocabulary and positions come from the shapes; ``heads`` defaults to
    width / 64 as in OpenCLIP ViT-H/14.
    """
    open_clip = _require_open_clip()
    from open_clip.transformer import TextTransformer

    try:
        vocab, width = state["token_embedding.weight"].shape
        positions = state["positional_embedding"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"text encoder: missing {err.args[0]}") from None
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    if not layers:
        raise CheckpointError("text encoder: no transformer blocks")
    heads = heads or width // HEAD_WIDTH
    mlp_ratio = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width  # 4 for ViT-H/14
    with torch.device("meta"):
        tower = TextTransformer(
            context_length=positions, vocab_size=vocab, width=width, heads=heads, layers=layers, mlp_ratio=mlp_ratio,
            output_dim=None, act_layer=torch.nn.GELU, norm_layer=open_clip.transformer.LayerNorm,
        )
    check_state_dict(tower.state_dict(), state, "text encoder", "TextTransformer")
    tower.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return tower.eval()


@torch.no_grad()
def encode(tower, tokens: torch.Tensor) -> torch.Tensor:
    """(n,) token ids -> (n, width) features: every block of ``tower``, then ``ln_final``.

    ``tower`` holds the blocks SD 2.1 uses (the first 23), so this is the penultimate-layer
    output of the 24-block OpenCLIP model. Causal attention, no padding mask (as SD 2.1).
    """
    n = tokens.shape[0]
    x = tower.token_embedding(tokens[None]) + tower.positional_embedding[:n]  # (1, n, W)
    # Causal mask: position i attends to positions <= i; -inf above the diagonal.
    mask = torch.full((n, n), float("-inf"), dtype=x.dtype).triu_(1)
    for block in tower.transformer.resblocks:
        x = block(x, attn_mask=mask)
    return tower.ln_final(x)[0]  # (n, W)


def load_text_tower(source: str | os.PathLike):
    """The text tower of an SD 2.1 source: an original single file, a diffusers model
    folder, or its ``text_encoder/`` folder."""
    path = Path(source)
    layout = detect_layout(path)
    if layout == "original":
        state = WeightFile(path).load(TEXT_PREFIX)
        if not state:
            raise CheckpointError(f"{path}: holds no text encoder (no {TEXT_PREFIX}* keys)")
        return build_text_tower(text_state_from_original(state))
    if layout == "diffusers":
        path = path / "text_encoder"
        if not path.is_dir():
            raise CheckpointError(f"{path.parent}: holds no text_encoder/ folder")
        layout = detect_layout(path)
    if layout != "diffusers-text":
        raise CheckpointError(f"{source}: holds no text encoder (layout {layout!r})")
    heads = None
    config = path / "config.json"
    if config.is_file():
        heads = json.loads(config.read_text()).get("num_attention_heads")
    try:
        state = text_state_from_transformers(WeightFile(find_weights(path)).load())
    except KeyError as err:
        raise CheckpointError(f"{path}: {err.args[0]}") from None
    return build_text_tower(state, heads=heads)


def prompt_embedding(source: str | os.PathLike, prompt: str = DEFAULT_PROMPT, pad_to_77: bool = False) -> torch.Tensor:
    """The context tensor (n, 1024), float32, of ``prompt`` under ``source``'s text encoder."""
    if not prompt or not prompt.strip():
        raise ValueError("prompt: must not be empty")
    tower = load_text_tower(source)
    context = encode(tower, tokenize(prompt, pad_to_77=pad_to_77))
    del tower
    return context.contiguous()
