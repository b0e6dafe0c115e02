"""``cdiff evaluate``: score a folder of predictions against one of ground truths, under one of
two protocols (cdiff.protocol).

The default, ``field``, is the protocol of the published comparison tables (GeoSET's
scripts/evaluate.py): cdiff.matching pairs the files, cdiff.scoring computes FID, DISTS, KID,
DINO, LPIPS, SSIM and PSNR (and the identity-collapse ratio with ``--sar``) in one batched pass,
cdiff.report writes the report with the published rows beside it (``--dataset``).

``release`` (``--protocol release``, formerly ``--paper-scaling``) keeps the C-DiffSET release's
protocol for the paper's own numbers (its utils.py and test.py); it is the code of this module:
- PSNR, SSIM, SCC and LPIPS are computed per image (batch size 1) and averaged over images;
- FID is pytorch-fid's, on the two sets of images (2048-d Inception pool features);
- predictions and targets are read from their files: uint8 images map to [-1, 1] as
  ``x / 127.5 - 1`` (other dtypes with the dataset readers' stretch, cdiff.data.imageio),
  grey images are repeated to RGB;
- PSNR, SSIM, SCC and LPIPS see ``to_unit(x)`` = ``(x + 1) / 2`` (the default), or, with
  ``paper_scaling``, the release's ``(x + 0.5).clamp(0, 1)`` that its published numbers were
  computed with (cdiff.metrics.to_unit; for LPIPS see cdiff.perceptual.lpips_distance);
- FID reads the files as they are, ``(x + 1) / 2`` (pytorch-fid divides by 255): the release
  computes it from image folders, so the scaling option does not change it.

Pairs are matched by their path relative to each folder, without the suffix
(``pred/a/b.png`` with ``target/a/b.jpg``; cdiff.imagefiles); both folders must hold the same names
(with ``skip_bad``, a file without its counterpart is logged, counted and left out).
What to score and how: ``EvaluationOptions``, the same for ``cdiff evaluate`` and ``cdiff
translate --target``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cdiff import metrics as image_metrics
from cdiff.data.imageio import read_image, to_unit_range
from cdiff.files import check_output
from cdiff.imagefiles import list_images, skip_or_raise
from cdiff.progress import progress
from cdiff import matching, published, scoring
from cdiff.protocol import METRICS as METRIC_TABLE
from cdiff.protocol import PROTOCOLS, RELEASE_METRICS, check_size, label
from cdiff.protocol import parse_metrics as parse_field_metrics
from cdiff.protocol import protocol as find_protocol
from cdiff.report import REPORT_NAMES, FieldReport, standard_json, write_reports

log = logging.getLogger(__name__)

METRICS = RELEASE_METRICS
PER_IMAGE = tuple(m for m in METRICS if METRIC_TABLE[m].per_image)
LABELS = {m: label(m) for m in METRICS}
SCALINGS = {False: "(x + 1) / 2", True: "(x + 0.5).clamp(0, 1), the release's (--protocol release)"}
LPIPS_CONVENTIONS = {False: PROTOCOLS["field"].lpips, True: PROTOCOLS["release"].lpips}
SCORES = {"psnr": image_metrics.psnr, "ssim": image_metrics.ssim, "scc": image_metrics.scc}
SKIP_BAD_HELP = (
    "log, count and leave out, instead of stopping, the images that cannot be scored: unreadable files, predictions "
    "of the wrong size (field: not the evaluation size; release: not their target's, or too small for a metric), "
    "ground truths smaller than the prediction (field), and with --protocol release predictions without a target "
    "of the same name and targets without a prediction. Test items without a prediction, and under the field "
    "protocol predictions that are no test item, are always counted and named in the report"
)


@dataclass(frozen=True)
class ImagePair:
    name: str  # relative path without suffix, e.g. "scene/0001"
    pred: Path
    target: Path


@dataclass(frozen=True)
class EvaluationOptions:
    """What ``cdiff evaluate`` (and ``cdiff translate --target``) computes, and how (module docstring)."""

    protocol: str = "field"  # "field": the published comparison tables'; "release": the paper's (cdiff.protocol)
    metrics: str | None = None  # comma-separated names that must all be computed; None: the protocol's set
    lpips_vgg: str | None = None  # torchvision's VGG16 file for LPIPS and DISTS (cdiff.perceptual.find_weights)
    fid_weights: str | None = None  # pytorch-fid's Inception file for FID and KID
    dists_weights: str | None = None  # DISTS's alpha/beta (field protocol)
    dino: str | None = None  # DINOv3-SAT ViT-L/16 folder (field protocol); None: DINO left out
    split_list: str | None = None  # the test items, one name per line (field protocol); None: every target
    sar_dir: str | None = None  # the SAR inputs: adds the identity-collapse ratio (field protocol)
    dataset: str | None = None  # a published benchmark (cdiff.published): its size and rows (field protocol)
    batch_size: int = 16  # images per network call (field protocol)
    skip_bad: bool = False  # log and count bad images instead of stopping (SKIP_BAD_HELP says which)
    report_dir: str | None = None  # where evaluation.json / .md go; None: the prediction folder

    def __post_init__(self):
        find_protocol(self.protocol)  # an unknown protocol raises, naming the choices
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.protocol == "release":
            given = {"--split-list": self.split_list, "--sar": self.sar_dir, "--dataset": self.dataset,
                     "--dists-weights": self.dists_weights, "--dino": self.dino}
            extra = [flag for flag, value in given.items() if value is not None]
            if extra:
                raise ValueError(f"{extra[0]} applies to the field protocol only, not to --protocol release")
            if self.metrics is not None:
                parse_metrics(self.metrics)
        elif self.metrics is not None:
            parse_field_metrics(self.metrics)  # an unknown name raises now

    @property
    def field_metrics(self) -> tuple[str, ...]:
        """The field protocol's metrics named in ``metrics`` (each required); () when none are named."""
        return parse_field_metrics(self.metrics) if self.metrics is not None else ()

    def check(self, pred_dir, target_dir) -> None:
        """Everything that can be checked before any image is scored (or, for ``cdiff translate
        --target``, translated), each failure one error naming the folder or file: the
        predictions and the ground truth are two folders; the report folder can be written
        (``cdiff.files.check_output``) and is not the ground truth's; the split list exists;
        the identity-collapse ratio has its SAR images; and the network files (``check_networks``)."""
        if _same_folder(pred_dir, target_dir):
            raise ValueError(f"--pred and --target are the same folder ({pred_dir}): a folder scored against itself "
                             "gives an infinite PSNR; give the ground truth's folder as --target")
        report = Path(self.report_dir or pred_dir)
        if _same_folder(report, target_dir):
            raise ValueError(f"--report-dir {report} is the ground truth's folder {target_dir}; write the reports "
                             "elsewhere")
        check_output(report, "folder", overwrite=True)  # overwrite: the folder holds the predictions
        for name in REPORT_NAMES:
            check_output(report / name, "file", overwrite=True)  # a rerun replaces the reports
        if self.split_list is not None:
            matching.split_list_path(self.split_list)
        if self.protocol == "field" and "identity" in self.field_metrics and self.sar_dir is None:
            raise ValueError("--metrics identity: the identity-collapse ratio needs the SAR inputs (--sar DIR)")
        self.check_networks()

    def check_networks(self) -> None:
        """Fail now, not after hours of translation, when a named metric's network weights are
        missing, or a weights file given by its option is not there."""
        if self.metrics is None:
            # The protocol's set: metrics without weights are left out, with one line each; a
            # file given by its option that is not there is a mistake all the same.
            from cdiff import networks, perceptual

            given = ((perceptual.LPIPS_VGG, self.lpips_vgg), (perceptual.FID_INCEPTION, self.fid_weights),
                     (perceptual.DISTS_ALPHA_BETA, self.dists_weights))
            for weights, path in given:
                if path is not None:
                    perceptual.find_weights(weights, path)
            if self.dino is not None:
                networks.find_dino(self.dino)
        elif self.protocol == "release":
            Networks.check(parse_metrics(self.metrics), self.lpips_vgg, self.fid_weights)
        else:
            files = scoring.NetworkFiles(self.lpips_vgg, self.fid_weights, self.dists_weights, self.dino)
            scoring.check_networks(self.field_metrics, files)


def _same_folder(a, b) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # also through links
    return a.resolve() == b.resolve()


def match_pairs(pred_dir, target_dir, names: list[str] | None = None, skip_bad: bool = False,
                skipped: list[str] | None = None) -> list[ImagePair]:
    """Pairs of same-named predictions and targets. With ``names``, only those predictions
    (each must have a target); without, both folders must hold exactly the same names. A
    prediction without a target, or a target without a prediction, raises naming it; with
    ``skip_bad`` each is logged and appended to ``skipped`` instead, and the rest are paired."""
    targets = list_images(target_dir, "target")
    preds = list_images(pred_dir, "prediction")
    if names is not None:
        unknown = [n for n in names if n not in preds]
        if unknown:
            raise ValueError(f"prediction folder {pred_dir}: no image named {unknown[0]!r}")
        preds = {n: preds[n] for n in names}
    no_target = [n for n in preds if n not in targets]
    no_pred = [n for n in targets if n not in preds] if names is None else []
    if skip_bad:
        for n in no_target:
            _skip(f"{preds[n]}: no target of the same name in {target_dir}", skipped)
        for n in no_pred:
            _skip(f"{targets[n]}: no prediction of the same name in {pred_dir}", skipped)
        pairs = [ImagePair(n, preds[n], targets[n]) for n in sorted(preds) if n in targets]
        if not pairs:
            raise ValueError(f"no prediction in {pred_dir} has a target of the same name in {target_dir}")
        return pairs
    if no_target:
        raise ValueError(
            f"{len(no_target)} predictions have no target of the same name in {target_dir}, "
            f"e.g. {preds[no_target[0]]} (expected {Path(target_dir) / no_target[0]}.*); --skip-bad leaves them out"
        )
    if no_pred:
        raise ValueError(
            f"{len(no_pred)} targets have no prediction of the same name in {pred_dir}, e.g. {targets[no_pred[0]]}; "
            "--skip-bad leaves them out"
        )
    return [ImagePair(n, preds[n], targets[n]) for n in sorted(preds)]


def _skip(line: str, skipped: list[str] | None) -> None:
    log.warning("skipped %s", line)
    if skipped is not None:
        skipped.append(line)


def read_metric_image(path: Path) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1]; grey repeated to RGB. Unreadable files raise naming it."""
    array = read_image(path)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    unit = to_unit_range(array, path)
    return torch.from_numpy(np.ascontiguousarray(unit)).permute(2, 0, 1)[None]


def read_pair(pair: ImagePair, metrics: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair's images; sizes that differ, or too small for one of ``metrics``, raise naming the file."""
    pred, target = read_metric_image(pair.pred), read_metric_image(pair.target)
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction {pair.pred} is {pred.shape[-1]}x{pred.shape[-2]} but its target {pair.target} "
            f"is {target.shape[-1]}x{target.shape[-2]}"
        )
    check_size(metrics, *pred.shape[-2:], pair.pred)
    return pred, target


@dataclass
class Evaluation:
    """Per-image scores, their means and FID, with the protocol they were computed under."""

    pred_dir: str
    target_dir: str
    metrics: tuple[str, ...]
    paper_scaling: bool
    per_image: list[dict] = field(default_factory=list)  # {"name", and a float per per-image metric}
    fid: float | None = None
    skipped: list[str] = field(default_factory=list)  # "path: reason" of pairs left out (--skip-bad)
    left_out: list[str] = field(default_factory=list)  # one line per metric left out (weights missing)

    @property
    def count(self) -> int:
        return len(self.per_image)

    @property
    def means(self) -> dict[str, float]:
        """The mean of each per-image metric over images, and FID."""
        out = {m: float(np.mean([row[m] for row in self.per_image])) for m in self.metrics if m in PER_IMAGE}
        if "fid" in self.metrics:
            out["fid"] = self.fid
        return out

    def to_json(self) -> str:
        return standard_json(
            {
                "pred": self.pred_dir,
                "target": self.target_dir,
                "images": self.count,
                "protocol": "release",
                "scaling": SCALINGS[self.paper_scaling],
                "paper_scaling": self.paper_scaling,
                "lpips_convention": LPIPS_CONVENTIONS[self.paper_scaling],
                "means": self.means,
                "skipped": self.skipped,
                "left_out": self.left_out,
                "per_image": self.per_image,
            }
        )

    def table(self) -> str:
        """The means as a plain-text table, for the terminal."""
        rows = [(LABELS[m], f"{v:.4f}") for m, v in self.means.items()]
        width = max(len(label) for label, _ in rows)
        lines = [f"{label:<{width}}  {value:>10}" for label, value in rows]
        lines.append(f"{self.count} images; protocol: release; metric scaling {SCALINGS[self.paper_scaling]}")
        lines.append(f"LPIPS convention: {LPIPS_CONVENTIONS[self.paper_scaling]}")
        if self.skipped:
            lines.append(f"{len(self.skipped)} pairs skipped (unreadable or mismatched)")
        return "\n".join(lines + self.left_out)

    def to_markdown(self) -> str:
        lines = [
            "# cdiff evaluation",
            "",
            f"Predictions `{self.pred_dir}`, targets `{self.target_dir}`: {self.count} image pairs.",
            f"Protocol: release, {PROTOCOLS['release'].title}.",
            f"PSNR, SSIM, SCC and LPIPS are per-image means on images scaled by `{SCALINGS[self.paper_scaling]}`;",
            "FID (pytorch-fid, 2048-d pool features) is computed on the image files as they are.",
            f"LPIPS convention: {LPIPS_CONVENTIONS[self.paper_scaling]}.",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {LABELS[m]} | {v:.4f} |" for m, v in self.means.items()]
        if self.skipped:
            lines += ["", f"{len(self.skipped)} pairs were skipped:", ""] + [f"- {s}" for s in self.skipped]
        if self.left_out:
            lines += [""] + [f"- {line}" for line in self.left_out]
        return "\n".join(lines) + "\n"

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """Write evaluation.json and evaluation.md into ``folder`` (atomically); their paths."""
        return write_reports(folder, self.to_json(), self.to_markdown())


class Networks:
    """The pretrained networks the chosen metrics need, loaded once (cdiff.perceptual)."""

    def __init__(self, metrics: tuple[str, ...], device=None, lpips_vgg=None, fid_weights=None):
        from cdiff import perceptual

        self.lpips = perceptual.load_lpips(lpips_vgg, device) if "lpips" in metrics else None
        self.inception = perceptual.load_fid_inception(fid_weights, device) if "fid" in metrics else None

    @staticmethod
    def check(metrics: tuple[str, ...], lpips_vgg=None, fid_weights=None) -> None:
        """Fail now, not after hours of translation, when a network's weights are missing."""
        from cdiff import perceptual

        if "lpips" in metrics:
            perceptual.find_weights(perceptual.LPIPS_VGG, lpips_vgg)
        if "fid" in metrics:
            perceptual.find_weights(perceptual.FID_INCEPTION, fid_weights)


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"psnr,ssim"`` -> ("psnr", "ssim"), in the canonical order; unknown names raise."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics: unknown metric {unknown[0] if unknown else text!r}; choose from {','.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


def evaluate(
    pairs: list[ImagePair],
    pred_dir: str | os.PathLike,
    target_dir: str | os.PathLike,
    metrics: tuple[str, ...] = METRICS,
    options: EvaluationOptions = EvaluationOptions(protocol="release"),
    device=None,
    show_progress: bool = True,
    paper_scaling: bool = True,
) -> Evaluation:
    """Score every pair under the release protocol (module docstring): ``metrics`` in METRICS'
    order; ``paper_scaling`` False scores on ``(x + 1) / 2`` instead of the release's scaling. A
    pair that cannot be read or whose sizes differ raises, naming the file; with
    ``options.skip_bad`` it is logged, counted in ``Evaluation.skipped`` and left out."""
    skip_bad = options.skip_bad
    result = Evaluation(str(pred_dir), str(target_dir), metrics, paper_scaling)
    networks = Networks(result.metrics, device, options.lpips_vgg, options.fid_weights)
    fid_pred, fid_target = [], []
    per_image_metrics = tuple(m for m in result.metrics if m in PER_IMAGE)
    for pair in progress(pairs, desc="evaluate", enabled=show_progress):
        try:
            pred, target = read_pair(pair, per_image_metrics)
        except ValueError as err:
            skip_or_raise(err, pair.name, skip_bad, result.skipped)
            continue
        row = {"name": pair.name}
        unit_pred, unit_target = image_metrics.to_unit(pred, paper_scaling), image_metrics.to_unit(target, paper_scaling)
        for name, fn in SCORES.items():
            if name in result.metrics:
                row[name] = float(fn(unit_pred, unit_target)[0])
        if networks.lpips is not None:
            from cdiff.perceptual import lpips_distance

            row["lpips"] = float(lpips_distance(networks.lpips, pred, target, paper_scaling)[0])
        if networks.inception is not None:
            fid_pred.append(image_metrics.to_unit(pred))
            fid_target.append(image_metrics.to_unit(target))
        result.per_image.append(row)
    if not result.per_image:
        raise ValueError(f"no image pair of {pred_dir} and {target_dir} could be evaluated")
    if networks.inception is not None:
        result.fid = _fid(networks.inception, fid_pred, fid_target)
    return result


def _fid(inception, preds: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    if len(preds) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(preds)}; leave fid out of --metrics")
    from cdiff.perceptual import inception_features

    def features(images: list[torch.Tensor]) -> torch.Tensor:
        # One image at a time through the resize: the images may differ in size.
        return torch.cat([inception_features(inception, image) for image in images])  # (N, 2048)

    mean_p, cov_p = image_metrics.feature_statistics(features(preds))
    mean_t, cov_t = image_metrics.feature_statistics(features(targets))
    return image_metrics.frechet_distance(mean_t, cov_t, mean_p, cov_p)


def run_evaluate(pred_dir, target_dir, options: EvaluationOptions = EvaluationOptions(), device=None,
                 names: list[str] | None = None, show_progress: bool = True):
    """The ``cdiff evaluate`` command: check, match, score, print the table, write the reports.

    ``options.metrics`` None: the protocol's set, each metric whose network weights are missing
    left out with one line; metrics named there must all be computed. ``names``: only these
    predictions, by relative path without suffix (``cdiff translate --target``: the ones it
    wrote); the other files of ``pred_dir`` are not looked at.
    """
    options.check(pred_dir, target_dir)
    if options.protocol == "release":
        return _run_release(pred_dir, target_dir, options, device, names)
    required = options.field_metrics
    chosen = required or PROTOCOLS["field"].metrics + (("identity",) if options.sar_dir is not None else ())
    size = published.benchmark(options.dataset).size if options.dataset is not None else None
    found = matching.match(pred_dir, target_dir, options.split_list, options.sar_dir, options.dataset, only=names)
    files = scoring.NetworkFiles(options.lpips_vgg, options.fid_weights, options.dists_weights, options.dino)
    networks = scoring.Networks(chosen, files, device, required=required)
    scores = scoring.score(found, chosen, networks, scoring.evaluation_size(found, size), options.batch_size, device,
                           options.skip_bad, show_progress)
    result = FieldReport(str(pred_dir), str(target_dir), _str_or_none(options.split_list),
                         _str_or_none(options.sar_dir), options.dataset, chosen, scores, found.missing,
                         [str(p) for p in found.unmatched], len(found.reference))
    print(result.table())
    for path in result.write(options.report_dir or pred_dir):
        print(f"  {path}")
    return result


def _str_or_none(value) -> str | None:
    return None if value is None else str(value)


def _run_release(pred_dir, target_dir, options: EvaluationOptions, device, names) -> Evaluation:
    """The release protocol. Without ``options.metrics``, a metric whose network weights are
    missing is left out with one line (unless its file was given: a wrong path is an error)."""
    left_out = []
    if options.metrics is not None:
        chosen = parse_metrics(options.metrics)
        Networks.check(chosen, options.lpips_vgg, options.fid_weights)
    else:
        chosen = []
        for name in METRICS:
            try:
                Networks.check((name,), options.lpips_vgg, options.fid_weights)
                chosen.append(name)
            except FileNotFoundError as err:
                if (name == "lpips" and options.lpips_vgg is not None) or (name == "fid" and options.fid_weights is not None):
                    raise
                left_out.append(f"{METRIC_TABLE[name].label} left out: {err}")
        chosen = tuple(chosen)
    unmatched: list[str] = []
    pairs = match_pairs(pred_dir, target_dir, names=names, skip_bad=options.skip_bad, skipped=unmatched)
    result = evaluate(pairs, pred_dir, target_dir, chosen, options, device)
    result.skipped[:0] = unmatched
    result.left_out.extend(left_out)
    print(result.table())
    for path in result.write(options.report_dir or pred_dir):
        print(f"  {path}")
    return result
