"""Quality against U-Net passes as a PNG, drawn with PIL alone (no matplotlib): one panel per measure
(PSNR, SSIM, the blur check), passes on a log axis, one series per family of rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cdiff.data.imageio import write_png

PANEL_W, PANEL_H, MARGIN = 420, 360, 70  # px
PANELS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("hf_ratio", "high-frequency ratio"))
SERIES = {  # family -> colour; drawn in this order
    "DDIM": (40, 90, 200),
    "DPM-Solver++(2M)": (150, 60, 170),
    "DDIM-50 + DeepCache": (40, 150, 70),
    "control": (120, 120, 120),
    "student": (200, 60, 40),
}


def _series(rows: list[dict], family: str) -> list[tuple[float, dict]]:
    chosen = [r for r in rows if r["family"] == family]
    if family == "DDIM-50 + DeepCache":  # the cached rows join the uncached DDIM-50 (interval 1)
        chosen += [r for r in rows if r["family"] == "DDIM" and r["arm"]["steps"] == 50]
    return sorted((r["passes"], r) for r in chosen)


def draw_quality(path: str | Path, rows: list[dict], title: str) -> Path:
    """Write the panels of ``rows`` (the study's rows: "passes", "family" and the measures) to the PNG ``path``."""
    font = ImageFont.load_default()
    width, height = MARGIN + len(PANELS) * (PANEL_W + MARGIN), PANEL_H + 2 * MARGIN + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 12), title, fill="black", font=font)
    low_x, high_x = 0, math.ceil(math.log2(max(r["passes"] for r in rows)))
    for p, (key, label) in enumerate(PANELS):
        left, top = MARGIN + p * (PANEL_W + MARGIN), MARGIN
        values = [r[key] for r in rows]
        low, high = min(values), max(values)
        pad = (high - low) * 0.08 or 0.01
        low, high = low - pad, high + pad

        def at(passes: float, value: float) -> tuple[float, float]:
            x = left + (math.log2(max(passes, 1)) - low_x) / (high_x - low_x) * PANEL_W
            return x, top + (high - value) / (high - low) * PANEL_H

        draw.rectangle([left, top, left + PANEL_W, top + PANEL_H], outline="black")
        draw.text((left, top - 16), label, fill="black", font=font)
        for k in range(low_x, high_x + 1):  # passes 1, 2, 4, ... 64
            x = left + (k - low_x) / (high_x - low_x) * PANEL_W
            draw.line([x, top + PANEL_H, x, top + PANEL_H + 4], fill="black")
            draw.text((x - 6, top + PANEL_H + 8), str(2**k), fill="black", font=font)
        for tick in np.linspace(low + pad, high - pad, 5):
            y = top + (high - tick) / (high - low) * PANEL_H
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((left - 48, y - 5), f"{tick:.3g}", fill="black", font=font)
        draw.text((left + PANEL_W // 2 - 60, top + PANEL_H + 24), "U-Net passes (log scale)", fill="black", font=font)
        reference = next(r for r in rows if r["family"] == "DDIM" and r["arm"]["steps"] == 50)[key]
        y = at(1, reference)[1]
        for x in range(int(left), int(left + PANEL_W), 8):  # DDIM-50's level, dashed
            draw.line([x, y, x + 4, y], fill=(160, 160, 160))
        for family, colour in SERIES.items():
            points = [at(passes, r[key]) for passes, r in _series(rows, family)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    for i, (family, colour) in enumerate(SERIES.items()):  # the legend, under the panels
        x = MARGIN + i * 170
        y = height - 24
        draw.line([x, y + 5, x + 20, y + 5], fill=colour, width=3)
        draw.text((x + 26, y), family if family != "control" else "teacher, student's sampler", fill="black", font=font)
    write_png(path, np.asarray(image))
    return Path(path)
