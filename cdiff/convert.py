"""``cdiff convert``: any SD 2.1 source (and optionally a release U-Net) -> one native C-DiffSET file.

The command's body; its parts live in the modules that own each job: reading layouts
(cdiff.load), the surgery (cdiff.surgery), the native format (cdiff.native).
"""

from __future__ import annotations

from pathlib import Path

from cdiff.config import DTYPES
from cdiff.files import check_output
from cdiff.layouts.detect import detect_layout
from cdiff.load import context_for, read_unet, read_vae
from cdiff.native import NATIVE_VERSION, save_native
from cdiff.pipeline import DEFAULT_PROMPT
from cdiff.statedict import build_model
from cdiff.surgery import cdiffset_surgery
from cdiff.unet import UNet
from cdiff.vae import VAE



def _describe(state: dict) -> str:
    count = sum(v.numel() for v in state.values())
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()})
    return f"{count / 1e6:.1f}M params, {'/'.join(dtypes)}"


def _surgery_done(before: tuple[int, int], after: tuple[int, int]) -> str:
    """What the surgery did to a U-Net of (in, out) channels ``before``, in words."""
    if before == after:
        return f"not applied: the U-Net is already the C-DiffSET one ({after[0]}-in/{after[1]}-out)"
    steps = []
    if after[0] != before[0]:
        steps.append("conv_in takes [SAR | EO] latents, both halves the original weights x 0.5")
    if after[1] != before[1]:
        steps.append("conv_out gains a variance channel of zero weights")
    return f"{before[0]}-in/{before[1]}-out -> {after[0]}-in/{after[1]}-out ({'; '.join(steps)})"


def convert(
    src,
    out,
    unet=None,
    plain: bool = False,
    prompt: str = DEFAULT_PROMPT,
    pad_to_77: bool = False,
    dtype: str | None = None,
    echo=print,
    overwrite: bool = False,
) -> Path:
    """``cdiff convert``: write a native C-DiffSET model (or, ``plain``, the SD 2.1 model as is).

    ``src`` gives the VAE and the text encoder (and the U-Net unless ``unet`` names a release
    file). ``dtype`` ("fp32", "fp16", "bf16") casts; None keeps the stored dtype. An existing
    ``out`` is refused unless ``overwrite``; ``out`` is never a source.
    """
    check_output(out, "file", overwrite, sources=(src, unet))  # before any slow step

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES.get(dtype)
    src, out = Path(src), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the native output must be a .safetensors file")
    echo(f"source: {src} ({detect_layout(src)} layout)")

    # 1. The VAE (small; and a source without one fails before any slow step).
    vae_state, vae_config, vae_layout = read_vae(src)
    echo(f"VAE: {src} ({vae_layout} layout): {_describe(vae_state)}")
    vae = build_model(VAE, vae_config, vae_state, src, torch_dtype)
    del vae_state

    # 2. The prompt embedding, so the text encoder is freed before the U-Net loads.
    context = context_for(src, prompt, pad_to_77).float()
    echo(f"prompt: {prompt!r} -> context {tuple(context.shape)}" + (" (padded to 77)" if pad_to_77 else ""))

    # 3. The U-Net (from the release file if given), built on the stored tensors.
    unet_source = Path(unet) if unet is not None else src
    unet_state, unet_config, unet_layout = read_unet(unet_source)
    echo(
        f"U-Net: {unet_source} ({unet_layout} layout): {unet_config.in_channels}-in/{unet_config.out_channels}-out, "
        f"{_describe(unet_state)}"
    )
    model = build_model(UNet, unet_config, unet_state, unet_source, torch_dtype)
    del unet_state

    # 4. The surgery (logged), unless the plain model is asked for.
    if not plain:
        before = (model.config.in_channels, model.config.out_channels)
        model = cdiffset_surgery(model)
        after = (model.config.in_channels, model.config.out_channels)
        echo(f"C-DiffSET surgery: {_surgery_done(before, after)}")
    context = context.to(model.conv_in.weight.dtype)
    save_native(out, model, vae, context, prompt=prompt, padding="77" if pad_to_77 else "none")
    echo(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): cdiff native v{NATIVE_VERSION}, U-Net "
        f"{model.config.in_channels}-in/{model.config.out_channels}-out, "
        f"{_describe(model.state_dict())}; VAE {_describe(vae.state_dict())}; context {tuple(context.shape)}"
    )
    return out
