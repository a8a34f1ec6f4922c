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
# Logs, loss files and comparisons land in OUT_DIR; the exit status is non-zero if a check failed.
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
export HF_DATASETS_CACHE="$OUT/datasets-cache"
status=0
t0=$(date +%s)
say() { echo "[fsdp_check $(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/summary.txt"; }

say "setup: tiny NSA checkpoint and stdlib documents in $OUT"
python - "$OUT" > "$OUT/setup.log" 2>&1 <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "examples")
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data import stdlib_documents, train_tokenizer
from nsa_hf.convert import convert_llama_to_nsa

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

COMMON=(--model "$OUT/nsa" --data "$OUT"/data/*.txt --seq-len 1024 --max-steps "$STEPS" --logging-steps 1
        --save-steps 1000000 --lr 1e-3 --sequential --seed 0)

run_pair() {  # $1 = fp32|bf16, $2 = tolerance, $3.. = extra train.py args
  local prec=$1 tol=$2; shift 2
  local mp=no save=(--no-save)
  if [ "$prec" = bf16 ]; then mp=bf16; save=(); fi
  say "$prec: 1 GPU, --batch-size 1 --grad-accum $NPROC"
  CUDA_VISIBLE_DEVICES=${FSDP_CHECK_SINGLE_GPU:-0} python examples/train.py "${COMMON[@]}" "$@" --no-save \
      --batch-size 1 --grad-accum "$NPROC" --output-dir "$OUT/run-1gpu-$prec" --log-file "$OUT/loss-1gpu-$prec.json" \
      > "$OUT/train-1gpu-$prec.log" 2>&1 || { say "$prec single-GPU run FAILED"; tail -30 "$OUT/train-1gpu-$prec.log"; status=1; }
  say "$prec: FSDP on $NPROC GPUs, --batch-size 1 each"
  # shellcheck disable=SC2086
  accelerate launch --config_file examples/fsdp.yaml --num_processes "$NPROC" --mixed_precision "$mp" ${FSDP_CHECK_LAUNCH_ARGS:-} \
      examples/train.py "${COMMON[@]}" "$@" "${save[@]}" --batch-size 1 --grad-accum 1 \
      --output-dir "$OUT/run-fsdp-$prec" --log-file "$OUT/loss-fsdp-$prec.json" \
      > "$OUT/train-fsdp-$prec.log" 2>&1 || { say "$prec FSDP run FAILED"; tail -40 "$OUT/train-fsdp-$prec.log"; status=1; }
  python examples/compare_losses.py "$OUT/loss-1gpu-$prec.json" "$OUT/loss-fsdp-$prec.json" --tolerance "$tol" \
      --json "$OUT/compare-$prec.json" 2>&1 | tee "$OUT/compare-$prec.txt"
  local rc=${PIPESTATUS[0]}
  say "$prec: compare_losses exit $rc ($(tail -1 "$OUT/compare-$prec.txt"))"
  [ "$rc" -eq 0 ] || status=1
}

run_pair fp32 "$TOL_FP32"
run_pair bf16 "$TOL_BF16" --bf16

if [ -f "$OUT/run-fsdp-bf16/final/config.json" ]; then
  python - "$OUT" >> "$OUT/summary.txt" 2>&1 <<'EOF'
import sys
from pathlib import Path

import torch
import nsa_hf  # noqa: F401
from transformers import AutoModelForCausalLM

out = Path(sys.argv[1])
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
