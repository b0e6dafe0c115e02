"""The pilot runs behind two choices of ``cdiff distill`` (docs/distill.md): the method, and how the student
keeps its confidence map. Writes studies/fewstep/pilots.md and pilots.json.

    python -m studies.fewstep.pilots --teacher weights/cdiff-demo-tiny.safetensors

1. Method: consistency distillation (LCM) and progressive distillation (16 -> 8 -> 4 steps, two rounds),
   each from configs/distill-synthetic-tiny.toml with the same number of optimiser steps of the same
   batch (``--steps``), one after the other on one thread; each run's CPU seconds are recorded. Both
   4-step students are scored on ``--scenes`` held-out scenes against the teacher's DDIM-50, beside the
   teacher sampled with each student's sampler (what distillation adds).
2. Confidence map: for each student, the AUROC against the injected discrepancies of (a) its own
   variance channel, trained towards the teacher's (``model.confidence = "variance"``), and (b) one
   teacher pass at the student's first step with t <= T/2, beside the teacher's own DDIM-50 map.

The runs live in ``--work`` (resumed when there), the latent cache of the teacher's VAE beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cdiff.demo import DEMO_MODEL
from cdiff.files import write_text
from cdiff.load import load_pipeline
from studies.fewstep.arms import Arm
from studies.fewstep.report import DISTILL_CONFIG, ROOT, STUDY, FewStepProtocol, heldout, measure

METHODS = {"consistency": [], "progressive": ["model.teacher_steps=16"]}


def pilot_arms(sampler: str) -> list[Arm]:
    return [Arm("teacher DDIM-50", "DDIM", "teacher", "ddim", 50),
            Arm(f"teacher {sampler}-4 (not distilled)", "control", "teacher", sampler, 4),
            Arm(f"student {sampler}-4, own map", "student", "student", sampler, 4),
            Arm(f"student {sampler}-4, teacher's map", "student, teacher's map", "student", sampler, 4,
                teacher_confidence=True)]


def run_pilot(method: str, teacher: Path, work: Path, steps: int) -> dict:
    """Distil (or resume) the pilot of ``method``; its student file and CPU seconds."""
    from cdiff.train import load_config, train
    from cdiff.train.latents import cache_latents

    latents = work / "latents"
    sets = [f"model.teacher={teacher}"]
    if not (latents / "index.json").is_file():
        cache_latents(load_config(DISTILL_CONFIG, sets), latents)
    sets += [f"model.method={method}", f"data.latents={latents}", f"train.steps={steps}", "val.every=0",
             f"train.save_every={max(steps // 4, 1)}", *METHODS[method]]
    run = work / method
    start = time.process_time()
    done = train(load_config(DISTILL_CONFIG, sets), run, resume=(run / "config.toml").is_file())
    record = run / "pilot.json"
    seconds = time.process_time() - start
    if record.is_file():  # an earlier, interrupted process's share
        seconds += json.loads(record.read_text())["cpu_seconds"]
    write_text(record, json.dumps({"cpu_seconds": seconds}))
    return {"student": done.checkpoint / "model.safetensors", "cpu_seconds": seconds, "steps": done.step,
            "config": sets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(DEMO_MODEL), help="the teacher (default: %(default)s)")
    parser.add_argument("--work", default=str(ROOT / "out" / "fewstep-pilots"), help="the runs' folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps of each pilot (default: %(default)s)")
    parser.add_argument("--scenes", type=int, default=32, help="held-out scenes scored (default: %(default)s)")
    parser.add_argument("--out", default=str(STUDY / "pilots.md"), help="the summary (default: %(default)s), .json beside it")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    teacher_path, work = Path(args.teacher), Path(args.work)
    protocol = FewStepProtocol(scenes=args.scenes, timed_scenes=1)
    data = heldout(protocol)
    teacher = load_pipeline(teacher_path, dtype=torch.float32)
    results = {}
    for method in METHODS:
        pilot = run_pilot(method, teacher_path, work, args.steps)
        student = load_pipeline(pilot["student"], dtype=torch.float32)
        rows = measure(teacher, student, pilot_arms(student.sampling[0]), data, protocol)
        results[method] = {**pilot, "student": str(pilot["student"]), "rows": rows}
    write_text(Path(args.out).with_suffix(".json"), json.dumps(
        {"teacher": teacher_path.name, "protocol": asdict(protocol), "steps": args.steps, "pilots": results},
        indent=1) + "\n")
    write_text(Path(args.out), render(results, teacher_path.name, args))
    print(render(results, teacher_path.name, args))
    return 0


def render(results: dict, teacher: str, args) -> str:
    lines = [
        "# Distillation pilots: which method, which confidence map",
        "",
        f"Generated by `python -m studies.fewstep.pilots` (numbers: [pilots.json](pilots.json)). Teacher "
        f"`{teacher}`; each pilot {args.steps} optimiser steps of configs/distill-synthetic-tiny.toml, one CPU "
        f"thread; scored on {args.scenes} held-out scenes (studies/fewstep/report.py's measures; the times are "
        "not comparable here: one scene each).",
        "",
        "| method | CPU s | row | PSNR dB | SSIM | HF ratio (/ DDIM-50's) | confidence AUROC | PSNR vs DDIM-50 image dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, result in results.items():
        reference = result["rows"][0]
        for r in result["rows"]:
            lines.append(f"| {method} | {result['cpu_seconds']:.0f} | {r['name']} | {r['psnr']:.2f} "
                         f"({r['psnr'] - reference['psnr']:+.2f}) | {r['ssim']:.4f} ({r['ssim'] - reference['ssim']:+.4f}) | "
                         f"{r['hf_ratio']:.3f} ({r['hf_ratio'] / reference['hf_ratio']:.2f}) | {r['auroc']:.3f} | "
                         f"{r['psnr_vs_ddim50']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
