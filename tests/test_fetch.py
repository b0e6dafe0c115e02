"""``cdiff fetch`` against a fake Hugging Face hub on 127.0.0.1 (tests/fake_hub.py): nothing here
reaches the internet. The served models are tiny SD 2.1-layout folders with seeded random weights,
written by diffusers and transformers themselves (cdiff/testing.py), at the real table's
repositories, revisions and paths; only the recorded sha256 of the real SD 2.1 VAE is lifted,
since the fake VAE is another file (a test checks that the recorded hash is enforced).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cdiff import download, hub, zoo
from cdiff.cli import main as cli_main
from cdiff.data.imageio import write_png
from cdiff.fetch import run_fetch
from cdiff.hub import HubFile, WebFile

from .fake_hub import FakeHub, Fault, git_sha1

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(echo=lambda line: None, show_progress=False)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running fake hub, HF_ENDPOINT pointing at it, and every cache in tmp_path."""
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("CDIFF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no real token is read
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(download, "RETRY_WAIT", 0.0)
    yield server
    server.stop()


def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def random_bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def nothing_final(folder: Path) -> list[Path]:
    """Files under ``folder`` other than partial downloads and lock files."""
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith((".incomplete", ".lock"))]


# --- the real table's models, served by the fake hub -----------------------------------------


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """Tiny SD 2.1 files and released U-Nets (8-in/5-out, 8-in/4-out) in the real layouts."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("open_clip")
    from cdiff.testing import one_thread, randomize_, tiny_configs, write_diffusers_folder

    unet_cfg, vae_cfg, text_cfg = tiny_configs()
    # A narrow text encoder (and U-Net context) keeps the files small; the vocabulary stays OpenCLIP's.
    unet_cfg = dict(unet_cfg, cross_attention_dim=64)
    text_cfg = dict(text_cfg, hidden_size=64, intermediate_size=128, num_attention_heads=1)
    root = tmp_path_factory.mktemp("release")
    with one_thread():
        sd21 = write_diffusers_folder(root / "sd21", unet_cfg, vae_cfg, text_cfg)
        for name, out_channels, seed in (("c-diffset", 5, 11), ("sd21-ft", 4, 12)):
            with torch.device("meta"):
                unet = diffusers.UNet2DConditionModel(**dict(unet_cfg, in_channels=8, out_channels=out_channels))
            randomize_(unet.to_empty(device="cpu"), seed).save_pretrained(root / name, safe_serialization=True)
    tokenizer = {f"tokenizer/{name}": f"fake {name}\n".encode() for name in
                 ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")}
    return {
        zoo.SD21_REPO: FakeHub.read_folder(sd21) | tokenizer,
        zoo.RELEASE_REPO: FakeHub.read_folder(root / "c-diffset", "baselines/qxs-saropt/c-diffset/")
        | FakeHub.read_folder(root / "sd21-ft", "baselines/qxs-saropt/sd21-ft/"),
        "folders": {"sd21": sd21, "c-diffset": root / "c-diffset", "sd21-ft": root / "sd21-ft"},
    }


def serve_release(server: FakeHub, tiny_release) -> None:
    server.add_repo(zoo.SD21_REPO, tiny_release[zoo.SD21_REPO], revision=zoo.SD21_REVISION)
    server.add_repo(zoo.RELEASE_REPO, tiny_release[zoo.RELEASE_REPO], revision=zoo.RELEASE_REVISION)


def without_recorded_hashes(monkeypatch) -> None:
    table = {name: dataclasses.replace(model, files=tuple(dataclasses.replace(f, sha256=None) for f in model.files))
             for name, model in zoo.MODELS.items()}
    monkeypatch.setattr(zoo, "MODELS", table)


def test_recorded_hash_is_enforced(fake_hub, tiny_release, tmp_path):
    """The real table records the SD 2.1 VAE's sha256: a hub serving another VAE is refused
    before any byte of it is downloaded."""
    serve_release(fake_hub, tiny_release)
    with pytest.raises(hub.IntegrityError, match=zoo.SD21_VAE_SHA256):
        run_fetch(["sd21-base"], **QUIET)
    vae = hashlib.sha256(tiny_release[zoo.SD21_REPO]["vae/diffusion_pytorch_model.safetensors"]).hexdigest()
    assert fake_hub.gets(f"/cdn/{vae}") == []
    assert not list((cache(tmp_path) / "hub").rglob("vae/diffusion_pytorch_model.safetensors"))


def test_fetch_convert_translate(fake_hub, tiny_release, tmp_path, monkeypatch, capsys):
    """`cdiff fetch cdiffset-qxs-saropt --convert`, then `cdiff translate --model cdiffset-qxs-saropt`:
    the native file holds exactly the served U-Net, VAE and the prompt under the served text encoder."""
    from cdiff import load_pipeline
    from cdiff.prompt import prompt_embedding
    from cdiff.load import read_unet, read_vae

    serve_release(fake_hub, tiny_release)
    without_recorded_hashes(monkeypatch)
    with pytest.raises(FileNotFoundError, match="run `cdiff fetch cdiffset-qxs-saropt --convert`"):
        load_pipeline("cdiffset-qxs-saropt")

    assert cli_main(["fetch", "cdiffset-qxs-saropt", "--convert"]) == 0
    out = capsys.readouterr().out
    assert "CreativeML Open RAIL++-M" in out and "law enforcement" in out  # the licence, at the first fetch
    native = zoo.native_path("cdiffset-qxs-saropt")
    assert native.is_file() and native.parent == cache(tmp_path) / "models"

    pipe = load_pipeline("cdiffset-qxs-saropt")
    folders = tiny_release["folders"]
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels) == (8, 5)
    for ours, (theirs, _, _) in ((pipe.unet, read_unet(folders["c-diffset"])), (pipe.vae, read_vae(folders["sd21"]))):
        state = ours.state_dict()
        assert state.keys() == theirs.keys()
        for key, value in theirs.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(pipe.context, prompt_embedding(folders["sd21"]), rtol=0, atol=0)

    # A second fetch downloads nothing and prints no licence.
    gets = len([r for r in fake_hub.requests if r[0] == "GET"])
    assert cli_main(["fetch", "cdiffset-qxs-saropt", "--convert"]) == 0
    out = capsys.readouterr().out
    assert "Open RAIL" not in out and "already converted" in out
    assert len([r for r in fake_hub.requests if r[0] == "GET"]) == gets

    sar = tmp_path / "sar"
    sar.mkdir()
    write_png(sar / "scene.png", np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    argv = ["translate", "--model", "cdiffset-qxs-saropt", "--input", str(sar), "--output", str(tmp_path / "eo"),
            "--steps", "2", "--conf-dir", str(tmp_path / "conf")]
    assert cli_main(argv) == 0
    assert (tmp_path / "eo" / "scene.png").is_file() and (tmp_path / "conf" / "scene.png").is_file()


def test_other_layouts_and_the_huggingface_cache(fake_hub, tiny_release, tmp_path, monkeypatch):
    """sd21-base (a diffusers pipeline folder, converted with the surgery), stage 1 (a U-Net folder
    kept 8-in/4-out), a web file checked by the hash in its name; huggingface_hub finds the files."""
    from cdiff.native import open_native
    from cdiff.load import read_unet

    serve_release(fake_hub, tiny_release)
    without_recorded_hashes(monkeypatch)
    vgg = random_bytes(50_000, seed=3)
    name = f"vgg16-{hashlib.sha256(vgg).hexdigest()[:8]}.pth"  # torch's naming: the hash's first digits
    fake_hub.web[name] = vgg
    table = dict(zoo.MODELS)
    table["lpips-vgg"] = dataclasses.replace(table["lpips-vgg"], files=(WebFile(f"{fake_hub.url}/web/{name}", name),))
    monkeypatch.setattr(zoo, "MODELS", table)

    base, stage1, weights = run_fetch(["sd21-base", "sd21ft-qxs-saropt", "lpips-vgg"], **QUIET)
    repo = cache(tmp_path) / "hub" / "models--Manojb--stable-diffusion-2-1-base"
    assert base == repo / "snapshots" / zoo.SD21_REVISION
    for path, data in tiny_release[zoo.SD21_REPO].items():
        assert (base / path).read_bytes() == data, path
    assert weights == cache(tmp_path) / "checkpoints" / name and weights.read_bytes() == vgg

    plain, start = run_fetch(["sd21ft-qxs-saropt", "sd21-base"], convert=True, **QUIET)
    stage1_unet = open_native(plain).load("unet.")
    for key, value in read_unet(stage1)[0].items():
        torch.testing.assert_close(stage1_unet[key], value, rtol=0, atol=0, msg=key)
    config = json.loads(open_native(plain).metadata["unet_config"])
    assert (config["in_channels"], config["out_channels"]) == (8, 4)  # stage 1 keeps its 4 outputs
    config = json.loads(open_native(start).metadata["unet_config"])
    assert (config["in_channels"], config["out_channels"]) == (8, 5)  # SD 2.1 -> the C-DiffSET start

    huggingface_hub = pytest.importorskip("huggingface_hub")
    for repo, revision, path in ((zoo.SD21_REPO, zoo.SD21_REVISION, "unet/diffusion_pytorch_model.safetensors"),
                                 (zoo.RELEASE_REPO, "main", "baselines/qxs-saropt/sd21-ft/config.json")):
        found = huggingface_hub.try_to_load_from_cache(repo, path, cache_dir=cache(tmp_path) / "hub", revision=revision)
        assert found is not None and Path(found).read_bytes() == tiny_release[repo][path]
    report = huggingface_hub.scan_cache_dir(cache(tmp_path) / "hub")
    assert not report.warnings and {r.repo_id for r in report.repos} == {zoo.SD21_REPO, zoo.RELEASE_REPO}


# --- downloads: resume, hashes, errors ---------------------------------------------------------


def test_cut_connection_resumes_with_only_the_rest(fake_hub, tmp_path):
    data = random_bytes(3_000_000, seed=1)
    fake_hub.add_repo("test/weights", {"unet/model.safetensors": data})
    remote, cdn = HubFile("test/weights", "unet/model.safetensors"), fake_hub.cdn_path(data)
    fake_hub.faults[cdn] = Fault(cut_after=1_200_000)
    with pytest.raises(hub.FetchError, match="run the same command again"):
        hub.fetch(remote, retries=0, **QUIET)
    partials = list((cache(tmp_path) / "hub").rglob("*.incomplete"))
    assert [p.stat().st_size for p in partials] == [1_200_000]
    assert nothing_final(cache(tmp_path) / "hub") == []  # neither the blob nor the snapshot link

    path = hub.fetch(remote, **QUIET)
    assert path.read_bytes() == data
    assert fake_hub.gets(cdn) == [None, "bytes=1200000-"]
    assert fake_hub.sent[cdn] == len(data)  # 1.2 MB, then exactly the other 1.8 MB
    assert not list((cache(tmp_path) / "hub").rglob("*.incomplete"))

    # Within one fetch: the cut is resumed at once.
    more = random_bytes(2_000_000, seed=2)
    fake_hub.add_repo("test/more", {"model.safetensors": more})
    fake_hub.faults[fake_hub.cdn_path(more)] = Fault(cut_after=700_000)
    assert hub.fetch(HubFile("test/more", "model.safetensors"), retries=1, **QUIET).read_bytes() == more
    assert fake_hub.sent[fake_hub.cdn_path(more)] == len(more)


def test_corrupted_bytes_are_refused_and_removed(fake_hub, tmp_path):
    data, small = random_bytes(500_000, seed=4), b'{"in_channels": 8}\n'
    fake_hub.add_repo("test/bad", {"model.safetensors": data, "config.json": small})
    fake_hub.faults[fake_hub.cdn_path(data)] = Fault(corrupt=True)
    fake_hub.faults["/test/bad/resolve/main/config.json"] = Fault(corrupt=True)
    with pytest.raises(hub.IntegrityError) as err:
        hub.fetch(HubFile("test/bad", "model.safetensors"), **QUIET)
    bad = bytes([data[0] ^ 0xFF]) + data[1:]
    assert hashlib.sha256(data).hexdigest() in str(err.value) and hashlib.sha256(bad).hexdigest() in str(err.value)
    assert "removed" in str(err.value)
    with pytest.raises(hub.IntegrityError, match=git_sha1(small)):  # a small file: its git blob id
        hub.fetch(HubFile("test/bad", "config.json"), **QUIET)
    assert [p for p in (cache(tmp_path) / "hub").rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []


def test_web_file_with_a_wrong_name_hash_is_refused(fake_hub, tmp_path):
    fake_hub.web["vgg16-00000000.pth"] = b"not the weights"
    with pytest.raises(hub.IntegrityError, match="00000000"):
        hub.fetch(WebFile(f"{fake_hub.url}/web/vgg16-00000000.pth", "vgg16-00000000.pth"), **QUIET)
    assert nothing_final(cache(tmp_path)) == []


def test_404_and_401_say_what_to_do(fake_hub, monkeypatch, capsys):
    fake_hub.add_repo("test/open", {"config.json": b"{}"})
    fake_hub.add_repo("meta/gated", {"model.safetensors": b"x" * 1000}, token="secret")
    with pytest.raises(hub.NotFoundError, match="HTTP 404.*does not exist"):
        hub.fetch(HubFile("test/open", "missing.json"), **QUIET)
    with pytest.raises(hub.NotFoundError, match="Invalid rev id"):
        hub.fetch(HubFile("test/open", "config.json", "v9"), **QUIET)
    assert cli_main(["fetch", "hf://meta/gated/model.safetensors"]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert "HTTP 401" in message and "accept its licence" in message and "HF_TOKEN" in message
    assert f"{fake_hub.url}/meta/gated" in message
    monkeypatch.setenv("HF_TOKEN", "secret")  # the token is sent to the hub
    assert hub.fetch(HubFile("meta/gated", "model.safetensors"), **QUIET).read_bytes() == b"x" * 1000


def test_offline_uses_the_cache(fake_hub, tmp_path, monkeypatch, capsys):
    fake_hub.add_repo("test/tiny", {"config.json": b'{"a": 1}', "model.safetensors": b"w" * 5000})
    table = {"tiny-test": zoo.Model("tiny-test", "a test model", (HubFile("test/tiny", "config.json"),), 10,
                                    "apache-2.0", "the fake hub")}
    monkeypatch.setattr(zoo, "MODELS", table)
    assert cli_main(["fetch", "tiny-test"]) == 0
    capsys.readouterr()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(fake_hub.requests)
    assert cli_main(["fetch", "tiny-test"]) == 0  # a branch revision, found through refs/main
    with pytest.raises(hub.OfflineError, match="HF_HUB_OFFLINE.*cached: tiny-test"):
        run_fetch(["hf://test/tiny/model.safetensors"], **QUIET)
    assert len(fake_hub.requests) == before  # offline: not one request

    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake_hub.stop()  # no network at all
    assert cli_main(["fetch", "tiny-test"]) == 0
    assert "using the cached copy" in capsys.readouterr().out
    assert cli_main(["fetch", "hf://test/tiny/model.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach" in err and "cached: tiny-test" in err
    assert cli_main(["fetch", "--list"]) == 0
    assert "tiny-test" in capsys.readouterr().out


def test_killed_download_leaves_no_file_under_its_final_name(fake_hub, tmp_path):
    data = random_bytes(2_000_000, seed=5)
    fake_hub.add_repo("test/kill", {"model.safetensors": data})
    cdn = fake_hub.cdn_path(data)
    fake_hub.faults[cdn] = Fault(stall_after=800_000)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "cdiff", "fetch", "hf://test/kill/model.safetensors"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = None
    try:
        assert fake_hub.stalled.wait(60), proc.stderr.read().decode() if proc.poll() is not None else "no download"
        for _ in range(200):  # the client writes what it has received
            partial = next((cache(tmp_path) / "hub").rglob("*.incomplete"), None)
            if partial is not None and partial.stat().st_size == 800_000:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        fake_hub.release.set()
    assert partial.stat().st_size == 800_000
    assert nothing_final(cache(tmp_path) / "hub") == []

    path = hub.fetch(HubFile("test/kill", "model.safetensors"), **QUIET)
    assert path.read_bytes() == data and fake_hub.gets(cdn)[-1] == "bytes=800000-"


def test_unknown_name_suggests_the_nearest(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CDIFF_CACHE_DIR", str(tmp_path))
    assert cli_main(["fetch", "cdifset-qxs-saropt"]) == 2
    err = capsys.readouterr().err
    assert "did you mean cdiffset-qxs-saropt" in err and "--list" in err
    assert cli_main(["fetch"]) == 2
    assert cli_main(["fetch", "--list"]) == 0
    listing = capsys.readouterr().out
    for name, model in zoo.MODELS.items():
        assert name in listing
    assert "Open RAIL++-M" in listing and "sd21ft-spacenet6" in listing
    # A path that exists is never taken for a name.
    (tmp_path / "sd21-base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert zoo.resolve("sd21-base") == "sd21-base"


def test_full_disk_is_named(fake_hub, tmp_path, monkeypatch):
    fake_hub.add_repo("test/big", {"model.safetensors": b"z" * 100_000})

    class Usage:
        free = 10

    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(hub.FetchError) as err:
        hub.fetch(HubFile("test/big", "model.safetensors"), **QUIET)
    assert err.value.errno == errno.ENOSPC and str(cache(tmp_path) / "hub") in str(err.value)
    assert nothing_final(cache(tmp_path)) == []


def test_addresses():
    assert hub.parse_address("hf://a/b/unet/config.json@0123") == HubFile("a/b", "unet/config.json", "0123")
    assert hub.parse_address("hf://a/b/x.bin") == HubFile("a/b", "x.bin", "main")
    assert hub.parse_address("https://huggingface.co/a/b/resolve/v1/c/d.json") == HubFile("a/b", "c/d.json", "v1")
    assert hub.parse_address("https://x.org/m/vgg.pth") == WebFile("https://x.org/m/vgg.pth", "vgg.pth")
    for bad in ("hf://a/b", "hf://a/b/c@", "ftp://x/y", "https://x.org/", "hf://a/b/../../../etc/x", "hf://a/b/c@.."):
        with pytest.raises(ValueError):
            hub.parse_address(bad)


def test_cache_folder_is_huggingface_hubs(tmp_path):
    """Without a cache folder given, hub files go where huggingface_hub itself puts them."""
    pytest.importorskip("huggingface_hub")
    code = f"""
import importlib, os, pathlib, cdiff.hub, huggingface_hub.constants as c
for name, value in (("XDG_CACHE_HOME", "xdg"), ("HF_HOME", "home"), ("HF_HUB_CACHE", "hc")):
    os.environ[name] = os.path.join({str(tmp_path)!r}, value)
    importlib.reload(c)
    print(cdiff.hub.hub_cache() == pathlib.Path(c.HF_HUB_CACHE), c.HF_HUB_CACHE)
"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HOME", "HF_HUB_CACHE", "CDIFF_CACHE_DIR", "XDG_CACHE_HOME", "HUGGINGFACE_HUB_CACHE")}
    result = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True,
                            text=True, cwd=ROOT)
    lines = result.stdout.split("\n")[:3]
    assert [line.split()[0] for line in lines] == ["True"] * 3, (result.stdout, result.stderr)
    assert [Path(line.split()[1]).parent.name for line in lines] == ["huggingface", "home", str(tmp_path.name)]


def test_docs_examples_run(tmp_path, monkeypatch, capsys):
    """The Python examples of docs/fetch.md run as written, offline."""
    import re

    monkeypatch.setenv("CDIFF_CACHE_DIR", str(tmp_path))
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "fetch.md").read_text(), flags=re.S)
    assert blocks
    for i, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/fetch.md example {i}", "exec"), {})
    out = capsys.readouterr().out
    assert "openrail++ ['baselines/qxs-saropt/c-diffset/config.json'" in out and "(0, 7)" in out


def test_metric_network_lands_where_evaluate_looks(fake_hub, tmp_path, monkeypatch):
    """Without a cache folder, `cdiff fetch lpips-vgg` writes torch's hub cache, where
    cdiff.perceptual (and so `cdiff evaluate`) finds the file."""
    from cdiff.perceptual import LPIPS_VGG, find_weights

    monkeypatch.delenv("CDIFF_CACHE_DIR")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = random_bytes(30_000, seed=6)
    fake_hub.web[LPIPS_VGG.file_name] = data
    table = dict(zoo.MODELS)  # the real name, served locally; the fake bytes' hash recorded instead of the name's
    table["lpips-vgg"] = dataclasses.replace(table["lpips-vgg"], files=(
        WebFile(f"{fake_hub.url}/web/{LPIPS_VGG.file_name}", LPIPS_VGG.file_name, hashlib.sha256(data).hexdigest()),))
    monkeypatch.setattr(zoo, "MODELS", table)
    with pytest.raises(FileNotFoundError):
        find_weights(LPIPS_VGG)
    [path] = run_fetch(["lpips-vgg"], **QUIET)
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / LPIPS_VGG.file_name
    assert find_weights(LPIPS_VGG) == path and path.read_bytes() == data


def test_fetched_metric_networks_are_found_by_evaluate_in_the_cache_folder(fake_hub, tmp_path, monkeypatch):
    """With CDIFF_CACHE_DIR set, `cdiff fetch lpips-vgg` writes DIR/checkpoints and `cdiff fetch
    dino-sat` the hub layout under DIR/hub: cdiff.perceptual and cdiff.networks (and so `cdiff
    evaluate` without flags) find both there."""
    from cdiff.networks import find_dino
    from cdiff.perceptual import LPIPS_VGG, find_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # empty: only the cache folder holds them
    for name in ("CDIFF_LPIPS_VGG", "CDIFF_DINO"):
        monkeypatch.delenv(name, raising=False)
    data = random_bytes(30_000, seed=7)
    fake_hub.web[LPIPS_VGG.file_name] = data
    table = dict(zoo.MODELS)
    table["lpips-vgg"] = dataclasses.replace(table["lpips-vgg"], files=(
        WebFile(f"{fake_hub.url}/web/{LPIPS_VGG.file_name}", LPIPS_VGG.file_name, hashlib.sha256(data).hexdigest()),))
    monkeypatch.setattr(zoo, "MODELS", table)
    dino = {path: random_bytes(2_000, seed=i) for i, path in enumerate(f.path for f in zoo.MODELS["dino-sat"].files)}
    fake_hub.add_repo(zoo.DINO_REPO, dino)
    with pytest.raises(FileNotFoundError, match="cdiff fetch lpips-vgg"):
        find_weights(LPIPS_VGG)
    with pytest.raises(FileNotFoundError, match="cdiff fetch dino-sat"):
        find_dino()

    [vgg] = run_fetch(["lpips-vgg"], **QUIET)
    assert vgg == cache(tmp_path) / "checkpoints" / LPIPS_VGG.file_name and find_weights(LPIPS_VGG) == vgg
    run_fetch(["dino-sat"], **QUIET)
    folder = find_dino()
    assert folder.is_relative_to(cache(tmp_path) / "hub") and folder.parent.name == "snapshots"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == dino
