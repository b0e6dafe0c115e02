"""Reading checkpoint files, recognising layouts, and the errors for bad input (tiny sizes)."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

from cdiff.files import atomic_path, save_safetensors
from cdiff.layouts.detect import detect_layout
from cdiff.weightfile import CheckpointError, WeightFile, read_state_dict

TENSORS = {"model.diffusion_model.conv_in.weight": torch.arange(6.0).reshape(2, 3), "first_stage_model.x": torch.ones(2)}


class NotATensor:  # a pickled object weights_only=True must refuse
    pass


def _assert_same(a, b):
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_reads_every_format_and_unwraps_state_dict(tmp_path):
    save_file(TENSORS, str(tmp_path / "a.safetensors"))
    torch.save({"state_dict": TENSORS, "global_step": 3}, tmp_path / "a.ckpt")
    torch.save(OrderedDict(TENSORS), tmp_path / "a.bin")
    for name in ("a.safetensors", "a.ckpt", "a.bin"):
        _assert_same(read_state_dict(tmp_path / name), TENSORS)
        assert detect_layout(tmp_path / name) == "original"
    assert read_state_dict(tmp_path / "a.safetensors", prefix="first_stage_model.").keys() == {"x"}


def test_sharded_index(tmp_path):
    save_file({"a": torch.ones(1)}, str(tmp_path / "m-1.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "m-2.safetensors"))
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    _assert_same(read_state_dict(tmp_path / "m.safetensors.index.json"), {"a": torch.ones(1), "b": torch.zeros(2)})
    (tmp_path / "m-2.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"m\.safetensors\.index\.json: shard m-2\.safetensors is missing"):
        WeightFile(tmp_path / "m.safetensors.index.json")


def test_refuses_arbitrary_pickles(tmp_path):
    torch.save({"state_dict": TENSORS, "callback": NotATensor()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refusing to load: this file needs unpickling arbitrary Python objects"):
        read_state_dict(tmp_path / "evil.ckpt")


def test_truncated_and_corrupt_files(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(TENSORS, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: .*(truncated|corrupt)"):
        read_state_dict(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: .*(truncated|corrupt)"):
        read_state_dict(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: not a readable \.safetensors file"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save(TENSORS, tmp_path / "cut.ckpt")
    data = (tmp_path / "cut.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: not a readable checkpoint \(truncated or corrupt\?\)"):
        read_state_dict(tmp_path / "cut.ckpt")


def test_unknown_layout_and_format(tmp_path):
    save_file({"foo.weight": torch.ones(1)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(CheckpointError, match=r"foo\.safetensors: unknown layout: its 1 keys \(first: \['foo\.weight'\]\)"):
        detect_layout(tmp_path / "foo.safetensors")
    (tmp_path / "w.npz").write_bytes(b"\x93NUMPY\x01\x00")
    with pytest.raises(CheckpointError, match=r"w\.npz: unknown weights format"):
        detect_layout(tmp_path / "w.npz")
    torch.save(TENSORS, tmp_path / "w.model")
    with pytest.raises(CheckpointError, match=r"w\.model: unknown weights format .*its bytes are a PyTorch checkpoint"):
        detect_layout(tmp_path / "w.model")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors: no such file or folder"):
        detect_layout(tmp_path / "nowhere.safetensors")


def test_folders(tmp_path):
    empty = tmp_path / "unet"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match=r"unet: no weights found \(expected diffusion_pytorch_model\.safetensors"):
        detect_layout(empty)
    save_file({"conv_in.weight": torch.ones(1)}, str(empty / "diffusion_pytorch_model.safetensors"))
    assert detect_layout(empty) == "diffusers-unet"
    (tmp_path / "vae").mkdir()
    assert detect_layout(tmp_path) == "diffusers"
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(CheckpointError, match=r"other: no weights found"):
        detect_layout(other)


def test_release_and_native_detection(tmp_path):
    save_file({"module.conv_in.weight": torch.ones(1), "module.down_blocks.0.x": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    assert detect_layout(tmp_path / "model.safetensors") == "diffusers-unet"
    save_file({"unet.conv_in.weight": torch.ones(1)}, str(tmp_path / "n.safetensors"), metadata={"format": "cdiff"})
    assert detect_layout(tmp_path / "n.safetensors") == "native"


def test_atomic_writes_leave_nothing_behind(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "folder", is_dir=True) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    save_safetensors({"a": torch.ones(2), "b": torch.ones(2)}, target, {"k": "v"})
    assert WeightFile(target).metadata == {"k": "v"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_atomic_folder_never_replaces_an_existing_one(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"mine: already exists and is not empty; give a new folder"):
        with atomic_path(tmp_path / "mine", is_dir=True):
            pass
    assert (tmp_path / "mine" / "keep.txt").read_text() == "precious"


# --- files that are not what their name says ---------------------------------------------------

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac\n"
    "size 5214865159\n"
)
NOT_WEIGHTS = {
    "html": ("<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Log in to continue</body></html>",
             r"is an HTML page, not weights: a login, error or download page"),
    "git-lfs": (LFS_POINTER, r"is a git-LFS pointer, not the weights: the real file \(5,214,865,159 bytes\) was never downloaded"),
    "json": ('{"error": "Repository not found"}', r"""is a JSON file, not weights \(it starts '\{"error": "Repository not found"\}'\)"""),
    "xml": ('<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>', r"is an XML document, not weights"),
    # One byte of text: torch.load raised a bare IndexError for it ("pop from empty list").
    "text-1-byte": ("a", r"is a text file, not weights \(it starts 'a'\)"),
    "text": ("hello world\n", r"is a text file, not weights \(it starts 'hello world'\)"),
    "empty": ("", r"is empty \(0 bytes\)"),
}


@pytest.mark.parametrize("kind", NOT_WEIGHTS)
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_ckpt_that_is_not_a_pickle_is_reported_for_what_it_is(tmp_path, kind, suffix):
    content, message = NOT_WEIGHTS[kind]
    path = tmp_path / f"v2-1_512-ema-pruned{suffix}"
    path.write_text(content)
    with pytest.raises(CheckpointError, match=rf"pruned\{suffix}: {message}") as info:
        read_state_dict(path)
    assert "\n" not in str(info.value) and "unpickling arbitrary" not in str(info.value)


def test_ckpt_that_is_a_zip_archive_is_reported(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "model.ckpt", "w") as z:
        z.writestr("model/v2-1.ckpt", b"weights")
    with pytest.raises(CheckpointError, match=r"model\.ckpt: is a zip archive, not a PyTorch checkpoint \(it holds no data\.pkl\)"):
        read_state_dict(tmp_path / "model.ckpt")


@pytest.mark.parametrize("name", ["sd21.ckpt", "sd21.bin", "sd21.pt", "sd21.weights"])
def test_safetensors_bytes_are_read_whatever_the_extension(tmp_path, name):
    save_file(TENSORS, str(tmp_path / name), metadata={"k": "v"})
    f = WeightFile(tmp_path / name)
    _assert_same(f.load(), TENSORS)
    assert f.metadata == {"k": "v"} and detect_layout(tmp_path / name) == "original"


def test_pickle_under_a_safetensors_name_is_refused(tmp_path):
    torch.save(TENSORS, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is a PyTorch pickle checkpoint under a \.safetensors name"):
        read_state_dict(tmp_path / "model.safetensors")
