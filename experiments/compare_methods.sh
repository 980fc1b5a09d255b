#!/usr/bin/env bash
# Train several methods from the same start model with the same budget and seed, then compare them.
#   bash experiments/compare_methods.sh TRAIN_DATA EVAL_DATA OUT_DIR [METHODS...]
# METHODS default: dpo simpo amapo amapo+spo. Budget knobs via environment variables (defaults below).
set -euo pipefail
cd "$(dirname "$0")/.."
train_data=$1; eval_data=$2; out=$3; shift 3
methods=("$@"); [ ${#methods[@]} -gt 0 ] || methods=(dpo simpo amapo amapo+spo)

MODEL=${MODEL:-smollm2-135m-instruct}
STEPS=${STEPS:-24}
BATCH=${BATCH:-4}
ACCUM=${ACCUM:-2}
LR=${LR:-3e-5}
MAX_LENGTH=${MAX_LENGTH:-160}
MAX_PROMPT=${MAX_PROMPT:-80}
EVAL_PAIRS=${EVAL_PAIRS:-200}
SEED=${SEED:-42}
PREFALIGN=${PREFALIGN:-.venv/bin/prefalign}

mkdir -p "$out"
runs=()
for method in "${methods[@]}"; do
  loss=${method%+spo}
  extra=()
  [ "$method" != "$loss" ] && extra+=(--use_spo true)
  run="$out/${method/+/_}"
  start=$(date +%s)
  "$PREFALIGN" train --model_name_or_path "$MODEL" --dataset "$train_data" --eval_dataset "$eval_data" \
    --max_eval_samples "$EVAL_PAIRS" --max_train_samples $((STEPS * BATCH * ACCUM)) \
    --loss_type "$loss" "${extra[@]}" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps 0.1 \
    --max_steps "$STEPS" --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" \
    --per_device_eval_batch_size 8 --max_length "$MAX_LENGTH" --max_prompt_length "$MAX_PROMPT" \
    --bf16 "${BF16:-false}" --prefix_sharing true --use_cpu true --logging_steps 2 --save_strategy no --eval_strategy no --report_to none \
    --seed "$SEED" --output_dir "$run" > "$run.log" 2>&1 || { echo "$method failed: see $run.log"; exit 1; }
  echo "$method: $(( $(date +%s) - start )) s wall ($run)"
  runs+=("$run")
done
"$PREFALIGN" compare "${runs[@]}" --out "$out/report"
echo "report: $out/report/report.md"
