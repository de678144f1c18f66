#!/usr/bin/env bash
# The main job end to end on built-in synthetic data (creates .venv first if missing):
# synthetic logs -> Beam/TFT preprocessing -> ESMM, MMoE and the BASE baseline -> evaluation
# (metrics table + HTML report with charts) -> SavedModel for TF Serving.
#
#   ./run_local.sh                      # defaults: Ali-CCP layout, 150k train / 75k test impressions
#   MODELS=mmoe_esmm ./run_local.sh     # pick the models: esmm esmm_ns base mmoe mmoe_esmm
#   FORMAT=avazu ./run_local.sh         # Avazu-style CSV instead of the Ali-CCP layout
#   NUM_TRAIN=20000 NUM_TEST=10000 EPOCHS=1 ./run_local.sh    # a quicker run
#   ./run_local.sh --direct_num_workers=2 --direct_running_mode=multi_processing
#                                       # extra arguments go to the Beam job unchanged
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES=""

FORMAT="${FORMAT:-aliccp}"
MODELS="${MODELS:-esmm base mmoe}"
MODELS="${MODELS//,/ }"
OUT="${OUT:-runs/local}"
NUM_TRAIN="${NUM_TRAIN:-150000}"
NUM_TEST="${NUM_TEST:-75000}"
EPOCHS="${EPOCHS:-3}"
SEED="${SEED:-2018}"
MAX_HASH_BUCKETS="${MAX_HASH_BUCKETS:-32768}"
LOG="$OUT/logs"
mkdir -p "$LOG"
step() { echo "[run_local] $(date +%H:%M:%S) $*"; }
run_logged() {  # run_logged NAME CMD...: full log to $LOG/NAME.log, shown on failure
  local name="$1"; shift
  if ! "$@" >"$LOG/$name.log" 2>&1; then
    tail -n 40 "$LOG/$name.log" >&2
    echo "[run_local] step '$name' failed; full log: $LOG/$name.log" >&2
    exit 1
  fi
}

case "$FORMAT" in
  aliccp|avazu) ;;
  *) echo "error: FORMAT must be aliccp or avazu, not '$FORMAT'" >&2; exit 2 ;;
esac
for model in $MODELS; do
  case "$model" in
    esmm|esmm_ns|base|mmoe|mmoe_esmm) ;;
    *) echo "error: unknown model '$model' in MODELS (esmm esmm_ns base mmoe mmoe_esmm)" >&2; exit 2 ;;
  esac
done

step "generating synthetic $FORMAT data ($NUM_TRAIN train / $NUM_TEST test impressions) -> $OUT/raw"
rm -rf "$OUT/raw"
run_logged synthetic python -m pipeline.synthetic --format="$FORMAT" --output_dir="$OUT/raw" \
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
echo "oracle = the generator's true probabilities."
sed -n '/^|/,$p' "$LOG/evaluate.log" | grep -v '^report: '
echo
saved_model=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['saved_model'])" "$OUT/models/$first/train_result.json")
echo "$first SavedModel (signatures: regression = pCVR, serving_default, predict): $saved_model"
echo "report: $OUT/report/index.html (charts), $OUT/report.json (metrics)   logs: $LOG/"
