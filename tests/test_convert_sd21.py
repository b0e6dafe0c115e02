"""Full-size SD 2.1 conversions, on seeded random weights (and, opt-in, on real checkpoints).

One diffusers SD 2.1 folder (U-Net 865M, VAE 84M, 23-layer text encoder 340M params; 5.3 GB)
is written once for this module by diffusers' and transformers' own ``save_pretrained``.
Reference outputs come from diffusers/transformers/open_clip and are computed before cdiff's
models are built, so at most two full U-Nets are alive at once (about 7 GB).

Opt-in: CDIFF_SD21=<an SD 2.1 checkpoint: single file or diffusers folder> and
CDIFF_RELEASE_UNET=<a C-DiffSET release model.safetensors> run the same parity checks on
real weights; without them those tests are skipped, saying so.
"""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cdiff.export as ex  # noqa: E402
from cdiff.config import UNetConfig, VAEConfig  # noqa: E402
from cdiff.convert import convert  # noqa: E402
from cdiff.layouts.original import TEXT_PREFIX  # noqa: E402
from cdiff.load import load_unet, load_vae, read_unet  # noqa: E402
from cdiff.prompt import prompt_embedding, tokenize  # noqa: E402
from cdiff.testing import (  # noqa: E402
    SD21_TEXT, SD21_UNET, SD21_VAE, assert_parity, check_vae_parity, randomize_, release_surgery, unet_inputs,
    write_diffusers_folder, write_release,
)
from cdiff.weightfile import WeightFile  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

PROMPT = "electro-optical image"
QUIET = dict(echo=lambda *_: None)


def assert_files_equal(a: Path, b: Path) -> int:
    """Every tensor of two .safetensors files equal (dtype and bits), read one at a time."""
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        keys = set(fa.keys())
        assert keys == set(fb.keys()), f"{a.name} vs {b.name}: keys differ: {sorted(keys ^ set(fb.keys()))[:5]}"
        for key in keys:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            assert x.dtype == y.dtype and torch.equal(x, y), f"{a.name} vs {b.name}: {key} differs"
    return len(keys)


def run_unet(model, in_channels: int, diffusers_model: bool) -> torch.Tensor:
    sample, t, context = unet_inputs(in_channels)
    with torch.no_grad():
        if diffusers_model:
            return model(sample, t, encoder_hidden_states=context).sample
        return model(sample, t, context)


# Slow: full-size SD 2.1 in fp32 is what these tests are about (the parity of the real architecture
# and of real-sized files), so the module writes about 16 GB in all and takes minutes; it cannot be
# made smaller without testing something else.
pytestmark = pytest.mark.slow

# Full-size files are 3.5-5 GB each: every test and fixture deletes what it wrote when it is
# done, so the module peaks at about 20 GB of disk instead of keeping 30 GB to the session's end.
@pytest.fixture(autouse=True)
def _delete_written_files(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def sd21(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd21")
    yield write_diffusers_folder(folder / "sd21", SD21_UNET, SD21_VAE, SD21_TEXT, seed=11)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def expected(sd21, tmp_path_factory):
    """diffusers' outputs: the plain U-Net (4-in), the release-surgery U-Net (8-in/5-out);
    and a release starting-point file (8-in/4-out, keys prefixed ``module.``)."""
    theirs = diffusers.UNet2DConditionModel.from_pretrained(sd21 / "unet").eval()
    out = {"plain": run_unet(theirs, 4, True)}
    cdiffset = release_surgery(theirs)
    out["cdiffset"] = run_unet(cdiffset, 8, True)
    del cdiffset
    gc.collect()
    start = release_surgery(theirs, variance=False)
    folder = tmp_path_factory.mktemp("release")
    out["release_file"] = write_release(folder / "model.safetensors", start, "module.")
    del start, theirs
    gc.collect()
    yield out
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def native(sd21, tmp_path_factory):
    folder = tmp_path_factory.mktemp("native")
    yield convert(sd21, folder / "cdiffset.safetensors", **QUIET)
    shutil.rmtree(folder, ignore_errors=True)


def test_sd21_unet_from_diffusers_folder(sd21, expected):
    unet = load_unet(sd21)
    assert unet.config == UNetConfig.sd21()  # stays 4-in/4-out
    assert_parity(run_unet(unet, 4, False), expected["plain"], "SD 2.1 U-Net from diffusers folder")
    del unet
    gc.collect()


def test_sd21_convert_native_and_original_export(sd21, expected, native, tmp_path):
    unet = load_unet(native)
    assert unet.config == UNetConfig.cdiffset()
    assert_parity(run_unet(unet, 8, False), expected["cdiffset"], "C-DiffSET U-Net (native) vs release surgery")
    del unet
    gc.collect()
    # Original single file: diffusers' own single-file converter must read it to the same model.
    single = ex.export_original(native, tmp_path / "single.safetensors")
    theirs = diffusers.UNet2DConditionModel.from_single_file(
        str(single), config=str(sd21), subfolder="unet", local_files_only=True, in_channels=8, out_channels=5
    ).eval()
    assert_parity(run_unet(theirs, 8, True), expected["cdiffset"], "diffusers from_single_file(cdiff original export)")
    del theirs
    gc.collect()
    vae = diffusers.AutoencoderKL.from_single_file(str(single), config=str(sd21), subfolder="vae", local_files_only=True).eval()
    check_vae_parity(load_vae(native), vae, "SD 2.1 VAE: cdiff native vs diffusers from_single_file")
    del vae
    # Round trip native -> original -> native, bit-exact.
    again = convert(single, tmp_path / "again.safetensors", **QUIET)
    single.unlink()
    assert assert_files_equal(native, again) == 686 + 248 + 1


def test_sd21_diffusers_configs_written_as_sd21s():
    """The exporter's config.json files are SD 2.1's (written out by hand in test_convert);
    the key mapping of that export is the tables' round trip, checked at the tiny size."""
    ours = ex.diffusers_unet_config(UNetConfig.sd21())
    assert {k: ours[k] for k in SD21_UNET} == SD21_UNET | {"sample_size": ours["sample_size"]}
    ours = ex.diffusers_vae_config(VAEConfig.sd21())
    assert {k: ours[k] for k in SD21_VAE} == SD21_VAE | {"sample_size": ours["sample_size"]}
    assert ours["scaling_factor"] == 0.18215


def test_sd21_vae(sd21):
    ours = load_vae(sd21)
    assert ours.config == VAEConfig.sd21()
    check_vae_parity(ours, diffusers.AutoencoderKL.from_pretrained(sd21 / "vae").eval(), "SD 2.1 VAE from diffusers folder")


def test_sd21_release_file(sd21, expected, tmp_path):
    release = expected["release_file"]
    out = convert(sd21, tmp_path / "from_release.safetensors", unet=release, **QUIET)
    unet = load_unet(out)
    assert (unet.config.in_channels, unet.config.out_channels) == (8, 5)
    # release surgery of the starting point == release surgery of SD 2.1 (conv_in is the same)
    assert_parity(run_unet(unet, 8, False), expected["cdiffset"], "release 8-in/4-out file + variance channel")
    del unet
    gc.collect()
    back = ex.export_release(out, tmp_path / "model.safetensors")
    with safe_open(str(back), framework="pt") as fb, safe_open(str(release), framework="pt") as fr:
        for key in fr.keys():
            theirs, ours = fr.get_tensor(key), fb.get_tensor(key[len("module."):])
            if key.startswith("module.conv_out."):
                assert torch.equal(ours[:4], theirs) and not ours[4].any()
            else:
                assert torch.equal(ours, theirs), key


def test_sd21_prompt_embedding(sd21, tmp_path):
    """The context equals transformers' CLIPTextModel (23 layers) on the unpadded tokens, and
    open_clip's own ViT-H/14 text tower (24 blocks, same weights) at its penultimate block."""
    tokens = tokenize(PROMPT)
    model = transformers.CLIPTextModel.from_pretrained(sd21 / "text_encoder").eval()
    with torch.no_grad():
        reference = model(input_ids=tokens[None]).last_hidden_state[0]  # (6, 1024)
    context = prompt_embedding(sd21, PROMPT)
    assert context.shape == (6, 1024)
    assert_parity(context, reference, "SD 2.1 prompt embedding vs transformers CLIPTextModel")

    # open_clip's tower given the same weights, mapped here by hand (q/k/v stacked), plus a
    # random 24th block that SD 2.1 never runs.
    from open_clip.transformer import TextTransformer

    tower = TextTransformer(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24, output_dim=1024)
    randomize_(tower, 5).eval()
    theirs = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    mine = tower.state_dict()
    with torch.no_grad():
        mine["token_embedding.weight"].copy_(theirs["embeddings.token_embedding.weight"])
        mine["positional_embedding"].copy_(theirs["embeddings.position_embedding.weight"])
        mine["ln_final.weight"].copy_(theirs["final_layer_norm.weight"])
        mine["ln_final.bias"].copy_(theirs["final_layer_norm.bias"])
        for i in range(23):
            a, b = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
            for kind in ("weight", "bias"):
                mine[a + f"attn.in_proj_{kind}"].copy_(torch.cat([theirs[b + f"self_attn.{p}_proj.{kind}"] for p in "qkv"]))
                mine[a + f"attn.out_proj.{kind}"].copy_(theirs[b + f"self_attn.out_proj.{kind}"])
                mine[a + f"ln_1.{kind}"].copy_(theirs[b + f"layer_norm1.{kind}"])
                mine[a + f"ln_2.{kind}"].copy_(theirs[b + f"layer_norm2.{kind}"])
                mine[a + f"mlp.c_fc.{kind}"].copy_(theirs[b + f"mlp.fc1.{kind}"])
                mine[a + f"mlp.c_proj.{kind}"].copy_(theirs[b + f"mlp.fc2.{kind}"])
    del model, theirs
    gc.collect()
    with torch.no_grad():
        padded = tokenize(PROMPT, pad_to_77=True)[None]
        penultimate = tower.forward_intermediates(padded, indices=[22], output_fmt="NLC", intermediates_only=True)
        open_clip_ref = tower.ln_final(penultimate["text_intermediates"][0])[0]  # (77, 1024)
    assert_parity(context, open_clip_ref[:6], "SD 2.1 prompt embedding vs open_clip penultimate")
    # The same tower written as an original single file's cond_stage_model.model.*.
    from safetensors.torch import save_file

    path = tmp_path / "text.safetensors"
    state = {TEXT_PREFIX + k: v.contiguous() for k, v in tower.state_dict().items()}
    state[TEXT_PREFIX + "logit_scale"] = torch.tensor(4.6)  # present in Stability's file, unused
    save_file(state, str(path))
    del tower, state
    gc.collect()
    padded_context = prompt_embedding(path, PROMPT, pad_to_77=True)
    assert_parity(padded_context, open_clip_ref, "original-layout prompt embedding, padded to 77")
    # Unpadded = the first 6 padded rows (causal attention), up to float rounding of other shapes.
    assert_parity(prompt_embedding(path, PROMPT), padded_context[:6], "original-layout prompt embedding, unpadded")


# --- opt-in: real checkpoints ----------------------------------------------------------------

SD21_PATH = os.environ.get("CDIFF_SD21")
RELEASE_PATH = os.environ.get("CDIFF_RELEASE_UNET")


@pytest.mark.skipif(not SD21_PATH, reason="set CDIFF_SD21 to a real SD 2.1 checkpoint (file or diffusers folder)")
def test_real_sd21(tmp_path):
    src = Path(SD21_PATH)
    plain = convert(src, tmp_path / "plain.safetensors", plain=True)
    if src.is_dir():
        theirs = diffusers.UNet2DConditionModel.from_pretrained(src / "unet", torch_dtype=torch.float32).eval()
        vae = diffusers.AutoencoderKL.from_pretrained(src / "vae", torch_dtype=torch.float32).eval()
    else:
        config = ex.export_diffusers(plain, tmp_path / "config")  # only its config.json files are used
        kwargs = dict(config=str(config), local_files_only=True, torch_dtype=torch.float32)
        theirs = diffusers.UNet2DConditionModel.from_single_file(str(src), subfolder="unet", **kwargs).eval()
        vae = diffusers.AutoencoderKL.from_single_file(str(src), subfolder="vae", **kwargs).eval()
    reference = run_unet(theirs, 4, True)
    del theirs
    gc.collect()
    assert_parity(run_unet(load_unet(src, dtype=torch.float32), 4, False), reference, "real SD 2.1 U-Net")
    check_vae_parity(load_vae(src, dtype=torch.float32), vae, "real SD 2.1 VAE")
    if src.is_dir():
        model = transformers.CLIPTextModel.from_pretrained(src / "text_encoder", torch_dtype=torch.float32).eval()
        with torch.no_grad():
            reference = model(input_ids=tokenize(PROMPT)[None]).last_hidden_state[0]
        assert_parity(prompt_embedding(src, PROMPT), reference, "real SD 2.1 prompt embedding")


@pytest.mark.skipif(not RELEASE_PATH, reason="set CDIFF_RELEASE_UNET to a C-DiffSET release model.safetensors")
def test_real_release_unet():
    src = Path(RELEASE_PATH)
    state, config, layout = read_unet(src)
    assert layout == "diffusers-unet" and config.in_channels == 8 and config.out_channels in (4, 5)
    theirs = diffusers.UNet2DConditionModel(**dict(SD21_UNET, in_channels=8, out_channels=config.out_channels))
    raw = WeightFile(src).load()
    theirs.load_state_dict({k.split(".", 1)[1] if k.startswith(("module.", "unet.")) else k: v.float() for k, v in raw.items()})
    reference = run_unet(theirs.eval(), 8, True)
    del theirs, raw, state
    gc.collect()
    assert_parity(run_unet(load_unet(src, dtype=torch.float32), 8, False), reference, "real release U-Net")
