#!/usr/bin/env bash
# The main job end to end on built-in synthetic data (creates .venv first if missing):
# synthetic logs -> Beam/TFT preprocessing -> ESMM, PLE and the BASE baseline -> evaluation
# (metrics table + HTML report with charts) -> SavedModel for TF Serving.
#
#   ./run_local.sh                      # defaults: Ali-CCP layout, 600k train / 150k test impressions, 1 epoch
#   MODELS="esmm ple" ./run_local.sh    # pick the models (model_fn/params.py): esmm esmm_ns base
#                                       # escm2_ips escm2_dr shared_bottom mmoe cgc ple
#   FORMAT=avazu ./run_local.sh         # Avazu-style CSV instead of the Ali-CCP layout
#   NUM_TRAIN=20000 NUM_TEST=10000 ./run_local.sh    # a quicker run
#   ./run_local.sh --direct_num_workers=2 --direct_running_mode=multi_processing
#                                       # extra arguments go to the Beam job unchanged
#   MODE=daily ./run_local.sh           # the daily rolling retrain over DAYS simulated days:
#                                       # late conversions, warm start, gate, publish to TF Serving
#                                       # (knobs DAYS, IMPRESSIONS_PER_DAY, HOLDOUT_PERCENT, MODEL,
#                                       # WINDOW_DAYS, MATURITY_DAYS, LABEL_STRATEGY)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES=""

FORMAT="${FORMAT:-aliccp}"
MODELS="${MODELS:-esmm base ple}"
MODELS="${MODELS//,/ }"
OUT="${OUT:-runs/local}"
NUM_TRAIN="${NUM_TRAIN:-600000}"
NUM_TEST="${NUM_TEST:-150000}"
EPOCHS="${EPOCHS:-1}"
SEED="${SEED:-2018}"
MAX_HASH_BUCKETS="${MAX_HASH_BUCKETS:-32768}"
LOG="$OUT/logs"
mkdir -p "$LOG"
step() { echo "[run_local] $(date +%H:%M:%S) $*"; }
MODE="${MODE:-batch}"
run_logged() {  # run_logged NAME CMD...: full log to $LOG/NAME.log (its progress lines shown), shown on failure
  local name="$1"; shift
  "$@" >"$LOG/$name.log" 2>&1 &
  local pid=$! last="" line
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2
    line=$(grep -o 'progress: .*' "$LOG/$name.log" 2>/dev/null | tail -n 1 || true)
    if [ -n "$line" ] && [ "$line" != "$last" ]; then echo "[run_local]   $line"; last="$line"; fi
  done
  if ! wait "$pid"; then
    tail -n 40 "$LOG/$name.log" >&2
    echo "[run_local] step '$name' failed; full log: $LOG/$name.log" >&2
    exit 1
  fi
}

if [ "$MODE" = daily ]; then
  DAYS="${DAYS:-8}"
  PER_DAY="${IMPRESSIONS_PER_DAY:-80000}"
  HOLDOUT_PERCENT="${HOLDOUT_PERCENT:-50}"
  MODEL="${MODEL:-esmm}"
  WINDOW_DAYS="${WINDOW_DAYS:-5}"
  MATURITY_DAYS="${MATURITY_DAYS:-2}"
  LABEL_STRATEGY="${LABEL_STRATEGY:-wait}"
  step "generating $DAYS days of impression and conversion logs ($PER_DAY impressions a day) -> $OUT/logs_daily"
  rm -rf "$OUT/logs_daily" "$OUT/daily" "$OUT/serving"
  run_logged synthetic python -m datagen.synthetic --daily --output_dir="$OUT/logs_daily" \
    --num_days="$DAYS" --impressions_per_day="$PER_DAY" --seed="$SEED" --bad_rows=2
  cat "$LOG/synthetic.log" | grep -E '^[0-9]{8}:' || true
  first_day=$(ls "$OUT/logs_daily/impressions" | head -n 1 | cut -d= -f2)
  for k in $(seq $((MATURITY_DAYS + 1)) $((DAYS - 1))); do
    date=$(python -c "import datetime,sys; d=datetime.datetime.strptime(sys.argv[1],'%Y%m%d')+datetime.timedelta(days=int(sys.argv[2])); print(d.strftime('%Y%m%d'))" "$first_day" "$k")
    step "daily run for $date"
    rc=0
    python -m orchestration.daily --date="$date" --logs_dir="$OUT/logs_daily" --work_dir="$OUT/daily" \
      --serving_root="$OUT/serving" --model="$MODEL" --window_days="$WINDOW_DAYS" \
      --maturity_days="$MATURITY_DAYS" --label_strategy="$LABEL_STRATEGY" --num_epochs="$EPOCHS" \
      --holdout_percent="$HOLDOUT_PERCENT" \
      --max_hash_buckets="$MAX_HASH_BUCKETS" --ground_truth_dir="$OUT/logs_daily/ground_truth" "$@" \
      >"$LOG/daily_$date.log" 2>&1 || rc=$?
    sed -n '/^daily run/,$p' "$LOG/daily_$date.log"
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then
      tail -n 40 "$LOG/daily_$date.log" >&2
      echo "[run_local] daily run $date failed (exit $rc); full log: $LOG/daily_$date.log" >&2
      exit 1
    fi
  done
  echo
  echo "Monitoring: every run's decision, holdout figures and calibration trend: $OUT/daily/report.md"
  echo "TF Serving: tensorflow_model_server --model_config_file=$(cd "$OUT/serving" && pwd)/models.config"
  ls "$OUT/serving/$MODEL"
  exit 0
fi

case "$FORMAT" in
  aliccp|avazu) ;;
  *) echo "error: FORMAT must be aliccp or avazu, not '$FORMAT'" >&2; exit 2 ;;
esac
known_models=" $(python -c 'from model_fn.params import MODELS; print(" ".join(MODELS))') "
for model in $MODELS; do
  if [[ "$known_models" != *" $model "* ]]; then
    echo "error: unknown model '$model' in MODELS (one of:$known_models)" >&2; exit 2
  fi
done

step "generating synthetic $FORMAT data ($NUM_TRAIN train / $NUM_TEST test impressions) -> $OUT/raw"
rm -rf "$OUT/raw"
run_logged synthetic python -m datagen.synthetic --format="$FORMAT" --output_dir="$OUT/raw" \
  --num_train="$NUM_TRAIN" --num_test="$NUM_TEST" --seed="$SEED"
tail -n 2 "$LOG/synthetic.log" | grep -v '^I' || true

step "preprocessing with Beam + TFT (DirectRunner) -> $OUT/preprocessed"
run_logged preprocess python -m pipeline.preprocess --format="$FORMAT" --input_dir="$OUT/raw" \
  --output_dir="$OUT/preprocessed" --max_hash_buckets="$MAX_HASH_BUCKETS" --overwrite "$@"
sed -n '/^reconciliation/,$p' "$LOG/preprocess.log"

evaluated=()
for model in $MODELS; do
  step "training $model ($EPOCHS epochs) -> $OUT/models/$model"
  rm -rf "$OUT/models/$model"
  run_logged "train_$model" python -m model_fn.train --transform_dir="$OUT/preprocessed" \
    --model_dir="$OUT/models/$model" --model="$model" --num_epochs="$EPOCHS"
  evaluated+=("$model:$OUT/models/$model")
done
first="${MODELS%% *}"

step "evaluating on the test split (paper protocol + ground truth)"
run_logged evaluate python -m model_fn.evaluate --transform_dir="$OUT/preprocessed" \
  --models="$(IFS=,; echo "${evaluated[*]}")" \
  --ground_truth="$OUT/raw/ground_truth_test.csv" --output="$OUT/report.json" --report_dir="$OUT/report"
echo
echo "Test split: AUCs (CTR, CTCVR over all impressions; CVR over clicked impressions;"
echo "CVR over all impressions against the true counterfactual conversions) and calibration"
echo "(mean prediction / observed rate). base = the paper's BASE (CVR trained on clicks only);"
echo "<model>:uncalibrated = the model's towers before their calibration (--calibration);"
echo "oracle = the generator's true probabilities."
sed -n '/^|/,$p' "$LOG/evaluate.log" | grep -v '^report: '
echo
saved_model=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['saved_model'])" "$OUT/models/$first/train_result.json")
echo "$first SavedModel (signatures: regression = pCVR, serving_default, predict): $saved_model"
echo "report: $OUT/report/index.html (charts), $OUT/report.json (metrics)   logs: $LOG/"
