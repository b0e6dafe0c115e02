"""Benchmark of the C-Diff loss, forward + backward: the fused Triton kernel, PyTorch eager and
torch.compile, both on the reference (cdiff.loss.confidence_nll_reference).

    python -m benchmarks.bench_loss                       # fp32, the three sizes below
    python -m benchmarks.bench_loss --dtype bf16 --peak-gbps 3350

Reports, per size and implementation: milliseconds per forward+backward (median over repeats,
CUDA events after warm-up), GPU kernel launches per step (torch.profiler), and bandwidth.

Byte model (stated once, used for every implementation): the minimum any implementation must
move, i.e. read target, eps_hat (B*C*h*w each) and raw (B*h*w) once, write d eps_hat (B*C*h*w)
and d raw (B*h*w) once: (3*B*C*h*w + 2*B*h*w) * element size. "model GB/s" = those bytes / time.
The kernel's actual traffic adds a second read of the inputs (forward reads them for the loss,
backward reads them again to write both gradients with the incoming gradient applied before
rounding: (2*B*C*h*w + B*h*w) * element size); "actual GB/s" counts that too, and the bandwidth
target is checked on it. alpha_bar, the loss scalar and the partial sums are negligible.

Targets, checked on a GPU: kernel >= 3x faster than eager at the training sizes (64,4,32,32) and
(16,4,64,64); kernel actual bandwidth >= 70% of the card's peak at (64,4,256,256). The exit status
is 1 when a target is missed. Without a GPU the script times the eager reference on the CPU only
(the kernel and torch.compile are GPU benchmarks) and says so.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from benchmarks.common import DTYPES, PEAK_GBPS  # PEAK_GBPS: by the device name; --peak-gbps for others
from cdiff.loss import confidence_nll, confidence_nll_reference

SIZES = [(64, 4, 32, 32), (16, 4, 64, 64), (64, 4, 256, 256)]
TRAINING_SIZES = [(64, 4, 32, 32), (16, 4, 64, 64)]  # QXS 256 px (bs 64), 512-px crops (bs 16)
LARGE_SIZE = (64, 4, 256, 256)


def model_bytes(shape, element_size: int) -> int:
    batch, channels, height, width = shape
    pixels = batch * height * width
    return (3 * pixels * channels + 2 * pixels) * element_size


def kernel_actual_bytes(shape, element_size: int) -> int:
    batch, channels, height, width = shape
    pixels = batch * height * width
    return model_bytes(shape, element_size) + (2 * pixels * channels + pixels) * element_size


def make_inputs(shape, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    batch, _, height, width = shape
    target = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    eps_hat = torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_()
    raw = torch.randn((batch, 1, height, width), generator=gen, device=device, dtype=dtype).requires_grad_()
    alpha_bar = torch.rand(batch, generator=gen, device=device)
    return target, eps_hat, raw, alpha_bar


def step_fn(loss_fn, target, eps_hat, raw, alpha_bar):
    def step():
        loss = loss_fn(target, eps_hat, raw, alpha_bar)
        return torch.autograd.grad(loss, (eps_hat, raw))  # no .grad accumulation kernel

    return step


def time_cuda(step, warmup: int, iters: int, repeats: int = 5) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def time_cpu(step, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def count_gpu_launches(step) -> int:
    """GPU kernels (and memsets/copies) in one forward+backward, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def peak_bandwidth(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, gbps in PEAK_GBPS:
        if key.lower() in device_name.lower():
            return float(gbps)
    return None


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton not installed")
    if torch.version.cuda:
        parts.append(f"torch built for CUDA {torch.version.cuda}")
    return ", ".join(parts)


def run_gpu(args, dtype) -> int:
    device_name = torch.cuda.get_device_name()
    peak = peak_bandwidth(device_name, args.peak_gbps)
    print(f"device: {device_name} (peak {peak or 'unknown'} GB/s); {versions()}; dtype {args.dtype}")
    print(f"{'size':>18} {'impl':>8} {'ms':>9} {'launches':>8} {'model GB/s':>11} {'actual GB/s':>12}")
    compiled = torch.compile(confidence_nll_reference)
    impls = {
        "triton": lambda *a: confidence_nll(*a, backend="triton"),
        "eager": lambda *a: confidence_nll(*a, backend="torch"),
    }
    if not args.no_compile:
        impls["compile"] = compiled
    failures = []
    for shape in args.sizes:
        inputs = make_inputs(shape, dtype, "cuda")
        size = dtype.itemsize
        ms = {}
        for name, fn in impls.items():
            step = step_fn(fn, *inputs)
            ms[name] = time_cuda(step, args.warmup, args.iters)
            launches = count_gpu_launches(step)
            model = model_bytes(shape, size) / ms[name] / 1e6
            actual = f"{kernel_actual_bytes(shape, size) / ms[name] / 1e6:12.1f}" if name == "triton" else f"{'':12}"
            print(f"{str(shape):>18} {name:>8} {ms[name]:9.4f} {launches:8d} {model:11.1f} {actual}")
        speedup = ms["eager"] / ms["triton"]
        line = f"{str(shape):>18} kernel/eager time ratio {ms['triton'] / ms['eager']:.3f} (speed-up {speedup:.2f}x)"
        if "compile" in ms:
            line += f"; kernel/compile {ms['triton'] / ms['compile']:.3f}"
        print(line)
        if shape in TRAINING_SIZES and speedup < 3.0:
            failures.append(f"{shape}: kernel only {speedup:.2f}x faster than eager (target >= 3x)")
        if shape == LARGE_SIZE:
            achieved = kernel_actual_bytes(shape, size) / ms["triton"] / 1e6
            if peak is None:
                failures.append(f"{shape}: peak bandwidth of {device_name!r} unknown; pass --peak-gbps")
            elif achieved < 0.7 * peak:
                failures.append(f"{shape}: {achieved:.0f} GB/s is {achieved / peak:.0%} of {peak:.0f} (target >= 70%)")
            else:
                print(f"{str(shape):>18} kernel bandwidth {achieved:.0f} GB/s = {achieved / peak:.0%} of peak")
        del inputs
        torch.cuda.empty_cache()
    print("targets: " + ("PASS" if not failures else "FAIL\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


def run_cpu(args, dtype) -> int:
    print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); {versions()}")
    print("no CUDA device: timing the PyTorch reference (eager) only; the Triton kernel and torch.compile")
    print("are GPU benchmarks (the kernel runs on the CPU only in Triton's slow interpreter, for tests).")
    print(f"{'size':>18} {'impl':>8} {'ms':>10} {'model GB/s':>11}")
    step_fn(confidence_nll_reference, *make_inputs((2, 4, 8, 8), dtype, "cpu"))()  # one-time start-up costs
    for shape in args.sizes:
        inputs = make_inputs(shape, dtype, "cpu")
        step = step_fn(lambda *a: confidence_nll(*a, backend="torch"), *inputs)
        ms = time_cpu(step, warmup=3, iters=args.cpu_iters)
        print(f"{str(shape):>18} {'eager':>8} {ms:10.2f} {model_bytes(shape, dtype.itemsize) / ms / 1e6:11.2f}")
        del inputs, step
    print("targets: not checked (they are GPU targets)")
    return 0


def parse_size(text: str):
    size = tuple(int(v) for v in text.lower().split("x"))
    if len(size) != 4:
        raise argparse.ArgumentTypeError(f"size must be BxCxHxW, got {text!r}")
    return size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=SIZES, help="e.g. 64x4x32x32")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50, help="iterations per timed repeat (GPU)")
    parser.add_argument("--cpu-iters", type=int, default=5)
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth of the GPU, GB/s")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    return run_gpu(args, dtype) if torch.cuda.is_available() else run_cpu(args, dtype)


if __name__ == "__main__":
    sys.exit(main())
