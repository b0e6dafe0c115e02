"""cdiff train, part 5: the latent cache, its views, and the flip error it measures."""

import json

import pytest
import torch
from safetensors.torch import load_file

import cdiff
from cdiff.cli import main
from cdiff.data import PairAugment, SyntheticPairs
from cdiff.testing import micro_model
from cdiff.train import train
from cdiff.train.latents import VIEWS, LatentPairs, batch_latents, cache_latents, dihedral, flip_error

pytestmark = pytest.mark.usefixtures("one_thread")
PLAIN = ("data.hflip=false", "data.vflip=false", "data.rot90=false")
NO_VAL = ("val.every=0", "val.holdout=0")  # every pair of the list is trained on (and cached)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("model") / "micro.safetensors")


def test_views_are_the_transforms_of_pair_augment():
    """The 8 cached views are exactly the images PairAugment's flips and rotations make."""
    image = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    ours = {tuple(dihedral(image, v).flatten().tolist()) for v in range(len(VIEWS))}
    augment = PairAugment()
    theirs = {tuple(augment({"x": image}, torch.Generator().manual_seed(s))["x"].flatten().tolist()) for s in range(200)}
    assert len(ours) == 8 and ours == theirs


def test_flip_error_of_the_tiny_vae():
    """A transformed latent is not the latent of the transformed image: measure by how much."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = cdiff.VAE(cdiff.VAEConfig.tiny()).eval()
    images = torch.stack([SyntheticPairs(4, size=64)[i]["eo"] for i in range(4)])
    errors = flip_error(vae, images)
    print("tiny VAE (seeded random weights), 64 px synthetic EO images: "
          + ", ".join(f"{k} {v:.1%}" for k, v in errors.items()))
    assert list(errors) == list(VIEWS[1:]) and all(0.01 < e < 10 for e in errors.values())
    # The measure itself: a per-pixel map (1x1 convolutions only) commutes with every view.
    pointwise = cdiff.VAE(cdiff.VAEConfig.tiny())
    pointwise.encode_latent = lambda x: x[:, :1] * 2 + x[:, 1:2]
    assert max(flip_error(pointwise, images).values()) == 0


def test_cache_holds_the_vae_latents_and_training_reads_them(tmp_path, model_file, capsys, small_config):
    config = small_config(model_file, "data.count=6", *PLAIN, *NO_VAL)
    code = main(["cache-latents", str(tmp_path / "cache"), "--config", _toml(tmp_path, config), "--batch-size", "4"])
    assert code == 0 and "hflip" in capsys.readouterr().out
    shards = json.loads((tmp_path / "cache" / "index.json").read_text())["shards"]
    assert [s["count"] for s in shards] == [6]
    stored = load_file(tmp_path / "cache" / shards[0]["file"])
    vae = cdiff.load_vae(model_file)
    pairs = SyntheticPairs(6, size=64)
    expected = vae.encode_latent(torch.stack([pairs[i]["sar"] for i in range(6)]))
    torch.testing.assert_close(stored["sar"][:, 0], expected, rtol=1e-5, atol=1e-6)
    assert stored["sar"].shape == (6, 1, 4, 8, 8) and LatentPairs(tmp_path / "cache")[5]["name"] == pairs[5]["name"]

    # Training from the cache follows training from the images (no augmentation: the same latents).
    steps = ("train.steps=3", "train.log_every=1", *NO_VAL)
    from_images = train(small_config(model_file, "data.count=6", *PLAIN, *steps), tmp_path / "images")
    from_cache = train(small_config(model_file, "data.count=6", *PLAIN, *steps, f"data.latents={tmp_path / 'cache'}"),
                       tmp_path / "latents")
    for a, b in zip(from_images.task.unet.parameters(), from_cache.task.unet.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_frozen_vae_encodes_in_fp32_under_autocast(tmp_path, model_file, small_config):
    """The latents of training (encoded now, or cached) under a bf16 autocast are the fp32 latents."""
    from cdiff.train.cdiffset import CDiffSETTask

    config = small_config(model_file, "data.count=4", "train.precision=bf16", *PLAIN, *NO_VAL)
    pairs = SyntheticPairs(4, size=64)
    sar, eo = (torch.stack([pairs[i][k] for i in range(4)]) for k in ("sar", "eo"))
    vae = cdiff.load_vae(model_file)
    expected = vae.encode_latent(torch.cat([sar, eo]))  # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        drifted = vae.encode_latent(torch.cat([sar, eo])).float()
        task = CDiffSETTask(config, torch.device("cpu"))
        encoded = torch.cat(batch_latents(task.vae, {"sar": sar, "eo": eo}, task.device))  # as task.loss encodes
        cache = cache_latents(config, tmp_path / "cache", batch_size=4, show_progress=False)
    relative = ((drifted - expected).square().mean() / expected.square().mean()).sqrt().item()
    print(f"micro VAE under bf16 autocast: latents off by {relative:.2%} RMS")
    assert relative > 1e-3  # the autocast does reach the VAE's convolutions when nothing stops it
    torch.testing.assert_close(encoded, expected, rtol=0, atol=0)
    stored = load_file(cache / "shard-00000.safetensors")
    torch.testing.assert_close(torch.cat([stored["sar"][:, 0], stored["eo"][:, 0]]), expected, rtol=0, atol=0)


def _toml(tmp_path, config) -> str:
    from cdiff.train.configfile import to_toml

    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    return str(path)


def test_cache_mismatches_are_refused(tmp_path, model_file, small_config):
    cache = cache_latents(small_config(model_file, "data.count=2", "data.crop=32", *PLAIN, *NO_VAL), tmp_path / "c",
                          show_progress=False)
    cases = [
        ((f"model.init={micro_model(tmp_path / 'other.safetensors', seed=1)}", "data.crop=32", *PLAIN),
         "was made with another VAE"),
        (("data.crop=32", "data.random_crop=true", *PLAIN), "holds the centre crop only"),
        (("data.crop=32", "data.random_crop=false"), "flips and rotations need"),
        (PLAIN, "at crop 32, the config asks for synthetic at crop 0"),
        # A cache of every pair would train on the pair the config holds out for validation.
        (("data.crop=32", *PLAIN, "val.holdout=1"), "made with val.holdout = 0 pairs held out .* holds out 1"),
    ]
    for sets, message in cases:
        with pytest.raises(ValueError, match=message):
            train(small_config(model_file, "data.count=2", f"data.latents={cache}", *NO_VAL, *sets), tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="no index.json"):
        LatentPairs(tmp_path)
    with pytest.raises(FileExistsError, match="is a folder that is not empty; pass --overwrite"):
        cache_latents(small_config(model_file), cache)
