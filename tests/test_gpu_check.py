"""benchmarks/gpu_check.sh: the dry run end to end on the CPU (so that the GPU run cannot fail on a
typo), and the driver's own logic: a part past its cap is stopped and the rest still run, a
failed part hands over to a new worker, a failed preflight stops everything, the pytest log is
read in both of its formats, and the targets are judged as docs/gpu-check.md sets them."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("diffusers")


from benchmarks import gpu_check, gpu_parts  # noqa: E402


def test_dry_run_runs_every_part_and_writes_the_json_and_the_table(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("PYTHONPATH", None)  # the script puts the checkout there itself
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads((out / "gpu_check.json").read_text())
    assert document["mode"].startswith("dry-run")
    parts = document["parts"]
    assert list(parts) == ["preflight", "peak", "translate", "train", "unet", "tests"]
    assert all(record["status"] == "ok" for record in parts.values()), {k: v["status"] for k, v in parts.items()}
    assert {"torch", "cuda", "triton", "diffusers", "python"} <= set(document["versions"])
    assert document["device"]["name"].startswith("CPU")

    assert parts["peak"]["tflops"] > 0
    translate = parts["translate"]
    for key in ("diffusers_s", "cdiff_s", "fastest_s", "diffusers_again_s", "tflop"):
        assert translate[key] > 0, key
    assert translate["fastest"] == "cdiff-cl-compiled-graph"
    # The diffusers loop and both cdiff paths make the same image, up to bf16 rounding (measured
    # 0.034 and 0.037 of the image's range); a wrong scale, noise or step gives ~1.
    assert translate["difference"] < 0.1 and translate["fastest_difference"] < 0.1
    assert set(parts["unet"]["impls"]) == {"diffusers", "cdiff", "cdiff-cl", "cdiff-cl-compiled"}
    assert all(figures["tflops"] > 0 for figures in parts["unet"]["impls"].values())
    assert set(parts["train"]["impls"]) == {"release", "cdiff", "cdiff-cl", "cdiff-cl-fused"}
    assert all(figures["images_per_s"] > 0 for figures in parts["train"]["impls"].values())
    tests = parts["tests"]
    # Every CUDA-only test was collected and skipped on the CPU; none failed, none errored.
    assert tests["exit_code"] == 0 and tests["skipped"] >= 50 and tests["failed"] == tests["errors"] == 0
    assert all("CUDA" in skip["reason"] for skip in tests["skips"])

    targets = {t["name"]: t for t in document["targets"]}
    assert set(targets) == {"translation_speedup", "translation_seconds", "unet_peak_fraction", "training_speedup",
                            "cuda_tests"}
    assert targets["translation_seconds"]["met"] is None  # set for an H100/H200 only
    assert all(targets[n]["value"] is not None and targets[n]["met"] is not None for n in
               ("translation_speedup", "unet_peak_fraction", "training_speedup"))
    printed = done.stdout.rstrip().splitlines()
    assert printed[-1] == f"JSON: {out / 'gpu_check.json'}" and printed[-2].startswith("| CUDA tests |")
    assert (out / "gpu_check.log").read_text().rstrip().endswith(printed[-1])
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "gpu_check.log", "worker.log", "tests.log", "tests.xml"}


# --- the driver, with a stand-in worker --------------------------------------------------------

# Speaks the worker's protocol (benchmarks/gpu_parts.py: a status file rewritten at every change)
# without torch: "slow" hangs, "boom" raises, "bad" is a failed preflight, others finish at once.
FAKE_WORKER = textwrap.dedent("""
    import json, os, sys, time
    status, parts = sys.argv[1], [a for a in sys.argv[2:] if not a.startswith("--")][:-2]
    data = {"current": None, "since": None, "parts": {}}
    def write():
        with open(status + ".tmp", "w") as f:
            json.dump(data, f)
        os.replace(status + ".tmp", status)
    for name in parts:
        data.update(current=name, since=time.time()); data["parts"][name] = {"status": "running"}; write()
        if name == "slow":
            data["parts"][name]["figure"] = 1.5; write()
            time.sleep(60)
        if name in ("boom", "bad"):
            data["parts"][name] = {"status": "failed: RuntimeError: planted"}; data["current"] = None; write()
            sys.exit(3)
        data["parts"][name] = {"status": "ok", "seconds": 0.0}; data["current"] = None; write()
    """)


def test_driver_stops_a_part_past_its_cap_and_restarts_after_a_failure(tmp_path, monkeypatch):
    worker = tmp_path / "worker.py"
    worker.write_text(FAKE_WORKER)
    monkeypatch.setattr(gpu_check, "WORKER", worker)
    monkeypatch.setattr(gpu_check, "PLAN", {"fast": (5, 0), "slow": (1, 0), "boom": (5, 0), "last": (5, 0)})
    monkeypatch.setattr(gpu_check, "GRACE_S", 0.5)
    check = gpu_check.Check(tmp_path, dry_run=True, budget=60)
    start = time.time()
    gpu_check.run_parts(check, ["fast", "slow", "boom", "last"], check.deadline, sys.executable)
    assert time.time() - start < 20  # "slow" sleeps 60 s: it was stopped at its cap
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["fast"]["status"] == "ok" and parts["last"]["status"] == "ok"
    assert parts["slow"]["status"].startswith("stopped after") and parts["slow"]["figure"] == 1.5  # kept
    assert parts["boom"]["status"] == "failed: RuntimeError: planted"
    assert (tmp_path / "worker.log").read_text().count("$ ") == 3  # after "slow" and after "boom": a new worker


def test_driver_stops_after_a_failed_preflight(tmp_path, monkeypatch):
    worker = tmp_path / "worker.py"
    worker.write_text(FAKE_WORKER.replace('("boom", "bad")', '("boom", "preflight")'))
    monkeypatch.setattr(gpu_check, "WORKER", worker)
    monkeypatch.setattr(gpu_check, "PLAN", {"preflight": (5, 0), "fast": (5, 0)})
    check = gpu_check.Check(tmp_path, dry_run=True, budget=60)
    gpu_check.run_parts(check, ["preflight", "fast"], check.deadline, sys.executable)
    assert list(check.document["parts"]) == ["preflight"]


def test_missing_package_stops_the_driver_at_once(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert gpu_check.main([str(tmp_path / "out"), "--dry-run"]) == 2
    assert "missing package(s) diffusers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- the worker's own decisions ---------------------------------------------------------------


def test_worker_skips_a_part_the_budget_cannot_hold_and_records_a_failure(tmp_path, monkeypatch):
    status = tmp_path / "status.json"
    plan = json.dumps({"peak": [30, 5], "unet": [30, 0]})

    def planted(sizes, record, deadline):
        record(first=1.0)
        raise RuntimeError("planted")

    monkeypatch.setattr(gpu_parts, "PARTS", {**gpu_parts.PARTS, "unet": planted})
    code = gpu_parts.main([str(status), "peak", "unet", "--deadline", str(time.time() + 3), "--plan", plan, "--dry-run"])
    parts = json.loads(status.read_text())["parts"]
    assert code == 3  # a failed part ends the worker: the driver starts another for the rest
    assert parts["peak"]["status"].startswith("skipped: budget")  # 3 s left, 5 needed
    assert parts["unet"]["status"] == "failed: RuntimeError: planted" and parts["unet"]["first"] == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_preflight_refuses_a_machine_without_cuda(tmp_path):
    status = tmp_path / "status.json"
    code = gpu_parts.main([str(status), "preflight", "--deadline", str(time.time() + 60), "--plan",
                           json.dumps({"preflight": [60, 0]})])
    assert code == 2
    assert "no CUDA device visible" in json.loads(status.read_text())["parts"]["preflight"]["status"]


# --- reading pytest, judging the targets ------------------------------------------------------


def test_pytest_log_in_both_formats():
    log = textwrap.dedent("""\
        tests/a.py::test_x[fp16-cl] PASSED                                     [ 10%]
        tests/a.py::test_y SKIPPED (needs a CUDA device)                       [ 20%]
        tests/a.py::test_z PASSED                                              [ 30%]
        tests/a.py::test_z ERROR                                               [ 30%]
        [gw1] [ 50%] PASSED tests/b.py::test_p[bf16]
        [gw0] [ 60%] FAILED tests/b.py::test_q
        [gw2] [ 70%] SKIPPED tests/b.py::test_r
        =========================== short test summary info ============================
        SKIPPED [2] tests/b.py:157: needs 2 CUDA devices
        FAILED tests/b.py::test_q - AssertionError: off by 1.2e-01
        ======= 2 passed, 1 failed, 1 error, 2 skipped in 3.1s =======
        """)
    parsed = gpu_check.parse_pytest_log(log)
    assert (parsed["passed"], parsed["failed"], parsed["errors"], parsed["skipped"]) == (2, 1, 1, 2)
    assert parsed["not_passed"] == ["tests/a.py::test_z", "tests/b.py::test_q"]
    assert parsed["skips"] == [{"count": 2, "where": "tests/b.py", "reason": "needs 2 CUDA devices"}]


def document(**parts):
    base = {
        "translate": {"fastest_s": 0.25, "fastest_speedup": 5.0},
        "peak": {"tflops": 800.0},
        "unet": {"impls": {"diffusers": {"tflops": 300.0}, "cdiff-cl": {"tflops": 250.0},
                           "cdiff-cl-compiled": {"tflops": 320.0}}},
        "train": {"impls": {"release": {"images_per_s": 100.0, "peak_mb": 60000.0},
                            "cdiff": {"images_per_s": 120.0, "peak_mb": 50000.0},
                            "cdiff-cl": {"images_per_s": 140.0, "peak_mb": 55000.0}}},
        "tests": {"exit_code": 0, "passed": 150, "failed": 0, "errors": 0, "skipped": 1,
                  "skips": [{"count": 1, "where": "tests/t.py", "reason": "needs 2 CUDA devices"}]},
    }
    base.update(parts)
    return {"mode": "gpu", "device": {"name": "NVIDIA H200"}, "parts": base}


def verdicts(doc) -> dict:
    return {t["name"]: t["met"] for t in gpu_check.evaluate_targets(doc)}


def test_targets_are_judged_as_documented():
    assert verdicts(document()) == dict.fromkeys(
        ("translation_speedup", "translation_seconds", "unet_peak_fraction", "training_speedup", "cuda_tests"), True)
    unet = {t["name"]: t for t in gpu_check.evaluate_targets(document())}["unet_peak_fraction"]
    assert unet["value"] == 320.0 / 800.0 and "cdiff-cl-compiled" in unet["what"]  # the fastest cdiff, not diffusers
    slow = document(translate={"fastest_s": 0.35, "fastest_speedup": 1.9})
    assert not verdicts(slow)["translation_speedup"] and not verdicts(slow)["translation_seconds"]
    elsewhere = dict(document(), device={"name": "NVIDIA A100-SXM4-80GB"})
    assert verdicts(elsewhere)["translation_seconds"] is None  # the 0.3-s target names the H100/H200
    assert not verdicts(document(peak={"tflops": 1100.0}))["unet_peak_fraction"]  # 29%
    # Faster, but the fastest cdiff step takes more memory than the release's: missed.
    hungry = document(train={"impls": {"release": {"images_per_s": 100.0, "peak_mb": 50000.0},
                                       "cdiff-cl": {"images_per_s": 140.0, "peak_mb": 50001.0}}})
    assert not verdicts(hungry)["training_speedup"]
    assert not verdicts(document(train={"impls": {"release": {"images_per_s": 100.0, "peak_mb": 9.0},
                                                  "cdiff": {"images_per_s": 129.0, "peak_mb": 8.0}}}))["training_speedup"]
    skipped = document(tests={"exit_code": 0, "passed": 10, "failed": 0, "errors": 0, "skipped": 1,
                              "skips": [{"count": 1, "where": "tests/t.py", "reason": "needs a CUDA device"}]})
    assert not verdicts(skipped)["cuda_tests"]  # a CUDA test that skips on the GPU has not passed
    assert verdicts(document(translate={}, unet={}))["translation_speedup"] is None  # not measured: no verdict
