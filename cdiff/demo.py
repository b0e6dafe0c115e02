"""``cdiff demo``: the bundled tiny C-DiffSET model translates held-out synthetic SAR scenes on the CPU.

The model, ``weights/cdiff-demo-tiny.safetensors`` (a few MB, made by tools/train_demo.py; see
weights/README.md), is cdiff's ``tiny`` stack trained on synthetic scenes of
cdiff.data.synth with seeds 0 .. N - 1 (N < HELDOUT_SEED). The demo's scenes start at seed
HELDOUT_SEED = 1,000,000, which training never saw, so the printed scores are held-out scores.
``weights/cdiff-demo-tiny.json`` records the scores of the ``Protocol`` below; a test
reproduces them.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cdiff.data.imageio import to_uint8, write_png
from cdiff.data.synth import SynthPair, make_pair, pair_name
from cdiff.files import check_output, write_text
from cdiff.load import load_pipeline
from cdiff.metrics import image_metrics, to_unit
from cdiff.pipeline import Pipeline, Translation
from cdiff.testing import one_thread

HELDOUT_SEED = 1_000_000  # the first held-out scene; training seeds are all below it
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
DEMO_MODEL = WEIGHTS / "cdiff-demo-tiny.safetensors"
DEMO_RECORD = DEMO_MODEL.with_suffix(".json")  # how the model was made and its recorded scores
SYNTHETIC_ONLY = (
    "warning: the bundled demo model was trained on synthetic scenes only (cdiff.data.synth, "
    "128x128, single-pol, seen from the left); on a real SAR image its output is not a meaningful EO "
    "image. For real data use a C-DiffSET model (cdiff convert) with cdiff translate."
)


@dataclass(frozen=True)
class Protocol:
    """How a demo score is measured: ``scenes`` held-out scenes from seed ``first_seed``, side ``size``,
    translated in one batch with ``steps`` DDIM steps (eta 0) from noise of seed ``seed``."""

    scenes: int = 4
    first_seed: int = HELDOUT_SEED
    size: int = 128
    steps: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.size % 64 or self.size < 64:
            raise ValueError(f"--size must be a positive multiple of 64, got {self.size}")
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.scenes < 1:
            raise ValueError(f"--scenes must be at least 1, got {self.scenes}")


# What the U-Net is trained to output, in words: (prediction, loss) -> the objective the demo prints.
OBJECTIVES = {
    ("epsilon", "cdiff"): "the noise (epsilon) and a variance, with the C-Diff loss: the paper's objective",
    ("sample", "cdiff"): "the clean latent (x0) and a variance, with the C-Diff loss: a variant, the paper "
                         "predicts the noise",
    ("epsilon", "mse"): "the noise (epsilon), plain L2, no variance: the paper's Table-3 ablation",
    ("sample", "mse"): "the clean latent (x0), plain L2, no variance: a variant of the Table-3 ablation",
}


# The protocols of the scores recorded in weights/cdiff-demo-tiny.json: the demo's own (what
# `cdiff demo` prints and a test reproduces) and a larger held-out set for the claim.
SCORE_PROTOCOLS = {"demo": Protocol(), "heldout": Protocol(scenes=64)}


def load_demo_model(path: str | Path | None = None) -> Pipeline:
    """The bundled demo model (or the native file ``path``) as a fp32 Pipeline on the CPU."""
    path = Path(path) if path is not None else DEMO_MODEL
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the demo model is not there; it ships in cdiff's source tree (weights/), so install "
            f"from a checkout (pip install -e .) or pass --model"
        )
    return load_pipeline(path, dtype=torch.float32)


def heldout_pairs(protocol: Protocol) -> list[SynthPair]:
    return [make_pair(protocol.first_seed + i, size=protocol.size) for i in range(protocol.scenes)]


def sar_batch(pairs: list[SynthPair]) -> torch.Tensor:
    """(B, 3, H, W) SAR in [-1, 1], single-pol repeated to 3 channels as the VAE takes it."""
    return torch.stack([torch.from_numpy(p.sar)[None].expand(3, -1, -1) for p in pairs])


def eo_batch(pairs: list[SynthPair]) -> torch.Tensor:
    """(B, 3, H, W) EO targets in [-1, 1]."""
    return torch.stack([torch.from_numpy(np.ascontiguousarray(p.eo.transpose(2, 0, 1))) for p in pairs])


def translate(pipeline: Pipeline, sar: torch.Tensor, protocol: Protocol, show_progress: bool = False, chunk: int = 16):
    """The demo's sampling: ``protocol.steps`` DDIM steps (eta 0) from noise of ``protocol.seed``.

    The noise of all B scenes is drawn at once, then the scenes go through in chunks of ``chunk``
    (memory): the result is that of one batch, whatever ``chunk`` is.
    """
    height, width = sar.shape[-2:]
    factor = pipeline.vae.config.downsample_factor
    shape = (len(sar), pipeline.vae.config.latent_channels, height // factor, width // factor)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(protocol.seed))
    parts = [pipeline.translate(sar[i : i + chunk], steps=protocol.steps, latents=noise[i : i + chunk],
                                show_progress=show_progress) for i in range(0, len(sar), chunk)]
    return Translation(torch.cat([p.eo for p in parts]), torch.cat([p.confidence for p in parts]))


def _mean_scores(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and SCC of (B, 3, H, W) images in [-1, 1] ((x + 1) / 2 scaling)."""
    return {name: float(values.double().mean()) for name, values in image_metrics(to_unit(prediction), to_unit(target)).items()}


def measure(pipeline: Pipeline, protocol: Protocol) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and SCC of the model over the protocol's held-out scenes."""
    pairs = heldout_pairs(protocol)
    return _mean_scores(translate(pipeline, sar_batch(pairs), protocol).eo, eo_batch(pairs))


def mean_eo_image(count: int, size: int) -> torch.Tensor:
    """(3, size, size): the mean EO image of training scenes 0 .. count - 1, in [-1, 1]."""
    total = np.zeros((size, size, 3), np.float64)
    for seed in range(count):
        total += make_pair(seed, size=size).eo
    return torch.from_numpy((total / count).astype(np.float32).transpose(2, 0, 1).copy())


def baseline_scores(protocol: Protocol, training_pairs: int) -> dict[str, dict[str, float]]:
    """The trivial baselines on the protocol's scenes: every prediction the mean EO image of the
    ``training_pairs`` training scenes, or the SAR image repeated to RGB."""
    pairs = heldout_pairs(protocol)
    sar, eo = sar_batch(pairs), eo_batch(pairs)
    mean = mean_eo_image(training_pairs, protocol.size)
    return {"mean_eo_baseline": _mean_scores(mean.expand_as(eo), eo), "sar_baseline": _mean_scores(sar, eo)}


def _confidence_image(confidence: torch.Tensor, height: int, width: int | None = None) -> np.ndarray:
    """(1, h, w) confidence -> (height, width) in [-1, 1]: min-max per map, nearest to the image size."""
    size = (height, width or height)
    c = torch.nn.functional.interpolate(confidence[None].float(), size=size, mode="nearest")[0, 0]
    low, high = c.min(), c.max()
    return ((c - low) / (high - low).clamp_min(1e-12) * 2 - 1).numpy()


def _table(rows: list[tuple[str, dict[str, float]]]) -> str:
    width = max(16, *(len(name) for name, _ in rows))
    lines = [f"| {'scene':<{width}} | PSNR (dB) | SSIM  | SCC    |", f"|{'-' * (width + 2)}|-----------|-------|--------|"]
    for name, s in rows:
        lines.append(f"| {name:<{width}} | {s['psnr']:9.2f} | {s['ssim']:.3f} | {s['scc']:6.3f} |")
    return "\n".join(lines)


def read_record(model: str | Path | None) -> dict | None:
    """The .json record beside ``model`` (tools/train_demo.py writes it), or None if there is none."""
    record = Path(model).with_suffix(".json") if model is not None else DEMO_RECORD
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{record}: not a demo model record (tools/train_demo.py writes them): {err}") from None


def describe_model(model: str | Path | None, pipeline: Pipeline) -> list[str]:
    """The lines `cdiff demo` prints first: which model this is, how it was trained, its objective."""
    from cdiff.native import native_prediction

    path = Path(model) if model is not None else DEMO_MODEL
    record = read_record(model)
    parameters = sum(p.numel() for p in pipeline.unet.parameters()) / 1e6
    if record is None or "training" not in record:
        return [f"model: {path} ({parameters:.1f}M-parameter U-Net; no training record beside it), the U-Net "
                f"predicting {'the noise (epsilon)' if native_prediction(path) == 'epsilon' else 'the clean latent (x0)'}"]
    config = record["training"]["config"]["model"]
    objective = OBJECTIVES[config["prediction"], config["loss"]]
    return [f"model: {path.name}: cdiff's tiny C-DiffSET ({parameters:.1f}M-parameter U-Net, tiny VAE), trained from "
            "scratch on the CPU on synthetic scenes only (cdiff.data.synth; tools/train_demo.py)",
            "prompt embedding: random N(0, 1), seeded (no text encoder); on real SAR its output means nothing",
            f"objective: {objective}"]


def claim(rows: dict[str, dict[str, float]]) -> str:
    """One line: on which metrics the model's mean beats every baseline in ``rows``, and on which not."""
    baselines = [scores for name, scores in rows.items() if name.startswith("baseline: ")]
    names = {"psnr": "PSNR", "ssim": "SSIM", "scc": "SCC"}
    model = rows["mean"]
    holds = [m for m in names if all(model[m] > b[m] for b in baselines)]
    fails = [m for m in names if m not in holds]
    which = "both baselines" if len(baselines) == 2 else f"the {len(baselines)} baseline(s)"
    text = f"the model beats {which} in {' and '.join(names[m] for m in holds) or 'no metric'}"
    for m in fails:
        text += f"; not in {names[m]} ({model[m]:.3f} against {' and '.join(f'{b[m]:.3f}' for b in baselines)})"
    return text


def recorded_scores(model: str | Path | None, protocol: Protocol) -> dict | None:
    """The scores recorded beside ``model`` (its .json, written by tools/train_demo.py) for exactly
    ``protocol``: {"model", "mean_eo_baseline", "sar_baseline": {metric: value}}; None if none are."""
    record = read_record(model)
    if record is None:
        return None
    if "scores" not in record:
        raise ValueError(f"{Path(model or DEMO_MODEL).with_suffix('.json')}: not a demo model record (no scores)")
    scores = record["scores"]
    for entry in scores.values():
        if entry.get("protocol") == asdict(protocol):
            return entry
    return None


def run_demo(out_dir: str = "cdiff-demo", scenes: int = 4, steps: int = Protocol.steps, seed: int = 0,
             size: int = Protocol.size, model: str | None = None, echo=print) -> dict[str, Path]:
    """Translate ``scenes`` held-out synthetic scenes with the demo model; write images, a panel and a table.

    Writes into ``out_dir``: per scene ``<name>_sar.png``, ``<name>_eo.png`` (the prediction),
    ``<name>_target.png`` and ``<name>_confidence.png`` (bright = confident, nearest-upsampled
    from the latent grid); ``panel.png`` (one row per scene: SAR | prediction | target |
    confidence); ``metrics.md`` and ``metrics.json``. The table has a row per scene, their mean,
    the SAR-as-RGB baseline and, when the model's record holds it for this protocol, the
    mean-training-EO baseline. Returns the written paths by name.
    """
    protocol = Protocol(scenes=scenes, steps=steps, seed=seed, size=size)
    # Check the output path before the compute, not after it (an existing folder is fine).
    out = check_output(out_dir, "folder", overwrite=True)
    start = time.perf_counter()
    pipeline = load_demo_model(model)
    description = describe_model(model, pipeline)
    for line in description:  # first: what the model is, before any number
        echo(line)
    recorded = recorded_scores(model, protocol)
    pairs = heldout_pairs(protocol)
    sar, eo = sar_batch(pairs), eo_batch(pairs)
    with one_thread():
        result = translate(pipeline, sar, protocol, show_progress=True)
    scores = image_metrics(to_unit(result.eo), to_unit(eo))
    names = [pair_name(protocol.first_seed + i) for i in range(scenes)]
    rows = [(n, {k: float(v[i]) for k, v in scores.items()}) for i, n in enumerate(names)]
    rows.append(("mean", _mean_scores(result.eo, eo)))
    rows.append(("baseline: SAR as RGB", _mean_scores(sar, eo)))
    if recorded is not None:
        rows.append(("baseline: mean training EO", recorded["mean_eo_baseline"]))

    paths, panel = {}, []
    for i, name in enumerate(names):
        images = {
            "sar": to_uint8(pairs[i].sar),
            "eo": to_uint8(result.eo[i].permute(1, 2, 0).numpy()),
            "target": to_uint8(pairs[i].eo),
            "confidence": to_uint8(_confidence_image(result.confidence[i], protocol.size)),
        }
        for kind, image in images.items():
            paths[f"{name}_{kind}"] = out / f"{name}_{kind}.png"
            write_png(paths[f"{name}_{kind}"], image)
        panel.append(np.concatenate([np.repeat(im[..., None], 3, 2) if im.ndim == 2 else im for im in images.values()], 1))
    paths["panel"] = out / "panel.png"
    write_png(paths["panel"], np.concatenate(panel, 0))
    table = _table(rows)
    elapsed = time.perf_counter() - start
    header = (f"cdiff demo: {scenes} held-out synthetic scenes (seeds {protocol.first_seed}..{protocol.first_seed + scenes - 1}, "
              f"never seen in training), {protocol.size}x{protocol.size}, {steps} DDIM steps, {elapsed:.1f} s")
    verdict = f"On these {scenes} scenes {claim(dict(rows))}."
    paths["metrics.md"] = out / "metrics.md"
    write_text(paths["metrics.md"], "\n".join(description) + f"\n\n{header}\n\n{table}\n\n{verdict}\n")
    paths["metrics.json"] = out / "metrics.json"
    write_text(paths["metrics.json"], json.dumps({"protocol": asdict(protocol), "rows": dict(rows)}, indent=2) + "\n")
    echo(header)
    echo(table)
    echo(verdict)
    echo(f"panel (SAR | prediction | target | confidence): {paths['panel']}")
    return paths


def run_demo_on_file(sar_path: str, out_dir: str = "cdiff-demo", steps: int = Protocol.steps, seed: int = 0,
                     model: str | None = None, echo=print) -> dict[str, Path]:
    """Translate the user's SAR image with the demo model; warn that it knows synthetic scenes only.

    The file is read as ``cdiff translate`` reads it (cdiff.geo.read_sar: any band count, TIFFs
    through rasterio, nodata and NaN pixels left out of the stretch), then made grey (the mean
    of its three channels), as the model was trained on single-pol SAR. Sides must be multiples
    of 64. Writes ``<stem>_eo.png`` (nodata pixels black) and ``<stem>_confidence.png`` into
    ``out_dir``.
    """
    from cdiff.geo import read_sar

    out = check_output(out_dir, "folder", overwrite=True)
    print(SYNTHETIC_ONLY, file=sys.stderr)
    scene = read_sar(sar_path)  # (H, W, 3) in [-1, 1], nodata at -1
    height, width = scene.sar.shape[:2]
    if height % 64 or width % 64:
        raise ValueError(f"--sar {sar_path}: sides must be multiples of 64 for the demo, got {height}x{width} "
                         f"(cdiff translate pads any size)")
    grey = torch.from_numpy(np.ascontiguousarray(scene.sar.mean(axis=2))).float()  # (H, W)
    pipeline = load_demo_model(model)
    for line in describe_model(model, pipeline):
        echo(line)
    with one_thread():
        result = translate(pipeline, grey.expand(1, 3, -1, -1), Protocol(steps=steps, seed=seed), show_progress=True)
    eo = to_uint8(result.eo[0].permute(1, 2, 0).numpy())
    if scene.valid is not None:
        eo[~scene.valid] = 0
    stem = Path(sar_path).stem
    paths = {"eo": out / f"{stem}_eo.png", "confidence": out / f"{stem}_confidence.png"}
    write_png(paths["eo"], eo)
    write_png(paths["confidence"], to_uint8(_confidence_image(result.confidence[0], height, width)))
    echo(f"cdiff demo: {sar_path} -> {paths['eo']}, {paths['confidence']}")
    return paths
