"""The README's Python examples run as written."""

import re
from pathlib import Path

import torch

from cdiff import UNet, UNetConfig, VAE, VAEConfig, save_native

from .helpers import one_thread

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert len(blocks) == 3
    # The first example loads "cdiffset.safetensors": a tiny C-DiffSET model stands in for it.
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_native("cdiffset.safetensors", UNet(UNetConfig.tiny(in_channels=8, out_channels=5)), VAE(VAEConfig.tiny()),
                torch.randn(6, 1024))
    namespace = {}
    exec(compile(blocks[0], "README example 1", "exec"), namespace)
    assert "torch.Size([1, 3, 256, 256]) torch.Size([1, 1, 32, 32])" in capsys.readouterr().out
    namespace = {}
    exec(compile(blocks[1], "README example 2", "exec"), namespace)
    assert namespace["loss"].ndim == 0
    assert all(p.grad is not None for p in namespace["unet"].parameters())


def test_readme_translate_example_runs(tmp_path, monkeypatch, capsys):
    (block,) = [b for b in python_blocks() if "Tiling(" in b]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_native("cdiffset.safetensors", UNet(UNetConfig.tiny(in_channels=8, out_channels=5)), VAE(VAEConfig.tiny()),
                torch.randn(6, 1024), prompt="a prompt of its own")
    with one_thread():
        exec(compile(block, "README translate example", "exec"), {})
    assert "torch.Size([1, 3, 256, 384]) torch.Size([1])" in capsys.readouterr().out
