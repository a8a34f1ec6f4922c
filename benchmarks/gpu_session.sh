#!/usr/bin/env bash
# One device lease: install, run the GPU tests, run the benchmarks; logs under $OUT.
#   device run (carry .whl):  bash benchmarks/gpu_session.sh [tests|bench|all] [extra bench args...]
# .whl holds the wheels the GPU image lacks (../shared/gpu-wheels/get-wheels .whl): fla-core, datasets.
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
rc=0
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -x -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
  rc=${PIPESTATUS[0]}
fi
if [[ $what == bench || $what == all ]]; then
  python3 benchmarks/bench_training.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_training.log"
fi
exit $rc
