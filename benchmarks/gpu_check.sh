#!/usr/bin/env bash
# The one-command GPU check (at most 8 minutes on one H100/H200): every CUDA-only test, and
# cdiff's headline speed figures against the diffusers-module loop, into OUT_DIR/gpu_check.json
# (every figure, with the device, torch, Triton and CUDA versions); a short table is printed last.
# What it runs and why: benchmarks/gpu_check.py; the measurements: benchmarks/gpu_parts.py.
#
#   bash benchmarks/gpu_check.sh OUT_DIR              # on a CUDA machine (default budget 450 s)
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run    # the same script on the CPU at tiny sizes (about a minute)
#   bash benchmarks/gpu_check.sh OUT_DIR --budget 400
#
# It runs from this checkout (PYTHONPATH gets the repository root first; cdiff need not be
# installed) with the python3 on PATH (PYTHON overrides it), which needs torch, Triton, pytest and
# diffusers 0.42.1. A GPU machine without diffusers takes it as wheels, downloaded once where pip
# reaches PyPI, into .whl/ at the repository root (ignored by git: echo /.whl/ >> .git/info/exclude):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==9.1.0
#
# (6.4 MB. diffusers is pure Python; of its requirements the GPU image lacks only importlib_metadata,
# which it imports on Python < 3.8 alone; 9.1.0 is the last release without a further requirement.)
# Then, on the GPU machine, from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#       && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_check.sh $OUT/gpu
#
# Exit status: 0 when every part ran and every target was met (dry run: every part ran), 1
# otherwise, 2 when a package or the device is missing (found before any long part starts).

set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out="" dry=0 budget=""
args=("$@")
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry=1 ;;
        --budget) budget=${2:-}; shift ;;
        -h|--help) sed -n '2,/^$/p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
        *) out=$1 ;;
    esac
    shift
done
if [ -z "$out" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run] [--budget SECONDS]" >&2
    exit 2
fi
if ! command -v "$PY" > /dev/null; then
    echo "gpu_check.sh: no $PY on PATH (set PYTHON)" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$out" || exit 2
# A hard stop 30 s past the budget (the driver itself stays inside it); the JSON written so far stays.
limit=${budget:-$([ $dry = 1 ] && echo 600 || echo 450)}
limit=${limit%.*}
timeout -k 10 $((limit + 30)) "$PY" benchmarks/gpu_check.py "${args[@]}" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
