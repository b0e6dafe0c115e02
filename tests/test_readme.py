"""The Python examples of the README and of every page in docs/ run as written, every one, in
order, with tiny stand-ins for the files they name; the pages whose examples print or build
something checkable are checked here too."""

import re
import shlex
from pathlib import Path

import pytest
import torch

from cdiff import VAE, UNet, UNetConfig, VAEConfig, save_native
from cdiff import testing
from cdiff.testing import one_thread, write_original_file

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CHECKED = {"library.md", "changing-the-unet.md", "translation.md"}  # run (and checked) by their own tests below


def python_blocks(page: Path = README) -> list[str]:
    """The ```python blocks of a Markdown page, in order (```text blocks are left out)."""
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def run_page(page: Path, folder: Path, sd21: bool = True) -> dict:
    """Run every python block of ``page`` in order in one namespace, in ``folder`` (the caller's
    working directory), beside the stand-in files; the namespace after the last block."""
    write_stand_ins(folder, sd21)
    namespace = {}
    with one_thread():
        for i, block in enumerate(python_blocks(page), 1):
            exec(compile(block, f"{page.name} example {i}", "exec"), namespace)
    return namespace


def write_stand_ins(folder: Path, sd21: bool = True) -> None:
    """cdiffset.safetensors: a tiny C-DiffSET native model; tiny-sd21.safetensors: a tiny
    SD 2.1 (4-in / 4-out) in Stability's original single-file layout (``sd21=False``: not made
    here, the page says how)."""
    torch.manual_seed(0)
    save_native(folder / "cdiffset.safetensors", UNet(UNetConfig.tiny(in_channels=8, out_channels=5)),
                VAE(VAEConfig.tiny()), torch.randn(6, 1024))
    if sd21:
        write_original_file(folder / "tiny-sd21.safetensors", tiny=True, seed=1)


def page_command(page: Path, file_name: str) -> list[str]:
    """The arguments of the ``python -m cdiff.testing`` command that the page's comment right
    above the first line loading ``file_name`` gives for making it."""
    lines = page.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if f'"{file_name}"' in line and not line.lstrip().startswith("#"))
    match = re.search(r"#.*?: (python -m cdiff\.testing .*)$", lines[first - 1])
    assert match, f"{page.name}: no command that makes {file_name} in the comment above: {lines[first - 1]!r}"
    argv = shlex.split(match.group(1))
    assert argv[:3] == ["python", "-m", "cdiff.testing"] and file_name in argv
    return argv[3:]


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    (block,) = python_blocks()  # the README keeps one example; the rest lives in docs/
    monkeypatch.chdir(tmp_path)
    write_stand_ins(tmp_path, sd21=False)
    with one_thread():
        exec(compile(block, "README example", "exec"), {})
    assert "torch.Size([1, 3, 256, 256]) torch.Size([1, 1, 32, 32])" in capsys.readouterr().out


def test_readme_links_to_every_docs_page():
    text = README.read_text() + (DOCS / "index.md").read_text()
    missing = [page.name for page in PAGES if page.name != "index.md" and page.name not in text]
    assert not missing, f"pages no one links to: {missing}"
    assert len(README.read_text().splitlines()) <= 200


def test_library_page(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = run_page(DOCS / "library.md", tmp_path)
    assert "torch.Size([1, 3, 128, 128]) torch.Size([1, 1, 16, 16])" in capsys.readouterr().out
    # One training step's loss: a scalar whose gradient reaches every parameter of the U-Net.
    assert namespace["loss"].ndim == 0
    assert all(p.grad is not None for p in namespace["unet"].parameters())


def test_changing_the_unet_page(tmp_path, monkeypatch, capsys):
    page = DOCS / "changing-the-unet.md"
    monkeypatch.chdir(tmp_path)
    testing.main(page_command(page, "tiny-sd21.safetensors"))  # the file is made as the page says
    namespace = run_page(page, tmp_path, sd21=False)
    out = capsys.readouterr().out
    # The changed U-Net: SD 2.1 tensors loaded, the gate new; surgery, a step, saved, loaded back.
    report = namespace["report"]
    assert report.missing == ("down.1.gate",) and not report.unexpected and not report.mismatched
    assert "1 missing, left at their initialisation (first: down.1.gate)" in out
    unet, again = namespace["unet"], namespace["again"]
    assert type(unet).__name__ == "GatedUNet" and (unet.config.in_channels, unet.config.out_channels) == (8, 5)
    assert torch.isfinite(namespace["loss"]) and unet.down[1].gate.grad is not None
    assert not torch.equal(unet.down[1].gate.detach(), torch.ones(3))  # the step moved the new parameter
    for key, value in unet.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    # Attention maps of every cross-attention; the custom backend stays on the mid block.
    probs = namespace["probs"]
    assert len(namespace["maps"]) == 16 and probs.shape == (2, 2, 64, 6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 64), rtol=0, atol=1e-6)
    assert again.mid.attn.blocks[0].cross_attn.attention_backend is namespace["temperature"]


def test_translation_page(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_page(DOCS / "translation.md", tmp_path)
    assert "torch.Size([1, 3, 256, 384]) torch.Size([1])" in capsys.readouterr().out


def test_docs_folder_has_an_index():
    assert DOCS / "index.md" in PAGES


@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in CHECKED], ids=lambda p: p.name)
def test_docs_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_page(page, tmp_path)


def test_a_failing_docs_example_fails_the_test(tmp_path, monkeypatch):
    """The runner executes the blocks, in order and in one namespace, and skips ```text blocks."""
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 2\n```\n\n```text\nnot python\n```\n\n```python\ny = x * 3\n```\n")
    monkeypatch.chdir(tmp_path)
    assert run_page(page, tmp_path)["y"] == 6
    page.write_text("```python\nraise RuntimeError('example 1 is broken')\n```\n")
    (tmp_path / "again").mkdir()
    monkeypatch.chdir(tmp_path / "again")
    with pytest.raises(RuntimeError, match="example 1 is broken"):
        run_page(page, tmp_path / "again")
