#!/usr/bin/env bash
# One device call: install, then run the named stages in order; logs and tables under $OUT.
#   device run (carry .whl):  bash benchmarks/gpu_session.sh STAGE [STAGE...]
# Stages:
#   tests     research/gpu_checks.sh: pytest -m gpu per file, time limits, table ($PYTEST_PATHS, $GPU_TESTS_BUDGET)
#   bench     benchmarks/bench_training.py             (one layer vs SDPA flash/cuDNN and fla-core; $BENCH_SEQLENS)
#   model     benchmarks/bench_model_training.py       (~1B NSA-Llama training step vs sdpa, 32k tokens)
#   generate  benchmarks/bench_generate.py             (~1B NSA-Llama generate() vs sdpa: TTFT, tok/s, memory; $GEN_CONFIGS)
#   decode    benchmarks/bench_decode.py               (per-layer decode kernels vs dense and fla-core)
#   quality   python -m research.quality               (dense vs NSA continued training, needle probe;
#                                                       $QUALITY_ARGS, default --budget $QUALITY_BUDGET s)
#   recipe    python -m research.recipe_check          (the conversion recipe through nsa-hf convert and examples/train.py,
#                                                       with and without the alignment term, dense beside; work kept in
#                                                       runs/recipe. Several GPUs: the train.py runs side by side, ~8 min.
#                                                       One GPU: ~11 min, so two calls: train.py runs start only in the
#                                                       first $RECIPE_START_BEFORE s (default 240) and the same stage
#                                                       again, while the machine is warm, continues; $RECIPE_ARGS)
# .whl holds the wheels the GPU image lacks (../shared/gpu-wheels/get-wheels .whl): fla-core, datasets.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
rc=0
t0=$(date +%s)
stamp() { echo "[gpu_session $(( $(date +%s) - t0 ))s] $*"; }
for stage in "${@:-tests}"; do
  stamp "stage $stage"
  case $stage in
    tests)
      # one pytest per file, each under a time limit; logs in $OUT/gpu_tests/, a pass/fail table last
      OUT="$OUT" bash research/gpu_checks.sh 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    bench)
      # shellcheck disable=SC2086
      python3 benchmarks/bench_training.py --out "$OUT" --seqlens ${BENCH_SEQLENS:-8192 16384 32768 65536} 2>&1 | tee "$OUT/bench_training.log" | tail -30 ;;
    model)
      python3 benchmarks/bench_model_training.py --out "$OUT/bench_model_training.md" 2>&1 | tee "$OUT/bench_model_training.log" | tail -12 ;;
    generate)
      # shellcheck disable=SC2086
      python3 benchmarks/bench_generate.py ${GEN_CONFIGS:+--configs $GEN_CONFIGS} \
          ${GEN_VARIANTS:+--variants $GEN_VARIANTS} --out "$OUT/bench_generate.md" 2>&1 | tee "$OUT/bench_generate.log" | tail -24 ;;
    decode)
      python3 benchmarks/bench_decode.py --graph --out "$OUT" 2>&1 | tee "$OUT/bench_decode.log" | tail -30 ;;
    quality)
      # shellcheck disable=SC2086
      # tokenizing --extra-code text is ~1 min on one core: let the tokenizer use all of them (no forks follow)
      TOKENIZERS_PARALLELISM=true python3 -m research.quality --out "$OUT/quality" ${QUALITY_ARGS:---budget ${QUALITY_BUDGET:-330}} 2>&1 | tee "$OUT/quality.log" | tail -40 ;;
    recipe)
      ngpu=$(nvidia-smi -L | wc -l); gpus=${RECIPE_GPUS:-$(( ngpu < 3 ? ngpu : 3 ))}
      if [ "$gpus" -gt 1 ]; then start=${RECIPE_START_BEFORE:-100000}; else start=${RECIPE_START_BEFORE:-240}; fi
      # shellcheck disable=SC2086,SC2046
      TOKENIZERS_PARALLELISM=true python3 -m research.recipe_check --out runs/recipe --gpus "$gpus" --start-before "$start" \
          ${RECIPE_ARGS:---extra-code $(python3 -c 'import os, torch, numpy, triton; print(" ".join(os.path.dirname(m.__file__) for m in (torch, numpy, triton)))')} \
          2>&1 | tee "$OUT/recipe.log" | tail -30
      case ${PIPESTATUS[0]} in 0) ;; 3) stamp "recipe: not finished; run the stage again to continue" ;; *) rc=1 ;; esac
      mkdir -p "$OUT/recipe" && cp runs/recipe/results.md runs/recipe/results.json runs/recipe/logs/*.log "$OUT/recipe/" 2>/dev/null ;;
    *) echo "unknown stage $stage"; rc=2 ;;
  esac
done
stamp "done rc=$rc"
exit $rc
