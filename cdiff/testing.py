"""Helpers that cdiff's tests, benchmarks and CPU trials share: small models with seeded random
weights, Stable Diffusion 2.1 with seeded random weights in the real layouts, one-thread torch,
the parity tolerance and the checks against diffusers, and tiny image files for the dataset tests.

Nothing can be downloaded on cdiff's test machines, and a benchmark needs the full-size
architecture, not trained values. ``write_diffusers_folder`` writes a diffusers SD 2.1 model
folder (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``, ``model_index.json``) with seeded
random weights, saved by diffusers and transformers themselves:

    python -m cdiff.testing OUT_DIR [--tiny] [--seed 0]
    cdiff convert OUT_DIR model.safetensors            # then use it like a real SD 2.1 folder

``write_original_file`` writes SD 2.1's U-Net and VAE with seeded random weights as one file in
Stability's original single-file layout (``model.diffusion_model.*``, ``first_stage_model.*``),
with cdiff's own exporter (no diffusers needed): the ``tiny-sd21.safetensors`` of
docs/changing-the-unet.md:

    python -m cdiff.testing tiny-sd21.safetensors --tiny --original

The configs below are SD 2.1 base's ``config.json`` files written out by hand, not derived
from cdiff's configs, so that a wrong number in cdiff cannot hide on both sides of a parity
test. Writing them needs the test extra (diffusers, transformers), imported only when writing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from cdiff.config import UNetConfig, VAEConfig
from cdiff.native import save_native
from cdiff.pipeline import Pipeline
from cdiff.unet import UNet
from cdiff.vae import VAE

PROMPT_TOKENS = 6  # the release's unpadded "electro-optical image" prompt is 6 tokens long
# The micro C-DiffSET stack of the training tests: a 370k-parameter U-Net and a small VAE.
MICRO_UNET = dict(model_channels=16, channel_mult=(1, 2), attention_levels=(False, True), num_res_blocks=1,
                  head_dim=16, norm_groups=8, context_dim=32)
MICRO_VAE = dict(block_channels=(16, 16, 16, 16), norm_groups=8)
# Parity tolerance of the stack: max abs error <= REL_TOL * max abs value of the reference.
REL_TOL = 1e-4

# SD 2.1 base's unet/config.json (diffusers' "attention_head_dim" holds head counts: head size 64).
SD21_UNET = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    upcast_attention=False, use_linear_projection=True,
)
# SD 2.1's vae/config.json.
SD21_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3,
    sample_size=768, scaling_factor=0.18215, up_block_types=["UpDecoderBlock2D"] * 4,
)
# SD 2.1's text_encoder/config.json: OpenCLIP ViT-H/14's text tower with its last block dropped.
SD21_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
    projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# SD 2.1's scheduler/scheduler_config.json.
SD21_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def tiny_configs() -> tuple[dict, dict, dict]:
    """(unet, vae, text) diffusers configs of cdiff's tiny presets, in SD 2.1's structure."""
    unet, vae = UNetConfig.tiny(), VAEConfig.tiny()
    return (
        dict(SD21_UNET, block_out_channels=list(unet.level_channels), norm_num_groups=unet.norm_groups,
             attention_head_dim=[c // unet.head_dim for c in unet.level_channels]),
        dict(SD21_VAE, block_out_channels=list(vae.block_channels), layers_per_block=vae.layers_per_block,
             norm_num_groups=vae.norm_groups),
        dict(SD21_TEXT, intermediate_size=256, num_hidden_layers=2),
    )


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter seeded random values (no zero-initialised layer can hide a bug).

    Weights ~ N(0, 1/fan_in) so activations keep their scale through deep stacks;
    norm scales ~ 1 + N(0, 0.1^2); biases ~ N(0, 0.1^2). Order follows ``named_parameters``,
    so two modules with the same parameter order get the same values.

    The values are drawn where the parameters are: a module on a GPU (e.g. built on the meta
    device, then ``to_empty(device="cuda")``) gets its 865M values in a fraction of a second,
    without a CPU copy. The CPU and CUDA generators give different values for the same seed.
    """
    first = next(module.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32, device=device)
        if p.ndim == 1:
            value = (1.0 + 0.1 * noise) if ("norm" in name and name.endswith("weight")) else 0.1 * noise
        else:
            value = noise / math.sqrt(p[0].numel())
        p.copy_(value.to(p.dtype))
    return module


def tiny_stack(seed: int, in_channels: int = 8, out_channels: int = 5) -> tuple[UNet, VAE, torch.Tensor]:
    """(U-Net, VAE, prompt embedding) of the tiny presets with seeded random weights; 4-in/4-out is
    the tiny stand-in for SD 2.1 that training's stage 1 widens (cdiff.train.start)."""
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.tiny(in_channels=in_channels, out_channels=out_channels)).eval()
    vae = VAE(VAEConfig.tiny()).eval()
    context = torch.randn(PROMPT_TOKENS, unet.config.context_dim, generator=torch.Generator().manual_seed(seed))
    return unet, vae, context


def tiny_pipeline(seed: int) -> Pipeline:
    """The tiny C-DiffSET stack (8-in/5-out U-Net, tiny VAE) with seeded random weights."""
    return Pipeline(*tiny_stack(seed))


def micro_model(path, out_channels: int = 4, seed: int = 0, config: dict | None = None) -> Path:
    """A native C-DiffSET file with seeded random weights: an 8-in U-Net (MICRO_UNET, or ``config``
    over the tiny preset; 4-out: the surgery adds the variance channel) and a small VAE."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sizes = MICRO_UNET if config is None else config
        unet = UNet(UNetConfig.tiny(in_channels=8, out_channels=out_channels, **sizes))
        vae = VAE(VAEConfig.tiny(**MICRO_VAE))
        context = torch.randn(6, unet.config.context_dim)
    return save_native(path, unet, vae, context)


# The small training run of the training tests: 64x64 synthetic pairs (8x8 latents), 6 steps of
# batch 2, a checkpoint and a validation (on 2 of the 16 pairs, held out of training) every 3 steps.
SMALL_RUN = [
    "data.kind=synthetic", "data.count=16", "data.size=64", "data.workers=0", "optim.lr=1e-3",
    "optim.warmup_steps=2", "train.steps=6", "train.batch_size=2", "train.precision=fp32", "train.device=cpu",
    "train.log_every=2", "train.save_every=3", "train.keep_last=1", "val.every=3", "val.holdout=2", "val.images=2",
    "val.steps=2",
    "val.batch_size=2", "val.grid_images=2",
]


def log_records(run_dir, kind: str = "train") -> list[dict]:
    """The complete lines of a run's log.jsonl of ``kind`` ("train", "val", "event"); a line still
    being written (cut short) is left out, and a missing log is empty."""
    path = Path(run_dir) / "log.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record["kind"] == kind:
            out.append(record)
    return out


def deny_writes(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only for a test. root ignores the mode, so for root cdiff.files' os.access
    is told too (``monkeypatch``: pytest's fixture, which undoes it)."""
    import os

    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access

        def access(path, flags, **kwargs):
            if Path(path).resolve() == Path(folder).resolve() and flags & os.W_OK:
                return False
            return real(path, flags, **kwargs)

        monkeypatch.setattr("cdiff.files.os.access", access)


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread, for tiny networks (the demo's, the tests'): as fast as two on an
    idle machine, and immune to OpenMP's spin-waiting threads, which make two threads many times
    slower on a busy one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    scale = expected.detach().abs().max().clamp_min(1e-30)
    return ((actual.detach().double() - expected.detach().double()).abs().max() / scale).item()


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, what: str, rel_tol: float = REL_TOL) -> float:
    """Assert that ``actual`` matches the reference ``expected`` within ``rel_tol`` x max|expected|."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= rel_tol, f"{what}: max abs error {err:.2e} x max|ref| exceeds {rel_tol:.0e}"
    print(f"{what}: max abs error = {err:.2e} x max|ref|")
    return err


# --- against diffusers ---------------------------------------------------------------------------


@torch.no_grad()
def release_surgery(unet, variance: bool = True):
    """The official release's channel surgery, on a diffusers UNet2DConditionModel, written
    here independently of cdiff: conv_in gets [SAR | EO] halves of weight x 0.5 (bias kept),
    conv_out one more output channel with zero weight and bias."""
    import diffusers

    cfg = dict(unet.config)
    conv_in, conv_out = unet.conv_in, unet.conv_out
    cfg["in_channels"] = 2 * conv_in.in_channels if conv_in.in_channels == 4 else conv_in.in_channels
    cfg["out_channels"] = conv_out.out_channels + (1 if variance else 0)
    new = diffusers.UNet2DConditionModel.from_config(cfg)
    state = unet.state_dict()
    if conv_in.in_channels == 4:
        state["conv_in.weight"] = torch.cat([conv_in.weight * 0.5, conv_in.weight * 0.5], dim=1)
    if variance:
        state["conv_out.weight"] = torch.cat([conv_out.weight, torch.zeros(1, *conv_out.weight.shape[1:])])
        state["conv_out.bias"] = torch.cat([conv_out.bias, torch.zeros(1)])
    new.load_state_dict(state)
    return new.eval()


def write_release(path: Path, unet, prefix: str = "module.") -> Path:
    """A release ``model.safetensors``: the diffusers U-Net state dict, keys prefixed."""
    from safetensors.torch import save_file

    save_file({prefix + k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    return path


def unet_inputs(in_channels: int, side: int = 16, context_len: int = 6, seed: int = 0):
    """(sample (2, in_channels, side, side), timesteps (2,), context (2, context_len, 1024)), seeded."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, in_channels, side, side, generator=gen)
    context = torch.randn(2, context_len, 1024, generator=gen)
    return sample, torch.tensor([37, 781]), context


def check_unet_parity(ours, theirs, what: str, side: int = 16) -> float:
    """cdiff's U-Net ``ours`` against diffusers' ``theirs`` on the same inputs (assert_parity)."""
    sample, t, context = unet_inputs(ours.config.in_channels, side)
    with torch.no_grad():
        expected = theirs(sample, t, encoder_hidden_states=context).sample
        actual = ours(sample, t, context)
    return assert_parity(actual, expected, what)


def check_vae_parity(ours, theirs, what: str, side: int = 32) -> None:
    """cdiff's VAE ``ours`` against diffusers' ``theirs``: the encoder's mean and the decoder."""
    images = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        posterior = theirs.encode(images).latent_dist
        assert_parity(ours.encode(images).mean, posterior.mean, f"{what} encoder mean")
        assert_parity(ours.decode(posterior.mean), theirs.decode(posterior.mean).sample, f"{what} decoder")


def write_diffusers_folder(root: Path, unet_cfg: dict, vae_cfg: dict, text_cfg: dict, seed: int = 0) -> Path:
    """A diffusers SD 2.1 model folder with seeded random weights, written by diffusers and
    transformers themselves; one model alive at a time."""
    import diffusers
    import transformers

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Built on the meta device and given uninitialised memory (they have no buffers), as
    # randomize_ overwrites every parameter: this skips diffusers' own init of 865M params.
    for name, cls, config, offset in (
        ("unet", diffusers.UNet2DConditionModel, unet_cfg, 0),
        ("vae", diffusers.AutoencoderKL, vae_cfg, 1),
    ):
        with torch.device("meta"):
            model = cls(**config)
        randomize_(model.to_empty(device="cpu"), seed + offset).save_pretrained(root / name, safe_serialization=True)
        del model
        gc.collect()
    model = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg)), seed + 2)
    model.save_pretrained(root / "text_encoder", safe_serialization=True)
    del model
    gc.collect()
    diffusers.DDIMScheduler(**SD21_SCHEDULER).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }))
    return root


def write_original_file(path, tiny: bool = True, seed: int = 0) -> Path:
    """SD 2.1's 4-in/4-out U-Net and VAE (cdiff's tiny presets, or the full sizes) with seeded
    random weights (``randomize_``, seeds ``seed`` and ``seed + 1``) and a seeded 6-token prompt
    embedding, as one ``.safetensors`` in Stability's original layout (cdiff.export)."""
    import tempfile

    from cdiff.export import export_original

    unet_config, vae_config = (UNetConfig.tiny(), VAEConfig.tiny()) if tiny else (UNetConfig.sd21(), VAEConfig.sd21())
    unet = randomize_(UNet(unet_config), seed)
    vae = randomize_(VAE(vae_config), seed + 1)
    context = torch.randn(PROMPT_TOKENS, unet_config.context_dim, generator=torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory(dir=Path(path).resolve().parent) as folder:
        native = save_native(Path(folder) / "native.safetensors", unet, vae, context)
        del unet, vae
        return export_original(native, path)


# --- tiny image files for the dataset tests ------------------------------------------------------

SN6 = "train/AOI_11_Rotterdam"  # a SpaceNet6 area folder


def png(path: Path, array) -> Path:
    """Write ``array`` (H, W) or (H, W, 3) as an 8-bit PNG, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def grey(value, h=16, w=16):
    """(h, w) uint8 around ``value``, alternating by one level across columns (so not constant)."""
    return np.full((h, w), value, dtype=np.uint8) + (np.arange(w) % 2).astype(np.uint8)[None, :]


def rgb(r, g, b, h=16, w=16):
    """(h, w, 3) uint8 of one colour."""
    return np.stack([np.full((h, w), c, np.uint8) for c in (r, g, b)], axis=-1)


def sn6_paths(root: Path, tile: str):
    """(SAR-Intensity, PS-RGB) paths of SpaceNet6 tile ``tile`` under ``root``, their folders made."""
    eo = root / SN6 / "PS-RGB" / f"SN6_Train_AOI_11_Rotterdam_PS-RGB_{tile}.tif"
    sar = root / SN6 / "SAR-Intensity" / f"SN6_Train_AOI_11_Rotterdam_SAR-Intensity_{tile}.tif"
    eo.parent.mkdir(parents=True, exist_ok=True)
    sar.parent.mkdir(parents=True, exist_ok=True)
    return sar, eo


def quadrant_bands(h=20, w=20):
    """(H, W, 4) float32: each band two-valued (so its 1st/99th percentiles are those values),
    at different scales: HH high on the left half, HV high on the top half, VH high on the
    left half, VV high on the top-left quadrant."""
    yy, xx = np.indices((h, w))
    left, top = xx < w // 2, yy < h // 2
    bands = [
        np.where(left, 0.5, 0.1),  # HH
        np.where(top, 0.03, 0.01),  # HV
        np.where(left, 300.0, 100.0),  # VH
        np.where(top & left, 9.0, 2.0),  # VV
    ]
    return np.stack(bands, axis=-1).astype(np.float32), left, top


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cdiff.testing",
                                     description="Write Stable Diffusion 2.1 with seeded random weights: as a diffusers "
                                     "model folder (needs the test extra: diffusers, transformers), or with --original "
                                     "as one file in Stability's original layout (needs nothing more).")
    parser.add_argument("out", metavar="OUT", help="the model folder (or with --original the .safetensors file) to "
                        "write; must not exist")
    parser.add_argument("--tiny", action="store_true", help="cdiff's tiny presets instead of the full SD 2.1 sizes")
    parser.add_argument("--original", action="store_true", help="one .safetensors file in Stability's original "
                        "layout (U-Net, VAE and a prompt embedding; no text encoder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (default: %(default)s)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} already exists")
    sizes = "tiny" if args.tiny else "SD 2.1 base"
    if args.original:
        if out.suffix != ".safetensors":
            parser.error(f"{out}: with --original, OUT is a .safetensors file")
        write_original_file(out, tiny=args.tiny, seed=args.seed)
        print(f"wrote {out} (SD 2.1 U-Net and VAE in Stability's original layout, {sizes} sizes, seed {args.seed})")
        return
    configs = tiny_configs() if args.tiny else (SD21_UNET, SD21_VAE, SD21_TEXT)
    write_diffusers_folder(out, *configs, seed=args.seed)
    print(f"wrote {out} ({sizes} sizes, seed {args.seed})")


if __name__ == "__main__":
    main()
