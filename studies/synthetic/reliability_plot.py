"""A reliability diagram as a PNG, drawn with PIL alone (no matplotlib).

Log-log axes: mean predicted variance (x) against mean squared error (y) per bin of
studies.synthetic.measures.reliability_bins; the diagonal is perfect calibration, a horizontal
dashed line the best constant variance's error level.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cdiff.data.imageio import write_png

WIDTH, HEIGHT, MARGIN = 640, 560, 80  # px
SERIES_COLOURS = ((200, 60, 40), (40, 90, 200), (40, 150, 70))


def _decades(low: float, high: float) -> tuple[int, int]:
    return math.floor(math.log10(low)), math.ceil(math.log10(high))


def draw_reliability(path: str | Path, series: dict[str, list[dict[str, float]]], title: str,
                     reference: float | None = None) -> Path:
    """Write the diagram of ``series`` (label -> reliability bins) to the PNG ``path``.

    ``reference``: a squared-error level drawn as a dashed horizontal line (e.g. the mean
    squared error, which the best constant variance predicts for every cell).
    """
    values = [v for bins in series.values() for b in bins for v in (b["variance"], b["squared_error"]) if v > 0]
    if reference:
        values.append(reference)
    first, last = _decades(min(values), max(values))
    last = max(last, first + 1)

    def at(value: float, horizontal: bool) -> float:
        share = (math.log10(max(value, 10.0**first)) - first) / (last - first)
        return MARGIN + share * (WIDTH - 1.5 * MARGIN) if horizontal else HEIGHT - MARGIN - share * (HEIGHT - 1.5 * MARGIN)

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    left, right, top, bottom = at(10.0**first, True), at(10.0**last, True), at(10.0**last, False), at(10.0**first, False)
    for k in range(first, last + 1):  # grid and tick labels, one per decade
        x, y = at(10.0**k, True), at(10.0**k, False)
        draw.line([(x, top), (x, bottom)], fill=(225, 225, 225))
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((x, bottom + 6), f"1e{k}", fill="black", font=font, anchor="mt")
        draw.text((left - 6, y), f"1e{k}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.line([(left, bottom), (right, top)], fill=(120, 120, 120), width=1)  # calibrated: error = variance
    if reference:
        y = at(reference, False)
        for x in range(int(left), int(right), 12):
            draw.line([(x, y), (min(x + 6, right), y)], fill=(120, 120, 120), width=2)
    for (label, bins), colour in zip(series.items(), SERIES_COLOURS):
        points = [(at(b["variance"], True), at(b["squared_error"], False)) for b in bins]
        draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
    legend = [(label, colour) for label, colour in zip(series, SERIES_COLOURS)]
    legend.append(("error = variance (calibrated)", (120, 120, 120)))
    if reference:
        legend.append(("best constant variance", (120, 120, 120)))
    for row, (label, colour) in enumerate(legend):
        y = top + 12 + 20 * row
        draw.rectangle([left + 10, y - 5, left + 24, y + 5], fill=colour)
        draw.text((left + 32, y), label, fill="black", font=font, anchor="lm")
    draw.text((WIDTH / 2, 24), title, fill="black", font=font, anchor="mm")
    draw.text(((left + right) / 2, HEIGHT - 24), "mean predicted variance (per bin)", fill="black",
              font=font, anchor="mm")
    axis_label = Image.new("RGB", (HEIGHT, 20), "white")
    ImageDraw.Draw(axis_label).text((HEIGHT / 2, 10), "mean squared error of the prediction", fill="black",
                                    font=font, anchor="mm")
    image.paste(axis_label.rotate(90, expand=True), (8, 0))
    write_png(path, np.asarray(image))
    return Path(path)
