"""The report of a field-protocol evaluation: evaluation.json, evaluation.md and the printed
table. Each names the protocol and the LPIPS convention, lists the metrics left out (one line
each) and the test items without a prediction, flags an identity-collapse ratio below 1, and,
for a known benchmark, sets the published rows (cdiff.published) beside the run's numbers with
the differences (this run minus the published value).

Both protocols write their reports through ``write_reports``: standard JSON only (a non-finite
number, such as the infinite PSNR of a prediction equal to its ground truth, is written as null
and listed under "non_finite"), and a full disk named in one line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdiff.files import out_of_space, write_text
from cdiff.protocol import METRICS, PROTOCOLS, label
from cdiff.published import BENCHMARKS, COLUMNS, PUBLISHED, SOURCE
from cdiff.scoring import Scores

REPORT_NAMES = ("evaluation.json", "evaluation.md")
SHOWN_NAMES = 10  # missing items named in the table and the markdown (all of them in the JSON)
NON_FINITE_NOTE = ("JSON has no infinity or NaN: these values are written as null (an infinite PSNR means a "
                   "prediction equal to its ground truth)")
IDENTITY_FLAG = ("below 1: the outputs are closer to their SAR inputs than to the ground truth "
                 "(identity collapse, as ReFlowSET flags it)")


@dataclass
class FieldReport:
    pred_dir: str
    target_dir: str
    split_list: str | None
    sar_dir: str | None
    dataset: str | None
    metrics: tuple[str, ...]  # the metrics asked for (or the protocol's default set)
    scores: Scores
    missing: list[str]  # test items without a prediction
    unmatched: list[str]  # prediction files that are no test item
    test_items: int

    @property
    def count(self) -> int:
        return len(self.scores.per_image)

    @property
    def means(self) -> dict[str, float]:
        """Every computed metric, in the table's order: per-image means and set-level numbers."""
        out = {}
        for name in METRICS:
            if name in self.scores.totals:
                out[name] = self.scores.totals[name]
            elif METRICS[name].per_image and self.scores.per_image and name in self.scores.per_image[0]:
                out[name] = float(np.mean([row[name] for row in self.scores.per_image]))
        return out

    @property
    def identity_collapse(self) -> bool:
        return self.scores.totals.get("identity", float("inf")) < 1

    def notes(self) -> list[str]:
        """The lines under the numbers: conventions, left-out metrics, missing items."""
        protocol = PROTOCOLS["field"]
        height, width = self.scores.size
        lines = [f"protocol: field, {protocol.title}; images: {protocol.scaling}; {width}x{height}",
                 f"LPIPS convention: {protocol.lpips}"]
        if self.identity_collapse:
            lines.append(f"identity-collapse ratio {self.scores.totals['identity']:.3f} {IDENTITY_FLAG}")
        lines += list(self.scores.skipped_metrics.values())
        if self.missing:
            shown = ", ".join(self.missing[:SHOWN_NAMES]) + (", ..." if len(self.missing) > SHOWN_NAMES else "")
            lines.append(f"missing: {len(self.missing)} of {self.test_items} test items have no prediction ({shown}); "
                         "the numbers are not comparable with a complete run")
        if self.unmatched:
            lines.append(f"ignored: {len(self.unmatched)} files of {self.pred_dir} are no test item "
                         f"(e.g. {Path(self.unmatched[0]).name})")
        if self.scores.skipped_items:
            lines.append(f"skipped: {len(self.scores.skipped_items)} unreadable images (--skip-bad)")
        return lines

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        """The header and rows of the numbers' table, with the published rows for a benchmark."""
        means = self.means
        header = ["metric", "this run"]
        published = PUBLISHED.get(self.dataset or "", {})
        for method in published:
            header += [method, "Δ"]
        rows = []
        names = [m for m in METRICS if m in means or (published and m in COLUMNS)]
        for name in names:
            metric = METRICS[name]
            row = [label(name), f"{means[name]:.{metric.digits}f}" if name in means else "-"]
            for values in published.values():
                if name not in values:
                    row += ["", ""]
                    continue
                row.append(f"{values[name]:.{metric.digits}f}")
                row.append(f"{means[name] - values[name]:+.{metric.digits}f}" if name in means else "")
            rows.append(row)
        return header, rows

    def table(self) -> str:
        header, rows = self._rows()
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                 for r in [header] + rows]
        title = f"{self.count} of {self.test_items} test items scored"
        if self.dataset:
            title += f"; {BENCHMARKS[self.dataset].title}, published rows from {SOURCE} (Δ = this run - published)"
        return "\n".join([title] + lines + self.notes())

    def to_markdown(self) -> str:
        header, rows = self._rows()
        lines = [
            "# cdiff evaluation",
            "",
            f"Predictions `{self.pred_dir}`, ground truth `{self.target_dir}`"
            + (f", split list `{self.split_list}`" if self.split_list else "")
            + (f", SAR `{self.sar_dir}`" if self.sar_dir else "")
            + f": {self.count} of {self.test_items} test items scored.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        if self.dataset:
            lines += ["", f"Published rows ({BENCHMARKS[self.dataset].title}): {SOURCE}. Δ = this run - published."]
        lines += [""] + [f"- {note}" for note in self.notes()]
        if self.missing:
            lines += ["", "Test items without a prediction: " + ", ".join(f"`{n}`" for n in self.missing[:SHOWN_NAMES])
                      + (f" and {len(self.missing) - SHOWN_NAMES} more (evaluation.json)" if len(self.missing) > SHOWN_NAMES else "")]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        protocol = PROTOCOLS["field"]
        return standard_json(
            {
                "protocol": "field",
                "protocol_title": protocol.title,
                "scaling": protocol.scaling,
                "lpips_convention": protocol.lpips,
                "pred": self.pred_dir,
                "target": self.target_dir,
                "split_list": self.split_list,
                "sar": self.sar_dir,
                "dataset": self.dataset,
                "size": list(self.scores.size),
                "images": self.count,
                "test_items": self.test_items,
                "means": self.means,
                "identity_collapse": self.identity_collapse if "identity" in self.scores.totals else None,
                "identity_parts": self.scores.identity_parts,
                "left_out": self.scores.skipped_metrics,
                "missing": self.missing,
                "unmatched": self.unmatched,
                "skipped": self.scores.skipped_items,
                "published": {"source": SOURCE, "rows": PUBLISHED[self.dataset]} if self.dataset else None,
                "per_image": self.scores.per_image,
            }
        )

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """Write evaluation.json and evaluation.md into ``folder`` (atomically); their paths."""
        return write_reports(folder, self.to_json(), self.to_markdown())


def standard_json(data: dict) -> str:
    """``data`` as standard JSON, indented: every non-finite float becomes null, and the key
    "non_finite" lists where each was ("means.psnr: inf") under a note saying why."""
    replaced = []

    def finite(value, where: str):
        if isinstance(value, float) and not math.isfinite(value):
            replaced.append(f"{where}: {value}")
            return None
        if isinstance(value, dict):
            return {key: finite(item, f"{where}.{key}" if where else str(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return value

    cleaned = finite(data, "")
    if replaced:
        cleaned["non_finite"] = {"note": NON_FINITE_NOTE, "values": replaced}
    return json.dumps(cleaned, indent=2, allow_nan=False) + "\n"


def write_reports(folder: str | os.PathLike, json_text: str, markdown: str) -> list[Path]:
    """Write evaluation.json and evaluation.md into ``folder``, each atomically; their paths. A
    full disk raises one line naming the file that could not be written."""
    paths = [Path(folder) / name for name in REPORT_NAMES]
    for path, text in zip(paths, (json_text, markdown)):
        try:
            write_text(path, text)
        except OSError as err:
            if not out_of_space(err):
                raise
            raise OSError(f"no space left on the device of {path.parent}: {path} was not written (the numbers are "
                          "printed above); free some space, or write the reports elsewhere with --report-dir") from None
    return paths
