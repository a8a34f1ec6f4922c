#!/usr/bin/env bash
# FSDP check: examples/train.py on one GPU vs `accelerate launch` with FSDP2 on two GPUs, same global
# batch and data order; the per-step losses must match. No network. About 2-3 minutes on 2 GPUs.
#
#   bash examples/fsdp_check.sh OUT_DIR [STEPS]
#
# 1. builds a small random Llama (vocab from a BPE tokenizer trained on stdlib sources), converts it
#    to NSA-Llama with nsa-hf, and writes stdlib sources as training documents;
# 2. float32: 1 GPU (--batch-size 1 --grad-accum 2) vs FSDP on 2 GPUs (--batch-size 1 each),
#    `--mixed_precision no`; strict tolerance (FSDP_CHECK_TOL_FP32, default 1e-3);
# 3. bf16: the same with --bf16 and examples/fsdp.yaml's bf16 mixed precision; looser tolerance
#    (FSDP_CHECK_TOL_BF16, default 3e-2): one GPU keeps bf16 weights, FSDP keeps float32 master
#    shards and computes in bf16, so the two round differently. This run also saves the final model
#    through FSDP and reloads it.
# The two single-GPU runs share the machine (GPU 0 and GPU 1 at once); the FSDP runs follow.
# Logs, loss files and comparisons land in OUT_DIR; the exit status is non-zero if a check failed.
# Only one GPU: FSDP_CHECK_NPROC=1 FSDP_CHECK_GPU_B=0 runs FSDP2 in one process (sharding, mixed precision
# and the save are exercised; the gradient reduce-scatter across ranks is not).
set -uo pipefail
OUT=${1:?usage: bash examples/fsdp_check.sh OUT_DIR [STEPS]}
STEPS=${2:-16}
TOL_FP32=${FSDP_CHECK_TOL_FP32:-1e-3}
TOL_BF16=${FSDP_CHECK_TOL_BF16:-3e-2}
NPROC=${FSDP_CHECK_NPROC:-2}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
t0=$(date +%s)
say() { echo "[fsdp_check $(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/summary.txt"; }

say "setup: tiny NSA checkpoint and stdlib documents in $OUT"
python - "$OUT" > "$OUT/setup.log" 2>&1 <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nsa_hf.convert import convert_llama_to_nsa
from nsa_hf.sample_data import stdlib_documents, train_tokenizer

out = Path(sys.argv[1])
train, _ = stdlib_documents(max_chars=2_000_000)
tok = train_tokenizer(train, 4096)
(out / "data").mkdir(exist_ok=True)
for i, doc in enumerate(train[:48]):
    (out / "data" / f"doc{i:03d}.txt").write_text(doc)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.eos_token_id)
llama = LlamaForCausalLM(cfg)
llama.save_pretrained(out / "llama")
tok.save_pretrained(out / "llama")
convert_llama_to_nsa(out / "llama", out / "nsa", cmp_block=16, cmp_stride=8, slc_block=32, slc_count=4,
                     window=64, evaluate=False, progress=False, remote_code=False)
print("ok", sum(p.numel() for p in llama.parameters()))
EOF
if [ $? -ne 0 ]; then say "setup FAILED (see setup.log)"; tail -20 "$OUT/setup.log"; exit 3; fi

COMMON=(--model "$OUT/nsa" --data "$OUT"/data/*.txt --seq-len "${FSDP_CHECK_SEQ_LEN:-1024}" --max-steps "$STEPS" --logging-steps 1
        --save-steps 1000000 --lr 1e-3 --sequential --seed 0)

single() {  # $1 = fp32|bf16, $2 = GPU index, $3.. = extra train.py args
  local prec=$1 gpu=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu HF_DATASETS_CACHE="$OUT/datasets-cache-1gpu-$prec" python examples/train.py "${COMMON[@]}" "$@" --no-save \
      --batch-size 1 --grad-accum "$NPROC" --output-dir "$OUT/run-1gpu-$prec" --log-file "$OUT/loss-1gpu-$prec.json" \
      > "$OUT/train-1gpu-$prec.log" 2>&1
}

fsdp() {  # $1 = fp32|bf16, $2.. = extra train.py args
  local prec=$1; shift
  local mp=no save=(--no-save)
  if [ "$prec" = bf16 ]; then mp=bf16; save=(); fi
  # shellcheck disable=SC2086
  HF_DATASETS_CACHE="$OUT/datasets-cache-fsdp-$prec" accelerate launch --config_file examples/fsdp.yaml --num_processes "$NPROC" --mixed_precision "$mp" ${FSDP_CHECK_LAUNCH_ARGS:-} \
      examples/train.py "${COMMON[@]}" "$@" ${save[@]+"${save[@]}"} --batch-size 1 --grad-accum 1 \
      --output-dir "$OUT/run-fsdp-$prec" --log-file "$OUT/loss-fsdp-$prec.json" \
      > "$OUT/train-fsdp-$prec.log" 2>&1
}

sharded() {  # $1 = fp32|bf16: the FSDP run's log must show FSDP2-sharded modules (not a silent DDP/1-process run)
  local prec=$1
  local units
  if units=$(python -c "import json, sys; r = json.load(open(sys.argv[1])); print(r[0]['fsdp_units']); sys.exit(0 if all(x.get('fsdp_units', 0) > 0 and x['world_size'] == $NPROC for x in r) else 1)" "$OUT/loss-fsdp-$prec.json" 2>/dev/null); then
    say "$prec: FSDP run sharded ($units FSDP units, world size $NPROC)"
  else
    say "$prec: FSDP run NOT sharded (fsdp_units / world_size in $OUT/loss-fsdp-$prec.json)"; status=1
  fi
}

compare() {  # $1 = fp32|bf16, $2 = tolerance
  local prec=$1 tol=$2
  python examples/compare_losses.py "$OUT/loss-1gpu-$prec.json" "$OUT/loss-fsdp-$prec.json" --tolerance "$tol" \
      --json "$OUT/compare-$prec.json" > "$OUT/compare-$prec.txt" 2>&1
  local rc=$?
  cat "$OUT/compare-$prec.txt"
  say "$prec: compare_losses exit $rc ($(tail -1 "$OUT/compare-$prec.txt"))"
  [ "$rc" -eq 0 ] || status=1
}

# The two single-GPU runs (float32, bf16) at the same time on two GPUs; then the FSDP runs.
say "1 GPU each, --batch-size 1 --grad-accum $NPROC: float32 on GPU ${FSDP_CHECK_GPU_A:-0}, bf16 on GPU ${FSDP_CHECK_GPU_B:-1}"
single fp32 "${FSDP_CHECK_GPU_A:-0}" & pid_a=$!
single bf16 "${FSDP_CHECK_GPU_B:-1}" --bf16 & pid_b=$!
wait $pid_a || { say "fp32 single-GPU run FAILED"; tail -30 "$OUT/train-1gpu-fp32.log"; status=1; }
wait $pid_b || { say "bf16 single-GPU run FAILED"; tail -30 "$OUT/train-1gpu-bf16.log"; status=1; }
say "fp32: FSDP on $NPROC GPUs (--mixed_precision no), --batch-size 1 each"
fsdp fp32 || { say "fp32 FSDP run FAILED"; tail -40 "$OUT/train-fsdp-fp32.log"; status=1; }
sharded fp32
compare fp32 "$TOL_FP32"
say "bf16: FSDP on $NPROC GPUs (--mixed_precision bf16, --bf16), --batch-size 1 each, saving the final model"
fsdp bf16 --bf16 || { say "bf16 FSDP run FAILED"; tail -40 "$OUT/train-fsdp-bf16.log"; status=1; }
sharded bf16
compare bf16 "$TOL_BF16"

if [ -f "$OUT/run-fsdp-bf16/final/config.json" ]; then
  python - "$OUT" >> "$OUT/summary.txt" 2>&1 <<'EOF'
import sys
from pathlib import Path

import torch
import nsa_hf  # noqa: F401
from safetensors import safe_open
from transformers import AutoModelForCausalLM

out = Path(sys.argv[1])


def saved_names(folder):
    with safe_open(folder / "model.safetensors", "pt") as checkpoint:
        return set(checkpoint.keys())


# The same tensors as the converted checkpoint's file (a tied embedding written once).
assert saved_names(out / "run-fsdp-bf16" / "final") == saved_names(out / "nsa"), \
    saved_names(out / "run-fsdp-bf16" / "final") ^ saved_names(out / "nsa")
a = AutoModelForCausalLM.from_pretrained(out / "nsa").state_dict()
b = AutoModelForCausalLM.from_pretrained(out / "run-fsdp-bf16" / "final").state_dict()
assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
changed = sum(not torch.equal(a[k].float(), b[k].float()) for k in a)
print(f"FSDP-saved checkpoint reloads: {len(b)} tensors, {changed} changed by training")
assert changed > 0
EOF
  [ $? -eq 0 ] && say "FSDP save: ok" || { say "FSDP save: reload check FAILED"; status=1; }
else
  say "FSDP save: no checkpoint at $OUT/run-fsdp-bf16/final"; status=1
fi
say "done: exit $status"
exit $status
