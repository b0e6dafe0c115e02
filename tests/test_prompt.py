"""The prompt embedding against open_clip and transformers on the same random weights.

Small towers (width 128) here; the full-size ViT-H/14 text encoder is checked in
test_convert_sd21.py. References: open_clip's own TextTransformer (its penultimate block's
output, then ln_final, as SD 2.1 runs it) and transformers' CLIPTextModel run on the
unpadded tokens, as the official release runs it.
"""

from __future__ import annotations

import pytest
import torch

from cdiff.layouts.original import TEXT_PREFIX
from cdiff.prompt import (
    build_text_tower,
    encode,
    prompt_embedding,
    text_state_from_original,
    text_state_from_transformers,
    tokenize,
)
from cdiff.testing import assert_parity, randomize_
from cdiff.weightfile import CheckpointError

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

PROMPT = "electro-optical image"
WIDTH, HEADS, LAYERS = 128, 2, 4  # the open_clip model; SD uses all but its last block


@pytest.fixture(scope="module")
def open_clip_tower():
    from open_clip.transformer import TextTransformer

    tower = TextTransformer(context_length=77, vocab_size=49408, width=WIDTH, heads=HEADS, layers=LAYERS, output_dim=64)
    return randomize_(tower, 3).eval()


def open_clip_penultimate(tower, tokens77: torch.Tensor) -> torch.Tensor:
    """open_clip's own forward on SD's padded 77 tokens: output of the second-to-last block, then ln_final."""
    with torch.no_grad():
        out = tower.forward_intermediates(tokens77[None], indices=[LAYERS - 2], output_fmt="NLC", intermediates_only=True)
        return tower.ln_final(out["text_intermediates"][0])[0]  # (77, W)


def test_tokenize_matches_open_clip():
    padded = open_clip.tokenize([PROMPT])[0]  # what SD 2.1's FrozenOpenCLIPEmbedder feeds
    tokens = tokenize(PROMPT)
    n = int((padded != 0).sum())
    assert tokens.tolist() == padded[:n].tolist()
    assert tokens[0] == 49406 and tokens[-1] == 49407 and len(tokens) == 6  # start, 4 BPE tokens, end
    assert torch.equal(tokenize(PROMPT, pad_to_77=True), padded)


def test_original_layout_equals_open_clip_penultimate(open_clip_tower):
    tower = build_text_tower(text_state_from_original(dict(open_clip_tower.state_dict())), heads=HEADS)
    assert len(tower.transformer.resblocks) == LAYERS - 1
    expected = open_clip_penultimate(open_clip_tower, tokenize(PROMPT, pad_to_77=True))
    unpadded = encode(tower, tokenize(PROMPT))
    assert unpadded.shape == (6, WIDTH)
    # Causal attention: the unpadded tokens see exactly what the first 6 padded ones see.
    assert_parity(unpadded, expected[:6], "unpadded prompt vs open_clip penultimate (first 6 rows)")
    assert_parity(encode(tower, tokenize(PROMPT, pad_to_77=True)), expected, "padded prompt vs open_clip penultimate")


def test_transformers_layout_equals_clip_text_model():
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS - 1,
        num_attention_heads=HEADS, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
    )
    model = randomize_(transformers.CLIPTextModel(config), 4).eval()
    tower = build_text_tower(text_state_from_transformers(dict(model.state_dict())), heads=HEADS)
    tokens = tokenize(PROMPT)
    with torch.no_grad():
        expected = model(input_ids=tokens[None]).last_hidden_state[0]  # the release: no padding
    assert_parity(encode(tower, tokens), expected, "prompt vs transformers CLIPTextModel (unpadded)")
    # Keys saved with the text_model. prefix (transformers 4, SD 2.1's own files) read the same.
    prefixed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in model.state_dict().items()}
    again = build_text_tower(text_state_from_transformers(prefixed), heads=HEADS)
    assert torch.equal(encode(again, tokens), encode(tower, tokens))


def test_prompt_embedding_from_original_file(open_clip_tower, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "text.safetensors"
    save_file({TEXT_PREFIX + k: v.contiguous() for k, v in open_clip_tower.state_dict().items()}, str(path))
    # width 128 -> 2 heads of 64, the ViT-H/14 head width cdiff assumes without a config.
    context = prompt_embedding(path, PROMPT)
    expected = open_clip_penultimate(open_clip_tower, tokenize(PROMPT, pad_to_77=True))
    assert context.dtype == torch.float32
    assert_parity(context, expected[:6], "prompt_embedding(original file)")
    assert_parity(prompt_embedding(path, PROMPT, pad_to_77=True), expected, "prompt_embedding(original file, pad_to_77)")


def test_bad_prompts_and_weights(open_clip_tower):
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        prompt_embedding("unused", "  ")
    with pytest.raises(ValueError, match=r"prompt: 102 tokens, at most 77 fit"):
        tokenize("map " * 100)
    state = text_state_from_original(dict(open_clip_tower.state_dict()))
    del state["ln_final.weight"]
    with pytest.raises(CheckpointError, match=r"text encoder: TextTransformer state does not match: 1 missing keys \(first: \['ln_final.weight'\]\)"):
        build_text_tower(state, heads=HEADS)
    state = text_state_from_original(dict(open_clip_tower.state_dict()))
    state["ln_final.bias"] = torch.zeros(WIDTH + 1)
    with pytest.raises(CheckpointError, match=r"text encoder: ln_final.bias has shape \(129,\) in the checkpoint, TextTransformer expects \(128,\)"):
        build_text_tower(state, heads=HEADS)
