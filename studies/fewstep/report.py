"""Regenerate studies/fewstep/fewstep.md (and .json, .png): few-step translation against the teacher's DDIM-50.

    python -m studies.fewstep                        # the demo model and its student (weights/, git-ignored)
    python -m studies.fewstep --distill              # first distil the student (cdiff distill, ~25 min on a CPU)

Every row translates the same held-out synthetic scenes (cdiff.demo: seeds HELDOUT_SEED .. + scenes - 1,
128 px, with their discrepancy masks) from the same starting noise, in one run: the teacher (the demo model)
with DDIM at 50 steps (the reference) and fewer, DPM-Solver++(2M), DDIM-50 with DeepCache at several
intervals, the teacher sampled as the student is (the control: no distillation), and the distilled
student. Per row: mean PSNR, SSIM, SCC against the true EO image; the blur check (high-frequency energy
over the target's, studies.fewstep.measures); the AUROC of the confidence map against the injected
discrepancies (the synthetic study's protocol for labels and AUROC); PSNR against the DDIM-50 image;
U-Net passes; and the time per image at batch 1 (median over ``timed_scenes`` scenes, the rows
interleaved scene by scene, after a warm-up) as a ratio to DDIM-50's. Same machine, thread count
and clock: the same numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cdiff.demo import DEMO_MODEL, HELDOUT_SEED, Protocol, eo_batch, heldout_pairs, sar_batch
from cdiff.files import write_text
from cdiff.load import load_pipeline
from studies.fewstep.arms import Arm, arm_pipeline, standard_arms, translate_arm, unet_passes
from studies.fewstep.measures import confidence_auroc, scores

ROOT = Path(__file__).resolve().parents[2]
STUDY = Path(__file__).resolve().parent
STUDENT = ROOT / "weights" / "cdiff-demo-tiny-student.safetensors"  # git-ignored; --distill makes it
DISTILL_CONFIG = ROOT / "configs" / "distill-synthetic-tiny.toml"
CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


@dataclass(frozen=True)
class FewStepProtocol:
    scenes: int = 64  # held-out scenes, seeds HELDOUT_SEED .. HELDOUT_SEED + scenes - 1
    size: int = 128  # px (the demo model's training size)
    chunk: int = 16  # scenes per translate call for the scores
    fresh_seed: int = 1  # the generator of a sampler's fresh noise (LCM), one per chunk
    timed_scenes: int = 8  # batch-1 translations timed per row (after one warm-up)
    clock: str = "thread"  # "thread": the one torch thread's CPU time (a busy shared machine); "wall"


def heldout(protocol: FewStepProtocol) -> dict[str, torch.Tensor]:
    """SAR, EO (N, 3, H, W) in [-1, 1], the discrepancy masks (N, H, W) and the starting noise (N, 4, h, w)."""
    pairs = heldout_pairs(Protocol(scenes=protocol.scenes, size=protocol.size))
    side = protocol.size // 8
    noise = torch.stack([torch.randn(4, side, side, generator=torch.Generator().manual_seed(i))
                         for i in range(protocol.scenes)])
    return {"sar": sar_batch(pairs), "eo": eo_batch(pairs), "noise": noise,
            "discrepancy": torch.from_numpy(np.stack([p.discrepancy for p in pairs]))}


def outer_fraction(pipeline, size: int) -> float:
    """FLOPs of the U-Net's outer level (DeepCache's cheap pass) over a whole pass, at ``size`` px."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, side = pipeline.unet, size // 8
    x, t, context = torch.zeros(1, unet.config.in_channels, side, side), torch.tensor(500), pipeline.context[None]
    kept = {}

    def keep(module, args) -> None:  # a pre-hook that returns None leaves the block's arguments as they are
        kept["inner"] = args[0]

    handle = unet.up[-1].register_forward_pre_hook(keep)
    counts = []
    with torch.no_grad():
        for call in (lambda: unet(x, t, context), lambda: unet.forward_outer(x, t, context, kept["inner"])):
            counter = FlopCounterMode(display=False)
            with counter:
                call()
            counts.append(counter.get_total_flops())
            handle.remove()  # after the whole pass has kept its inside
    return counts[1] / counts[0]


def measure(teacher, student, arms: list[Arm], data: dict, protocol: FewStepProtocol, progress=print) -> list[dict]:
    """Every row's scores, passes and seconds per image (``arms[0]`` is the reference, DDIM-50)."""
    pipelines = [arm_pipeline(arm, teacher, student) for arm in arms]
    fraction = outer_fraction(teacher, protocol.size)
    rows, reference = [], None
    for arm, pipeline in zip(arms, pipelines):
        eo, confidence = [], []
        for first in range(0, protocol.scenes, protocol.chunk):
            part = slice(first, first + protocol.chunk)
            result = translate_arm(pipeline, arm, data["sar"][part], data["noise"][part], protocol.fresh_seed + first)
            eo.append(result.eo.float())
            confidence.append(result.confidence)
        eo, confidence = torch.cat(eo), torch.cat(confidence)
        reference = eo if reference is None else reference
        row = {"name": arm.name, "family": arm.family, "arm": asdict(arm), "passes": unet_passes(arm, fraction, teacher.process),
               **scores(eo, data["eo"], reference), "auroc": confidence_auroc(confidence, data["discrepancy"])}
        rows.append(row)
        progress(f"fewstep: {arm.name}: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}, HF {row['hf_ratio']:.3f}, "
                 f"AUROC {row['auroc']:.3f}")
    seconds = time_rows(pipelines, arms, data, protocol)
    for row, value in zip(rows, seconds):
        row["seconds"] = value
        row["speedup"] = seconds[0] / value
    return rows


@torch.no_grad()
def time_rows(pipelines, arms: list[Arm], data: dict, protocol: FewStepProtocol) -> list[float]:
    """Median seconds per batch-1 translation of each row, the rows interleaved scene by scene in a rotating order."""
    clock = CLOCKS[protocol.clock]
    times = [[] for _ in arms]
    order = list(range(len(arms)))
    for scene in range(-1, protocol.timed_scenes):  # scene -1: the warm-up, not kept
        i = max(scene, 0)
        shift = (scene + 1) % len(order)
        for k in order[shift:] + order[:shift]:
            start = clock()
            translate_arm(pipelines[k], arms[k], data["sar"][i : i + 1], data["noise"][i : i + 1], protocol.fresh_seed)
            if scene >= 0:
                times[k].append(clock() - start)
    return [statistics.median(t) for t in times]


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, checked on the rows: the 4-step student against DDIM-50, and DeepCache at 50 steps."""
    reference = rows[0]
    out = []
    student = next((r for r in rows if r["family"] == "student" and r["arm"]["steps"] == 4), None)
    if student is not None:
        checks = [
            ("PSNR within 0.3 dB of DDIM-50", student["psnr"] - reference["psnr"], lambda d: d >= -0.3, "{:+.2f} dB"),
            ("SSIM within 0.01 of DDIM-50", student["ssim"] - reference["ssim"], lambda d: d >= -0.01, "{:+.4f}"),
            ("high-frequency ratio within 10% of DDIM-50's", student["hf_ratio"] / reference["hf_ratio"] - 1,
             lambda d: abs(d) <= 0.10, "{:+.1%}"),
            ("at least 8x less time per image", student["speedup"], lambda d: d >= 8, "{:.2f}x"),
        ]
        out += [{"what": f"4-step student: {what}", "measured": fmt.format(value), "met": bool(ok(value))}
                for what, value, ok, fmt in checks]
    cached = [r for r in rows if r["family"] == "DDIM-50 + DeepCache"]
    fast = [r for r in cached if r["psnr"] - reference["psnr"] >= -0.2]
    best = max(fast, key=lambda r: r["speedup"]) if fast else None
    if cached:
        measured = (f"{best['speedup']:.2f}x at interval {best['arm']['cache_interval']} "
                    f"({best['psnr'] - reference['psnr']:+.2f} dB)") if best else "no interval within 0.2 dB"
        out.append({"what": "DeepCache at 50 steps: at least 1.8x with at most 0.2 dB PSNR lost", "measured": measured,
                    "met": bool(best and best["speedup"] >= 1.8)})
    return out


def table(rows: list[dict]) -> str:
    reference = rows[0]
    lines = ["| row | U-Net passes | PSNR dB | SSIM | SCC | HF ratio (/ DDIM-50's) | confidence AUROC | "
             "PSNR vs DDIM-50 image dB | ms / image | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['passes']:.3g} | {r['psnr']:.2f} ({r['psnr'] - reference['psnr']:+.2f}) | "
            f"{r['ssim']:.4f} ({r['ssim'] - reference['ssim']:+.4f}) | {r['scc']:.4f} | "
            f"{r['hf_ratio']:.3f} ({r['hf_ratio'] / reference['hf_ratio']:.2f}) | {r['auroc']:.3f} | "
            f"{r['psnr_vs_ddim50']:.1f} | {r['seconds'] * 1e3:.0f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def render(context: dict, rows: list[dict], checks: list[dict]) -> str:
    p = context["protocol"]
    text = [
        "# Few-step translation against DDIM-50 (demo model, held-out synthetic scenes)",
        "",
        f"Generated by `python -m studies.fewstep` (numbers: [fewstep.json](fewstep.json), plot: "
        f"[fewstep.png](fewstep.png)). Do not edit by hand: rerun it. Run: {context['seconds']} s on "
        f"{context['threads']} CPU thread(s), {context['machine']}, torch {context['torch']}; times on the "
        f"{p['clock']} clock.",
        "",
        f"Teacher: `{context['teacher']['file']}` (sha256 {context['teacher']['sha256'][:16]}, predicts "
        f"{context['teacher']['prediction']}). Student: `{context['student']['file']}` (sha256 "
        f"{context['student']['sha256'][:16]}; {context['student']['distillation']} distillation, samples with "
        f"{context['student']['sampling'][0]} in {context['student']['sampling'][1]} steps).",
        "",
        f"Scenes: {p['scenes']} held-out synthetic scenes of {p['size']} px (seeds {HELDOUT_SEED} .. "
        f"{HELDOUT_SEED + p['scenes'] - 1}), scene i from the starting noise of seed i in every row. In "
        "parentheses: the difference from the teacher's DDIM-50 (HF ratio: the ratio to its). U-Net passes "
        "count a DeepCache outer-level pass as its share of a whole pass's FLOPs "
        f"({context['outer_fraction']:.3f}). Time: batch 1, median of {p['timed_scenes']} scenes, VAE included.",
        "",
        table(rows),
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        *[f"| {c['what']} | {c['measured']} | {'met' if c['met'] else '**missed**'} |" for c in checks],
        "",
    ]
    return "\n".join(text)


def describe(path: Path, pipeline) -> dict:
    import hashlib

    from cdiff.native import open_native

    metadata = open_native(path).metadata
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "prediction": pipeline.prediction_type, "sampling": pipeline.sampling,
            "distillation": metadata.get("distillation"), "distilled_from": metadata.get("distilled_from")}


def distil_student(teacher: Path, student: Path, work: Path, threads: int) -> None:
    """``cdiff distill`` of configs/distill-synthetic-tiny.toml from ``teacher``; the final student copied to ``student``."""
    import shutil

    from cdiff.train import load_config, train
    from cdiff.train.latents import cache_latents

    sets = [f"model.teacher={teacher}"]
    latents = work / "latents"
    if not (latents / "index.json").is_file():
        cache_latents(load_config(DISTILL_CONFIG, sets), latents)
    torch.set_num_threads(threads)
    done = train(load_config(DISTILL_CONFIG, [*sets, f"data.latents={latents}"]), work / "run",
                 resume=(work / "run" / "config.toml").is_file())
    shutil.copyfile(done.checkpoint / "model.safetensors", student)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(DEMO_MODEL), help="the teacher, a native file (default: %(default)s)")
    parser.add_argument("--student", default=str(STUDENT), help="its distilled student (default: %(default)s)")
    parser.add_argument("--distill", action="store_true", help="first distil the student into --student "
                        f"({DISTILL_CONFIG.relative_to(ROOT)}; work folder beside it, resumed if there)")
    parser.add_argument("--scenes", type=int, default=FewStepProtocol.scenes, help="held-out scenes (default: %(default)s)")
    parser.add_argument("--timed-scenes", type=int, default=FewStepProtocol.timed_scenes,
                        help="batch-1 translations timed per row (default: %(default)s)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=FewStepProtocol.clock,
                        help="thread: the torch thread's CPU time (a busy machine); wall (default: %(default)s)")
    parser.add_argument("--out", default=str(STUDY / "fewstep.md"), help="the report (default: %(default)s); "
                        "its .json and .png are written beside it")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread counts one thread's CPU time: it needs --threads 1")
    teacher_path, student_path = Path(args.teacher), Path(args.student)
    if args.distill:
        distil_student(teacher_path, student_path, student_path.with_suffix(".work"), args.threads)
    for path, hint in ((teacher_path, "the teacher"), (student_path, "make it with --distill")):
        if not path.is_file():
            raise SystemExit(f"fewstep: error: {path}: not found ({hint})")
    protocol = FewStepProtocol(scenes=args.scenes, timed_scenes=args.timed_scenes, clock=args.clock)
    teacher, student = (load_pipeline(p, dtype=torch.float32) for p in (teacher_path, student_path))
    if student.sampling is None:
        raise SystemExit(f"fewstep: error: {student_path} records no sampler: not a distilled student")
    start = time.perf_counter()
    arms = standard_arms(student_sampler=student.sampling[0])
    rows = measure(teacher, student, arms, heldout(protocol), protocol)
    checks = targets(rows)
    out = Path(args.out)
    context = {"protocol": asdict(protocol), "threads": args.threads, "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "seconds": round(time.perf_counter() - start),
               "teacher": describe(teacher_path, teacher), "student": describe(student_path, student),
               "outer_fraction": outer_fraction(teacher, protocol.size)}
    from studies.fewstep.plot import draw_quality

    draw_quality(out.with_suffix(".png"), rows, "Quality against U-Net passes (held-out synthetic scenes)")
    write_text(out.with_suffix(".json"), json.dumps({**context, "rows": rows, "targets": checks}, indent=1) + "\n")
    write_text(out, render(context, rows, checks))
    print(table(rows))
    print(f"fewstep: {out}, {out.with_suffix('.json').name}, {out.with_suffix('.png').name} ({context['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
