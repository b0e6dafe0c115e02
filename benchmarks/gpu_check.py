"""The one-command GPU check: every CUDA-only test, and cdiff's headline speed figures against the
diffusers-module loop, on one GPU within a time budget (8 minutes at most); benchmarks/gpu_check.sh
runs it (docs/gpu-check.md says how, with which wheels).

    python benchmarks/gpu_check.py OUT_DIR [--budget SECONDS]      # on a CUDA machine
    python benchmarks/gpu_check.py OUT_DIR --dry-run                # the same script on the CPU, tiny sizes

What runs, in this order (the measurements themselves: benchmarks/gpu_parts.py):
1. in a worker process: ``preflight`` (packages, device, versions: a missing package or a wrong
   device stops everything here, in seconds), ``peak`` (bf16 matrix-product rate, measured),
   ``translate`` (512 px, batch 1, DDIM-50: cdiff's default and fastest paths against the
   diffusers loop), ``train`` (a 256-px training step: images/s and peak memory against the
   release's), ``unet`` (the U-Net at batch 16: the fraction of the measured peak);
2. ``tests``: pytest over CUDA_TESTS, the tests that need a GPU (kernels against references in
   fp32/fp16/bf16 in both layouts, forward and backward; CUDA-graph replay against eager;
   channels-last against NCHW; compiled against eager; training steps in bf16 and fp16 with fused
   AdamW; two NCCL processes when there are two GPUs).

Budget: each part has a cap (PLAN), and starts only when the time left allows it (else it is
recorded as "skipped: budget"); TESTS_RESERVE seconds of the budget are kept for the tests. A part
that runs past its cap is stopped (its worker killed) with what it had measured; a part that fails
ends its worker, and another worker runs the parts left. OUT_DIR/gpu_check.json is rewritten after
every part, so a run killed from outside still leaves every figure measured so far; the table of
figures and targets is printed last.

This driver imports nothing beyond the standard library, so that it reports a broken torch or a
missing package instead of dying with it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "benchmarks" / "gpu_parts.py"
BUDGET_S = 450  # the default: 8 minutes at most, with room for the wheel install before it
# part -> (cap in seconds, seconds that must be left for it to start). Caps are ceilings: the
# parts are expected to take (H100/H200) about 10, 5, 120, 80 and 60 s.
PLAN = {
    "preflight": (90, 0),
    "peak": (30, 5),
    "translate": (170, 45),
    "train": (130, 40),
    "unet": (90, 20),
}
TESTS_RESERVE = 150  # seconds of the budget kept for the tests, which also get whatever the parts left
GRACE_S = 10  # past a part's cap (its own stages stop earlier), before its worker is killed

# The tests that need a GPU; on a GPU every one runs there. The kernel files run on the CPU too (in
# Triton's interpreter), all the others skip without CUDA.
CUDA_TESTS = (
    "tests/test_group_norm_kernel.py",  # GroupNorm+SiLU kernel vs reference: fp32/fp16/bf16, both layouts, fwd + bwd
    "tests/test_loss_kernel.py",  # the C-Diff loss kernel vs reference: the same
    "tests/test_samplers.py::test_sampling_loops_never_sync_on_cuda",
    "tests/test_samplers.py::test_sampling_loop_captures_in_a_cuda_graph",  # graph replay == eager
    "tests/test_compiled.py::test_cuda_graph_translation_equals_eager",
    "tests/test_compiled.py::test_compiled_unet_on_cuda_in_half_precision",  # compiled + graph == eager
    "tests/test_channels_last.py::test_half_precision_channels_last_path_on_cuda",
    "tests/test_channels_last.py::test_channels_last_equals_nchw_on_cuda",
    "tests/test_train_cuda.py",  # bf16 / fp16 steps with fused AdamW; a run and a resume; 2 NCCL processes
)
# In the dry run pytest collects every file above (so that a wrong name fails here, not on the
# GPU) but runs only the tests that skip without CUDA, by name: the kernel tests take minutes in
# Triton's interpreter.
DRY_RUN_SELECTION = "cuda and not cpu"
TEST_TIMEOUT_S = 300  # per test, when pytest-timeout is installed
ALLOWED_SKIPS = ("needs 2 CUDA devices",)  # a one-GPU machine skips the NCCL test; any other skip fails the target

PACKAGES = ("torch", "diffusers", "pytest")  # found before anything starts (the worker imports them)
TARGET_SPEEDUP_TRANSLATION, TARGET_SECONDS_TRANSLATION = 2.0, 0.3
TARGET_PEAK_FRACTION, TARGET_SPEEDUP_TRAINING = 0.30, 1.3


def write_json(path: Path, document: dict) -> None:
    """Atomically (a temporary beside it, then a rename), so that a kill leaves the previous version."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stop(process: subprocess.Popen) -> None:
    """Kill ``process`` and what it started (its own session: compile workers, pytest-xdist's)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Check:
    """The run's record (OUT_DIR/gpu_check.json) and its budget."""

    def __init__(self, out: Path, dry_run: bool, budget: float):
        self.out, self.dry_run = out, dry_run
        self.start = time.time()
        self.deadline = self.start + budget
        self.document = {
            "check": "cdiff GPU check (benchmarks/gpu_check.sh)",
            "mode": "dry-run: CPU, tiny sizes, figures mean nothing" if dry_run else "gpu",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "budget_s": budget, "elapsed_s": 0.0, "device": {}, "versions": {}, "parts": {}, "targets": [],
        }
        self.path = out / "gpu_check.json"
        self.save()

    def left(self) -> float:
        return self.deadline - time.time()

    def set_part(self, name: str, record: dict) -> None:
        self.document["parts"][name] = record
        if name == "preflight":
            self.document["device"] = record.get("device", {})
            self.document["versions"] = record.get("versions", {})
        self.save()

    def save(self) -> None:
        self.document["elapsed_s"] = round(time.time() - self.start, 1)
        write_json(self.path, self.document)


# --- the worker's parts ---------------------------------------------------------------------------


def run_parts(check: Check, parts: list[str], deadline: float, python: str) -> None:
    """Run ``parts`` in workers (benchmarks/gpu_parts.py) until each has a record; stop a part past
    its cap; after a failed or stopped part, a new worker takes the parts left."""
    log = check.out / "worker.log"
    status_path = Path(tempfile.mkdtemp(prefix="gpu_check.")) / "status.json"
    left = list(parts)
    while left:
        if time.time() > deadline:  # no worker started only to skip
            for name in left:
                check.set_part(name, {"status": "skipped: budget (none left for the parts)"})
                announce(name, check.document["parts"][name])
            return
        status_path.unlink(missing_ok=True)
        command = [python, str(WORKER), str(status_path), *left, "--deadline", str(deadline), "--plan", json.dumps(PLAN)]
        if check.dry_run:
            command.append("--dry-run")
        with log.open("a") as handle:
            handle.write(f"\n$ {' '.join(command)}\n")
            handle.flush()
            # The worker imports benchmarks.common and cdiff from this checkout: the root goes first on its path.
            path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
            worker = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": path})
        shown, stopped = set(), None
        while True:
            finished = worker.poll() is not None
            status = read_json(status_path)
            for name, record in status.get("parts", {}).items():  # figures as they come
                check.document["parts"][name] = record
            current, since = status.get("current"), status.get("since")
            if not finished and current and since:
                cap = PLAN[current][0]
                if time.time() > min(since + cap, deadline) + GRACE_S:
                    stop(worker)
                    stopped, finished = current, True
                    status = read_json(status_path)
            for name, record in status.get("parts", {}).items():
                if name not in shown and record.get("status") != "running" and name != stopped:
                    shown.add(name)
                    check.set_part(name, record)
                    announce(name, record)
            if finished:
                break
            check.save()
            time.sleep(0.5)
        records = status.get("parts", {})
        if stopped:
            seconds = time.time() - status["since"]
            check.set_part(stopped, {**records.get(stopped, {}), "status": f"stopped after {seconds:.0f} s "
                                     f"(its cap: {PLAN[stopped][0]} s, or the budget)", "seconds": round(seconds, 1)})
            announce(stopped, check.document["parts"][stopped])
        elif status.get("current"):  # the worker died inside a part (a crash, the kernel's OOM killer)
            name = status["current"]
            check.set_part(name, {**records.get(name, {}), "status": f"failed: the worker exited ({worker.returncode}) "
                                  f"inside it; see worker.log"})
            announce(name, check.document["parts"][name])
        done = [name for name in left if name in check.document["parts"]
                and check.document["parts"][name].get("status") != "running"]
        if any(str(check.document["parts"][n].get("status", "")).startswith("failed") for n in done):
            print(tail(log), flush=True)
        if not done:  # no progress (the worker could not even start): report the parts left as failed
            for name in left:
                check.set_part(name, {"status": f"failed: the worker exited ({worker.returncode}) before it; see worker.log"})
            print(tail(log), flush=True)
            return
        if "preflight" in done and check.document["parts"]["preflight"].get("status") != "ok":
            return
        left = [name for name in left if name not in done]


def announce(name: str, record: dict) -> None:
    seconds = record.get("seconds")
    print(f"== {name}: {record.get('status')}" + (f" ({seconds:.0f} s)" if seconds is not None else ""), flush=True)


# --- the tests ------------------------------------------------------------------------------------

# "tests/x.py::test_y[a] PASSED [ 10%]" (pytest -v), "[gw1] [ 10%] PASSED tests/x.py::test_y[a]"
# (pytest-xdist), and the summary's "FAILED tests/x.py::test_y - message".
OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
RESULT_LINE = re.compile(rf"^(?:\[gw\d+\] \[\s*\d+%\] )?(?P<a>{OUTCOMES}) (?P<anode>\S+::\S+)"
                         rf"|^(?P<bnode>\S+::\S+) (?P<b>{OUTCOMES})\b")
SKIP_LINE = re.compile(r"^SKIPPED \[(\d+)\] (\S+?):(?:\d+: )?(.*)$")


def parse_pytest_log(text: str) -> dict:
    """Each test's outcome (a failure or an error overrides a pass: a test can pass, then fail in
    its teardown), the counts, and the skip reasons, from a ``pytest -v -rfEs`` log."""
    outcomes: dict[str, str] = {}
    skips = []
    for line in text.splitlines():
        match = RESULT_LINE.match(line)
        if match:
            outcome = (match["a"] or match["b"]).lower()
            node = match["anode"] or match["bnode"]
            if outcomes.get(node) not in ("failed", "error"):
                outcomes[node] = outcome
            continue
        skip = SKIP_LINE.match(line)
        if skip:
            skips.append({"count": int(skip[1]), "where": skip[2], "reason": skip[3].strip()})
    counts = Counter(outcomes.values())
    return {"passed": counts["passed"], "failed": counts["failed"], "errors": counts["error"],
            "skipped": counts["skipped"], "not_passed": sorted(n for n, o in outcomes.items() if o in ("failed", "error")),
            "skips": skips}


def run_tests(check: Check, python: str) -> None:
    log, xml = check.out / "tests.log", check.out / "tests.xml"
    command = [python, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={xml}", *CUDA_TESTS]
    if check.dry_run:
        command += ["-k", DRY_RUN_SELECTION]
    else:
        if importlib.util.find_spec("xdist"):
            command += ["-n", "4"]  # Triton and Inductor compile on the CPU: four at a time
        if importlib.util.find_spec("pytest_timeout"):
            command += [f"--timeout={TEST_TIMEOUT_S}"]
    cap = check.left()
    check.set_part("tests", {"status": "running", "command": " ".join(command[1:])})
    start = time.time()
    with log.open("w") as handle:
        tests = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            code = tests.wait(timeout=max(cap, 1))
            status = "ok" if code in (0, 1) else f"failed: pytest exited {code} (see tests.log)"
        except subprocess.TimeoutExpired:
            stop(tests)
            code, status = None, f"stopped after {time.time() - start:.0f} s: the budget (results so far below)"
    record = {"status": status, "seconds": round(time.time() - start, 1), "exit_code": code,
              **parse_pytest_log(log.read_text(errors="replace")), "command": " ".join(command[1:])}
    check.set_part("tests", record)
    announce("tests", record)
    if code not in (0,):
        print(tail(log, 25), flush=True)


# --- targets and the table ------------------------------------------------------------------------


def fastest(impls: dict, key: str, prefix: str = "cdiff") -> tuple[str | None, dict]:
    """The ``prefix`` implementation with the largest ``key``."""
    candidates = {name: figures for name, figures in impls.items() if name.startswith(prefix) and figures.get(key)}
    if not candidates:
        return None, {}
    name = max(candidates, key=lambda n: candidates[n][key])
    return name, candidates[name]


def evaluate_targets(document: dict) -> list[dict]:
    """The targets (docs/gpu-check.md), each {name, what, target, value, met}; met is None where the figure is missing."""
    parts, targets = document["parts"], []
    hopper = any(key in document["device"].get("name", "") for key in ("H100", "H200"))

    translate = parts.get("translate", {})
    speedup, seconds = translate.get("fastest_speedup"), translate.get("fastest_s")
    targets.append(dict(name="translation_speedup", what="512-px translation, batch 1, DDIM-50: cdiff's fastest path vs "
                        "the diffusers loop", target=f">= {TARGET_SPEEDUP_TRANSLATION}x", value=speedup,
                        met=None if speedup is None else speedup >= TARGET_SPEEDUP_TRANSLATION))
    targets.append(dict(name="translation_seconds", what="the same, seconds per translation",
                        target=f"< {TARGET_SECONDS_TRANSLATION} s on an H100/H200", value=seconds,
                        met=None if seconds is None or not hopper else seconds < TARGET_SECONDS_TRANSLATION))

    unet, peak = parts.get("unet", {}), parts.get("peak", {}).get("tflops")
    name, figures = fastest(unet.get("impls", {}), "tflops")
    fraction = figures["tflops"] / peak if figures and peak else None
    targets.append(dict(name="unet_peak_fraction", what=f"U-Net forward, batch 16: fastest cdiff ({name}) TFLOP/s over the "
                        "measured bf16 peak", target=f">= {TARGET_PEAK_FRACTION:.0%}", value=fraction,
                        met=None if fraction is None else fraction >= TARGET_PEAK_FRACTION))

    train = parts.get("train", {})
    release = train.get("impls", {}).get("release", {})
    name, figures = fastest(train.get("impls", {}), "images_per_s")
    ratio = figures["images_per_s"] / release["images_per_s"] if figures and release.get("images_per_s") else None
    memory_ok = None
    if figures and figures.get("peak_mb") is not None and release.get("peak_mb") is not None:
        memory_ok = figures["peak_mb"] <= release["peak_mb"]
    elif ratio is not None and document["mode"] != "gpu":
        memory_ok = True  # the CPU has no per-model peak (the process's resident set is the same for all)
    targets.append(dict(name="training_speedup", what=f"256-px training step: fastest cdiff ({name}) vs the release, "
                        "images/s at no more peak memory", target=f">= {TARGET_SPEEDUP_TRAINING}x, memory <= release's",
                        value=ratio, met=None if ratio is None or memory_ok is None
                        else ratio >= TARGET_SPEEDUP_TRAINING and memory_ok))

    tests = parts.get("tests", {})
    unexpected = [s for s in tests.get("skips", []) if not any(a in s["reason"] for a in ALLOWED_SKIPS)]
    complete = tests.get("exit_code") in (0, 1)
    targets.append(dict(name="cuda_tests", what="every CUDA-only test passes", target="all pass (2-GPU test may skip)",
                        value=f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
                              f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped",
                        met=None if not tests else complete and tests.get("passed", 0) > 0 and not tests.get("failed")
                        and not tests.get("errors") and not unexpected))
    return targets


def number(value, unit: str = "", digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}{unit}"


def table(document: dict) -> str:
    """The short table printed last: figures, targets, and whether each is met."""
    parts, versions, device = document["parts"], document["versions"], document["device"]
    gpu = document["mode"] == "gpu"
    lines = [f"cdiff GPU check{'' if gpu else ' (DRY RUN on the CPU: tiny sizes, the figures mean nothing)'}: "
             f"{device.get('name', '?')}; torch {versions.get('torch', '?')}, CUDA {versions.get('cuda', '?')}, "
             f"Triton {versions.get('triton', '?')}, diffusers {versions.get('diffusers', '?')}; "
             f"{document['elapsed_s']:.0f} s of a {document['budget_s']:.0f}-s budget",
             "parts: " + ", ".join(f"{name} {str(record.get('status', '?'))[:70]}" for name, record in parts.items()),
             "", "| figure | value | target | met |", "|---|---|---|---|"]
    met = {t["name"]: t for t in document["targets"]}

    def verdict(name: str) -> str:
        value = met[name]["met"]
        return "-" if value is None else ("yes" if value else "NO")

    peak = parts.get("peak", {})
    lines.append(f"| {peak.get('dtype', 'bf16')} matrix product, measured | {number(peak.get('tflops'), ' TFLOP/s', 4)} "
                 f"(data sheet {number(peak.get('datasheet_tflops'), '', 4)}) | | |")
    tr = parts.get("translate", {})
    label = f"translation {tr.get('size', '?')} px, batch 1, {tr.get('steps', '?')} DDIM steps, {tr.get('dtype', '?')}"
    lines.append(f"| {label}: diffusers loop | {number(tr.get('diffusers_s'), ' s')} | | |")
    lines.append(f"| ... cdiff default (NCHW, eager) | {number(tr.get('cdiff_s'), ' s')}, "
                 f"{number(tr.get('cdiff_speedup'), 'x')} | | |")
    lines.append(f"| ... cdiff fastest (channels-last, compiled, CUDA graph) | {number(tr.get('fastest_s'), ' s')}, "
                 f"{number(tr.get('fastest_speedup'), 'x')} | >= {TARGET_SPEEDUP_TRANSLATION:g}x; "
                 f"< {TARGET_SECONDS_TRANSLATION} s | {verdict('translation_speedup')}; {verdict('translation_seconds')} |")
    unet = parts.get("unet", {})
    name, figures = fastest(unet.get("impls", {}), "tflops")
    fraction = met["unet_peak_fraction"]["value"]
    lines.append(f"| U-Net forward, batch {unet.get('batch', '?')}, {unet.get('side', '?')}x{unet.get('side', '?')} latent: "
                 f"fastest cdiff ({name}) | {number(figures.get('tflops'), ' TFLOP/s')} = "
                 f"{'-' if fraction is None else f'{fraction:.0%}'} of measured peak (diffusers "
                 f"{number(unet.get('impls', {}).get('diffusers', {}).get('tflops'), '')}) | "
                 f">= {TARGET_PEAK_FRACTION:.0%} | {verdict('unet_peak_fraction')} |")
    train = parts.get("train", {})
    release = train.get("impls", {}).get("release", {})
    name, figures = fastest(train.get("impls", {}), "images_per_s")
    label = f"training step {train.get('size', '?')} px, batch {train.get('batch', '?')}, {train.get('precision', '?')}"
    lines.append(f"| {label}: release | {number(release.get('images_per_s'), ' img/s')}, "
                 f"{number(release.get('peak_mb'), ' MiB', 4)} | | |")
    lines.append(f"| ... fastest cdiff ({name}) | {number(figures.get('images_per_s'), ' img/s')} "
                 f"({number(met['training_speedup']['value'], 'x')}), {number(figures.get('peak_mb'), ' MiB', 4)} | "
                 f">= {TARGET_SPEEDUP_TRAINING}x, no more memory | {verdict('training_speedup')} |")
    lines.append(f"| CUDA tests | {met['cuda_tests']['value']} | all pass | {verdict('cuda_tests')} |")
    lines.append(f"JSON: {document.get('json', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for gpu_check.json and the logs (made if missing)")
    parser.add_argument("--dry-run", action="store_true", help="run the whole script on the CPU at tiny sizes")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for everything (default: {BUDGET_S}; dry run: 600)")
    args = parser.parse_args(argv)
    budget = args.budget or (600 if args.dry_run else BUDGET_S)
    missing = [name for name in PACKAGES + (() if args.dry_run else ("triton",)) if importlib.util.find_spec(name) is None]
    if missing:
        print(f"gpu_check: missing package(s) {', '.join(missing)} for {sys.executable}; on the GPU machine carry them as "
              f"wheels (docs/gpu-check.md)", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # The parts run the Triton kernels on the GPU, or not at all (the dry run's CPU): never in
    # Triton's interpreter, which a test session sets (tests/conftest.py sets it again for pytest).
    os.environ.pop("TRITON_INTERPRET", None)
    check = Check(args.out_dir, args.dry_run, budget)
    check.document["json"] = str(check.path)
    print(f"gpu_check: {'dry run on the CPU' if args.dry_run else 'GPU'}, budget {budget:.0f} s, into {args.out_dir}",
          flush=True)
    run_parts(check, list(PLAN), check.deadline - TESTS_RESERVE, sys.executable)
    preflight = check.document["parts"].get("preflight", {})
    if preflight.get("status") != "ok":
        check.save()
        print(f"gpu_check: stopped before any long part: preflight {preflight.get('status')} (traceback: worker.log, "
              f"{check.path})", file=sys.stderr)
        return 2
    run_tests(check, sys.executable)
    check.document["targets"] = evaluate_targets(check.document)
    check.save()
    print(table(check.document), flush=True)
    ran = all(record.get("status") == "ok" for record in check.document["parts"].values())
    if args.dry_run:  # the targets are computed (the code runs) but mean nothing at tiny sizes
        return 0 if ran else 1
    # Every target met; the 0.3-s one is only set for an H100/H200 (None elsewhere).
    checked = [t for t in check.document["targets"] if not (t["name"] == "translation_seconds" and t["met"] is None)]
    return 0 if ran and all(t["met"] for t in checked) else 1


if __name__ == "__main__":
    sys.exit(main())
