"""What every benchmark script shares: the device and its peaks, interleaved timing, FLOP counting,
the row appended to benchmarks/results.csv.

Conventions (benchmarks/README.md): implementations are timed in one process, interleaved (each
repeat runs every implementation once, in a rotating order), after warm-up, each call between
two synchronisations (CUDA events on a GPU); the figure is the median. FLOPs are counted once per
shape with torch.utils.flop_counter.FlopCounterMode (matrix products and convolutions: 2 per
multiply-add; attention included; elementwise work not counted).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from cdiff.config import DTYPES  # noqa: F401  (the benchmarks' --dtype names are cdiff's)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_CSV = ROOT / "benchmarks" / "results.csv"

# Dense tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name() (first match wins):
# (fp16/bf16 with fp32 accumulation, as PyTorch runs them; fp32 without TF32, PyTorch's default).
# From NVIDIA's data sheets, whose tensor figures are quoted "with sparsity": the dense figure is
# half of that. H100 SXM5 and H200 SXM: 1979 sparse -> 989.5 dense, fp32 67; H100 PCIe: 1513 ->
# 756.5, fp32 51; H100 NVL / H200 NVL: 1671 -> 835.5, fp32 60; A100 (SXM4 and PCIe): 624 -> 312,
# fp32 19.5; L40S: 733 -> 366 (data sheet: 362.05 dense), fp32 91.6; RTX A6000 (GA102
# whitepaper, fp16 with fp32 accumulation): 309.7 -> 154.8, fp32 38.7; RTX 4090 (Ada whitepaper,
# fp16/bf16 with fp32 accumulation): 330.4 -> 165.2, fp32 82.6.
PEAK_TFLOPS = [
    ("H200 NVL", 835.5, 60.0),
    ("H200", 989.5, 67.0),
    ("H100 NVL", 835.5, 60.0),
    ("H100 PCIe", 756.5, 51.0),
    ("H100", 989.5, 67.0),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("A100", 312.0, 19.5),
    ("L40S", 362.05, 91.6),
    ("A6000", 154.8, 38.7),  # "NVIDIA RTX A6000"
    ("RTX 4090", 165.2, 82.6),
]

# Peak memory bandwidth, GB/s, by the same kind of substring (vendor data sheets).
PEAK_GBPS = [
    ("H200", 4800),
    ("H100 NVL", 3900),
    ("H100 PCIe", 2000),
    ("H100", 3350),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("GH200", 4000),
    ("A100-SXM4-80GB", 2039),
    ("A100 80GB PCIe", 1935),
    ("A100", 1555),  # 40 GB SXM4 / PCIe
    ("L40S", 864),
    ("L40", 864),
    ("L4", 300),
    ("A6000", 768),
    ("RTX 4090", 1008),
    ("RTX 3090", 936),
    ("V100", 900),
    ("T4", 320),
]

CSV_FIELDS = ["date", "script", "figure", "impl", "device", "dtype", "settings", "clock", "ms", "ratio", "tflops",
              "peak_fraction", "peak_memory_mb", "cpu_load", "python", "torch", "cuda", "triton", "diffusers"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak for ``dtype`` (fp16/bf16 tensor cores, or fp32), None if unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, single in PEAK_TFLOPS:
        if key in name:
            return single if dtype == torch.float32 else half
    return None


def peak_gbps(device_name_: str) -> float | None:
    for key, gbps in PEAK_GBPS:
        if key in device_name_:
            return gbps
    return None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "-"}
    for name in ("triton", "diffusers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "-"
    return found


def cpu_load() -> float:
    """The 1-minute load average: on a shared machine, how busy the cores were."""
    return os.getloadavg()[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated memory since the last reset (CUDA); nan on the CPU, where it is not isolated."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_cpu_clock = time.perf_counter


def use_cpu_clock(name: str) -> None:
    """Time CPU runs on the wall clock, or on the calling thread's CPU time ("thread"): with one
    torch thread all the work runs on it, and on a busy machine the thread clock leaves out the
    time it waited for a core."""
    global _cpu_clock
    _cpu_clock = CLOCKS[name]


def time_once(fn: Callable, device: torch.device) -> float:
    """Seconds of one call of ``fn``, synchronised (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        fn()
        end.record()
        sync(device)
        return start.elapsed_time(end) / 1e3
    start = _cpu_clock()
    fn()
    return _cpu_clock() - start


def interleaved(fns: dict[str, Callable], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function: ``warmup`` untimed calls each, then ``repeats``
    rounds in which every function runs once, the order rotating from round to round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    names = list(fns)
    times = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_once(fns[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


def count_flops(fn: Callable) -> int:
    """FLOPs of one call of ``fn`` (run once under FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def fraction_of_peak(flops: int, seconds: float, device: torch.device, dtype: torch.dtype):
    """(achieved TFLOP/s, fraction of the device's peak or None when the peak is unknown, that
    fraction as text: "12.3%" or "-")."""
    achieved = flops / seconds / 1e12
    peak = peak_tflops(device, dtype)
    fraction = achieved / peak if peak else None
    return achieved, fraction, f"{fraction:.1%}" if fraction is not None else "-"


def append_csv(path: str | Path | None, rows: list[dict], script: str) -> None:
    """Append ``rows`` (keys of CSV_FIELDS; date, script, clock and versions filled in here) to
    ``path``; None or "" skips. ``script``: the benchmark's file (its ``__file__``)."""
    if not path or not rows:
        return
    path = Path(path)
    new = not path.exists()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    script = Path(script).name
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            clock = _clock_name() if row.get("device", "CPU").startswith("CPU") else "cuda-events"
            writer.writerow({"date": stamp, "script": script, "clock": clock, **versions(),
                             **{k: _cell(v) for k, v in row.items()}})


def _clock_name() -> str:
    return next(name for name, clock in CLOCKS.items() if clock is _cpu_clock)


def _cell(value):
    if isinstance(value, float):
        return "" if value != value else f"{value:.6g}"  # nan -> empty
    return "" if value is None else value


def add_common_arguments(parser, repeats: int | None = None, warmup: int | None = None) -> None:
    """--device, --csv, --threads, and --repeats / --warmup when given their defaults."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (default: %(default)s)")
    if warmup is not None:
        parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls per implementation first")
    parser.add_argument("--csv", default=str(RESULTS_CSV), help="append result rows here; '' for none (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 on a shared, busy machine, where "
                             "OpenMP threads spin-waiting on each other make 2 threads many times slower than 1")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="CPU runs: wall time, or the thread's CPU time (with --threads 1, on a busy machine)")


def apply_threads(args) -> None:
    """--threads and --clock."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        raise SystemExit("--clock thread counts one thread's CPU time: it needs --threads 1")
    use_cpu_clock(args.clock)


def header(device: torch.device, what: str) -> str:
    v = versions()
    load = f"; CPU load average {cpu_load():.1f}" if device.type == "cpu" else ""
    return (f"{what}\ndevice {device_name(device)}; python {v['python']}, torch {v['torch']}, CUDA {v['cuda']}, "
            f"triton {v['triton']}, diffusers {v['diffusers']}{load}")


def load_diffusers_twins(tiny: bool, unet_kwargs: dict | None = None, vae: bool = False, seed: int = 0,
                         device: str | torch.device = "cpu"):
    """(diffusers modules, cdiff modules) with the same seeded random weights: the U-Net
    (8-in/5-out) and, with ``vae``, the VAE; SD 2.1 sizes (cdiff/testing.py), or cdiff's tiny
    presets. Built on the meta device, then given memory and values on ``device`` (no init of 865M
    parameters; on a GPU the values are drawn there, so they differ from the CPU's for a seed).
    The cdiff modules share the diffusers modules' tensors until either is converted (``.to``)."""
    import diffusers

    import cdiff
    from cdiff.layouts.diffusers import UNET as UNET_TABLE
    from cdiff.layouts.diffusers import VAE as VAE_TABLE
    from cdiff.testing import SD21_UNET, SD21_VAE, randomize_, tiny_configs

    unet_config = dict(tiny_configs()[0] if tiny else SD21_UNET, in_channels=8, out_channels=5, **(unet_kwargs or {}))
    with torch.device("meta"):
        theirs = [diffusers.UNet2DConditionModel(**unet_config)]
        ours = [cdiff.UNet(cdiff.UNetConfig.tiny(in_channels=8, out_channels=5) if tiny else cdiff.UNetConfig.cdiffset())]
        if vae:
            theirs.append(diffusers.AutoencoderKL(**(tiny_configs()[1] if tiny else SD21_VAE)))
            ours.append(cdiff.VAE(cdiff.VAEConfig.tiny() if tiny else cdiff.VAEConfig.sd21()))
    for i, (model, table) in enumerate(zip(theirs, (UNET_TABLE, VAE_TABLE))):
        theirs[i] = randomize_(model.to_empty(device=device), seed + i).eval()
        ours[i].load_state_dict(table.rename(theirs[i].state_dict(), to="cdiff"), assign=True)
        ours[i].eval()
    return theirs, ours
