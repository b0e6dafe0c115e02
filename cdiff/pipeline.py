"""C-DiffSET inference: a SAR image in, an EO image and a confidence map out."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from cdiff import graphs
from cdiff import tiling as tiles
from cdiff.loss import confidence_from_raw
from cdiff.samplers import SAMPLERS, make_sampler
from cdiff.schedulers import DDPM, check_prediction_type
from cdiff.stepcache import DeepCache, check_interval, whole_steps
from cdiff.tiling import Tiling
from cdiff.vae import _check_4d

DEFAULT_PROMPT = "electro-optical image"
RELEASE_SAMPLING = ("ddim", 50)  # what translate runs for a model that records no sampling of its own


@dataclass
class Translation:
    eo: torch.Tensor  # (B, 3, H, W) in [-1, 1], in the VAE's dtype
    # (B, 1, H/8, W/8) fp32 = 1 / variance at the first step with t <= T/2 (confidence_step); None for a 4-out U-Net
    confidence: torch.Tensor | None


def confidence_step(timesteps: list[int], num_train_timesteps: int) -> int:
    """The step whose predicted variance becomes the confidence map: the first with t <= T/2.

    The release saves the map of step ``steps // 2`` of its 50-step DDIM run, t = 481, which
    is the first step at or below T/2 = 500. Choosing by timestep keeps that meaning at any
    step count and sampler (step ``steps // 2`` of a 6-step run would read t = 333).
    """
    half = num_train_timesteps / 2
    return next((i for i, t in enumerate(timesteps) if t <= half), len(timesteps) - 1)


def _nonfinite_samples(x: torch.Tensor) -> list[int]:
    return (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()


class Pipeline:
    """The U-Net, the VAE and the fixed prompt embedding of a C-DiffSET model.

    context: (L, context_dim) prompt embedding (the release's unpadded prompt has L of about 6).
    prediction_type: what the U-Net's first channels predict, one of cdiff.schedulers.PREDICTION_TYPES
    ("epsilon" for the paper's models; "sample" for ``cdiff train --prediction sample``); the
    sampler reads the output as such. sampling: (sampler, steps) that ``translate`` runs by default,
    recorded in a distilled student's file (cdiff.train.distill: e.g. ("lcm", 4)); None: the
    release's DDIM-50, and asking for others is not warned of. Each module keeps its own device and
    dtype (e.g. an fp32 VAE beside a bf16 U-Net); inputs are moved to each module's as they reach it.
    """

    def __init__(self, unet, vae, context: torch.Tensor, prompt: str = DEFAULT_PROMPT, process: DDPM | None = None,
                 prediction_type: str = "epsilon", sampling: tuple[str, int] | None = None):
        if context.ndim != 2 or context.shape[1] != unet.config.context_dim:
            raise ValueError(
                f"context must be (L, {unet.config.context_dim}) for this U-Net, got {tuple(context.shape)}"
            )
        if unet.config.in_channels != 2 * vae.config.latent_channels:
            raise ValueError(
                f"a C-DiffSET U-Net takes [SAR latent | EO latent] = {2 * vae.config.latent_channels} channels, "
                f"this one takes {unet.config.in_channels}"
            )
        self.unet, self.vae, self.context, self.prompt = unet, vae, context, prompt
        self.process = process or DDPM()
        self.prediction_type = check_prediction_type(prediction_type)
        if sampling is not None and (sampling[0] not in SAMPLERS or not isinstance(sampling[1], int) or sampling[1] < 1):
            raise ValueError(f"sampling must be (one of {SAMPLERS}, steps >= 1), got {sampling!r}")
        self.sampling = sampling
        self._warned_range = False
        self._warned_override = False
        self._compiled = None  # (the U-Net it was made from, torch.compile of it), see compile()
        self._graph = None  # (key, CapturedFunction) of the last cuda_graph=True run

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's 8 times the U-Net's 8 = 64 for SD 2.1."""
        return self.vae.config.downsample_factor * self.unet.config.downsample_factor

    def to(self, device=None, dtype=None, memory_format: torch.memory_format | None = None) -> "Pipeline":
        """Move every module (and the prompt embedding) to one device and dtype.

        ``memory_format=torch.channels_last`` stores the convolution weights NHWC, so the U-Net's
        and the VAE's activations stay NHWC end to end (cdiff.layers), the fast layout of
        tensor-core convolutions; results are the same as in the default layout.
        """
        layout = {} if memory_format is None else {"memory_format": memory_format}
        self.unet.to(device=device, dtype=dtype, **layout)
        self.vae.to(device=device, dtype=dtype, **layout)
        self.context = self.context.to(device=device, dtype=dtype)
        return self

    def compile(self, enabled: bool = True, **options) -> "Pipeline":
        """Run the U-Net through ``torch.compile(unet, **options)`` in ``translate`` (each new
        input shape compiles once, tens of seconds); ``enabled=False`` returns to eager. The
        module itself is unchanged (its weights are shared). Returns the pipeline."""
        self._compiled = (self.unet, torch.compile(self.unet, **options)) if enabled else None
        return self

    @property
    def denoiser(self):
        """What ``translate`` calls as the U-Net: the compiled one after ``compile()``, else the module."""
        if self._compiled is not None and self._compiled[0] is self.unet:
            return self._compiled[1]
        return self.unet

    @torch.no_grad()
    def translate(
        self,
        sar: torch.Tensor,
        steps: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        sampler: str | None = None,
        show_progress: bool = False,
        tiling: Tiling | None = None,
        cuda_graph: bool = False,
        cache_interval: int = 1,
    ) -> Translation:
        """Translate SAR images into EO images and confidence maps.

        Args:
            sar: (B, 3, H, W) float, in [-1, 1], H and W multiples of 64 (``size_multiple``).
                Single-pol SAR: repeat the channel, ``sar.repeat(1, 3, 1, 1)``.
            steps: sampler steps (model calls); None: the model's own (``sampling``: a distilled
                student's recorded count, else 50, the release's setting). A count or sampler other
                than a student's recorded ones warns once per pipeline.
            eta: DDIM's noise (0: deterministic; in [0, 1]); DDIM only.
            generator: draws the starting noise (on its device, so one seed gives the same
                noise on CPU and GPU) and, with eta > 0, DDIM's fresh noise.
            latents: (B, 4, H/8, W/8) the starting noise instead of drawing it; the noise drawn
                from a seed, passed here, reproduces that seeded run exactly.
            sampler: one of cdiff.samplers.SAMPLERS; None: the model's own (a student's recorded
                sampler, else "ddim"). "dpmpp_2m" is DPM-Solver++(2M), second order, meant for 10-20
                steps; "ddim_trailing" and "lcm" sample distilled students (docs/distill.md).
            show_progress: a progress bar over the steps on stderr.
            tiling: images larger than ``tiling.tile`` go through overlapping tiles, with peak
                memory set by the tile size: each step blends the U-Net's predictions of all
                tiles (MultiDiffusion), and the VAE runs tile by tile (cdiff.tiling). None: whole.
            cuda_graph: run the sampling loop (every U-Net call and update) as one CUDA graph,
                captured at the first call for these shapes, sampler and step count (one extra
                run, kept with its memory until another shape is asked) and replayed after;
                CUDA only, eta = 0, no tiling; the progress bar shows the capture only. The
                VAE runs eagerly. Same results as without (tests/test_compiled.py).
            cache_interval: DeepCache (cdiff.stepcache): the U-Net runs whole every
                ``cache_interval``-th step (and at the confidence step), its outermost level alone
                on the steps between, reusing the last whole pass's deep features. 1 (default): no
                caching, the same bits as before. Above 1: no tiling of the U-Net, no cuda_graph,
                and the U-Net runs uncompiled.

        Returns:
            Translation(eo, confidence): eo (B, 3, H, W) in [-1, 1] in the VAE's dtype; the
            confidence 1 / variance (B, 1, H/8, W/8) fp32 that the U-Net predicts at the first
            step with t <= T/2 (``confidence_step``), or None for a 4-out U-Net.

        Raises ValueError for non-float input, sides that are not multiples of 64, and NaN or Inf
        in the input or in any module's output (naming the step). Values outside [-1, 1], or
        all within [0, 1], warn once per pipeline.
        """
        self._check_sar(sar)
        sampler, steps = self._sampling(sampler, steps)
        chosen = make_sampler(sampler, self.process, steps, eta, self.prediction_type)  # checks the options first
        if cuda_graph and (eta != 0 or tiling is not None):
            raise ValueError("cuda_graph=True replays a fixed loop: it needs eta=0 and tiling=None")
        check_interval(cache_interval)
        if cache_interval > 1 and (cuda_graph or tiles.needs_tiles(sar.shape[-2], sar.shape[-1], tiling)):
            raise ValueError(f"cache_interval={cache_interval} keeps one image's deep features: it needs "
                             "cuda_graph=False and an image that fits one tile (or tiling=None)")
        unet_param, vae_param = next(self.unet.parameters()), next(self.vae.parameters())
        device, dtype = unet_param.device, unet_param.dtype

        sar_latent = tiles.encode(self.vae, sar.to(vae_param.device, vae_param.dtype), tiling)  # (B, 4, h, w), scaled
        sar_latent = sar_latent.to(device, dtype)
        noise = self._starting_noise(sar_latent.shape, latents, generator, device)  # fp32
        context = self.context.to(device, dtype).expand(sar.shape[0], -1, -1)  # (B, L, context_dim)

        def denoise(sar_latent: torch.Tensor, noise: torch.Tensor, context: torch.Tensor):
            return self._denoise(chosen, sar_latent, noise, context, generator, tiling, show_progress, cache_interval)

        if cuda_graph:
            key = (sampler, self.prediction_type, steps, sar_latent.shape, dtype, device, id(self.denoiser))
            if self._graph is None or self._graph[0] != key:
                self._graph = None  # free the old graph's memory before capturing the new one
                self._graph = (key, graphs.CapturedFunction(denoise, (sar_latent, noise, context), self._capture))
            eo_latent, raw, nonfinite = self._graph[1](sar_latent, noise, context)
        else:
            eo_latent, raw, nonfinite = denoise(sar_latent, noise, context)
        eo = tiles.decode(self.vae, eo_latent.to(vae_param.device, vae_param.dtype), tiling)  # (B, 3, H, W)
        self._check_finite(sar_latent, nonfinite, eo, chosen.timesteps)
        confidence = confidence_from_raw(raw.float()) if raw.shape[1] else None
        return Translation(eo=eo.clamp(-1, 1), confidence=confidence)

    _capture = staticmethod(graphs.cuda_graph_capture)  # tests put graphs.eager_capture here on the CPU

    def _denoise(self, chosen, sar_latent, noise, context, generator, tiling, show_progress, cache_interval=1):
        """The sampling loop: (EO latent (B, 4, h, w) fp32, raw variance (B, 0 or 1, h, w) of the
        confidence step, (steps,) bool: which steps gave NaN/Inf). Reads tensors only from its
        arguments (and the U-Net's weights), so that it can be captured in a CUDA graph."""
        device, dtype = sar_latent.device, sar_latent.dtype
        capture = confidence_step(chosen.timesteps, self.process.num_train_timesteps)
        latent_channels = sar_latent.shape[1]
        unet = self.denoiser
        # DeepCache calls the uncompiled module's forward_outer between whole passes; the confidence step is whole.
        cached = DeepCache(self.unet, whole_steps(len(chosen.timesteps), cache_interval, (capture,))) \
            if cache_interval > 1 else None
        # Device-side bookkeeping only (no host sync per step): which steps gave NaN/Inf, and the
        # raw variance of the capture step. Each sampler calls the model once per step, in order.
        nonfinite = torch.zeros(len(chosen.timesteps), dtype=torch.bool, device=device)
        captured, calls = {}, [0]

        def predict(eo_latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            step = calls[0]
            calls[0] += 1
            unet_input = torch.cat([sar_latent, eo_latent.to(dtype)], dim=1)  # (B, 8, h, w)
            # One U-Net call, or one per batch of tiles, blended (B, 4 [+1], h, w).
            if cached is not None:  # the whole image (translate checked that it needs no tiles)
                output = cached(step, unet_input, t, context)
            else:
                output = tiles.denoise(lambda x: unet(x, t, context[:1].expand(len(x), -1, -1)), unet_input,
                                       tiling, scale=self.vae.config.downsample_factor)
            nonfinite[step] = ~torch.isfinite(output).all()
            if step == capture:
                captured["raw"] = output[:, latent_channels:]  # (B, 1, h, w); (B, 0, h, w) for a 4-out U-Net
            return output[:, :latent_channels]

        eo_latent = chosen.sample(predict, noise, generator=generator, show_progress=show_progress)
        return eo_latent, captured["raw"], nonfinite

    def _sampling(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        """The sampler and step count to run: the ones asked for, else the model's own; asking a
        distilled student for others warns once."""
        own = self.sampling or RELEASE_SAMPLING
        chosen = (own[0] if sampler is None else sampler, own[1] if steps is None else steps)
        if self.sampling is not None and chosen != own and not self._warned_override:
            self._warned_override = True
            warnings.warn(f"this model is a distilled student made to sample with {own[0]} in {own[1]} steps (its "
                          f"file records them); running {chosen[0]} in {chosen[1]} steps instead, as asked. "
                          "Warned once per pipeline.", stacklevel=4)
        return chosen

    def _check_sar(self, sar) -> None:
        if not isinstance(sar, torch.Tensor):
            raise ValueError(f"sar must be a torch.Tensor, got {type(sar).__name__}")
        if not sar.is_floating_point():
            hint = " (uint8 0..255: sar.float() / 127.5 - 1)" if sar.dtype == torch.uint8 else ""
            raise ValueError(f"sar must be a float tensor scaled to [-1, 1], got {sar.dtype}{hint}")
        _check_4d(sar, "sar", self.vae.config.image_channels, "SAR images")
        if sar.shape[0] == 0:
            raise ValueError("sar holds no images (batch size 0)")
        multiple = self.size_multiple
        if sar.shape[2] % multiple or sar.shape[3] % multiple:
            raise ValueError(
                f"sar: height and width must be multiples of {multiple} (the VAE divides by "
                f"{self.vae.config.downsample_factor}, the U-Net by {self.unet.config.downsample_factor} more), "
                f"got {sar.shape[2]}x{sar.shape[3]}; pad or crop it"
            )
        finite, low, high = torch.stack([torch.isfinite(sar).all().to(sar.dtype), sar.min(), sar.max()]).tolist()
        if not finite:
            raise ValueError(f"sar contains NaN or Inf (samples {_nonfinite_samples(sar)})")
        if not self._warned_range and (low < -1 or high > 1 or low >= 0):
            self._warned_range = True
            warnings.warn(
                f"sar values lie in [{low:.3g}, {high:.3g}]; translate expects SAR scaled to [-1, 1] "
                "(from 0..255: x / 127.5 - 1; from [0, 1]: 2 x - 1). Warned once per pipeline.",
                stacklevel=4,  # the caller of translate (through torch.no_grad's wrapper)
            )

    def _starting_noise(self, shape, latents, generator, device) -> torch.Tensor:
        if latents is None:
            # Drawn on the generator's device, so a seed gives the same image on CPU and GPU.
            noise_device = generator.device if generator is not None else device
            return torch.randn(shape, generator=generator, device=noise_device, dtype=torch.float32).to(device)
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            got = getattr(latents, "dtype", type(latents).__name__)
            raise ValueError(f"latents must be a float tensor {tuple(shape)}, got {got}")
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have the SAR latent's shape {tuple(shape)}, got {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise ValueError(f"latents contain NaN or Inf (samples {_nonfinite_samples(latents)})")
        return latents.to(device, torch.float32)

    def _check_finite(self, sar_latent, nonfinite, eo, timesteps) -> None:
        # One host sync for the whole run, after it.
        ok_latent, bad_step, ok_eo = torch.stack(
            [torch.isfinite(sar_latent).all(), nonfinite.any(), torch.isfinite(eo).all().to(sar_latent.device)]
        ).tolist()
        if not ok_latent:
            raise ValueError(
                f"the VAE encoder's output (the SAR latent) has NaN or Inf (samples {_nonfinite_samples(sar_latent)}), "
                "from finite input: the VAE overflows in its dtype; run it in fp32 (pipeline.vae.float())"
            )
        if bad_step:
            step = int(nonfinite.nonzero()[0])
            raise ValueError(
                f"the U-Net's output has NaN or Inf from step {step} of {len(timesteps)} (t={timesteps[step]}) "
                "on, from a finite input: the U-Net overflows in its dtype (try bf16 or fp32) or its weights hold NaN"
            )
        if not ok_eo:
            raise ValueError(
                f"the VAE decoder's output has NaN or Inf (samples {_nonfinite_samples(eo)}): the VAE overflows "
                "in its dtype; run it in fp32 (pipeline.vae.float())"
            )
