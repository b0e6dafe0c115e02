"""The metrics ``cdiff evaluate`` knows and the two protocols it scores under: one table each.

- ``field`` (the default): the protocol of the published SAR-to-EO comparison tables, GeoSET's
  ``scripts/evaluate.py`` (ReFlowSET's agrees where both compute a metric; docs/evaluation.md
  lists where they differ). Images read as ``file / 255`` in [0, 1]; predictions matched to test
  items by stem; the ground truth centre-cropped to the prediction's size; FID and KID against
  every test item's ground truth; LPIPS fed ``x * 2 - 1``.
- ``release``: the C-DiffSET release's (its utils.py and test.py), for the paper's own numbers:
  PSNR, SSIM, SCC and LPIPS on ``(x + 0.5).clamp(0, 1)`` of images in [-1, 1], LPIPS fed that
  [0, 1] image as it is; files matched by relative path; FID between the matched pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdiff.metrics import SCC_WINDOW, SSIM_MIN_SIDE

# LPIPS's VGG16 halves the image four times (2 x 2 max pools) before its last stage.
LPIPS_MIN_SIDE = 16


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    lower_is_better: bool | None  # None: not a score (no arrow)
    digits: int  # decimals printed, as in the published tables
    per_image: bool  # a mean of per-image scores; otherwise one number for the set
    network: str | None  # the network it needs: "lpips", "dists", "inception", "dino"; None: none
    min_side: int = 1  # the smallest image side (pixels) it can be computed on


_ALL = (
    Metric("fid", "FID", True, 2, False, "inception"),
    Metric("dists", "DISTS", True, 4, True, "dists"),
    Metric("kid", "KID", True, 5, False, "inception"),
    Metric("dino", "DINO", False, 4, True, "dino"),
    Metric("lpips", "LPIPS", True, 4, True, "lpips", LPIPS_MIN_SIDE),
    Metric("ssim", "SSIM", False, 4, True, None, SSIM_MIN_SIDE),
    Metric("psnr", "PSNR (dB)", False, 3, True, None),
    Metric("scc", "SCC", False, 4, True, None, SCC_WINDOW),
    Metric("identity", "identity-collapse ratio", None, 3, False, None),  # needs --sar
)
METRICS: dict[str, Metric] = {m.name: m for m in _ALL}


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    metrics: tuple[str, ...]  # what it computes when --metrics is not given
    scaling: str  # what the per-image metrics see
    lpips: str  # the LPIPS convention, named in every report


PROTOCOLS: dict[str, Protocol] = {
    "field": Protocol(
        "field",
        "the field's (GeoSET's scripts/evaluate.py)",
        ("fid", "dists", "kid", "dino", "lpips", "ssim", "psnr"),
        "file / 255 in [0, 1]; ground truth centre-cropped to the prediction's size",
        "VGG, images in [0, 1] mapped to [-1, 1] (x * 2 - 1) before the network: the standard convention "
        "of GeoSET's and ReFlowSET's tables",
    ),
    "release": Protocol(
        "release",
        "the C-DiffSET release's (its utils.py and test.py), for the paper's numbers",
        ("psnr", "ssim", "scc", "lpips", "fid"),
        "(x + 0.5).clamp(0, 1) of images in [-1, 1], as the release computed its published numbers",
        "VGG, fed the [0, 1] image (x + 0.5).clamp(0, 1) as it is (normalize=False): the release's; it reads "
        "about 0.05 lower than the standard x * 2 - 1 convention and does not compare with the field's tables",
    ),
}
RELEASE_METRICS = ("psnr", "ssim", "scc", "lpips", "fid")  # what the release protocol can compute


def label(name: str) -> str:
    """The metric's label with its direction: "FID ↓", "SSIM ↑"."""
    metric = METRICS[name]
    arrow = {True: " ↓", False: " ↑", None: ""}[metric.lower_is_better]
    return metric.label + arrow


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"--protocol: unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def parse_metrics(text: str, protocol_name: str = "field") -> tuple[str, ...]:
    """``"psnr,fid"`` -> ("fid", "psnr"), in the table's order; a name unknown, or unknown to
    the protocol, raises."""
    known = tuple(METRICS) if protocol_name == "field" else RELEASE_METRICS
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--metrics: unknown metric {unknown[0] if unknown else text!r} for the "
                         f"{protocol_name} protocol; choose from {','.join(known)}")
    return tuple(m for m in known if m in names)


def check_size(metrics: tuple[str, ...], height: int, width: int, path) -> None:
    """Raise, naming ``path`` and the smallest size, when an image of ``height`` x ``width`` is
    too small for one of ``metrics`` (SSIM's 11 x 11 window, SCC's, LPIPS's pooling)."""
    small = [m for m in metrics if min(height, width) < METRICS[m].min_side]
    if small:
        needs = ", ".join(f"{METRICS[m].label} at least {METRICS[m].min_side}x{METRICS[m].min_side}" for m in small)
        raise ValueError(f"{path} is {width}x{height}: too small to score ({needs} pixels); leave "
                         f"{'that metric' if len(small) == 1 else 'those metrics'} out with --metrics")
