"""Conversions at the tiny preset: every source layout in, native out, exports back, the
C-DiffSET surgery, the CLI, and the error messages. The full-size SD 2.1 checks live in
test_convert_sd21.py; both write their sources with cdiff/testing.py.

Sources are written by the reference libraries themselves (diffusers' ``save_pretrained``,
transformers' CLIPTextModel), from seeded random weights; the release's surgery is written
here independently of cdiff's; the original layout is checked by diffusers' own
single-file loader. Reference outputs always come from diffusers, never from cdiff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded; config= is a local folder

import cdiff.export as ex  # noqa: E402
from cdiff.cli import main as cli_main  # noqa: E402
from cdiff.config import UNetConfig, VAEConfig  # noqa: E402
from cdiff.convert import convert  # noqa: E402
from cdiff.layouts.detect import detect_layout  # noqa: E402
from cdiff.load import load_pipeline, load_unet, load_vae, read_unet  # noqa: E402
from cdiff.loss import VAR_MAX, VAR_MIN, VAR_OFFSET, variance_from_raw  # noqa: E402
from cdiff.native import NATIVE_VERSION  # noqa: E402
from cdiff.statedict import build_model  # noqa: E402
from cdiff.surgery import cdiffset_surgery  # noqa: E402
from cdiff.testing import (  # noqa: E402
    assert_parity, check_unet_parity, check_vae_parity, randomize_, release_surgery, tiny_configs, unet_inputs,
    write_diffusers_folder, write_release,
)
from cdiff.weightfile import CheckpointError, WeightFile  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("open_clip")

TINY_UNET, TINY_VAE, TINY_TEXT = tiny_configs()


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_diffusers_folder(tmp_path_factory.mktemp("tiny") / "sd21", TINY_UNET, TINY_VAE, TINY_TEXT)


@pytest.fixture(scope="module")
def tiny_native(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "model.safetensors"
    convert(tiny_folder, out, echo=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def reference(tiny_folder):
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_folder / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_folder / "vae").eval()
    return unet, vae


# --- loading ---------------------------------------------------------------------------------


def test_load_unet_and_vae_from_diffusers_folder_match_diffusers(tiny_folder, reference):
    for source in (tiny_folder, tiny_folder / "unet"):
        unet = load_unet(source)
        assert unet.config == UNetConfig.tiny()  # a plain SD U-Net stays 4-in/4-out
        out = unet(*unet_inputs(4))
        assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 16, 16)
        check_unet_parity(unet, reference[0], f"tiny U-Net from {source.name}")
    for source in (tiny_folder, tiny_folder / "vae"):
        vae = load_vae(source)
        assert vae.config == VAEConfig.tiny()
        check_vae_parity(vae, reference[1], f"tiny VAE from {source.name}")


def test_load_dtype_and_stored_dtype(tiny_folder):
    assert load_unet(tiny_folder).conv_in.weight.dtype == torch.float32
    unet = load_unet(tiny_folder, dtype=torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}


def test_convert_writes_native_cdiffset_model(tiny_folder, tiny_native, reference):
    f = WeightFile(tiny_native)
    assert detect_layout(tiny_native) == "native"
    assert f.metadata["format"] == "cdiff" and f.metadata["format_version"] == NATIVE_VERSION
    assert f.metadata["prompt"] == "electro-optical image" and f.metadata["padding"] == "none"
    pipe = load_pipeline(tiny_native)
    unet, vae, context = pipe.unet, pipe.vae, pipe.context
    assert unet.config == UNetConfig.tiny(in_channels=8, out_channels=5) and vae.config == VAEConfig.tiny()
    assert context.shape == (6, 1024)
    # The surgery against the release's, written independently on diffusers' model.
    check_unet_parity(unet, release_surgery(reference[0]), "tiny C-DiffSET U-Net vs release surgery")
    check_vae_parity(vae, reference[1], "tiny VAE in native file")


def test_surgery_weights_and_initial_variance(tiny_folder):
    plain = load_unet(tiny_folder)
    w_in, b_in = plain.conv_in.weight.clone(), plain.conv_in.bias.clone()
    w_out, b_out = plain.conv_out.weight.clone(), plain.conv_out.bias.clone()
    model = cdiffset_surgery(plain)
    assert (model.config.in_channels, model.config.out_channels) == (8, 5)
    assert torch.equal(model.conv_in.weight[:, :4], w_in * 0.5) and torch.equal(model.conv_in.weight[:, 4:], w_in * 0.5)
    assert torch.equal(model.conv_in.bias, b_in)
    assert torch.equal(model.conv_out.weight[:4], w_out) and torch.equal(model.conv_out.bias[:4], b_out)
    assert not model.conv_out.weight[4].any() and model.conv_out.bias[4] == 0
    # raw variance 0 everywhere at start, so variance exactly 1: the loss's constants give that.
    raw = model(*unet_inputs(8))[:, 4:]
    assert not raw.any()
    assert torch.equal(variance_from_raw(raw), torch.ones_like(raw))
    assert VAR_MIN == 1e-6 and VAR_MAX == 10.0
    assert abs(VAR_OFFSET - torch.log(torch.expm1(torch.tensor(1 - 1e-6, dtype=torch.float64))).item()) < 1e-12
    # 8-in/4-out gets the variance channel only; 8-in/5-out is taken unchanged.
    starting = build_model(type(model), UNetConfig.tiny(in_channels=8, out_channels=4),
                              {k: (v[:4] if k.startswith("conv_out") else v) for k, v in model.state_dict().items()}, "test")
    done = cdiffset_surgery(starting)
    assert (done.config.in_channels, done.config.out_channels) == (8, 5)
    assert torch.equal(done.conv_in.weight, starting.conv_in.weight)
    assert cdiffset_surgery(done) is done


def test_surgery_refuses_other_shapes(tiny_folder):
    from cdiff.unet import UNet

    with torch.device("meta"):
        odd = UNet(UNetConfig.tiny(in_channels=3, out_channels=4))
    with pytest.raises(ValueError, match=r"cdiffset_surgery: a 3-in/4-out U-Net"):
        cdiffset_surgery(odd)


# --- release files -------------------------------------------------------------------------


def test_release_unet_files(tiny_folder, reference, tmp_path):
    trained = randomize_(release_surgery(reference[0]), 7)  # a "trained" 8-in/5-out model
    path = write_release(tmp_path / "model.safetensors", trained, prefix="module.")
    assert detect_layout(path) == "diffusers-unet"
    unet = load_unet(path)
    assert (unet.config.in_channels, unet.config.out_channels) == (8, 5)
    check_unet_parity(unet, trained, "release 8-in/5-out U-Net")
    out = tmp_path / "converted.safetensors"
    convert(tiny_folder, out, unet=path, echo=lambda *_: None)
    assert_same_tensors(read_unet(out)[0], read_unet(path)[0], "release U-Net taken unchanged")
    # The SAR-conditioned starting point (8-in/4-out), keys prefixed "unet.": variance only.
    start = release_surgery(reference[0], variance=False)
    path = write_release(tmp_path / "start.safetensors", start, prefix="unet.")
    convert(tiny_folder, out, unet=path, echo=lambda *_: None, overwrite=True)
    converted = load_unet(out)
    check_unet_parity(converted, release_surgery(start), "release 8-in/4-out + variance channel")
    # Export back to the release file: bit-exact.
    back = ex.export_release(out, tmp_path / "back.safetensors")
    expected = {k: v for k, v in converted.state_dict().items()}
    assert_same_tensors(read_unet(back)[0], expected, "release export")


# --- native and exports ----------------------------------------------------------------------


def test_native_round_trips_through_every_layout(tiny_native, tmp_path, reference):
    native = WeightFile(tiny_native).load()
    # diffusers folder: read back by diffusers itself, then by cdiff, bit-exactly.
    folder = ex.export_diffusers(tiny_native, tmp_path / "diffusers")
    assert detect_layout(folder) == "diffusers"
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    check_unet_parity(load_unet(tiny_native), theirs, "native -> diffusers export, read by diffusers")
    check_vae_parity(load_vae(tiny_native), diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval(), "VAE export")
    diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    again = convert(folder, tmp_path / "again.safetensors", echo=lambda *_: None)
    assert_same_tensors(WeightFile(again).load(), native, "native -> diffusers -> native")
    # original single file, then back.
    single = ex.export_original(tiny_native, tmp_path / "single.safetensors")
    assert detect_layout(single) == "original"
    again = convert(single, tmp_path / "again2.safetensors", echo=lambda *_: None)
    assert_same_tensors(WeightFile(again).load(), native, "native -> original -> native")
    assert WeightFile(again).metadata["unet_config"] == WeightFile(tiny_native).metadata["unet_config"]


def test_original_export_read_by_diffusers_single_file_loader(tiny_folder, tiny_native, reference, tmp_path):
    """The independent check of the original-layout tables: diffusers' own converter reads
    cdiff's export (plain and C-DiffSET) and must give diffusers' outputs."""
    plain = convert(tiny_folder, tmp_path / "plain.safetensors", plain=True, echo=lambda *_: None)
    for source, (c_in, c_out), expected in (
        (plain, (4, 4), reference[0]),
        (tiny_native, (8, 5), release_surgery(reference[0])),
    ):
        single = ex.export_original(source, tmp_path / f"single{c_in}.safetensors")
        theirs = diffusers.UNet2DConditionModel.from_single_file(
            str(single), config=str(tiny_folder), subfolder="unet", local_files_only=True,
            in_channels=c_in, out_channels=c_out,
        ).eval()
        sample, t, context = unet_inputs(c_in)
        with torch.no_grad():
            assert_parity(theirs(sample, t, encoder_hidden_states=context).sample,
                          expected(sample, t, encoder_hidden_states=context).sample,
                          f"diffusers from_single_file of cdiff's original export ({c_in}-in)")
        check_unet_parity(load_unet(single), expected, f"cdiff reading its original export ({c_in}-in)")
    vae = diffusers.AutoencoderKL.from_single_file(
        str(single), config=str(tiny_folder), subfolder="vae", local_files_only=True
    ).eval()
    check_vae_parity(load_vae(single), vae, "diffusers from_single_file VAE vs cdiff")
    check_vae_parity(load_vae(single), reference[1], "original-layout VAE vs diffusers' own")


def test_load_pipeline(tiny_folder, tiny_native):
    from cdiff.pipeline import Pipeline

    pipe = load_pipeline(tiny_native)
    assert isinstance(pipe, Pipeline) and pipe.context.shape == (6, 1024)
    assert pipe.prompt == "electro-optical image"
    assert torch.equal(pipe.context, WeightFile(tiny_native).load("context")[""])
    with pytest.raises(ValueError, match="surgery=True"):
        load_pipeline(tiny_folder)
    pipe = load_pipeline(tiny_folder, surgery=True, pad_to_77=True)
    assert pipe.unet.config.in_channels == 8 and pipe.context.shape == (77, 1024)


def test_native_prediction_travels_with_the_model(tiny_native, tmp_path):
    """A U-Net trained to predict x0 ("sample") is sampled as one: the pipeline's sampler reads
    its output as x0; a file without the field (written before it existed) is "epsilon"."""
    from cdiff.native import native_prediction, save_native

    pipe = load_pipeline(tiny_native)
    unet, vae, context = pipe.unet, pipe.vae, pipe.context
    assert native_prediction(tiny_native) == "epsilon" and load_pipeline(tiny_native).prediction_type == "epsilon"
    x0_model = save_native(tmp_path / "x0.safetensors", unet, vae, context, prediction="sample")
    assert native_prediction(x0_model) == "sample"
    pipe = load_pipeline(x0_model)
    assert pipe.prediction_type == "sample" and pipe.unet.state_dict().keys() == unet.state_dict().keys()
    with pytest.raises(ValueError, match="prediction must be one of"):
        save_native(tmp_path / "bad.safetensors", unet, vae, context, prediction="v")


# --- CLI -------------------------------------------------------------------------------------


def test_cli_convert_and_export(tiny_folder, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert cli_main(["convert", str(tiny_folder), str(out), "--pad-to-77", "--dtype", "fp16", "--prompt", "a map"]) == 0
    text = capsys.readouterr().out
    assert "diffusers layout" in text and "4-in/4-out" in text and "float32" in text
    assert "8-in/5-out" in text and "float16" in text and f"wrote {out}" in text
    f = WeightFile(out)
    assert f.metadata["prompt"] == "a map" and f.metadata["padding"] == "77"
    assert f.load("context")[""].shape == (77, 1024)
    assert {v.dtype for v in f.load("unet.").values()} == {torch.float16}
    assert cli_main(["convert", str(tiny_folder), str(tmp_path / "plain.safetensors"), "--plain"]) == 0
    assert load_unet(tmp_path / "plain.safetensors").config.in_channels == 4
    assert cli_main(["export", str(out), str(tmp_path / "release.safetensors"), "--to", "release"]) == 0
    assert detect_layout(tmp_path / "release.safetensors") == "diffusers-unet"


# --- bad input -------------------------------------------------------------------------------


def _corrupt_unet_folder(src: Path, dst: Path, edit) -> Path:
    """Copy of the tiny model folder whose unet weights ``edit(state)`` changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights))
    return dst


def test_error_missing_and_unexpected_keys(tiny_folder, tmp_path):
    def drop(state):
        for k in [k for k in state if k.startswith("up_blocks.1.attentions.0.transformer_blocks.0.attn2")]:
            del state[k]

    bad = _corrupt_unet_folder(tiny_folder, tmp_path / "missing", drop)
    with pytest.raises(CheckpointError, match=r"missing.*: UNet state does not match: 5 missing keys \(first: \['up\.1\.attn\.0"):
        load_unet(bad)

    def extra(state):
        state["up_blocks.0.extra.weight"] = torch.zeros(3)
        state["conv_in.extra"] = torch.zeros(3)

    bad = _corrupt_unet_folder(tiny_folder, tmp_path / "unexpected", extra)
    with pytest.raises(CheckpointError, match=r"unexpected.*1 keys match no rule .*up_blocks\.0\.extra\.weight"):
        load_unet(bad)

    def extra_renamable(state):
        state["conv_in.extra"] = torch.zeros(3)

    bad = _corrupt_unet_folder(tiny_folder, tmp_path / "unexpected2", extra_renamable)
    with pytest.raises(CheckpointError, match=r"0 missing keys \(first: \[\]\), 1 unexpected keys \(first: \['conv_in\.extra'\]\)"):
        load_unet(bad)


def test_error_shape_mismatch(tiny_folder, tmp_path):
    def widen(state):
        state["mid_block.attentions.0.proj_out.bias"] = torch.zeros(width + 1)

    width = UNetConfig.tiny().level_channels[-1]
    bad = _corrupt_unet_folder(tiny_folder, tmp_path / "shape", widen)
    message = rf"shape.*mid\.attn\.proj_out\.bias has shape \({width + 1},\) in the checkpoint, UNet expects \({width},\)"
    with pytest.raises(CheckpointError, match=message):
        load_unet(bad)


def test_error_not_sd21(tiny_folder, tmp_path):
    def deeper(state):
        for k in [k for k in state if k.startswith("down_blocks.0.resnets.1.")]:
            state[k.replace("resnets.1.", "resnets.2.")] = state[k].clone()

    bad = _corrupt_unet_folder(tiny_folder, tmp_path / "deeper", deeper)
    (bad / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"deeper/unet.*not Stable Diffusion 2\.1"):
        load_unet(bad / "unet")


def test_error_release_file_alone_has_no_vae(tiny_folder, reference, tmp_path):
    path = write_release(tmp_path / "model.safetensors", reference[0])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: holds no VAE"):
        convert(path, tmp_path / "out.safetensors", echo=lambda *_: None)
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_leaves_nothing_behind_on_failure(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        convert(tiny_folder, out, echo=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_native_prompt_mismatch_and_bad_output_name(tiny_native, tmp_path):
    with pytest.raises(CheckpointError, match=r"stored prompt embedding is for prompt 'electro-optical image'"):
        convert(tiny_native, tmp_path / "x.safetensors", prompt="a photo", echo=lambda *_: None)
    with pytest.raises(ValueError, match=r"out\.ckpt: the native output must be a \.safetensors file"):
        convert(tiny_native, tmp_path / "out.ckpt", echo=lambda *_: None)


def test_native_version_checked(tiny_native, tmp_path):
    from safetensors.torch import save_file

    f = WeightFile(tiny_native)
    path = tmp_path / "future.safetensors"
    save_file(f.load(), str(path), metadata={**f.metadata, "format_version": "99"})
    with pytest.raises(CheckpointError, match=r"future\.safetensors: native format version '99'; this cdiff reads version 1"):
        load_unet(path)


def test_error_folder_without_weights_and_cli_message(tmp_path, capsys):
    (tmp_path / "model" / "unet").mkdir(parents=True)
    (tmp_path / "model" / "vae").mkdir()
    (tmp_path / "model" / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match=r"model/unet: no weights found"):
        load_unet(tmp_path / "model")
    assert cli_main(["convert", str(tmp_path / "model"), str(tmp_path / "out.safetensors")]) == 2
    assert "cdiff: error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_random_sd21_tool_writes_a_convertible_folder(tmp_path, capsys):
    from cdiff.testing import main as random_sd21

    random_sd21([str(tmp_path / "sd"), "--tiny", "--seed", "4"])
    assert detect_layout(tmp_path / "sd") == "diffusers"
    unet = load_unet(tmp_path / "sd")
    assert (unet.config.in_channels, unet.config.out_channels) == (4, 4)
    with pytest.raises(SystemExit):  # never writes over an existing folder
        random_sd21([str(tmp_path / "sd"), "--tiny"])
    assert "already exists" in capsys.readouterr().err


def test_convert_says_which_surgery_it_did(tiny_folder, tiny_native, tmp_path):
    said = []
    convert(tiny_folder, tmp_path / "a.safetensors", echo=said.append)
    assert "C-DiffSET surgery: 4-in/4-out -> 8-in/5-out (conv_in takes [SAR | EO] latents, both halves the original " \
           "weights x 0.5; conv_out gains a variance channel of zero weights)" in said
    said.clear()
    convert(tiny_native, tmp_path / "b.safetensors", echo=said.append)  # already C-DiffSET: nothing done
    (line,) = [s for s in said if s.startswith("C-DiffSET surgery")]
    assert line == "C-DiffSET surgery: not applied: the U-Net is already the C-DiffSET one (8-in/5-out)"
