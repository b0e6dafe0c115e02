"""`cdiff evaluate --protocol release` (the C-DiffSET release's protocol): pairing, the per-image
protocol against torchmetrics, reports, bad input, and the LPIPS / FID plumbing. The default,
the field's protocol, is tested in tests/test_field_protocol.py.

LPIPS and FID need pretrained networks that cannot be downloaded here. Their tests use
randomly initialised networks saved to local files under the pretrained files' names: they
prove that cdiff builds the same network as the libraries from such a file, feeds it the
images the protocol says, and computes the formula; not the pretrained numbers.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cdiff import metrics, perceptual
from cdiff.cli import main
from cdiff.evaluate import EvaluationOptions, evaluate, match_pairs, parse_metrics, run_evaluate
from cdiff.testing import one_thread

torchmetrics_image = pytest.importorskip("torchmetrics.functional.image")


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def write_images(folder, names, size=(32, 24), seed=0, noise=0.0, base=None, suffix=".png"):
    """Random RGB PNGs; with ``base`` (a dict of arrays) noisy copies of those."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name in names:
        path = folder / f"{name}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if base is None:
            array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        else:
            array = np.clip(base[name] + rng.normal(0, noise, base[name].shape), 0, 255).astype(np.uint8)
        Image.fromarray(array).save(path)
        arrays[name] = array
    return arrays


@pytest.fixture
def folders(tmp_path):
    names = ["a", "b", "sub/c"]
    target = write_images(tmp_path / "target", names)
    write_images(tmp_path / "pred", names, seed=1, noise=25.0, base=target)
    return tmp_path / "pred", tmp_path / "target"


@pytest.mark.parametrize("paper_scaling", [False, True])
def test_per_image_scores_equal_torchmetrics_on_the_files(folders, paper_scaling):
    pred_dir, target_dir = folders
    result = evaluate(match_pairs(pred_dir, target_dir), pred_dir, target_dir, ("psnr", "ssim", "scc"),
                      paper_scaling=paper_scaling, show_progress=False)
    assert [row["name"] for row in result.per_image] == ["a", "b", "sub/c"]
    reference = {
        "psnr": lambda p, t: torchmetrics_image.peak_signal_noise_ratio(p, t, data_range=1.0),
        "ssim": lambda p, t: torchmetrics_image.structural_similarity_index_measure(p, t, data_range=1.0),
        "scc": torchmetrics_image.spatial_correlation_coefficient,
    }
    for row in result.per_image:
        files = [pred_dir / f"{row['name']}.png", target_dir / f"{row['name']}.png"]
        p, t = (torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1)[None].double() / 127.5 - 1 for f in files)
        # The release: (x + 0.5).clamp(0, 1) of images in [-1, 1]; the default: (x + 1) / 2 = file / 255.
        p, t = ((x + 0.5).clamp(0, 1) if paper_scaling else (x + 1) / 2 for x in (p, t))
        for name, fn in reference.items():
            assert row[name] == pytest.approx(float(fn(p.float(), t.float())), rel=1e-5, abs=1e-6), name
    means = result.means
    assert means["psnr"] == pytest.approx(np.mean([row["psnr"] for row in result.per_image]))  # per-image mean
    assert set(means) == {"psnr", "ssim", "scc"}


def test_the_command_prints_and_writes_atomic_reports(folders, tmp_path, capsys):
    pred_dir, target_dir = folders
    report_dir = tmp_path / "reports"
    argv = ["evaluate", "--pred", str(pred_dir), "--target", str(target_dir), "--metrics", "psnr,scc",
            "--paper-scaling", "--report-dir", str(report_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PSNR (dB)" in out and "SCC" in out and "SSIM" not in out and "(x + 0.5).clamp(0, 1)" in out
    assert sorted(p.name for p in report_dir.iterdir()) == ["evaluation.json", "evaluation.md"]  # no temporaries
    report = json.loads((report_dir / "evaluation.json").read_text())
    assert report["images"] == 3 and report["paper_scaling"] is True and set(report["means"]) == {"psnr", "scc"}
    assert "(x + 0.5).clamp(0, 1)" in (report_dir / "evaluation.md").read_text()
    assert "| PSNR (dB) ↑ |" in (report_dir / "evaluation.md").read_text()


def test_the_default_protocol_is_named_in_the_report(folders):
    pred_dir, target_dir = folders
    result = run_evaluate(pred_dir, target_dir, EvaluationOptions(metrics="ssim"), show_progress=False)
    report = json.loads((pred_dir / "evaluation.json").read_text())
    assert report["protocol"] == "field" and report["scaling"].startswith("file / 255")
    assert "x * 2 - 1" in report["lpips_convention"]
    assert result.count == 3


# --- bad input ------------------------------------------------------------------------------


def test_names_that_do_not_match(tmp_path):
    write_images(tmp_path / "target", ["a", "b"])
    write_images(tmp_path / "pred", ["a", "x"], seed=1)
    with pytest.raises(ValueError, match=r"no target of the same name .*x\.png"):
        match_pairs(tmp_path / "pred", tmp_path / "target")
    (tmp_path / "pred" / "x.png").unlink()
    with pytest.raises(ValueError, match=r"no prediction .*b\.png"):
        match_pairs(tmp_path / "pred", tmp_path / "target")
    assert [p.name for p in match_pairs(tmp_path / "pred", tmp_path / "target", names=["a"])] == ["a"]


def test_sizes_that_do_not_match(tmp_path, capsys):
    write_images(tmp_path / "target", ["a"], size=(32, 32))
    write_images(tmp_path / "pred", ["a"], size=(32, 24))
    argv = ["evaluate", "--pred", str(tmp_path / "pred"), "--target", str(tmp_path / "target"), "--metrics", "psnr"]
    assert main(argv + ["--protocol", "release"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdiff: error: prediction") and "pred/a.png is 32x24" in err and "target/a.png is 32x32" in err
    assert main(argv) == 0  # the field's protocol centre-crops the larger ground truth (tests/test_field_protocol.py)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    write_images(tmp_path / "target", ["a"])
    with pytest.raises(ValueError, match=r"prediction folder .*empty holds no images"):
        match_pairs(tmp_path / "empty", tmp_path / "target")
    with pytest.raises(FileNotFoundError, match=r"target folder .*nowhere"):
        match_pairs(tmp_path / "empty", tmp_path / "nowhere")


def test_truncated_image_is_named_or_skipped(folders):
    pred_dir, target_dir = folders
    data = (pred_dir / "b.png").read_bytes()
    (pred_dir / "b.png").write_bytes(data[: len(data) // 2])
    pairs = match_pairs(pred_dir, target_dir)
    with pytest.raises(ValueError, match=r"cannot read image .*pred/b\.png"):
        evaluate(pairs, pred_dir, target_dir, ("psnr",), show_progress=False)
    result = evaluate(pairs, pred_dir, target_dir, ("psnr",), EvaluationOptions(protocol="release", skip_bad=True),
                      show_progress=False)
    assert result.count == 2 and len(result.skipped) == 1 and "pred/b.png" in result.skipped[0]
    assert "1 pairs skipped" in result.table()


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric 'iou'"):
        parse_metrics("psnr,iou")
    with pytest.raises(ValueError, match="unknown metric 'iou'"):
        EvaluationOptions(protocol="release", metrics="psnr,iou")
    assert parse_metrics("fid, PSNR") == ("psnr", "fid")


def test_missing_network_weights_give_one_message_naming_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("CDIFF_LPIPS_VGG", raising=False)
    monkeypatch.delenv("CDIFF_FID_INCEPTION", raising=False)
    write_images(tmp_path / "pred", ["a"])
    write_images(tmp_path / "target", ["a"])
    argv = ["evaluate", "--pred", str(tmp_path / "pred"), "--target", str(tmp_path / "target"), "--metrics", "lpips"]
    assert main(argv + ["--protocol", "release"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vgg16-397923af.pth" in err and "cdiff fetch lpips-vgg" in err
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in err and "CDIFF_LPIPS_VGG" in err
    monkeypatch.setenv("CDIFF_FID_INCEPTION", str(tmp_path / "nothing.pth"))
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth \(from CDIFF_FID_INCEPTION\).*pytorch-fid/releases"):
        perceptual.find_weights(perceptual.FID_INCEPTION)


def test_weights_of_the_wrong_network_are_refused(tmp_path):
    pytest.importorskip("lpips")
    path = tmp_path / "vgg16-397923af.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"VGG16 \(LPIPS, DISTS\) weights .*vgg16-397923af.pth: not the expected network"):
        perceptual.load_lpips(path)


# --- LPIPS and FID plumbing, with random networks -------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch-home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home / "hub" / "checkpoints"


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_lpips_is_the_library_network_on_the_protocol_images(torch_home, tmp_path):
    lpips = pytest.importorskip("lpips")
    vgg = pytest.importorskip("torchvision.models.vgg")
    torch.manual_seed(0)
    features = vgg.make_layers(vgg.cfgs["D"])  # VGG16's conv trunk, randomly initialised
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    ours = perceptual.load_lpips(_save(state, tmp_path / "random-vgg16.pth"))
    # The reference is lpips' own pretrained path: torchvision loads "vgg16-397923af.pth" from the
    # hub cache. Its classifier is unused by LPIPS; zero views keep the file small.
    full = dict(state)
    for name, shape in {"classifier.0": (4096, 25088), "classifier.3": (4096, 4096), "classifier.6": (1000, 4096)}.items():
        full[f"{name}.weight"] = torch.zeros(1).expand(shape)
        full[f"{name}.bias"] = torch.zeros(1).expand(shape[:1])
    _save(full, torch_home / "vgg16-397923af.pth")
    reference = lpips.LPIPS(net="vgg", verbose=False).eval()

    g = torch.Generator().manual_seed(1)
    pred, target = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1, torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    with torch.no_grad():
        expected_paper = reference(metrics.to_unit(pred, True), metrics.to_unit(target, True)).flatten()
        expected = reference(pred, target).flatten()
    torch.testing.assert_close(perceptual.lpips_distance(ours, pred, target, paper_scaling=True), expected_paper)
    torch.testing.assert_close(perceptual.lpips_distance(ours, pred, target), expected)
    assert not torch.allclose(expected, expected_paper)  # the scaling matters
    torch.testing.assert_close(perceptual.lpips_distance(ours, pred, pred), torch.zeros(2))


def test_fid_features_are_pytorch_fids_and_the_command_reports_all_five(torch_home, tmp_path, capsys):
    fid_inception = pytest.importorskip("pytorch_fid.inception")
    pytest.importorskip("lpips")
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    # FID's blocks have torchvision's parameter shapes, so a random torchvision Inception
    # (1008 classes, no auxiliary head) gives a state dict of the right form.
    random_net = models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for module in random_net.modules():  # He init: features of order 1 (the default gives ~1e-8 whatever the image)
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    weights = _save(random_net.state_dict(), torch_home / "pt_inception-2015-12-05-6726825d.pth")
    del random_net
    ours = perceptual.load_fid_inception()  # found in the hub cache
    reference = fid_inception.InceptionV3([3]).eval()  # pytorch-fid loads the same cached file
    images = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(images)[0].flatten(1).double()
    torch.testing.assert_close(perceptual.inception_features(ours, images), expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().mean() > 1e-2

    # The whole command with all five metrics: random VGG for LPIPS, the random Inception for FID.
    vgg = pytest.importorskip("torchvision.models.vgg")
    state = {f"features.{k}": v for k, v in vgg.make_layers(vgg.cfgs["D"]).state_dict().items()}
    vgg_file = _save(state, tmp_path / "vgg.pth")
    target = write_images(tmp_path / "target", ["a", "b"])
    write_images(tmp_path / "pred", ["a", "b"], seed=1, noise=25.0, base=target)
    pred_dir, target_dir = tmp_path / "pred", tmp_path / "target"
    argv = ["evaluate", "--pred", str(pred_dir), "--target", str(target_dir), "--lpips-vgg", str(vgg_file),
            "--fid-weights", str(weights), "--device", "cpu", "--protocol", "release"]
    assert main(argv) == 0
    report = json.loads((pred_dir / "evaluation.json").read_text())
    assert set(report["means"]) == {"psnr", "ssim", "scc", "lpips", "fid"}
    assert report["means"]["fid"] > 0 and all("lpips" in row for row in report["per_image"])
    assert "FID ↓" in capsys.readouterr().out


def _save(state, path):
    torch.save(state, path)
    return path
