r"""The daily rolling retrain: late conversions in, a checked model out to TF Serving.

  python -m orchestration.daily --date=YYYYMMDD --logs_dir=LOGS --work_dir=WORK \
      --serving_root=SERVING [--model=esmm] [--window_days=7] [--attribution_days=7] \
      [--maturity_days=3] [--label_strategy=wait|naive|corrected] [--calibration_band=0.8,1.25] [beam options]

Log layout (``datagen.synthetic --daily`` writes it, with ground truth):
  LOGS/impressions/date=D/sample_skeleton.csv, common_features.csv   Ali-CCP layout, one day
  LOGS/conversions/date=C/conversions.csv     sample_id,conversion_timestamp: conversions of day C

A run for date T:
  1. Plan. The eval day is E = T - maturity_days, the newest day whose labels are mature.
     Train days: the window T-window_days+1 .. T without E; with --label_strategy=wait
     (default) only the mature days before E, with naive also the immature days after E,
     whose not-yet-converted clicks count as negatives for now (later runs correct them);
     corrected trains on the same days as naive and fits pCVR's calibration to the train
     days' conversions scaled up by the share still to come (orchestration.delay estimates the
     conversion-delay distribution from the window's logs).
  2. Re-label (Beam, pipeline.relabel): every impression of the train and eval days gets
     the conversions logged up to T inside the attribution window; labels are recomputed
     from the logs each run, so re-running a date never counts a conversion twice.
  3. Transform (pipeline.preprocess, the same TFT job). The first run's transform is the
     reference; every later transform must give the same output on probe examples, or the
     run stops (the hashing is stateless, so a change means the code or flags changed).
  4. Train, warm-started from the model currently served (trainable variables; --nowarm_start
     trains from scratch, and the gate still compares with the served model).
  5. Evaluate candidate and served model on day E's holdout: --holdout_percent of every
     day's impressions (by sample id hash) that no run ever trains on, so neither model has
     seen them, even when yesterday's run trained on day E (naive strategy). The gate
     (orchestration.gate) decides on paired differences with their intervals: a candidate whose
     calibration is outside --calibration_band beyond the noise, or whose --gate_metrics are
     worse beyond the noise, is not published (the run says so with the figures and exits 3;
     the served model stays); a holdout with too few positives (--min_gate_positives) is
     said to be too small to tell and --undecided decides.
  6. Publish to SERVING/<model_name>/<T as integer version>/ atomically with warmup
     requests, keep the newest --keep_versions, update SERVING/models.config (pipeline.publish).
  7. Rewrite WORK/report.md: every run's decision, holdout figures with intervals, and the
     calibration trend of the served model (orchestration.daily_report).

Every step's output has a completion marker; a rerun skips finished steps and redoes an
unfinished one, so a run killed anywhere can be rerun and completes, and rerunning a finished
date with the same flags changes nothing; with other flags (RESULT_ARGS) it is refused, naming
them (remove WORK/runs/T to redo the date). One run of a date at a time (WORK/runs/T.lock), and
one publish of a model. Every flag is checked before any work (a misspelled one, not a Beam
option either, is refused naming the closest known flag). Exit codes: 0 published (or already),
3 not published (the gate, or a failed publish), 2 usage error (or a finished date rerun with
other flags, or a date or model in use by another run), 4 the transform changed.
"""

import datetime
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import apache_beam as beam
import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
from absl import flags, logging
from apache_beam.options.pipeline_options import PipelineOptions

from model_fn import calibration as C
from model_fn import estimator as E
from model_fn import evaluation
from model_fn import input_fn as I
from model_fn import metrics as M
from model_fn.memory import DoesNotFit
from model_fn.params import DEFAULT_MEMORY_LIMIT_GB, FITTED_PARAMS, MODELS, check_params, check_run
from orchestration import daily_report, delay, gate
from pipeline import partition, preprocess, publish, relabel
from pipeline.sources import aliccp
from pipeline.sources.deadletter import DEAD
from preprocessing import cli
from preprocessing import features as F
from preprocessing import transform as T

FLAGS = flags.FLAGS
STRATEGIES = ("wait", "naive", "corrected")
RELABEL_MARKER = "relabel.json"
RESULT = daily_report.RESULT
TRAINING_RUN = "training_run.json"     # in the published version's assets.extra
EXIT_REFUSED = 3
CALIBRATIONS = C.METHODS
# The arguments that decide what a date's run trains, evaluates and publishes (result.json records
# them): rerunning a finished date with other values is refused, naming them. The others (paths
# of ground truth, partitions, Beam options, train_examples, keep_versions) change how or where
# the work runs, not its result.
RESULT_ARGS = ("model", "model_name", "model_params", "calibration", "window_days", "attribution_days",
               "maturity_days", "label_strategy", "holdout_percent", "max_hash_buckets", "num_epochs",
               "warm_epochs", "warm_start", "batch_size", "seed", "gate_metrics", "max_metric_drop",
               "calibration_band", "min_gate_positives", "undecided", "gate_confidence")


def define_flags(fv: flags.FlagValues = FLAGS):
  """The command-line flags (only when run as a program, so the module imports as a library),
  defined into ``fv`` with their bounds; validate_flags checks the rest before any work."""
  fl = cli.Define(fv)
  fl.DEFINE_string("date", None, "Run date YYYYMMDD: conversions logged up to this day are known.")
  fl.DEFINE_string("logs_dir", None, "Root of impressions/date=D/ and conversions/date=D/.")
  fl.DEFINE_string("work_dir", None, "Runs, models and the reference transform live here.")
  fl.DEFINE_string("serving_root", None, "TF Serving's model base dir (models.config goes here).")
  fl.DEFINE_enum("model", "esmm", list(MODELS), "Model to train (model_fn.params.MODELS).")
  fl.DEFINE_string("params_file", None, "A JSON object of model params (model_fn.params.DEFAULT_PARAMS "
                   "keys, e.g. a tuned model's params.json without hash_buckets) that the day's model "
                   "trains with.")
  fl.DEFINE_enum("calibration", "bias", list(CALIBRATIONS), "Calibration built into the published "
                 "model: bias, platt, isotonic or none (model_fn.train --calibration).")
  fl.DEFINE_string("model_name", None, "Name under which TF Serving serves it (default: --model).")
  fl.DEFINE_integer("window_days", 7, "Rolling window of impression days.", lower_bound=2)
  fl.DEFINE_integer("attribution_days", 7, "A conversion counts up to this many days after the "
                    "impression day.", lower_bound=0)
  fl.DEFINE_integer("maturity_days", 3, "Labels of a day are mature this many days later.",
                    lower_bound=0)
  fl.DEFINE_enum("label_strategy", "wait", list(STRATEGIES),
                 "wait: train only on mature days; naive: also on immature days, open clicks as "
                 "negatives; corrected: as naive, with pCVR calibrated to the conversions still to come "
                 "(the delay distribution estimated from the logs).")
  fl.DEFINE_list("gate_metrics", list(gate.DEFAULT_METRICS),
                 f"Metrics that must not be worse beyond the noise, among {', '.join(gate.GATE_METRICS)}.")
  fl.DEFINE_float("max_metric_drop", gate.DEFAULT_MAX_DROP, "A candidate is refused when a gate metric's "
                  "difference to the served model has its upper bound below -max_metric_drop (-g: "
                  "refused unless its interval reaches a gain of g).", lower_bound=-1.0, upper_bound=1.0)
  fl.DEFINE_list("calibration_band", [f"{b:g}" for b in gate.DEFAULT_BAND], "LOW,HIGH: a model whose "
                 "calibration (mean prediction / observed rate on the holdout, per head) is outside "
                 "this band beyond the noise is not published, and a served one is replaced.")
  fl.DEFINE_integer("min_gate_positives", gate.DEFAULT_MIN_POSITIVES, "Fewer positive labels of a gate "
                    "metric on the holdout: too few to tell, --undecided decides.", lower_bound=0)
  fl.DEFINE_enum("undecided", gate.DEFAULT_UNDECIDED, list(gate.UNDECIDED_POLICIES),
                 "When the holdout is too small to tell: publish the fresher model or keep the served one.")
  fl.DEFINE_float("gate_confidence", gate.DEFAULT_CONFIDENCE, "Confidence of the gate's intervals.")
  fl.DEFINE_integer("keep_versions", 3, "Published versions to keep.", lower_bound=1)
  fl.DEFINE_integer("holdout_percent", 20,
                    "Share of every day's impressions (by sample id hash) that no run trains on; the "
                    "gate evaluates on the eval day's share (0: the whole eval day, no holdout).",
                    lower_bound=0, upper_bound=99)
  fl.DEFINE_float("num_epochs", 1.0, "Epochs over the train days of a cold-started run, and passes "
                  "each row gets over all the warm-started runs it is trained in.", lower_bound=0.0)
  fl.DEFINE_float("warm_epochs", 0.0, "Epochs of a warm-started run (0: num_epochs / number of "
                  "train days, since a row stays a train day in about that many runs).", lower_bound=0.0)
  fl.DEFINE_boolean("warm_start", True, "Continue from the served model's variables (--nowarm_start: "
                    "train from scratch, e.g. after a change of model shape).")
  fl.DEFINE_integer("batch_size", 1024, "Examples per step.", lower_bound=1)
  fl.DEFINE_float("memory_limit_gb", DEFAULT_MEMORY_LIMIT_GB, "Refuse to train when the estimated peak "
                  "memory exceeds this many GiB (0: what the machine has available; model_fn/memory.py).",
                  lower_bound=0.0)
  fl.DEFINE_integer("max_hash_buckets", 1 << 17, "Cap on every field's hash buckets (fixed across days).",
                    lower_bound=0)
  fl.DEFINE_string("ground_truth_dir", None,
                   "Optional LOGS/ground_truth of synthetic logs: report label completeness per day.")
  fl.DEFINE_integer("seed", 42, "Model seed.")
  fl.DEFINE_integer("partitions", 0, "Run the day's preprocessing as this many pipelines, for a "
                    "window larger than the DirectRunner's memory (pipeline.preprocess --partitions).",
                    lower_bound=0)
  fl.DEFINE_integer("parallel_partitions", 1, "Partitions run at once (with --partitions).",
                    lower_bound=1)
  fl.DEFINE_boolean("train_examples", True, "Write the day's train split as tf.Examples besides "
                    "the blocks that training reads (pipeline.preprocess --train_examples); "
                    "--notrain_examples: blocks only, a faster job.")


# The flag of each gate setting (orchestration.gate.decide's parameters).
GATE_FLAGS = {"metrics": "gate_metrics", "band": "calibration_band", "min_positives": "min_gate_positives",
              "undecided": "undecided", "confidence": "gate_confidence"}
UsageError = preprocess.UsageError   # a mistake in how the job was called (exit 2)


class TransformDrift(RuntimeError):
  """Today's transform differs from the reference one (exit 4)."""


def check_args(date: str, model: str, model_params: Dict, calibration: str, window_days: int,
               maturity_days: int, label_strategy: str, holdout_percent: int, batch_size: int,
               num_epochs: float, warm_epochs: float, gate_metrics: Sequence[str], max_hash_buckets: int,
               attribution_days: int, keep_versions: int, calibration_band: Sequence = gate.DEFAULT_BAND,
               min_gate_positives: int = gate.DEFAULT_MIN_POSITIVES, undecided: str = gate.DEFAULT_UNDECIDED,
               gate_confidence: float = gate.DEFAULT_CONFIDENCE,
               max_metric_drop: float = gate.DEFAULT_MAX_DROP) -> Dict:
  """Every argument of a day's run, before any work or write (the flags parser runs it on the
  flags, run() on its arguments): the model params as model_fn.params.check_params checks them
  for model_fn.train too, the run's numbers as check_run. Returns the model params the run
  trains with besides what the day's data decide (schema, base rates)."""
  _day(date)
  model_params = dict(model_params or {})
  if model_params.get("model", model) != model:
    # Its loss weights and network sizes are that model's (params.json holds them resolved).
    raise UsageError(f"--params_file holds the params of model {model_params['model']!r}, not of "
                     f"--model={model}; give the same model, or a file without 'model'")
  # What the day's data decide (schema, base rates) comes from the day's transform output.
  model_params = {k: v for k, v in model_params.items()
                  if k not in ("model", "hash_buckets", "format", "base_rates", "train_holdout")}
  try:
    check_params({"model": model, **model_params})
    check_run(batch_size, num_epochs, warm_epochs=warm_epochs)
  except (TypeError, ValueError) as e:
    raise UsageError(f"--model / --params_file: {e}") from None
  if calibration not in CALIBRATIONS:
    raise UsageError(f"--calibration must be one of {CALIBRATIONS}, got {calibration!r}")
  if label_strategy == "corrected" and calibration == "none":
    raise UsageError("--label_strategy=corrected corrects pCVR through the calibration; give a "
                     "--calibration other than none")
  _check_window(window_days, maturity_days, label_strategy)
  if not 0 <= holdout_percent < 100:
    raise UsageError("--holdout_percent must be in [0, 100)")
  if not (np.isfinite(max_metric_drop) and -1 <= max_metric_drop <= 1):
    raise UsageError(f"--max_metric_drop must be a number in [-1, 1], got {max_metric_drop}")
  try:
    gate.check_config(gate_metrics, band(calibration_band), min_gate_positives, undecided, gate_confidence)
  except gate.ConfigError as e:
    raise UsageError(f"--{GATE_FLAGS[e.setting]}: {e}") from None
  for name, value, minimum in (("max_hash_buckets", max_hash_buckets, 0),
                               ("attribution_days", attribution_days, 0), ("keep_versions", keep_versions, 1)):
    if value < minimum:
      raise UsageError(f"--{name} must be at least {minimum}, got {value}")
  return model_params


def band(values: Sequence) -> List[float]:
  """--calibration_band's LOW,HIGH as floats (HIGH may be inf)."""
  try:
    return [float(v) for v in values]
  except (TypeError, ValueError):
    raise UsageError(f"--calibration_band must be two numbers LOW,HIGH, got {list(values)}") from None


def warm_start_params(params: Dict, served_dir: Optional[str]) -> Dict:
  """``params`` of a run warm-started from ``served_dir``: the served model's values of the params
  its weights were fitted to (FITTED_PARAMS: the pooling, the hidden activation) and of its
  hidden layers' shape (hidden_norm), each unless the params name one. A model trained before a
  default changed keeps retraining as it was trained; --nowarm_start moves to the defaults."""
  if not served_dir or not tf.io.gfile.exists(os.path.join(served_dir, E.PARAMS_FILE)):
    return params
  served = E.load_params(served_dir)
  return {**{k: served[k] for k in (*FITTED_PARAMS, "hidden_norm")}, **params}


def load_params_file(path: Optional[str]) -> Dict:
  """The JSON object of model params in --params_file ({} without one)."""
  if not path:
    return {}
  try:
    with tf.io.gfile.GFile(path) as f:
      model_params = json.load(f)
  except (OSError, tf.errors.OpError, json.JSONDecodeError) as e:
    raise UsageError(f"--params_file {path}: {e}") from None
  if not isinstance(model_params, dict):
    raise UsageError(f"--params_file {path} must hold a JSON object of model params")
  return model_params


def validate_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The flags together, before any work (run by the flags parser, preprocessing/cli.py)."""
  cli.require(fv, "date", "logs_dir", "work_dir", "serving_root")
  v = lambda name: fv[name].value
  check_args(v("date"), v("model"), load_params_file(v("params_file")), v("calibration"), v("window_days"),
             v("maturity_days"), v("label_strategy"), v("holdout_percent"), v("batch_size"), v("num_epochs"),
             v("warm_epochs"), v("gate_metrics"), v("max_hash_buckets"), v("attribution_days"),
             v("keep_versions"), v("calibration_band"), v("min_gate_positives"), v("undecided"),
             v("gate_confidence"), v("max_metric_drop"))


def _differences(recorded: Dict, given: Dict) -> List[str]:
  # A result of the gate before intervals (no calibration_band recorded) gave max_metric_drop
  # another meaning: its gate arguments are not compared.
  skip = () if "calibration_band" in recorded else ("gate_metrics", "max_metric_drop")
  return [f"--{k if k != 'model_params' else 'params_file'} {recorded[k]!r} -> {given[k]!r}"
          for k in RESULT_ARGS if k in recorded and k in given and k not in skip and recorded[k] != given[k]]


def _recorded_args(done: Dict) -> Dict:
  """The RESULT_ARGS a finished run recorded; for a result.json of an earlier version, which
  recorded none, what its plan shows of them."""
  if "args" in done:
    return done["args"]
  p = done.get("plan", {})
  out = {}
  if "window" in p:
    out["window_days"] = len(p["window"])
  if "eval_day" in p and "date" in p:
    out["maturity_days"] = (_day(p["date"]) - _day(p["eval_day"])).days
  if "strategy" in p:
    out["label_strategy"] = p["strategy"]
  if "holdout_percent" in p:
    out["holdout_percent"] = p["holdout_percent"]
  return out


def _day(date: str) -> datetime.date:
  try:
    if not (isinstance(date, str) and len(date) == 8 and date.isdigit()):
      raise ValueError(date)     # strptime would read 2024011 as 20240101
    return datetime.datetime.strptime(date, "%Y%m%d").date()
  except (TypeError, ValueError):
    raise UsageError(f"--date must be YYYYMMDD, got {date!r}") from None


def _fmt(day: datetime.date) -> str:
  return day.strftime("%Y%m%d")


def _check_window(window_days: int, maturity_days: int, strategy: str) -> None:
  if strategy not in STRATEGIES:
    raise UsageError(f"--label_strategy must be one of {STRATEGIES}")
  if window_days < 2 or maturity_days < 0 or maturity_days >= window_days:
    raise UsageError("need window_days >= 2 and 0 <= maturity_days < window_days")


def plan(date: str, logs_dir: str, window_days: int, maturity_days: int, strategy: str) -> Dict:
  """Which days train, which day evaluates, which conversion logs are read."""
  _check_window(window_days, maturity_days, strategy)
  t = _day(date)
  window = [_fmt(t - datetime.timedelta(days=k)) for k in range(window_days - 1, -1, -1)]
  present = [d for d in window if tf.io.gfile.exists(relabel.log_paths(logs_dir, d)["skeleton"])]
  eval_day = _fmt(t - datetime.timedelta(days=maturity_days))
  if eval_day not in present:
    raise UsageError(f"no impression log for the eval day {eval_day} under {logs_dir}/impressions")
  train = [d for d in present if d < eval_day or (strategy != "wait" and d > eval_day)]
  if not train:
    raise UsageError(f"no train day in the window {window[0]}..{window[-1]} before the eval day {eval_day}")
  logs = {d: relabel.log_paths(logs_dir, d)["conversions"] for d in window}
  conversions = {d: path for d, path in logs.items() if tf.io.gfile.exists(path)}
  return {"date": date, "eval_day": eval_day, "train_days": train, "window": window,
          "immature_days": [d for d in present if d > eval_day], "conversion_logs": conversions,
          "strategy": strategy}


def _done(path: str) -> Optional[dict]:
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  return None


def _write_json(path: str, obj) -> None:
  publish.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def _owning(path: str, what: str) -> publish.OutputLock:
  """The lock that makes this run the only one writing ``path`` (pipeline/publish.py); a
  second run is refused with a UsageError naming the first one's pid, instead of removing
  what the first one is writing."""
  try:
    return publish.OutputLock(path, what).acquire()
  except publish.OutputBusy as e:
    raise UsageError(str(e)) from None


def run_relabel(p: Dict, logs_dir: str, out_dir: str, attribution_days: int, beam_args: Sequence[str],
                holdout_percent: int = 0) -> Dict:
  """Step 2: relabeled skeleton files per split + the split's common files; the marker last.

  ``holdout_percent``: the share of every day's impressions (by sample id) kept out of
  training in every run; the eval split is that slice of the eval day. One run of a date
  relabels at a time (an unfinished ``out_dir`` is removed and redone: never a live run's).
  """
  with _owning(out_dir, "daily run relabeling this date"):
    return _run_relabel(p, logs_dir, out_dir, attribution_days, beam_args, holdout_percent)


def _run_relabel(p: Dict, logs_dir: str, out_dir: str, attribution_days: int, beam_args: Sequence[str],
                 holdout_percent: int) -> Dict:
  done = _done(os.path.join(out_dir, RELABEL_MARKER))
  if done:
    return done
  if tf.io.gfile.exists(out_dir):
    tf.io.gfile.rmtree(out_dir)
  splits = {"train": p["train_days"], "eval": [p["eval_day"]]}
  dates = sorted(d for days in splits.values() for d in days)
  impressions = {d: relabel.log_paths(logs_dir, d)["skeleton"] for d in dates}
  pipeline = beam.Pipeline(options=PipelineOptions(list(beam_args), save_main_session=False))
  out = pipeline | "Relabel" >> relabel.Relabel(impressions, p["conversion_logs"], attribution_days)
  routed = out["lines"] | "Route" >> beam.ParDo(relabel.RouteToSplits(splits["train"], p["eval_day"], holdout_percent)).with_outputs(
      *splits)
  for split in splits:
    _ = routed[split] | f"Write_{split}" >> beam.io.WriteToText(
        os.path.join(out_dir, split, "sample_skeleton"), file_name_suffix=".csv", coder=beam.coders.BytesCoder())
  _ = out[DEAD] | "WriteDeadLetters" >> beam.io.WriteToText(
      os.path.join(out_dir, "dead_letter", "relabel"), file_name_suffix=".jsonl")
  result = pipeline.run()
  result.wait_until_finish()
  counters = preprocess._counters(result)
  rec = relabel.reconcile(counters, dates)
  rec["holdout_percent"] = holdout_percent
  for key in ("routed", "not_used_this_run"):
    prefix = f"{relabel.NS}/{key}/"
    rec[key] = {k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix)}
  routed_all = sum(rec["routed"].values()) + sum(rec["not_used_this_run"].values())
  if not (rec["impressions_balanced"] and rec["conversions_balanced"]) or routed_all != rec["impressions_written"]:
    raise RuntimeError(f"relabel row counts do not reconcile: {json.dumps(rec, sort_keys=True)}")
  for split, days in splits.items():
    for d in days:
      tf.io.gfile.copy(relabel.log_paths(logs_dir, d)["common"],
                       os.path.join(out_dir, split, f"common_features_{d}.csv"), overwrite=True)
  _write_json(os.path.join(out_dir, RELABEL_MARKER), rec)
  return rec


def run_transform(relabeled: str, out_dir: str, max_hash_buckets: int, beam_args: Sequence[str],
                  partitions: int = 0, parallel_partitions: int = 1, train_examples: bool = True) -> None:
  """Step 3: the preprocessing job on the relabeled files (skipped when finished); with
  ``partitions``, as that many pipelines (pipeline.preprocess --partitions); ``train_examples``
  False writes the train split as blocks only."""
  if tf.io.gfile.exists(os.path.join(out_dir, F.RECONCILIATION)):
    return
  patterns = {split: {"skeleton": os.path.join(relabeled, split, "sample_skeleton*.csv"),
                      "common": os.path.join(relabeled, split, "common_features_*.csv")}
              for split in ("train", "eval")}
  preprocess.run("aliccp", patterns, out_dir, list(beam_args), max_hash_buckets=max_hash_buckets,
                 overwrite=True, partitions=partitions, parallel_partitions=parallel_partitions,
                 train_examples=train_examples)


def probe_examples(logs_dir: str, date: str, n: int = 32) -> List[bytes]:
  """Up to ``n`` raw serialized tf.Examples of day ``date`` as a client would send them
  (labels and sample id left out): warmup requests and the transform drift probe."""
  known = frozenset(f.name for f in F.fields("aliccp"))
  rows = []
  paths = relabel.log_paths(logs_dir, date)
  # partition.records: the lines as the job reads them (a file's byte-order mark dropped).
  with tf.io.gfile.GFile(paths["skeleton"], "rb") as f:
    for line in partition.records(f):
      try:
        rows.append(aliccp.parse_skeleton_line(line, known)[0])
      except aliccp.BadRecord:
        continue
      if len(rows) == n:
        break
  wanted = {r["index"] for r in rows}
  common = {}
  with tf.io.gfile.GFile(paths["common"], "rb") as f:
    for line in partition.records(f):
      if len(common) == len(wanted):
        break
      try:
        row = aliccp.parse_common_line(line, known)[0]
      except aliccp.BadRecord:
        continue
      if row["index"] in wanted:
        common[row["index"]] = row["features"]
  drop = set(F.RAW_LABELS) | {F.SAMPLE_ID}
  return [T.raw_example({k: v for k, v in aliccp.to_raw_instance(r, common.get(r["index"], {})).items()
                         if k not in drop}, "aliccp").SerializeToString() for r in rows]


def _transform(transform_dir: str, serialized: Sequence[bytes]) -> Dict[str, np.ndarray]:
  # The transform_fn is a TF1 graph (tft_beam.Context(force_tf_compat_v1=True)): apply it in one.
  with tf.Graph().as_default() as graph:
    raw = tf.io.parse_example(tf.constant(list(serialized)),
                              T.raw_feature_spec("aliccp", with_labels=False, with_sample_id=False))
    got = tft.TFTransformOutput(transform_dir).transform_raw_features(raw, drop_unused_features=True)
    dense = {k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v for k, v in got.items()}
    with tf.compat.v1.Session(graph=graph) as session:
      session.run(tf.compat.v1.tables_initializer())
      return session.run(dense)


def check_transform(reference: str, transform_dir: str, serialized: Sequence[bytes]) -> str:
  """Step 3's guard: the first transform becomes the reference; later ones must agree on
  the schema's bucket counts and on every output for the probe examples."""
  if not tf.io.gfile.exists(os.path.join(reference, "transform_fn")):
    # Under the reference's lock, so no other day's first run removes this staging copy.
    with _owning(reference, "daily run setting the reference transform"):
      if not tf.io.gfile.exists(os.path.join(reference, "transform_fn")):
        staging = reference + ".tmp"
        if tf.io.gfile.exists(staging):
          tf.io.gfile.rmtree(staging)
        for sub in ("transform_fn", "transformed_metadata"):
          publish.copy_tree(os.path.join(transform_dir, sub), os.path.join(staging, sub))
        tf.io.gfile.rename(staging, reference, overwrite=True)
        return "reference set"
  want = T.transformed_hash_buckets(tft.TFTransformOutput(reference))
  got = T.transformed_hash_buckets(tft.TFTransformOutput(transform_dir))
  if want != got:
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    raise TransformDrift(f"hash bucket counts differ from the reference transform for {diff}")
  a, b = _transform(reference, serialized), _transform(transform_dir, serialized)
  if set(a) != set(b):
    raise TransformDrift(f"transform outputs differ: {sorted(set(a) ^ set(b))}")
  for k in a:
    if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]):
      raise TransformDrift(f"transform output {k!r} differs from the reference on the same raw examples")
  return "same as reference"


def label_completeness(logs_dir: str, truth_dir: str, rec: Dict) -> Dict[str, Dict[str, float]]:
  """Per day: conversions known to this run / conversions that will eventually happen
  (ground truth: clicked impressions whose counterfactual conversion is 1)."""
  out = {}
  for date, counts in sorted(rec["days"].items()):
    with tf.io.gfile.GFile(relabel.log_paths(logs_dir, date)["skeleton"]) as f:
      clicks = np.array([int(line.split(",", 2)[1]) for line in f])
    with tf.io.gfile.GFile(os.path.join(truth_dir, f"date={date}.csv")) as f:
      next(f)
      cf = np.array([int(line.rstrip("\n").rsplit(",", 1)[1]) for line in f])
    eventual = int((clicks * cf).sum())
    known = int(counts["conversions_attributed"])
    out[date] = {"known": known, "eventual": eventual, "completeness": known / eventual if eventual else 1.0}
  return out


def delay_figures(rec: Dict, p: Dict, date: str, attribution_days: int, maturity_days: int) -> Dict:
  """The conversion-delay distribution estimated from the window's relabel counts, the eval day's
  estimated label completeness, and the factor the corrected strategy scales the train days'
  conversions by (1 for the other strategies)."""
  try:
    est = delay.estimate(rec["days"], date, attribution_days)
    scale = delay.conversion_scale(est, rec["days"], p["train_days"], date)
  except ValueError as e:
    if p["strategy"] == "corrected":
      raise UsageError(f"{date}: cannot estimate the conversion delay: {e}") from None
    return {"conversion_scale": 1.0, "note": str(e)}
  return {**est, "eval_day_completeness": delay.completeness(est, maturity_days),
          "train_conversion_scale": scale,
          "conversion_scale": scale if p["strategy"] == "corrected" else 1.0}


def epochs_for_run(num_epochs: float, warm_epochs: float, warm: bool, num_train_days: int) -> float:
  """A cold start trains ``num_epochs``. A warm start continues a model that has already
  trained on most of the window: a row stays a train day for about ``num_train_days``
  consecutive runs, so each warm run trains num_epochs / num_train_days and a row gets about
  ``num_epochs`` passes in all (``warm_epochs`` > 0 sets it instead)."""
  if not warm:
    return num_epochs
  return warm_epochs if warm_epochs > 0 else num_epochs / max(1, num_train_days)


def served_run(serving_root: str, model_name: str) -> Optional[Dict]:
  """The training run of the newest published version (from its assets.extra), or None."""
  path = publish.newest(serving_root, model_name)
  if not path:
    return None
  info = _done(os.path.join(path, "assets.extra", TRAINING_RUN)) or {}
  info["path"] = path
  info["version"] = int(os.path.basename(path))
  return info


def run(date: str, logs_dir: str, work_dir: str, serving_root: str, model: str = "esmm",
        model_name: Optional[str] = None, window_days: int = 7, attribution_days: int = 7,
        maturity_days: int = 3, label_strategy: str = "wait",
        gate_metrics: Sequence[str] = gate.DEFAULT_METRICS, max_metric_drop: float = gate.DEFAULT_MAX_DROP,
        keep_versions: int = 3, num_epochs: float = 1.0, batch_size: int = 1024,
        max_hash_buckets: int = 1 << 17, ground_truth_dir: Optional[str] = None, seed: int = 42,
        beam_args: Sequence[str] = (), holdout_percent: int = 20, warm_epochs: float = 0.0,
        warm_start: bool = True, partitions: int = 0, parallel_partitions: int = 1,
        train_examples: bool = True, model_params: Optional[Dict] = None,
        calibration: str = "bias", calibration_band: Sequence = gate.DEFAULT_BAND,
        min_gate_positives: int = gate.DEFAULT_MIN_POSITIVES, undecided: str = gate.DEFAULT_UNDECIDED,
        gate_confidence: float = gate.DEFAULT_CONFIDENCE,
        memory_limit_gb: float = DEFAULT_MEMORY_LIMIT_GB) -> Dict:
  """One day's run (see the module doc). Returns the run's result (also RUN/result.json).
  ``model_params``: params the model trains with besides ``model`` (checked before any work).
  ``memory_limit_gb``: a model whose estimated training memory exceeds it (0: what the machine
  has available) is refused before it trains (model_fn/memory.py)."""
  model_params = check_args(date, model, model_params, calibration, window_days, maturity_days,
                            label_strategy, holdout_percent, batch_size, num_epochs, warm_epochs,
                            gate_metrics, max_hash_buckets, attribution_days, keep_versions, calibration_band,
                            min_gate_positives, undecided, gate_confidence, max_metric_drop)
  calibration_band = band(calibration_band)
  model_name = model_name or model
  args = dict(model=model, model_name=model_name, model_params=model_params, calibration=calibration,
              window_days=window_days, attribution_days=attribution_days, maturity_days=maturity_days,
              label_strategy=label_strategy, holdout_percent=holdout_percent,
              max_hash_buckets=max_hash_buckets, num_epochs=float(num_epochs),
              warm_epochs=float(warm_epochs), warm_start=bool(warm_start), batch_size=batch_size, seed=seed,
              gate_metrics=list(gate_metrics), max_metric_drop=float(max_metric_drop),
              calibration_band=[format(b, "g") for b in calibration_band], min_gate_positives=min_gate_positives, undecided=undecided,
              gate_confidence=float(gate_confidence))
  args = json.loads(json.dumps(args))      # as result.json records it
  run_dir = os.path.join(work_dir, "runs", date)
  # One run of a date at a time: a second is refused (UsageError naming the first one's pid)
  # instead of training into, or publishing from, the same model dir.
  with _owning(run_dir, "daily run of this date"):
    done = _done(os.path.join(run_dir, RESULT))
    if done:
      differ = _differences(_recorded_args(done), args)
      if differ:
        raise UsageError(f"{date} is already done ({os.path.join(run_dir, RESULT)}) with other flags: "
                         f"{'; '.join(differ)}. Nothing was changed; to redo the date with these flags, "
                         f"remove {run_dir} first")
      done["rerun"] = True
      return done
    p = plan(date, logs_dir, window_days, maturity_days, label_strategy)
    p["holdout_percent"] = holdout_percent
    tf.io.gfile.makedirs(run_dir)
    _write_json(os.path.join(run_dir, "plan.json"), p)
    rec = run_relabel(p, logs_dir, os.path.join(run_dir, "relabeled"), attribution_days, beam_args, holdout_percent)
    transform_dir = os.path.join(run_dir, "transformed")
    run_transform(os.path.join(run_dir, "relabeled"), transform_dir, max_hash_buckets, beam_args,
                  partitions, parallel_partitions, train_examples)
    probes = probe_examples(logs_dir, p["eval_day"])
    transform_check = check_transform(os.path.join(work_dir, "transform_reference"), transform_dir, probes)
    served = served_run(serving_root, model_name)
    served_dir = served.get("model_dir") if served else None
    if served_dir and not tf.io.gfile.exists(served_dir):
      served_dir = None
    warm = served_dir if warm_start else None
    model_dir = os.path.join(run_dir, "model")
    try:
      I.require_rows(transform_dir)     # an empty split would train or gate on nothing (NaN metrics)
    except I.EmptySplit as e:
      raise UsageError(f"{date}: {e} (the eval split is --holdout_percent={holdout_percent} of day "
                       f"{p['eval_day']}); nothing was trained or published") from None
    epochs = epochs_for_run(num_epochs, warm_epochs, bool(warm), len(p["train_days"]))
    delays = delay_figures(rec, p, date, attribution_days, maturity_days)
    trained = _done(os.path.join(model_dir, "train_result.json"))
    # A model fitted at another conversion scale (a killed run resumed with another strategy) is
    # refitted: the budget is spent, so this only recalibrates and exports again.
    if (not trained or not tf.io.gfile.exists(trained.get("saved_model", ""))
        or (C.load(model_dir) or {}).get("conversion_scale", 1.0) != delays["conversion_scale"]):
      params = warm_start_params({**model_params, "model": model}, warm)   # format, buckets: the day's transform
      try:
        trained = E.train_and_evaluate(transform_dir, model_dir, params, batch_size, num_epochs=epochs, seed=seed,
                                       warm_start_from=warm, calibration=calibration,
                                       conversion_scale=delays["conversion_scale"], memory_limit_gb=memory_limit_gb)
      except (DoesNotFit, E.ModelDirError) as e:     # too large; or a served model it cannot start from
        raise UsageError(f"{date}: {e}; nothing was trained or published") from None
    to_score = [("candidate", model_dir)] + ([("served", served_dir)] if served_dir else [])
    report, curves = evaluation.evaluate(to_score, transform_dir)
    candidate = {k: v for k, v in report["candidate"].items() if isinstance(v, float)}
    served_metrics = ({k: v for k, v in report["served"].items() if isinstance(v, float)}
                      if "served" in report else None)
    decision = gate.decide(curves["candidate"], curves.get("served"), gate_metrics, max_metric_drop,
                           calibration_band, min_gate_positives, undecided, gate_confidence,
                           delays.get("eval_day_completeness", 1.0))
    # Written as JSON: an undefined metric (NaN) is null there, with a warning naming it.
    result = {"date": date, "plan": p, "relabel": rec, "transform": transform_check,
              "warm_start_from": warm, "epochs": epochs, "served_before": served and served["version"],
              "candidate": M.finite_or_none(candidate, f"{date}: the candidate's metrics"),
              "served": served_metrics and M.finite_or_none(served_metrics, f"{date}: the served model's metrics"),
              "model_dir": model_dir, "saved_model": trained["saved_model"], "args": args, "gate": decision,
              "delay": delays}
    if ground_truth_dir:
      result["label_completeness"] = label_completeness(logs_dir, ground_truth_dir, rec)
    if not decision["publish"]:
      result.update(published=False, refused=decision["refused"] or [decision["decision"]])
    else:
      extra = {"model_dir": model_dir, "date": date, "metrics": result["candidate"]}
      pub = publish.publish(trained["saved_model"], serving_root, model_name, int(date), probes,
                            keep=keep_versions, extra_files={TRAINING_RUN: json.dumps(extra, indent=2)})
      result.update(published=pub["published"], version=pub["version"], versions=pub["versions"],
                    publish=pub["reason"])
    _write_json(os.path.join(run_dir, RESULT), result)
    try:
      daily_report.write(work_dir)
    except (OSError, tf.errors.OpError, ValueError, KeyError) as e:   # the run's result stands
      logging.warning("could not rewrite %s: %s", os.path.join(work_dir, daily_report.REPORT), e)
    return result


def format_result(r: Dict) -> str:
  lines = [f"daily run {r['date']}{' (already done; nothing changed)' if r.get('rerun') else ''}: "
           f"train days {','.join(r['plan']['train_days'])}, eval day {r['plan']['eval_day']}, "
           f"strategy {r['plan']['strategy']}"]
  rel = r["relabel"]
  lines.append(f"  relabel: impressions {rel['impressions_read']:,} read = {rel['impressions_written']:,} written"
               f" + {sum(rel['impressions_set_aside'].values()):,} set aside; conversions "
               f"{rel['conversions_read']:,} read = {rel['conversions_attributed']:,} attributed + "
               f"{sum(rel['conversions_set_aside'].values()):,} set aside "
               + str({k: v for k, v in rel["conversions_set_aside"].items() if v}))
  for date, c in sorted(r.get("label_completeness", {}).items()):
    lines.append(f"  labels of {date}: {c['known']}/{c['eventual']} conversions known ({100 * c['completeness']:.0f}%)")
  d = r.get("delay") or {}
  if "cdf" in d:
    lines.append(f"  delay: {100 * d['eval_day_completeness']:.0f}% of the eval day's conversions arrived "
                 f"(estimated); the train days' eventual conversions are {d['train_conversion_scale']:.3f}x "
                 f"the known ones" + ("; pCVR calibrated to them" if d["conversion_scale"] != 1.0 else ""))
  lines.append(f"  transform: {r['transform']}; warm start: {r['warm_start_from'] or 'none (cold start)'}; "
               f"epochs {r['epochs']:g}")
  keys = ("auc/ctr", "auc/ctcvr", "auc/cvr_clicked", "calibration/ctcvr")
  num = lambda v: "undefined" if v is None or not np.isfinite(v) else f"{v:.4f}"
  lines.append("  candidate: " + "  ".join(f"{k}={num(r['candidate'][k])}" for k in keys if k in r["candidate"]))
  if r.get("served"):
    lines.append(f"  served v{r['served_before']}: "
                 + "  ".join(f"{k}={num(r['served'][k])}" for k in keys if k in r["served"]))
  else:
    lines.append("  gate: no served model with a known training run to compare with")
  if r.get("gate"):
    lines += gate.summary_lines(r["gate"])
  if r.get("refused"):
    lines.append("  NOT PUBLISHED, the served model stays: " + "; ".join(r["refused"]))
  else:
    lines.append(f"  {r['publish']}: version {r['version']}; versions now {r['versions']}")
  return "\n".join(lines)


def main(argv):
  beam_args = argv[1:]
  try:
    model_params = load_params_file(FLAGS.params_file)    # validate_flags has checked it
    r = run(FLAGS.date, FLAGS.logs_dir, FLAGS.work_dir, FLAGS.serving_root, FLAGS.model, FLAGS.model_name,
            FLAGS.window_days, FLAGS.attribution_days, FLAGS.maturity_days, FLAGS.label_strategy,
            FLAGS.gate_metrics, FLAGS.max_metric_drop, FLAGS.keep_versions, FLAGS.num_epochs,
            FLAGS.batch_size, FLAGS.max_hash_buckets, FLAGS.ground_truth_dir, FLAGS.seed, beam_args,
            FLAGS.holdout_percent, FLAGS.warm_epochs, FLAGS.warm_start, FLAGS.partitions,
            FLAGS.parallel_partitions, FLAGS.train_examples, model_params, FLAGS.calibration,
            FLAGS.calibration_band, FLAGS.min_gate_positives, FLAGS.undecided, FLAGS.gate_confidence,
            FLAGS.memory_limit_gb)
  except (UsageError, publish.OutputBusy) as e:    # busy: another run publishes this model now
    print(f"error: {e}", file=sys.stderr)
    return cli.EXIT_USAGE
  except publish.PublishError as e:
    print(f"error: not published, the served model stays: {e}", file=sys.stderr)
    return EXIT_REFUSED
  except TransformDrift as e:
    print(f"error: the transform changed: {e}; nothing was trained or published", file=sys.stderr)
    return 4
  print(format_result(r))
  return EXIT_REFUSED if r.get("refused") else 0


if __name__ == "__main__":
  # Flags it does not define go to Beam; one that Beam does not know either is an error.
  cli.run(main, define_flags, validate_flags, beam=True)
