"""Loading, converting and exporting models: every layout in, cdiff's native file out.

Sources (see cdiff.checkpoint for how a layout is recognised): Stability's original single
file, a diffusers model folder (or its ``unet/`` / ``vae/`` folder), the official C-DiffSET
release's ``model.safetensors`` (a diffusers-keyed U-Net), and cdiff's native file.

Keys travel original -> diffusers -> cdiff through the rename tables of cdiff.layouts; the
U-Net and VAE configs come from the native metadata, a diffusers ``config.json``, or the
weights' shapes matched against the presets (SD 2.1, and cdiff's tiny test preset).
Models are built on the meta device and take the checkpoint's tensors with
``load_state_dict(assign=True)``: no second copy, and the stored dtype is kept unless a
``dtype`` is asked for.

The native file is one ``.safetensors``: ``unet.*`` and ``vae.*`` in cdiff's names, the
prompt embedding ``context`` (L, 1024), and metadata ``format``="cdiff", ``format_version``,
``unet_config`` / ``vae_config`` (cdiff.config.config_to_json), ``prompt``, ``padding``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from cdiff.checkpoint import (
    NATIVE_FORMAT,
    CheckpointError,
    check_state_dict,
    WeightFile,
    detect_layout,
    find_weights,
    save_safetensors,
    strip_wrapper,
)
from cdiff.config import UNetConfig, VAEConfig, config_from_json, config_to_json
from cdiff.layouts import diffusers as diffusers_layout
from cdiff.layouts import original as original_layout
from cdiff.pipeline import DEFAULT_PROMPT

log = logging.getLogger("cdiff.convert")

NATIVE_VERSION = "1"
CONTEXT_KEY = "context"  # the prompt embedding in a native file
ORIGINAL_CONTEXT_KEY = "cdiff.context"  # ... in cdiff's exports to the original layout
DIFFUSERS_CONTEXT_FILE = "cdiff_context.safetensors"  # ... in cdiff's exports to a diffusers folder
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# --- config inference -------------------------------------------------------------------


def _count(state, prefix: str) -> int:
    """How many consecutive indices ``prefix{n}.`` has, from 0."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state):
        n += 1
    return n


def _get(state, key: str, where) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{where}: missing key {key}")
    return state[key]


def _match_preset(inferred, presets, what: str, where, keep: tuple[str, ...]):
    """The preset equal to ``inferred`` on every field but ``keep`` (taken from ``inferred``)."""
    for preset in presets:
        candidate = replace(preset, **{f: getattr(inferred, f) for f in keep})
        if candidate == inferred:
            return candidate
    raise CheckpointError(
        f"{where}: this {what} is not Stable Diffusion 2.1's (nor cdiff's tiny test preset); found {asdict(inferred)}"
    )


def infer_unet_config(state, diffusers_config: dict | None = None, where="U-Net") -> UNetConfig:
    """The UNetConfig of a diffusers-keyed U-Net state dict (and its config.json, if any).

    in/out channels, widths, depths, attention levels and the context width come from the
    shapes; head size, GroupNorm groups and eps from ``diffusers_config`` when given, else
    from the preset the shapes match. Anything that is neither SD 2.1 (any in/out channels,
    with or without upcast attention) nor the tiny preset is refused.
    """
    conv_in = _get(state, "conv_in.weight", where)
    conv_out = _get(state, "conv_out.weight", where)
    levels = _count(state, "down_blocks.")
    widths = [
        _get(state, f"down_blocks.{i}.resnets.0.conv1.weight", where).shape[0] for i in range(levels)
    ]
    width = conv_in.shape[0]
    attention = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in state) for i in range(levels))
    mid = "mid_block.attentions.0."
    proj_in = _get(state, mid + "proj_in.weight", where)
    if proj_in.ndim != 2:
        raise CheckpointError(
            f"{where}: its spatial transformers use 1x1 conv projections (Stable Diffusion 1.x); "
            f"only SD 2.1 (linear projections) is supported"
        )
    if any(w % width for w in widths):
        raise CheckpointError(f"{where}: level widths {widths} are not multiples of {width}")
    fields = dict(
        in_channels=conv_in.shape[1],
        out_channels=conv_out.shape[0],
        model_channels=width,
        channel_mult=tuple(w // width for w in widths),
        num_res_blocks=_count(state, "down_blocks.0.resnets."),
        attention_levels=attention,
        transformer_depth=_count(state, mid + "transformer_blocks."),
        context_dim=_get(state, mid + "transformer_blocks.0.attn2.to_k.weight", where).shape[1],
    )
    presets = (UNetConfig.sd21(), UNetConfig.tiny())
    if diffusers_config:
        heads = diffusers_config.get("num_attention_heads") or diffusers_config.get("attention_head_dim")
        heads = heads if isinstance(heads, (list, tuple)) else [heads] * levels  # diffusers' "head dim" = head count
        head_dims = {w // h for w, h in zip(widths, heads) if h}
        try:
            inferred = UNetConfig(
                **fields,
                head_dim=head_dims.pop() if len(head_dims) == 1 else -1,
                norm_groups=diffusers_config.get("norm_num_groups", 32),
                norm_eps=diffusers_config.get("norm_eps", 1e-5),
                upcast_attention=bool(diffusers_config.get("upcast_attention", False)),
            )
        except ValueError as err:
            raise CheckpointError(f"{where}: config.json does not fit the weights: {err}") from None
        return _match_preset(inferred, presets, "U-Net", where, keep=("in_channels", "out_channels", "upcast_attention"))
    # Without a config, head size and norms cannot be read off the weights: take the preset's.
    for preset in presets:
        candidate = replace(preset, in_channels=fields["in_channels"], out_channels=fields["out_channels"])
        if all(getattr(candidate, k) == v for k, v in fields.items()):
            return candidate
    raise CheckpointError(
        f"{where}: this U-Net is not Stable Diffusion 2.1 (UNetConfig.sd21(); or cdiff's tiny test preset); found {fields}"
    )


def infer_vae_config(state, diffusers_config: dict | None = None, where="VAE") -> VAEConfig:
    """The VAEConfig of a diffusers-keyed AutoencoderKL state dict (shapes, then config.json or the presets)."""
    levels = _count(state, "encoder.down_blocks.")
    fields = dict(
        image_channels=_get(state, "encoder.conv_in.weight", where).shape[1],
        latent_channels=_get(state, "post_quant_conv.weight", where).shape[0],
        block_channels=tuple(
            _get(state, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", where).shape[0] for i in range(levels)
        ),
        layers_per_block=_count(state, "encoder.down_blocks.0.resnets."),
    )
    presets = (VAEConfig.sd21(), VAEConfig.tiny())
    if diffusers_config:
        try:
            inferred = VAEConfig(
                **fields,
                norm_groups=diffusers_config.get("norm_num_groups", 32),
                scaling_factor=diffusers_config.get("scaling_factor", 0.18215),
            )
        except ValueError as err:
            raise CheckpointError(f"{where}: config.json does not fit the weights: {err}") from None
        return _match_preset(inferred, presets, "VAE", where, keep=("scaling_factor",))
    for preset in presets:
        if all(getattr(preset, k) == v for k, v in fields.items()):
            return preset
    raise CheckpointError(f"{where}: this VAE is not the SD 2.1 autoencoder (or cdiff's tiny test preset); found {fields}")


def _original_unet_table(state, where):
    """The original-layout table for the block structure ``state`` (original keys) has."""
    op = sorted({int(k.split(".")[1]) for k in state if k.startswith("input_blocks.") and ".0.op." in k})
    if not op:
        raise CheckpointError(f"{where}: no downsampling blocks (input_blocks.N.0.op) in the U-Net")
    per_level = op[0]
    levels = len(op) + 1
    attention = tuple(
        any(k.startswith(f"input_blocks.{1 + i * per_level}.1.") for k in state) for i in range(levels)
    )
    # Only the block structure matters to the table; the tiny preset carries it validly.
    shape = UNetConfig.tiny(channel_mult=(1,) * levels, attention_levels=attention, num_res_blocks=per_level - 1)
    return original_layout.unet_table(shape)


def _original_vae_config_shape(state) -> VAEConfig:
    levels = _count(state, "encoder.down.")
    return VAEConfig.tiny(block_channels=(32,) * max(levels, 1))


# --- reading sources --------------------------------------------------------------------


def _native(path) -> WeightFile:
    """A native file, its format version checked."""
    f = WeightFile(path)
    if f.metadata.get("format") != NATIVE_FORMAT:
        raise CheckpointError(f"{path}: not a cdiff native file (no format={NATIVE_FORMAT} in its metadata)")
    version = f.metadata.get("format_version")
    if version != NATIVE_VERSION:
        raise CheckpointError(f"{path}: native format version {version!r}; this cdiff reads version {NATIVE_VERSION}")
    return f


def _rename(table, state, where, to="cdiff") -> dict:
    try:
        return table.rename(state, to=to)
    except KeyError as err:
        raise CheckpointError(f"{where}: unexpected keys: {err.args[0]}") from None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from None


def _component_folder(path: Path, layout: str, component: str) -> Path:
    """The ``unet/`` or ``vae/`` folder of a diffusers source, or the component folder itself."""
    if layout == "diffusers":
        folder = path / component
        if not folder.is_dir():
            raise CheckpointError(f"{path}: a diffusers model folder without {component}/")
        return folder
    return path


def read_unet(source) -> tuple[dict, UNetConfig, str]:
    """(cdiff-keyed state dict, UNetConfig, layout) of the U-Net in ``source``."""
    path = Path(source)
    layout = detect_layout(path)
    if layout == "native":
        f = _native(path)
        return f.load("unet."), config_from_json(f.metadata["unet_config"]), layout
    if layout == "original":
        state = WeightFile(path).load(original_layout.UNET_PREFIX)
        if not state:
            raise CheckpointError(f"{path}: holds no U-Net ({original_layout.UNET_PREFIX}* keys)")
        state = _rename(_original_unet_table(state, path), state, path)  # -> diffusers names
        config_json = None
    elif layout in ("diffusers", "diffusers-unet"):
        if path.is_dir():
            folder = _component_folder(path, layout, "unet")
            detect_layout(folder)  # a folder without weights fails here, by name
            state = WeightFile(find_weights(folder)).load()
            config_json = _read_json(folder / "config.json")
        else:
            state, config_json = WeightFile(path).load(), None
        state = {strip_wrapper(k): v for k, v in state.items()}
    else:
        raise CheckpointError(f"{path}: holds no U-Net (layout {layout!r})")
    config = infer_unet_config(state, config_json, where=path)
    return _rename(diffusers_layout.UNET, state, path), config, layout


def read_vae(source) -> tuple[dict, VAEConfig, str]:
    """(cdiff-keyed state dict, VAEConfig, layout) of the VAE in ``source``."""
    path = Path(source)
    layout = detect_layout(path)
    if layout == "native":
        f = _native(path)
        return f.load("vae."), config_from_json(f.metadata["vae_config"]), layout
    if layout == "original":
        state = WeightFile(path).load(original_layout.VAE_PREFIX)
        if not state:
            raise CheckpointError(f"{path}: holds no VAE ({original_layout.VAE_PREFIX}* keys)")
        try:
            state = original_layout.vae_to_diffusers(state, _original_vae_config_shape(state))
        except KeyError as err:
            raise CheckpointError(f"{path}: unexpected keys: {err.args[0]}") from None
        config_json = None
    elif layout in ("diffusers", "diffusers-vae"):
        if path.is_dir():
            folder = _component_folder(path, layout, "vae")
            detect_layout(folder)
            state = WeightFile(find_weights(folder)).load()
            config_json = _read_json(folder / "config.json")
        else:
            state, config_json = WeightFile(path).load(), None
    else:
        raise CheckpointError(f"{path}: holds no VAE (layout {layout!r}; a release U-Net file needs an SD 2.1 source beside it)")
    config = infer_vae_config(state, config_json, where=path)
    return _rename(diffusers_layout.VAE, state, path), config, layout


def read_context(source) -> tuple[torch.Tensor, str, str] | None:
    """A stored prompt embedding (context, prompt, padding) of ``source``, or None."""
    path = Path(source)
    layout = detect_layout(path)
    if layout == "native":
        f = _native(path)
        return f.load(CONTEXT_KEY)[""], f.metadata.get("prompt", ""), f.metadata.get("padding", "none")
    candidates = {
        "original": (path, ORIGINAL_CONTEXT_KEY),
        "diffusers": (path / DIFFUSERS_CONTEXT_FILE, CONTEXT_KEY),
    }
    if layout not in candidates or not candidates[layout][0].is_file():
        return None
    file, key = candidates[layout]
    f = WeightFile(file)
    state = f.load(key)
    if "" not in state:
        return None
    return state[""], f.metadata.get("prompt", ""), f.metadata.get("padding", "none")


def has_text_encoder(source) -> bool:
    path = Path(source)
    layout = detect_layout(path)
    if layout == "original":
        return any(k.startswith(original_layout.TEXT_PREFIX) for k in WeightFile(path).keys())
    return layout == "diffusers" and (path / "text_encoder").is_dir()


def stored_prompt(source) -> tuple[str, bool] | None:
    """(prompt, pad_to_77) that ``source``'s stored embedding was made with, when it has no
    text encoder to encode another; None otherwise."""
    stored = None if has_text_encoder(source) else read_context(source)
    return None if stored is None else (stored[1], stored[2] == "77")


def context_for(source, prompt: str = DEFAULT_PROMPT, pad_to_77: bool = False) -> torch.Tensor:
    """The prompt embedding (L, 1024) for ``source``: encoded with its text encoder if it has
    one, else the one stored in it (which must be for the same prompt and padding)."""
    padding = "77" if pad_to_77 else "none"
    if has_text_encoder(source):
        from cdiff.prompt import prompt_embedding

        return prompt_embedding(source, prompt, pad_to_77=pad_to_77)
    stored = read_context(source)
    if stored is None:
        raise CheckpointError(f"{source}: holds neither a text encoder nor a prompt embedding")
    context, stored_prompt, stored_padding = stored
    if (stored_prompt, stored_padding) != (prompt, padding):
        raise CheckpointError(
            f"{source}: holds no text encoder, and its stored prompt embedding is for prompt "
            f"{stored_prompt!r} (padding {stored_padding}), not {prompt!r} (padding {padding})"
        )
    return context


# --- building models --------------------------------------------------------------------


def _cast(state: dict, dtype, device) -> dict:
    return {
        k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
        for k, v in state.items()
    }


def build_model(cls, config, state: dict, where, dtype=None, device=None) -> nn.Module:
    """``cls(config)`` built on the meta device, holding exactly ``state`` (checked by name and shape)."""
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model.state_dict(), state, where, cls.__name__)
    model.load_state_dict(_cast(state, dtype, device), assign=True)
    return model.eval()


def load_unet(source, dtype: torch.dtype | None = None, device=None):
    """The U-Net of ``source`` (any layout), exactly as stored: no channel surgery.

    ``dtype`` None keeps the stored dtype.
    """
    from cdiff.unet import UNet

    state, config, _ = read_unet(source)
    return build_model(UNet, config, state, source, dtype, device)


def load_vae(source, dtype: torch.dtype | None = None, device=None):
    """The VAE of ``source`` (native, original single file, diffusers folder or ``vae/``)."""
    from cdiff.vae import VAE

    state, config, _ = read_vae(source)
    return build_model(VAE, config, state, source, dtype, device)


def load_pipeline(
    source,
    unet=None,
    prompt: str | None = None,
    pad_to_77: bool = False,
    surgery: bool = False,
    dtype: torch.dtype | None = None,
    device=None,
):
    """A cdiff.pipeline.Pipeline from ``source``: its VAE and prompt embedding, and the U-Net
    of ``unet`` (e.g. a release ``model.safetensors``) or of ``source``.

    A native file needs nothing else. From an SD 2.1 source the prompt is encoded (needs
    open_clip). ``prompt`` None: the prompt (and padding) a model without a text encoder was
    converted with, else ``DEFAULT_PROMPT``; a prompt given for such a model must be its own.
    ``surgery=True`` applies ``cdiffset_surgery`` to a 4- or 5-out U-Net first; without it a
    plain SD 2.1 U-Net (4 in) is refused, as it cannot take a SAR latent.
    """
    from cdiff.pipeline import Pipeline

    model = load_unet(unet if unet is not None else source, dtype, device)
    if surgery:
        model = cdiffset_surgery(model)
    vae = load_vae(source, dtype, device)
    if model.config.in_channels != 2 * vae.config.latent_channels:
        raise ValueError(
            f"{unet or source}: its U-Net takes {model.config.in_channels} channels, a plain SD 2.1 U-Net; "
            f"pass surgery=True or run 'cdiff convert' to make the C-DiffSET U-Net"
        )
    if prompt is None:
        prompt, pad_to_77 = stored_prompt(source) or (DEFAULT_PROMPT, pad_to_77)
    # context_for has already checked that a stored embedding was made for this very prompt.
    context = context_for(source, prompt, pad_to_77).to(device=device, dtype=dtype or model.conv_in.weight.dtype)
    return Pipeline(model, vae, context, prompt=prompt)


# --- the C-DiffSET surgery --------------------------------------------------------------


@torch.no_grad()
def cdiffset_surgery(unet):
    """The C-DiffSET U-Net from an SD 2.1 one, as the official release makes it.

    - conv_in, C to 2C input channels in the order [SAR latent | noisy EO latent]: both halves
      are the original weights x 0.5, so at start the U-Net sees the mean of the two latents;
      the bias is kept.
    - conv_out, C to C + 1 output channels: the first C keep the noise head; the last is the
      raw variance, zero weights and zero bias, so the variance starts at exactly 1
      (cdiff.loss.variance_from_raw(0) = 1) and the C-Diff loss starts as plain L2.

    A C-in/C-out U-Net (SD 2.1) gets both; a 2C-in/C-out one (the release's SAR-conditioned
    starting point) only the variance channel; a 2C-in/(C+1)-out one is returned unchanged.
    The result shares every other parameter with ``unet`` (no copy). Other shapes raise.
    """
    from cdiff.loss import variance_from_raw
    from cdiff.unet import UNet

    cfg = unet.config
    c_in, c_out = cfg.in_channels, cfg.out_channels
    if c_in == c_out:
        latent = c_in
    elif c_in == 2 * c_out or c_in == 2 * (c_out - 1):
        latent = c_in // 2
    else:
        latent = None
    if latent is None or (c_in, c_out) not in ((latent, latent), (2 * latent, latent), (2 * latent, latent + 1)):
        raise ValueError(
            f"cdiffset_surgery: a {c_in}-in/{c_out}-out U-Net is neither SD 2.1 (4-in/4-out), the "
            f"SAR-conditioned starting point (8-in/4-out) nor C-DiffSET (8-in/5-out)"
        )
    if (c_in, c_out) == (2 * latent, latent + 1):
        log.info("cdiffset_surgery: %d-in/%d-out is already C-DiffSET; unchanged", c_in, c_out)
        return unet
    state = dict(unet.state_dict())
    if c_in == latent:
        weight = state["conv_in.weight"]  # (width, C, 3, 3)
        state["conv_in.weight"] = torch.cat([0.5 * weight, 0.5 * weight], dim=1)  # (width, 2C, 3, 3): [SAR | EO]
        log.info("cdiffset_surgery: conv_in %d -> %d channels [SAR latent | noisy EO latent], weights x 0.5", c_in, 2 * c_in)
    weight, bias = state["conv_out.weight"], state["conv_out.bias"]  # (C, width, 3, 3), (C,)
    state["conv_out.weight"] = torch.cat([weight, torch.zeros_like(weight[:1])], dim=0)  # (C + 1, width, 3, 3)
    state["conv_out.bias"] = torch.cat([bias, torch.zeros_like(bias[:1])], dim=0)
    start = variance_from_raw(torch.zeros(())).item()
    log.info("cdiffset_surgery: conv_out %d -> %d channels, raw variance zero-initialised (variance %g)", c_out, c_out + 1, start)
    config = replace(cfg, in_channels=2 * latent, out_channels=latent + 1)
    return build_model(UNet, config, state, "cdiffset_surgery")


# --- native format ----------------------------------------------------------------------


def save_native(path, unet, vae, context: torch.Tensor, prompt: str = DEFAULT_PROMPT, padding: str = "none") -> Path:
    """Write U-Net, VAE, prompt embedding and configs to one native ``.safetensors`` (atomically)."""
    if context.ndim != 2:
        raise ValueError(f"context: expected (L, {unet.config.context_dim}), got {tuple(context.shape)}")
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    tensors[CONTEXT_KEY] = context
    metadata = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_VERSION,
        "unet_config": config_to_json(unet.config),
        "vae_config": config_to_json(vae.config),
        "prompt": prompt,
        "padding": padding,
    }
    save_safetensors(tensors, path, metadata)
    return Path(path)


def load_native(path, dtype=None, device=None):
    """(unet, vae, context, prompt) of a native file."""
    from cdiff.unet import UNet
    from cdiff.vae import VAE

    f = _native(path)
    unet = build_model(UNet, config_from_json(f.metadata["unet_config"]), f.load("unet."), path, dtype, device)
    vae = build_model(VAE, config_from_json(f.metadata["vae_config"]), f.load("vae."), path, dtype, device)
    context = f.load(CONTEXT_KEY)[""]
    return unet, vae, context, f.metadata.get("prompt", "")


# --- command bodies ---------------------------------------------------------------------


def _describe(state: dict) -> str:
    count = sum(v.numel() for v in state.values())
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()})
    return f"{count / 1e6:.1f}M params, {'/'.join(dtypes)}"


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
    from cdiff.files import check_output
    from cdiff.unet import UNet
    from cdiff.vae import VAE

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
        echo(
            "C-DiffSET surgery: " + ("none needed" if before == after else f"{before[0]}-in/{before[1]}-out -> {after[0]}-in/{after[1]}-out")
            + " (conv_in [SAR | EO] x 0.5, conv_out + zero variance channel)"
        )
    context = context.to(model.conv_in.weight.dtype)
    save_native(out, model, vae, context, prompt=prompt, padding="77" if pad_to_77 else "none")
    echo(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): cdiff native v{NATIVE_VERSION}, U-Net "
        f"{model.config.in_channels}-in/{model.config.out_channels}-out, "
        f"{_describe(model.state_dict())}; VAE {_describe(vae.state_dict())}; context {tuple(context.shape)}"
    )
    return out
