"""`cdiff evaluate` under bad input and faults, in both protocols: images too small for a metric,
a folder scored against itself, non-finite numbers in evaluation.json, a report folder that cannot
be written, a pickled weights file, a full disk, `--skip-bad` with unmatched files, and the metric
networks found where `cdiff fetch` puts them.

Each test failed on the code before its fix (a traceback, an `Infinity` in the JSON, an error
after every metric was computed, torch's own advice to unpickle, a prediction without a target
that stopped the run, a file in the cache that was not looked for).
"""

import argparse
import re
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdiff import networks, perceptual, scoring
from cdiff import evaluate as evaluate_module
from cdiff.cli import main
from cdiff.testing import deny_writes, one_thread

PROTOCOLS = ["field", "release"]
VGG16 = perceptual.LPIPS_VGG.file_name


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Every place a metric network is looked for, empty: torch's hub cache, cdiff's cache
    folder, the Hugging Face cache; no weight paths in the environment."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("CDIFF_CACHE_DIR", str(tmp_path / "cdiff-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("CDIFF_LPIPS_VGG", "CDIFF_FID_INCEPTION", "CDIFF_DISTS", "CDIFF_DINO"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cdiff-cache"


def pngs(folder, names, side=16, seed=0, like=None):
    """Random RGB PNGs ``side`` x ``side``; with ``like`` (a folder), exact copies of its files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if like is not None:
            (folder / f"{name}.png").write_bytes((like / f"{name}.png").read_bytes())
        else:
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def evaluate(pred, target, protocol, *extra):
    return main(["evaluate", "--pred", str(pred), "--target", str(target), "--protocol", protocol, *map(str, extra)])


def one_line(err: str) -> str:
    err = err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# --- images too small for a metric ------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_image_too_small_for_ssim_is_one_error_naming_the_file_and_the_size(tmp_path, caches, capsys, protocol):
    pred, target = pngs(tmp_path / "pred", ["a"], side=1), pngs(tmp_path / "target", ["a"], side=1, seed=1)
    assert evaluate(pred, target, protocol, "--metrics", "psnr,ssim") == 2
    err = one_line(capsys.readouterr().err)
    assert f"{pred / 'a.png'} is 1x1" in err and "SSIM at least 6x6" in err
    # The protocol's default set: the same error (SCC too under the release protocol), no report.
    assert evaluate(pred, target, protocol) == 2
    err = one_line(capsys.readouterr().err)
    assert "SSIM at least 6x6" in err and (protocol == "field" or "SCC at least 8x8" in err)
    assert not (pred / "evaluation.json").exists()
    # 6 x 6 is enough for SSIM (as for torchmetrics, whose reflect padding needs 6).
    pngs(pred, ["a"], side=6), pngs(target, ["a"], side=6, seed=1)
    assert evaluate(pred, target, protocol, "--metrics", "psnr,ssim") == 0


def test_ssim_itself_refuses_a_small_image_in_words():
    from cdiff.metrics import ssim

    with pytest.raises(ValueError, match="at least 6x6"):
        ssim(torch.rand(1, 3, 5, 9), torch.rand(1, 3, 5, 9))


# --- a folder against itself, and standard JSON -------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_folder_scored_against_itself_is_refused(tmp_path, caches, capsys, protocol):
    target = pngs(tmp_path / "target", ["a", "b"])
    assert evaluate(target, target, protocol, "--metrics", "psnr") == 2
    assert "same folder" in one_line(capsys.readouterr().err)
    (tmp_path / "link").symlink_to(target)  # the same folder under another name
    assert evaluate(tmp_path / "link", target, protocol, "--metrics", "psnr") == 2
    assert "same folder" in one_line(capsys.readouterr().err)
    pred = pngs(tmp_path / "pred", ["a", "b"], seed=3)
    assert evaluate(pred, target, protocol, "--metrics", "psnr", "--report-dir", target) == 2
    assert "is the ground truth's folder" in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in target.iterdir()) == ["a.png", "b.png"]  # nothing written there


def no_constants(name):
    raise AssertionError(f"evaluation.json holds {name}, which is not JSON")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_infinite_psnr_is_written_as_null_with_a_note(tmp_path, caches, capsys, protocol):
    target = pngs(tmp_path / "target", ["a", "b"])
    pred = pngs(tmp_path / "pred", ["a", "b"], like=target)  # copies: PSNR is infinite
    assert evaluate(pred, target, protocol, "--metrics", "psnr,ssim") == 0
    assert "inf" in capsys.readouterr().out  # the printed table says what it is
    report = json.loads((pred / "evaluation.json").read_text(), parse_constant=no_constants)
    assert report["means"]["psnr"] is None and report["means"]["ssim"] == pytest.approx(1.0)
    assert [row["psnr"] for row in report["per_image"]] == [None, None]
    assert report["non_finite"]["values"] == ["means.psnr: inf", "per_image[0].psnr: inf", "per_image[1].psnr: inf"]
    assert "null" in report["non_finite"]["note"]


def test_standard_json_replaces_every_non_finite_number():
    from cdiff.report import standard_json

    data = {"a": float("nan"), "b": [1.0, float("-inf")], "c": {"d": (2, float("inf"))}, "e": "inf"}
    out = json.loads(standard_json(data), parse_constant=no_constants)
    assert (out["a"], out["b"], out["c"], out["e"]) == (None, [1.0, None], {"d": [2, None]}, "inf")
    assert out["non_finite"]["values"] == ["a: nan", "b[1]: -inf", "c.d[1]: inf"]
    assert "non_finite" not in json.loads(standard_json({"a": 1.0}))


# --- the report folder: checked before any work, and a full disk ---------------------------------




def no_scoring(monkeypatch):
    """Reading any image for scoring fails the test: the checks must come first."""
    def read(*args, **kwargs):
        raise AssertionError("an image was read before the report folder was checked")

    monkeypatch.setattr(scoring, "read_unit", read)
    monkeypatch.setattr(evaluate_module, "read_metric_image", read)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_read_only_report_folder_is_refused_before_any_work(tmp_path, caches, monkeypatch, capsys, protocol):
    target = pngs(tmp_path / "target", ["a", "b"])
    pred = pngs(tmp_path / "pred", ["a", "b"], seed=3)
    reports = tmp_path / "reports"
    reports.mkdir()
    deny_writes(monkeypatch, pred)
    deny_writes(monkeypatch, reports)
    no_scoring(monkeypatch)
    try:
        assert evaluate(pred, target, protocol, "--metrics", "psnr") == 2
        err = one_line(capsys.readouterr().err)
        assert f"{pred}: cannot write into this folder: permission denied" in err and ".tmp" not in err
        assert evaluate(pred, target, protocol, "--metrics", "psnr", "--report-dir", reports) == 2
        assert f"{reports}: cannot write into this folder" in one_line(capsys.readouterr().err)
    finally:
        pred.chmod(0o755)
        reports.chmod(0o755)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_full_disk_names_the_report_that_was_not_written(tmp_path, caches, monkeypatch, capsys, protocol):
    target = pngs(tmp_path / "target", ["a", "b"])
    pred = pngs(tmp_path / "pred", ["a", "b"], seed=3)
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if "evaluation.json" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert evaluate(pred, target, protocol, "--metrics", "psnr") == 2
    captured = capsys.readouterr()
    err = one_line(captured.err)
    assert f"no space left on the device of {pred}: {pred / 'evaluation.json'} was not written" in err
    assert "Errno" not in err and "PSNR" in captured.out  # the numbers were printed before
    assert sorted(p.name for p in pred.iterdir()) == ["a.png", "b.png"]  # no temporary left


# --- pickled weights files -------------------------------------------------------------------


class Payload:
    """Unpickling this would create ``marker``: the test sees whether anything was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize(("option", "metric", "name", "protocol"), [
    ("--lpips-vgg", "lpips", "lpips-vgg", "field"),
    ("--lpips-vgg", "lpips", "lpips-vgg", "release"),
    ("--fid-weights", "fid", "fid-inception", "field"),
    ("--dists-weights", "dists", "dists", "field"),
])
def test_a_pickled_weights_file_is_refused_in_one_line(tmp_path, caches, capsys, option, metric, name, protocol):
    pytest.importorskip("lpips")
    pytest.importorskip("pytorch_fid")
    target = pngs(tmp_path / "target", ["a", "b"], side=32)
    pred = pngs(tmp_path / "pred", ["a", "b"], side=32, seed=3)
    weights = tmp_path / "weights.pth"
    torch.save({"features.0.weight": torch.zeros(1), "config": argparse.Namespace(x=1),
                "payload": Payload(tmp_path / "unpickled")}, weights)
    assert evaluate(pred, target, protocol, "--metrics", f"psnr,{metric}", option, weights) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{weights}: not a plain tensor file" in err and "cdiff never unpickles untrusted code" in err
    assert f"`cdiff fetch {name}`" in err and "weights_only" not in err
    assert not (tmp_path / "unpickled").exists()


# --- --skip-bad ---------------------------------------------------------------------------------


def test_release_skip_bad_leaves_out_files_without_a_counterpart(tmp_path, caches, capsys):
    target = pngs(tmp_path / "target", ["a", "b", "only-target"])
    pred = pngs(tmp_path / "pred", ["a", "b", "only-pred"], seed=3)
    assert evaluate(pred, target, "release", "--metrics", "psnr") == 2
    assert "only-pred.png" in one_line(capsys.readouterr().err)
    assert evaluate(pred, target, "release", "--metrics", "psnr", "--skip-bad") == 0
    assert "2 pairs skipped" in capsys.readouterr().out
    report = json.loads((pred / "evaluation.json").read_text())
    assert report["images"] == 2 and [row["name"] for row in report["per_image"]] == ["a", "b"]
    assert report["skipped"] == [f"{pred / 'only-pred.png'}: no target of the same name in {target}",
                                 f"{target / 'only-target.png'}: no prediction of the same name in {pred}"]


def test_field_predictions_that_are_no_test_item_are_ignored_and_counted(tmp_path, caches, capsys):
    target = pngs(tmp_path / "target", ["a", "b", "c"])
    pred = pngs(tmp_path / "pred", ["a", "b", "a_real_A"], seed=3)
    for skip in ([], ["--skip-bad"]):
        assert evaluate(pred, target, "field", "--metrics", "psnr", *skip) == 0
        out = capsys.readouterr().out
        assert "ignored: 1 files of" in out and "a_real_A.png" in out
        assert "missing: 1 of 3 test items have no prediction (c)" in out
        report = json.loads((pred / "evaluation.json").read_text())
        assert report["unmatched"] == [str(pred / "a_real_A.png")] and report["missing"] == ["c"]
        assert report["images"] == 2


def test_the_help_says_what_skip_bad_does(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "predictions without a target of the same name and targets without a prediction" in text
    assert "predictions that are no test item, are always counted" in text


# --- where the metric networks are found ---------------------------------------------------------


def random_vgg16_file(path):
    vgg = pytest.importorskip("torchvision.models.vgg")
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg.make_layers(vgg.cfgs["D"]).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_networks_in_cdiffs_cache_folder_are_found_without_flags(tmp_path, caches, capsys):
    """Files where `cdiff fetch --cache-dir` / CDIFF_CACHE_DIR puts them: DIR/checkpoints."""
    pytest.importorskip("lpips")
    checkpoints = caches / "checkpoints"
    random_vgg16_file(checkpoints / VGG16)
    for weights in (perceptual.FID_INCEPTION, perceptual.DISTS_ALPHA_BETA):
        (checkpoints / weights.file_name).write_bytes(b"placed")
        assert perceptual.find_weights(weights) == checkpoints / weights.file_name
    target = pngs(tmp_path / "target", ["a", "b"])
    pred = pngs(tmp_path / "pred", ["a", "b"], seed=3)
    assert evaluate(pred, target, "field", "--metrics", "psnr,lpips") == 0
    assert json.loads((pred / "evaluation.json").read_text())["means"]["lpips"] > 0


def test_a_missing_network_names_every_folder_looked_in_and_the_fetch_command(tmp_path, caches, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        perceptual.find_weights(perceptual.LPIPS_VGG)
    message = str(err.value)
    assert str(caches / "checkpoints") in message and str(tmp_path / "torch-home" / "hub" / "checkpoints") in message
    assert "`cdiff fetch lpips-vgg`" in message
    # DINO is looked for where `cdiff fetch dino-sat` would put it now: the cache folder's hub/, else
    # the Hugging Face cache.
    with pytest.raises(FileNotFoundError, match=rf"not found in {caches / 'hub'}: get them with `cdiff fetch dino-sat`"):
        networks.find_dino()
    monkeypatch.delenv("CDIFF_CACHE_DIR")
    with pytest.raises(FileNotFoundError, match=rf"not found in {tmp_path / 'hf-cache'}: .*`cdiff fetch dino-sat`"):
        networks.find_dino()


# --- the documented commands ---------------------------------------------------------------------


DOCS = Path(__file__).resolve().parents[1] / "docs"


def documented_commands(page: Path) -> list[list[str]]:
    """Every `cdiff ...` command line of the ```text blocks of ``page`` (continuations joined,
    comments dropped), split as the shell would (variables left as they are)."""
    import shlex

    commands = []
    for block in re.findall(r"```text\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("cdiff "):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


@pytest.mark.parametrize("page", ["evaluation.md", "model-zoo.md", "fetch.md", "datasets.md"])
def test_every_documented_command_parses_and_names_what_exists(page):
    """The commands of the evaluation and model zoo pages are the real CLI's: each parses, each
    fetch name is cdiff's, each --split-list name is a shipped list, each shipped file exists."""
    from cdiff import zoo
    from cdiff.cli import build_parser
    from cdiff.data.frozen import SPLITS_DIR
    from cdiff.matching import split_list_path

    commands = documented_commands(DOCS / page)
    assert commands
    for argv in commands:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"docs/{page}: `cdiff {' '.join(argv)}` is not a valid command")
        if argv[0] == "fetch":
            assert all(n in zoo.MODELS or "://" in n for n in args.names), argv
        if getattr(args, "split_list", None) and "/" not in args.split_list:
            assert split_list_path(args.split_list).is_file()
    for path in re.findall(r"\$LISTS/([\w./-]+)", (DOCS / page).read_text()):
        assert (SPLITS_DIR / path).is_file(), path


def test_the_evaluator_looks_for_the_file_names_fetch_writes():
    from cdiff import zoo

    for weights in (perceptual.LPIPS_VGG, perceptual.FID_INCEPTION, perceptual.DISTS_ALPHA_BETA):
        assert weights.file_name in [f.name for f in zoo.MODELS[weights.fetch].files], weights.fetch
    assert networks.DINO_FETCH in zoo.MODELS
