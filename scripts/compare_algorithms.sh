#!/usr/bin/env bash
# Same-budget comparison of the six meta-learners on Omniglot (README table):
# conv4, 28 px, the full background set with the fixed alphabet split, 5-way 1-shot 15-query
# training episodes, meta-batch 4, 200 meta-updates each (800 training tasks); evaluation on the 6
# unseen test alphabets, 5-way 1- and 5-shot, 500 fixed episodes, each with its own adaptation.
#   bash scripts/compare_algorithms.sh [OUT] [PRECISION]     (about 10 minutes on 2 CPU cores)
# PRECISION: fp32 (default) or bf16 (edgemeta train --precision); ALGOS="maml anil" picks a subset.
set -euo pipefail
OUT="${1:-runs/compare}"
PRECISION="${2:-fp32}"
DATA=(--data omniglot:background)   # `edgemeta data fetch omniglot` puts it under the data root
TEST=(--data data/omniglot/images_background_small1.zip --data data/omniglot/images_background_small2.zip)
COMMON=(--split-mode alphabets --way 5 --shot 1 --query 15 --meta-batch 4 --episodes 200 --val-every 100
        --val-episodes 100 --precision "$PRECISION" --quiet)
declare -A EXTRA=(
  [protonet]=""
  [r2d2]=""
  [maml]="--inner-steps 1 --inner-lr 0.4"
  [fomaml]="--inner-steps 1 --inner-lr 0.4"
  [anil]="--inner-steps 5 --inner-lr 0.1"
  [reptile]="--inner-steps 5 --inner-lr 0.05"
)
for algo in ${ALGOS:-protonet r2d2 maml fomaml anil reptile}; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  edgemeta train "${DATA[@]}" "${COMMON[@]}" --algo "$algo" ${EXTRA[$algo]} --out "$OUT/$algo"
  seconds=$(( $(date +%s) - start ))
  for shot in 1 5; do
    edgemeta eval "$OUT/$algo/best.safetensors" "${TEST[@]}" --shot "$shot" --episodes 500 --json \
      | python -c "import json,sys; r=json.load(sys.stdin); r.update(algo='$algo', precision='$PRECISION', train_seconds=$seconds); print(json.dumps(r))" \
      >> "$OUT/results.jsonl"
  done
done
cat "$OUT/results.jsonl"
