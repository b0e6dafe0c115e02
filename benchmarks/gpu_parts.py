"""The measurements of the one-command GPU check, run by benchmarks/gpu_check.py in a worker process.

    python benchmarks/gpu_parts.py STATUS_FILE --deadline EPOCH --plan JSON [--dry-run] PART...

Each part records its figures into STATUS_FILE (JSON, rewritten atomically) as soon as it has
them, under the part's name, and STATUS_FILE says which part runs since when: the driver stops a
part that outlasts its cap and keeps what the part had measured. A part that raises is recorded
as failed and ends the worker (a CUDA error can leave the device unusable for the rest of the
process); the driver starts another worker for the parts left. A part starts only when the
deadline leaves it the seconds the plan says it needs; else it is recorded as skipped.

Parts, at the GPU's sizes (``--dry-run``: the same code on the CPU at DRY_RUN's tiny sizes):
- ``preflight``: the packages import (torch, Triton, diffusers' three modules, pytest, cdiff from
  this checkout and its Triton kernels) and the device is a working CUDA device; the versions.
- ``peak``: the device's bf16 matrix-product rate, measured: the median time of products of
  random 8192 x 8192 and 16384 x 16384 matrices, the faster of the two sizes.
- ``translate``: one 512 x 512 translation at batch 1 with 50 DDIM steps in bf16 (VAE encode, the
  sampling loop, VAE decode) on the same seeded random SD 2.1 weights: the release's loop on
  diffusers' modules against cdiff's default path (``Pipeline.translate``), interleaved; then
  against cdiff's fastest path (channels-last, ``Pipeline.compile()``, ``cuda_graph=True``),
  interleaved again.
- ``unet``: one forward of the C-DiffSET U-Net at batch 16 on 64 x 64 latents (512-px images) in
  bf16: diffusers', cdiff's NCHW and channels-last, interleaved; then channels-last compiled;
  TFLOP/s of each (the driver divides by the measured peak).
- ``train``: one training step at 256 px in bf16 autocast (benchmarks/bench_train.py): the
  release's against cdiff's NCHW and channels-last, interleaved, batch 64 halved until it fits;
  then cdiff's with the fused kernels (SDPA's fused attention, the Triton GroupNorm+SiLU) on its
  own; images/s and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
from benchmarks import common
from cdiff.files import atomic_path

FASTEST_TRANSLATION = "cdiff-cl-compiled-graph"


@dataclass(frozen=True)
class Sizes:
    """What each part measures at, on which device."""

    device: str
    dtype: str  # of the peak, the translation and the U-Net forward
    tiny: bool  # cdiff's tiny presets instead of SD 2.1's sizes
    matmul_sides: tuple[int, ...]
    image: int  # translation: image side in px
    steps: int  # translation: DDIM steps
    unet_batch: int
    unet_side: int  # U-Net forward: latent side (image side / 8)
    train_image: int
    train_batch: int  # the first batch tried; halved while it does not fit
    train_precision: str
    train_impls: tuple[str, ...]  # of bench_train.IMPLEMENTATIONS, timed interleaved
    train_fused: tuple[str, ...]  # timed after them, on their own
    warmup: int  # untimed calls of each implementation first
    repeats: int  # timed interleaved rounds (translation, U-Net)
    train_steps: int  # timed steps per block (training; 2 rounds of blocks)
    compile_options: tuple[tuple[str, object], ...]  # torch.compile's keyword arguments
    compile_start_s: float  # a compiled stage starts only with this much of its part's time left
    fused_start_s: float  # the same for the training step with the fused kernels


GPU = Sizes(device="cuda", dtype="bf16", tiny=False, matmul_sides=(8192, 16384), image=512, steps=50,
            unet_batch=16, unet_side=64, train_image=256, train_batch=64, train_precision="bf16",
            train_impls=("release", "cdiff", "cdiff-cl"), train_fused=("cdiff-cl-fused",),
            warmup=2, repeats=5, train_steps=4, compile_options=(), compile_start_s=60.0, fused_start_s=30.0)
# The same code on the CPU, to prove the script before a GPU is spent on it. torch.compile with
# the "eager" backend: Dynamo traces as on the GPU, but no Inductor (minutes on 2 cores); the CUDA
# graph is cdiff.graphs.eager_capture, the CPU stand-in the tests use.
DRY_RUN = Sizes(device="cpu", dtype="bf16", tiny=True, matmul_sides=(128, 256), image=64, steps=2,
                unet_batch=2, unet_side=8, train_image=64, train_batch=2, train_precision="bf16",
                train_impls=("release", "cdiff", "cdiff-cl"), train_fused=("cdiff-cl-fused",),
                warmup=1, repeats=2, train_steps=1, compile_options=(("backend", "eager"),), compile_start_s=0.0,
                fused_start_s=0.0)


class Status:
    """The worker's record, rewritten atomically at every change:
    {"current": the running part or None, "since": its start (epoch s), "parts": {part: {...}}}."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = {"current": None, "since": None, "parts": {}}

    def start(self, part: str) -> None:
        self.data.update(current=part, since=time.time())
        self.data["parts"][part] = {"status": "running"}
        self.write()

    def record(self, part: str, **values) -> None:
        self.data["parts"].setdefault(part, {}).update(values)
        self.write()

    def finish(self) -> None:
        self.data.update(current=None, since=None)
        self.write()

    def write(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(finite(self.data), indent=1))


def finite(value):
    """``value`` with NaN and infinities as None (strict JSON) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# --- the parts ----------------------------------------------------------------------------------


def part_preflight(sizes: Sizes, record, deadline: float) -> None:
    if sizes.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"no CUDA device visible to torch {torch.__version__} (CUDA build "
                           f"{torch.version.cuda or 'none'}); --dry-run checks the script on the CPU")
    import diffusers
    import pytest  # noqa: F401 (the driver runs the CUDA tests with it)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: F401

    import cdiff

    where = Path(cdiff.__file__).resolve().parent
    if where != ROOT / "cdiff":
        raise RuntimeError(f"cdiff is imported from {where}, not from this checkout ({ROOT}): put {ROOT} first on "
                           f"PYTHONPATH (gpu_check.sh does)")
    versions = common.versions()
    versions["cdiff"] = cdiff.__version__
    versions["diffusers"] = diffusers.__version__
    if sizes.device == "cuda":
        import triton  # noqa: F401 (the kernels need it on a GPU)

        from cdiff.kernels import confidence_nll, group_norm_silu  # noqa: F401

        x = torch.randn(256, 256, device="cuda")
        if not torch.isfinite((x @ x).sum()).item():
            raise RuntimeError("a matrix product on the CUDA device gave a non-finite result")
        props = torch.cuda.get_device_properties(0)
        device = {"name": props.name, "count": torch.cuda.device_count(), "memory_gb": round(props.total_memory / 2**30, 1),
                  "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}
        versions["cudnn"] = str(torch.backends.cudnn.version())
    else:
        device = {"name": common.device_name(torch.device("cpu")), "count": 0}
    record(device=device, versions=versions)
    print(f"preflight: {device['name']}; " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)


def part_peak(sizes: Sizes, record, deadline: float) -> None:
    device, dtype = torch.device(sizes.device), common.DTYPES[sizes.dtype]
    rates = {}
    for side in sizes.matmul_sides:
        gen = torch.Generator(device=device).manual_seed(side)
        a, b = (torch.randn(side, side, generator=gen, device=device).to(dtype) for _ in range(2))  # random data, not zeros
        out = torch.empty(side, side, device=device, dtype=dtype)

        def product():
            torch.mm(a, b, out=out)

        for _ in range(3):
            product()
        seconds = statistics.median(common.time_once(product, device) for _ in range(10))
        rates[str(side)] = 2 * side**3 / seconds / 1e12
        record(matmul_tflops=dict(rates))
        del a, b, out
    record(dtype=sizes.dtype, tflops=max(rates.values()), datasheet_tflops=common.peak_tflops(device, dtype))


def part_translate(sizes: Sizes, record, deadline: float) -> None:
    from benchmarks import bench_translate

    device, dtype = torch.device(sizes.device), common.DTYPES[sizes.dtype]
    theirs, ours = common.load_diffusers_twins(sizes.tiny, vae=True, device=device)
    context = torch.randn(6, ours[0].config.context_dim, generator=torch.Generator().manual_seed(0))
    names = ["diffusers", "cdiff", FASTEST_TRANSLATION]
    impls, pipe = bench_translate.implementations(theirs, ours, context, device, dtype, sizes.steps, names,
                                                  dict(sizes.compile_options))
    gen = torch.Generator().manual_seed(1)
    sar = (torch.rand(1, 3, sizes.image, sizes.image, generator=gen) * 2 - 1).to(device, dtype)
    noise = torch.randn(1, 4, sizes.image // 8, sizes.image // 8, generator=gen).to(device)
    calls = {name: (lambda f: lambda: f(sar, noise))(f) for name, f in impls.items()}
    record(preset="tiny" if sizes.tiny else "sd21", size=sizes.image, steps=sizes.steps, batch=1, dtype=sizes.dtype)
    with torch.no_grad():
        record(tflop=bench_translate.translation_flops(pipe, sar, noise, sizes.steps) / 1e12)
        reference, default = calls["diffusers"]().float(), calls["cdiff"]().float()
        record(difference=relative_difference(default, reference.clamp(-1, 1)))  # cdiff clamps to [-1, 1]
        # One more untimed call each: the calls above were the first (lazy initialisation, cuDNN's choices).
        seconds = common.interleaved({n: calls[n] for n in ("diffusers", "cdiff")}, device, 1, sizes.repeats)
    record(diffusers_s=seconds["diffusers"], cdiff_s=seconds["cdiff"], cdiff_speedup=seconds["diffusers"] / seconds["cdiff"])

    left = deadline - time.time()
    if left < sizes.compile_start_s:
        record(fastest=f"skipped: budget ({left:.0f} s of the part left, {sizes.compile_start_s:.0f} needed)")
        return
    with torch.no_grad():
        start = time.perf_counter()
        fastest = calls[FASTEST_TRANSLATION]().float()  # compiles, then captures the CUDA graph
        common.sync(device)
        record(fastest=FASTEST_TRANSLATION, fastest_first_call_s=time.perf_counter() - start,
               fastest_difference=relative_difference(fastest, default))
        seconds = common.interleaved({n: calls[n] for n in ("diffusers", FASTEST_TRANSLATION)}, device, 1,
                                     sizes.repeats)
    record(fastest_s=seconds[FASTEST_TRANSLATION], diffusers_again_s=seconds["diffusers"],
           fastest_speedup=seconds["diffusers"] / seconds[FASTEST_TRANSLATION])


def part_unet(sizes: Sizes, record, deadline: float) -> None:
    from benchmarks import bench_unet

    device, dtype = torch.device(sizes.device), common.DTYPES[sizes.dtype]
    theirs, ours = common.load_diffusers_twins(sizes.tiny, device=device)
    names = ["diffusers", "cdiff", "cdiff-cl", "cdiff-cl-compiled"]
    impls = bench_unet.forward_implementations(theirs[0], ours[0], device, dtype, names, dict(sizes.compile_options))
    calls, flops = bench_unet.forward_calls(impls, ours[0], sizes.unet_batch, sizes.unet_side, device, dtype,
                                            torch.Generator().manual_seed(0))
    record(preset="tiny" if sizes.tiny else "sd21", batch=sizes.unet_batch, side=sizes.unet_side, dtype=sizes.dtype,
           tflop=flops / 1e12)
    measured = {}

    def keep(seconds: dict) -> None:
        for name, sec in seconds.items():
            measured[name] = {"ms": sec * 1e3, "tflops": flops / sec / 1e12}
        record(impls=measured)

    keep(common.interleaved({n: calls[n] for n in names[:3]}, device, sizes.warmup, sizes.repeats))
    left = deadline - time.time()
    if left < sizes.compile_start_s:
        record(compiled=f"skipped: budget ({left:.0f} s of the part left, {sizes.compile_start_s:.0f} needed)")
        return
    start = time.perf_counter()
    calls["cdiff-cl-compiled"]()  # compiles
    common.sync(device)
    record(compiled_first_call_s=time.perf_counter() - start)
    keep(common.interleaved({n: calls[n] for n in ("cdiff-cl", "cdiff-cl-compiled")}, device, sizes.warmup,
                            sizes.repeats))


def part_train(sizes: Sizes, record, deadline: float) -> None:
    from benchmarks import bench_train

    device = torch.device(sizes.device)
    record(preset="tiny" if sizes.tiny else "sd21", size=sizes.train_image, precision=sizes.train_precision)
    if device.type == "cuda":
        record(resident_mb_at_start=torch.cuda.memory_allocated(device) / 2**20)

    def measure(impls, batch: int) -> dict:
        args = SimpleNamespace(size=sizes.train_image, tiny=sizes.tiny, impls=list(impls), precision=sizes.train_precision,
                               warmup=sizes.warmup, steps=sizes.train_steps, rounds=2)
        return bench_train.run(args, device, batch)

    batch, measured, too_large = sizes.train_batch, None, []
    while measured is None:
        try:
            measured = measure(sizes.train_impls, batch)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            too_large.append(batch)
            record(out_of_memory_at=too_large)
        if measured is None:  # out of the except block: the failed attempt's tensors are free now
            gc.collect()
            torch.cuda.empty_cache()
            batch //= 2
    flops, impls = measured["flops"], {}

    def keep(results: dict) -> None:
        for name, (seconds, peak) in results.items():
            impls[name] = {"ms": seconds * 1e3, "images_per_s": batch / seconds, "tflops": flops / seconds / 1e12,
                           "peak_mb": peak if device.type == "cuda" else None}
        record(batch=batch, tflop=flops / 1e12, impls=impls)

    keep(measured["results"])
    # The fused kernels on their own, after the figures above are safe: a failure here (a kernel at
    # full size for the first time) leaves them recorded.
    left = deadline - time.time()
    if sizes.train_fused and left < sizes.fused_start_s:
        record(fused=f"skipped: budget ({left:.0f} s of the part left)")
    elif sizes.train_fused:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        keep(measure(sizes.train_fused, batch)["results"])


PARTS = {"preflight": part_preflight, "peak": part_peak, "translate": part_translate, "unet": part_unet,
         "train": part_train}


def release_memory() -> None:
    """Between parts: forget compiled graphs and cached blocks, so the next part starts clean."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("status", type=Path, help="the JSON file this worker writes")
    parser.add_argument("parts", nargs="+", choices=sorted(PARTS))
    parser.add_argument("--deadline", type=float, required=True, help="no part starts after this (epoch seconds)")
    parser.add_argument("--plan", type=json.loads, required=True,
                        help='{part: [cap seconds, seconds needed to start]} as JSON')
    parser.add_argument("--dry-run", action="store_true", help="the CPU at tiny sizes")
    args = parser.parse_args(argv)
    sizes = DRY_RUN if args.dry_run else GPU
    with cpu_stand_ins(sizes.device == "cpu"):
        return run_parts(args, sizes)


@contextlib.contextmanager
def cpu_stand_ins(enabled: bool):
    """On the CPU: one torch thread (a shared machine, where two spinning OpenMP threads run many
    times slower) and cdiff.graphs.eager_capture for the CUDA graph; both undone at the end."""
    from cdiff import graphs
    from cdiff.pipeline import Pipeline

    threads, capture = torch.get_num_threads(), Pipeline.__dict__["_capture"]
    if enabled:
        torch.set_num_threads(1)
        Pipeline._capture = staticmethod(graphs.eager_capture)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        Pipeline._capture = capture


def run_parts(args, sizes: Sizes) -> int:
    """Run ``args.parts`` in order; 0, or 2 / 3 when the preflight / another part failed."""
    status = Status(args.status)
    for name in args.parts:
        cap, needed = args.plan[name]
        left = args.deadline - time.time()
        if left < needed:
            status.record(name, status=f"skipped: budget ({left:.0f} s left, {needed} s needed)")
            continue
        status.start(name)
        start = time.time()
        print(f"== {name}", flush=True)
        try:
            PARTS[name](sizes, lambda **values: status.record(name, **values), start + min(cap, left))
        except Exception as error:
            traceback.print_exc()
            status.record(name, status=f"failed: {type(error).__name__}: {error}"[:600],
                          seconds=round(time.time() - start, 1), traceback=traceback.format_exc()[-4000:])
            status.finish()
            return 2 if name == "preflight" else 3
        status.record(name, status="ok", seconds=round(time.time() - start, 1))
        status.finish()
        release_memory()
    return 0


if __name__ == "__main__":
    sys.exit(main())
