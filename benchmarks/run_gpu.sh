#!/usr/bin/env bash
# The GPU figures in one go: the CUDA tests and every benchmark, each one's output in
# OUT_DIR/<part>.txt and every figure in OUT_DIR/results.csv (also appended to benchmarks/results.csv).
# For a short GPU loan, benchmarks/gpu_check.sh is the 8-minute subset (tests and headline figures).
#
#   bash benchmarks/run_gpu.sh OUT_DIR [PART ...]
#
# Run from anywhere, on a CUDA machine with this repository and its test extra installed
# (pip install -e ".[test]"); PYTHON overrides the interpreter (default: python).
# PARTS (default: all of them, in this order; about 25-35 minutes on one H100). Where a command
# may run for at most 10 minutes, call the script once per part:
#   tests       the CUDA tests: sampling loops in CUDA graphs, cuda_graph=True, compile, the fp16
#               channels-last path, both Triton kernels, training steps (about 3 min)
#   kernels     bench_group_norm (fp16 forward; bf16 forward + backward) and bench_loss (about 2 min)
#   unet        bench_unet: forward vs diffusers at 64x64, batch 1 and 16; attention; checkpointing (about 5 min)
#   translate   bench_translate: 512 px, 50 DDIM steps, batch 1 and 8 (about 7 min)
#   translate16 bench_translate at batch 16 (the 30%-of-peak target; about 5 min)
#   train       bench_train: 256 px, batch 64 or the largest that fits, bf16 (about 6 min)
#   tiling      bench_tiling at SD 2.1 sizes (about 4 min)
#   quality     bench_quality_steps on the demo model, if weights/cdiff-demo-tiny.safetensors exists (about 2 min)
# The exit status is 1 when a part failed or missed its target (each part's .txt says which).

set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/run_gpu.sh OUT_DIR [tests|kernels|unet|translate|translate16|train|tiling|quality ...]" >&2
    exit 2
fi
out=$1
shift
parts=${*:-tests kernels unet translate translate16 train tiling quality}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu.sh: no CUDA device visible to $PY" >&2
    exit 2
fi
mkdir -p "$out"
csv="$out/results.csv"
status=0

run() {  # run LABEL COMMAND...: output to OUT_DIR/LABEL.txt, time and exit status on the console
    local label=$1
    shift
    echo "== $label: $*"
    local start=$SECONDS
    "$@" > "$out/$label.txt" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s ($out/$label.txt)"
    [ $rc -eq 0 ] || status=1
}

{
    nvidia-smi || true
    $PY -c "import torch, triton, diffusers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
    git log -1 --oneline || true
} > "$out/environment.txt" 2>&1

for part in $parts; do
    case $part in
        tests)
            run tests $PY -m pytest -q -rs tests/test_samplers.py tests/test_compiled.py tests/test_channels_last.py \
                tests/test_group_norm_kernel.py tests/test_loss_kernel.py tests/test_train_cuda.py ;;
        kernels)
            run group_norm_fp16 $PY -m benchmarks.bench_group_norm --dtype fp16 --csv "$csv"
            run group_norm_bf16_backward $PY -m benchmarks.bench_group_norm --dtype bf16 --backward --csv "$csv"
            run loss_bf16 $PY -m benchmarks.bench_loss --dtype bf16 ;;
        unet)
            run unet $PY -m benchmarks.bench_unet --csv "$csv" ;;
        translate)
            run translate $PY -m benchmarks.bench_translate --batches 1 8 --repeats 3 --warmup 1 --csv "$csv" ;;
        translate16)
            run translate16 $PY -m benchmarks.bench_translate --batches 16 --repeats 3 --warmup 1 \
                --impls diffusers cdiff-cl-graph cdiff-cl-fused-graph cdiff-cl-compiled-graph --csv "$csv" ;;
        train)
            run train $PY -m benchmarks.bench_train --csv "$csv" ;;
        tiling)
            run tiling $PY -m benchmarks.bench_tiling --preset sd21 --dtype fp16 --sizes 1024 2048 4096 \
                --untiled-max 2048 --tile 1024 --overlap 256 --error-size 1024 --error-tile 512 ;;
        quality)
            if [ -f weights/cdiff-demo-tiny.safetensors ]; then
                run quality $PY -m benchmarks.bench_quality_steps --model weights/cdiff-demo-tiny.safetensors --csv "$csv"
            else
                echo "== quality: skipped, weights/cdiff-demo-tiny.safetensors is not in this checkout"
            fi ;;
        *)
            echo "run_gpu.sh: unknown part $part" >&2
            status=1 ;;
    esac
done

if [ -f "$csv" ]; then  # the rows of this run, also in the repository's table
    if [ -f benchmarks/results.csv ]; then
        tail -n +2 "$csv" >> benchmarks/results.csv
    else
        cp "$csv" benchmarks/results.csv
    fi
fi
exit $status
