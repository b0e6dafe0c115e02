"""`cdiff evaluate` under the field's protocol: the set-level formulas against their reference
libraries, DISTS and LPIPS against theirs on seeded random networks written in the libraries'
own file layouts, matching by stem, the centre crop, missing predictions, the identity-collapse
ratio, metrics left out when their weights are missing, and the published rows.

Nothing is downloaded: each network's "pretrained" file is a seeded random network saved
under the real file name, in a temporary torch hub cache. That proves cdiff builds the same
network as the library from such a file and feeds it what the protocol says; not the
pretrained numbers.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cdiff import matching, metrics, networks, published
from cdiff.cli import main

from cdiff.testing import one_thread

VGG16 = "vgg16-397923af.pth"
INCEPTION = "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache, cdiff cache and Hugging Face cache, and no weight paths in the
    environment: nothing is found."""
    home = tmp_path / "torch-home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("CDIFF_CACHE_DIR", str(tmp_path / "cdiff-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("CDIFF_LPIPS_VGG", "CDIFF_FID_INCEPTION", "CDIFF_DISTS", "CDIFF_DINO"):
        monkeypatch.delenv(name, raising=False)
    return home / "hub" / "checkpoints"


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def read01(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255).permute(2, 0, 1)


def random_vgg16(hub_dir=None, seed=0):
    """A seeded random VGG16 `features` state (torchvision's keys); with ``hub_dir`` also the
    whole torchvision file there (classifier as zero views, so the file stays small)."""
    vgg = pytest.importorskip("torchvision.models.vgg")
    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in vgg.make_layers(vgg.cfgs["D"]).state_dict().items()}
    if hub_dir is not None:
        full = dict(state)
        for name, shape in {"classifier.0": (4096, 25088), "classifier.3": (4096, 4096), "classifier.6": (1000, 4096)}.items():
            full[f"{name}.weight"] = torch.zeros(1).expand(shape)
            full[f"{name}.bias"] = torch.zeros(1).expand(shape[:1])
        torch.save(full, hub_dir / VGG16)
    return state


def random_inception(models, seed=13):
    """pytorch-fid's Inception layout (torchvision's, 1008 classes, no auxiliary head) with seeded
    He-initialised convolutions: features of order 1 that depend on the image (PyTorch's default
    initialisation gives features of order 1e-8 whatever the input, which no test could tell apart)."""
    torch.manual_seed(seed)
    net = models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net


def random_alpha_beta(path, seed=1):
    g = torch.Generator().manual_seed(seed)
    # The DISTS authors' layout (DISTS_pytorch/weights.pt): {"alpha", "beta"}, (1, 1475, 1, 1) each.
    state = {k: torch.rand(1, 1475, 1, 1, generator=g) * 0.2 + 0.01 for k in ("alpha", "beta")}
    torch.save(state, path)
    return state


# --- set-level formulas ---------------------------------------------------------------------


def test_kid_equals_torchmetrics_on_the_same_features():
    kid_module = pytest.importorskip("torchmetrics.image.kid")
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(24, 2048, generator=g, dtype=torch.float64)
    reference = torch.randn(24, 2048, generator=g, dtype=torch.float64) * 1.2 + 0.1
    # With subsets of the whole set (24 < 500 on both sides) every torchmetrics subset is a
    # permutation of the set, and the unbiased MMD² does not depend on the order.
    reference_kid = kid_module.KernelInceptionDistance(feature=torch.nn.Identity(), subsets=3, subset_size=24)
    reference_kid.update(reference, real=True)
    reference_kid.update(pred, real=False)
    expected = float(reference_kid.compute()[0])
    assert metrics.kid(pred, reference) == pytest.approx(expected, rel=1e-9)
    assert expected > 0


def test_kid_subsets_are_drawn_as_geoset_draws_them():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(530, 6, generator=g, dtype=torch.float64)
    reference = torch.randn(510, 6, generator=g, dtype=torch.float64) + 0.3
    # GeoSET's procedure written out: 50 rounds of numpy default_rng(0) picks of 500 without
    # replacement, predictions first; unbiased MMD² with (x.y / d + 1)^3; the mean.
    a, b = pred.numpy(), reference.numpy()
    rng = np.random.default_rng(0)
    values = []
    for _ in range(50):
        x, y = a[rng.choice(530, 500, replace=False)], b[rng.choice(510, 500, replace=False)]
        kxx, kyy, kxy = ((u @ v.T / 6 + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
        values.append((kxx.sum() - np.trace(kxx)) / (500 * 499) + (kyy.sum() - np.trace(kyy)) / (500 * 499) - 2 * kxy.mean())
    assert metrics.kid(pred, reference) == pytest.approx(float(np.mean(values)), rel=1e-10)
    assert metrics.kid(pred, reference, seed=1) != pytest.approx(float(np.mean(values)), rel=1e-6)


@pytest.mark.parametrize("sizes", [(20, 30, 64), (90, 80, 16)], ids=["fewer-samples-than-dims", "more-samples"])
def test_fid_equals_pytorch_fid_on_the_same_features(sizes):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    n_pred, n_ref, dims = sizes
    rng = np.random.default_rng(2)
    pred, reference = rng.random((n_pred, dims)), rng.random((n_ref, dims)) * 1.3 + 0.1
    # GeoSET: calculate_frechet_distance(reference stats, prediction stats), np.cov with rowvar=False.
    expected = fid_score.calculate_frechet_distance(reference.mean(0), np.cov(reference, rowvar=False),
                                                    pred.mean(0), np.cov(pred, rowvar=False))
    ours = metrics.fid_from_features(torch.from_numpy(pred), torch.from_numpy(reference))
    assert ours == pytest.approx(float(expected), rel=1e-7)


def test_identity_ratio_is_the_ratio_of_the_two_mean_differences():
    g = torch.Generator().manual_seed(3)
    gen, sar, gt = (torch.rand(3, 3, 8, 8, generator=g) for _ in range(3))
    ratio = metrics.identity_ratio(metrics.mean_absolute_difference(gen, sar), metrics.mean_absolute_difference(gen, gt))
    assert ratio == pytest.approx(float((gen - sar).abs().mean() / (gen - gt).abs().mean()), rel=1e-6)


# --- DISTS and LPIPS against their libraries ------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_dists_equals_the_authors_implementation_in_both_file_layouts(hub, tmp_path):
    dists_pt = pytest.importorskip("DISTS_pytorch")
    state = random_vgg16(hub)
    alpha_beta = random_alpha_beta(tmp_path / "weights.pt")
    reference = dists_pt.DISTS(load_weights=False)  # its VGG16 comes from the hub cache: the random file
    reference.alpha.data, reference.beta.data = alpha_beta["alpha"], alpha_beta["beta"]
    reference.eval()
    torch.save(state, tmp_path / "vgg.pth")
    ours = networks.load_dists(tmp_path / "weights.pt", tmp_path / "vgg.pth")

    g = torch.Generator().manual_seed(4)
    target = torch.rand(3, 3, 64, 64, generator=g)
    pred = (target + 0.2 * torch.randn(3, 3, 64, 64, generator=g)).clamp(0, 1)
    with torch.no_grad():
        expected = reference(pred, target)
        torch.testing.assert_close(ours(pred, target), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(target, target), torch.zeros(3), rtol=0, atol=1e-5)
    assert expected.min() > 0.01

    # pyiqa's layout: the whole module's state (stageK.N.* trunk, alpha, beta) in one file.
    torch.save(reference.state_dict(), tmp_path / "DISTS_weights-f5e65c96.pth")
    whole = networks.load_dists(tmp_path / "DISTS_weights-f5e65c96.pth", tmp_path / "no-vgg-needed.pth")
    with torch.no_grad():
        torch.testing.assert_close(whole(pred, target), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_lpips_on_the_field_path_is_the_library_fed_x_times_2_minus_1(hub, tmp_path, capsys):
    lpips = pytest.importorskip("lpips")
    random_vgg16(hub)  # for lpips' own loading, and found by cdiff in the same cache
    pred_dir, target_dir = tmp_path / "pred", tmp_path / "target"
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        target = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        save_png(target_dir / f"{name}.png", target)
        save_png(pred_dir / f"{name}.png", np.clip(target + rng.normal(0, 30, target.shape), 0, 255).astype(np.uint8))
    assert main(["evaluate", "--pred", str(pred_dir), "--target", str(target_dir), "--metrics", "lpips,psnr"]) == 0
    report = json.loads((pred_dir / "evaluation.json").read_text())
    reference = lpips.LPIPS(net="vgg", verbose=False).eval()
    for row in report["per_image"]:
        x, y = read01(pred_dir / f"{row['name']}.png")[None], read01(target_dir / f"{row['name']}.png")[None]
        with torch.no_grad():
            expected = float(reference(x * 2 - 1, y * 2 - 1))
            other = float(reference(x, y))  # the [0, 1], normalize=False convention
        assert row["lpips"] == pytest.approx(expected, rel=1e-5)
        assert abs(row["lpips"] - other) > 1e-3
    assert "x * 2 - 1" in report["lpips_convention"] and "LPIPS convention" in capsys.readouterr().out


# --- DINO -----------------------------------------------------------------------------------


def test_dino_is_the_patch_token_cosine_of_the_transformers_model(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip("transformers without DINOv3")
    config = transformers.DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_register_tokens=4, patch_size=16)
    torch.manual_seed(6)
    transformers.DINOv3ViTModel(config).save_pretrained(tmp_path / "dino")
    monkeypatch.setenv("CDIFF_DINO", str(tmp_path / "dino"))
    ours = networks.load_dino()
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(2, 3, 64, 48, generator=g), torch.rand(2, 3, 64, 48, generator=g)
    # GeoSET's steps written out: 224 px bilinear antialiased, the SAT normalisation, bf16,
    # the patch tokens (after the class token and 4 registers), cosine per patch, mean.
    model = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "dino").to(torch.bfloat16).eval()
    mean, std = torch.tensor([0.430, 0.411, 0.296]).view(1, 3, 1, 1), torch.tensor([0.213, 0.156, 0.143]).view(1, 3, 1, 1)

    def tokens(images):
        resized = torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear", antialias=True)
        return model(pixel_values=((resized - mean) / std).to(torch.bfloat16)).last_hidden_state[:, 5:].float()

    with torch.no_grad():
        expected = torch.nn.functional.cosine_similarity(tokens(x), tokens(y), dim=-1).mean(1)
    torch.testing.assert_close(networks.dino_similarity(ours, x, y), expected)
    assert tokens(x).shape == (2, 196, 32)


# --- matching -------------------------------------------------------------------------------


def test_stems_match_across_folders_suffixes_and_fake_b(tmp_path):
    rng = np.random.default_rng(8)
    for path in ("target/sub/a.jpg", "target/b.png", "target/c.png", "pred/a_fake_B.png", "pred/deep/b.png",
                 "pred/a_real_A.png"):
        save_png(tmp_path / path, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    found = matching.match(tmp_path / "pred", tmp_path / "target")
    assert [(i.name, i.pred.name, i.target.name) for i in found.items] == [("a", "a_fake_B.png", "a.jpg"),
                                                                          ("b", "b.png", "b.png")]
    assert found.missing == ["c"] and [p.name for p in found.unmatched] == ["a_real_A.png"]
    assert [p.name for p in found.reference] == ["a.jpg", "b.png", "c.png"]  # every test item, scored or not


def test_a_split_list_chooses_the_test_items_and_the_reference(tmp_path):
    rng = np.random.default_rng(9)
    for path in ("target/1.png", "target/2.png", "target/3.png", "pred/1.png", "pred/3.png"):
        save_png(tmp_path / path, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    split = tmp_path / "test.txt"
    split.write_text("opt_256_oc_0.2/1.png\n\n2  # a comment\n")
    found = matching.match(tmp_path / "pred", tmp_path / "target", split_list=split)
    assert [i.name for i in found.items] == ["1"] and found.missing == ["2"]
    assert [p.name for p in found.reference] == ["1.png", "2.png"]  # 3 is no test item
    assert [p.name for p in found.unmatched] == ["3.png"]
    split.write_text("1\n4\n")
    with pytest.raises(ValueError, match=r"split list .*test\.txt have no image in .*target, e.g. '4'"):
        matching.match(tmp_path / "pred", tmp_path / "target", split_list=split)
    split.write_text("1\nx/1.png\n")
    with pytest.raises(ValueError, match=r"'1' on line 2 is already on line 1"):
        matching.read_split_list(split)
    (tmp_path / "sn6.txt").write_text("train/AOI_11_Rotterdam/PS-RGB/SN6_Train_AOI_11_Rotterdam_PS-RGB_tile_1.tif\n")
    assert matching.read_split_list(tmp_path / "sn6.txt", "spacenet6") == ["SN6_Train_AOI_11_Rotterdam_tile_1"]


@pytest.mark.parametrize("files", [("pred/a.png", "pred/a_fake_B.png"), ("pred/a.png", "pred/x/a.jpg")],
                         ids=["fake_B-beside-plain", "two-folders"])
def test_a_duplicate_stem_is_an_error_naming_both(tmp_path, files):
    rng = np.random.default_rng(10)
    for path in ("target/a.png",) + files:
        save_png(tmp_path / path, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="are both named 'a'"):
        matching.match(tmp_path / "pred", tmp_path / "target")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--target", str(tmp_path / "target")]) == 2


def test_the_ground_truth_is_centre_cropped_to_the_prediction(tmp_path, hub):
    rng = np.random.default_rng(11)
    big = rng.integers(0, 256, (71, 69, 3), dtype=np.uint8)  # H 71, W 69; the crop is 64 x 64 at (3, 2)
    save_png(tmp_path / "target" / "a.png", big)
    save_png(tmp_path / "pred" / "a.png", big[3:67, 2:66])
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--target", str(tmp_path / "target"),
                 "--metrics", "psnr,ssim"]) == 0
    report = json.loads((tmp_path / "pred" / "evaluation.json").read_text())
    # The crop is exact: the PSNR is infinite, written as null (standard JSON) and listed as such.
    assert report["means"]["psnr"] is None and report["means"]["ssim"] == pytest.approx(1.0)
    assert "means.psnr: inf" in report["non_finite"]["values"]
    assert report["size"] == [64, 64]
    small = torch.zeros(3, 60, 70)
    with pytest.raises(ValueError, match=r"x\.png is 70x60, smaller than the prediction's 64x64"):
        matching.centre_crop(small, 64, 64, "x.png")


# --- the command ----------------------------------------------------------------------------


def write_run(tmp_path, names=("a", "b", "c"), predicted=("a", "b"), size=64, target_size=70, seed=12):
    """Ground truths (target_size), predictions of some of them (size, noisy centre crops), and
    SAR images (target_size, grey)."""
    rng = np.random.default_rng(seed)
    off = (target_size - size) // 2
    for name in names:
        target = rng.integers(0, 256, (target_size, target_size, 3), dtype=np.uint8)
        save_png(tmp_path / "target" / f"{name}.png", target)
        save_png(tmp_path / "sar" / f"{name}.png", rng.integers(0, 256, (target_size, target_size), dtype=np.uint8))
        if name in predicted:
            crop = target[off:off + size, off:off + size]
            save_png(tmp_path / "pred" / f"{name}.png", np.clip(crop + rng.normal(0, 20, crop.shape), 0, 255).astype(np.uint8))
    return tmp_path / "pred", tmp_path / "target", tmp_path / "sar"


def test_without_network_files_psnr_and_ssim_one_line_per_left_out_metric_exit_0(tmp_path, hub, capsys):
    pred, target, _ = write_run(tmp_path)
    assert main(["evaluate", "--pred", str(pred), "--target", str(target)]) == 0
    out = capsys.readouterr().out
    report = json.loads((pred / "evaluation.json").read_text())
    assert set(report["means"]) == {"psnr", "ssim"}
    left_out = [line for line in out.splitlines() if " left out: " in line]
    assert [line.split(" left out")[0] for line in left_out] == ["LPIPS", "DISTS", "FID", "KID", "DINO"]
    assert all("cdiff fetch" in line for line in left_out)
    assert f"{VGG16} not found" in left_out[0] and f"{INCEPTION} not found" in left_out[2]
    assert set(report["left_out"]) == {"lpips", "dists", "fid", "kid", "dino"}
    # Missing predictions are counted and named, in the table and the reports.
    assert "missing: 1 of 3 test items have no prediction (c)" in out
    assert report["missing"] == ["c"] and report["images"] == 2 and report["test_items"] == 3
    assert "`c`" in (pred / "evaluation.md").read_text()


def test_a_metric_asked_for_by_name_without_its_weights_is_an_error(tmp_path, hub, capsys):
    pred, target, _ = write_run(tmp_path)
    assert main(["evaluate", "--pred", str(pred), "--target", str(target), "--metrics", "psnr,dists"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and VGG16 in err and "cdiff fetch lpips-vgg" in err
    assert main(["evaluate", "--pred", str(pred), "--target", str(target), "--metrics", "dino"]) == 2
    assert "cdiff fetch dino-sat" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred), "--target", str(target), "--metrics", "identity"]) == 2
    assert "--sar" in capsys.readouterr().err
    # A file given by its option that is not there is a mistake, not a metric to leave out.
    assert main(["evaluate", "--pred", str(pred), "--target", str(target), "--fid-weights", str(tmp_path / "no.pth")]) == 2
    assert "no.pth: no such file" in capsys.readouterr().err


def test_identity_collapse_is_flagged_below_1(tmp_path, hub, capsys):
    pred, target, sar = write_run(tmp_path, predicted=("a", "b", "c"))
    argv = ["evaluate", "--pred", str(pred), "--target", str(target), "--sar", str(sar), "--metrics", "psnr,identity"]
    assert main(argv) == 0
    report = json.loads((pred / "evaluation.json").read_text())
    to_sar = np.mean([float((read01(pred / f"{n}.png") - read01(sar / f"{n}.png")[:, 3:67, 3:67]).abs().mean())
                      for n in "abc"])
    to_gt = np.mean([float((read01(pred / f"{n}.png") - read01(target / f"{n}.png")[:, 3:67, 3:67]).abs().mean())
                     for n in "abc"])
    assert report["means"]["identity"] == pytest.approx(to_sar / to_gt, rel=1e-5) and to_sar / to_gt > 1
    assert report["identity_collapse"] is False and "identity collapse" not in capsys.readouterr().out
    # Outputs nearer their SAR input (grey, as RGB) than their ground truth fall below 1 and are
    # flagged: 0.55 SAR + 0.45 GT gives a ratio of about 0.45 / 0.55.
    for n in "abc":
        near_sar = np.repeat(np.asarray(Image.open(sar / f"{n}.png"))[3:67, 3:67, None], 3, axis=2) * 0.55
        save_png(pred / f"{n}.png", (near_sar + np.asarray(Image.open(target / f"{n}.png"))[3:67, 3:67] * 0.45).astype(np.uint8))
    assert main(argv) == 0
    report = json.loads((pred / "evaluation.json").read_text())
    assert 0.7 < report["means"]["identity"] < 1 and report["identity_collapse"] is True
    assert "below 1" in capsys.readouterr().out


def test_a_benchmark_prints_the_published_rows_and_the_differences(tmp_path, hub, capsys):
    pred, target, _ = write_run(tmp_path, predicted=("a", "b", "c"), size=256, target_size=256)
    assert main(["evaluate", "--pred", str(pred), "--target", str(target), "--dataset", "qxs-saropt"]) == 0
    out = capsys.readouterr().out
    report = json.loads((pred / "evaluation.json").read_text())
    rows = published.PUBLISHED["qxs-saropt"]
    assert report["published"]["rows"] == rows and "GeoSET" in report["published"]["source"]
    psnr_line = next(line for line in out.splitlines() if line.startswith("PSNR"))
    run_psnr = report["means"]["psnr"]
    assert psnr_line.split() == ["PSNR", "(dB)", "↑", f"{run_psnr:.3f}", "16.920", f"{run_psnr - 16.92:+.3f}",
                                 "15.400", f"{run_psnr - 15.40:+.3f}"]
    assert "C-DiffSET" in out and "SD2.1 FT (stage 1)" in out
    # A prediction of another size than the benchmark's is an error naming it.
    save_png(pred / "a.png", np.zeros((128, 128, 3), np.uint8))
    assert main(["evaluate", "--pred", str(pred), "--target", str(target), "--dataset", "qxs-saropt"]) == 2
    assert "a.png is 128x128; every prediction must be 256x256" in capsys.readouterr().err


def test_release_protocol_options_that_do_not_apply_are_refused(tmp_path, hub, capsys):
    pred, target, sar = write_run(tmp_path, predicted=("a", "b", "c"), target_size=64)
    assert main(["evaluate", "--pred", str(pred), "--target", str(target), "--protocol", "release",
                 "--sar", str(sar)]) == 2
    assert "--sar applies to the field protocol only" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred), "--target", str(target), "--protocol", "release"]) == 0
    out = capsys.readouterr().out
    report = json.loads((pred / "evaluation.json").read_text())
    assert report["protocol"] == "release" and set(report["means"]) == {"psnr", "ssim", "scc"}
    assert "(x + 0.5).clamp(0, 1)" in out and "LPIPS left out" in out and "FID left out" in out


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_fid_and_kid_use_pytorch_fids_features_of_every_test_item(tmp_path, hub):
    fid_inception = pytest.importorskip("pytorch_fid.inception")
    models = pytest.importorskip("torchvision.models")
    torch.save(random_inception(models).state_dict(), hub / INCEPTION)
    pred, target, _ = write_run(tmp_path, names=("a", "b", "c", "d"), predicted=("a", "b", "c"), size=32, target_size=40)
    rng = np.random.default_rng(14)
    for n in "abc":  # predictions unlike their ground truths, so that mixing the two up shows
        save_png(pred / f"{n}.png", (rng.random((32, 32, 3)) ** 3 * 255).astype(np.uint8))
    assert main(["evaluate", "--pred", str(pred), "--target", str(target), "--metrics", "fid,kid", "--batch-size", "2"]) == 0
    report = json.loads((pred / "evaluation.json").read_text())
    # The reference: pytorch-fid's network on the predictions, and on every ground truth (d has
    # no prediction) centre-cropped to 32 x 32; GeoSET's formulas on those features.
    reference_net = fid_inception.InceptionV3([3]).eval()
    with torch.no_grad():
        fp = reference_net(torch.stack([read01(pred / f"{n}.png") for n in "abc"]))[0].flatten(1).double().numpy()
        fr = reference_net(torch.stack([read01(target / f"{n}.png")[:, 4:36, 4:36] for n in "abcd"]))[0]
        fr = fr.flatten(1).double().numpy()
    # (The formula itself equals pytorch-fid's calculate_frechet_distance: the test above; scipy's
    # 2048 x 2048 matrix square root takes minutes on two cores.)
    expected_fid = metrics.fid_from_features(torch.from_numpy(fp), torch.from_numpy(fr))
    assert report["means"]["fid"] == pytest.approx(expected_fid, rel=1e-4, abs=0) and expected_fid > 1
    expected_kid = metrics.kid(torch.from_numpy(fp), torch.from_numpy(fr))
    assert report["means"]["kid"] == pytest.approx(expected_kid, rel=1e-4, abs=0) and abs(expected_kid) > 1e-3
    assert report["missing"] == ["d"]
