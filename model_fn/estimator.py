"""Estimator plumbing shared by the entry points: build, record params, train and export.

No flags here: ``model_fn.train`` and ``model_fn.evaluate`` both import it.

On a cluster the same code runs in every task; ``TF_CONFIG`` (set by the cluster manager, or
by model_fn.launch_local_cluster) says which. ``tf.estimator.train_and_evaluate`` then runs
the task's role: parameter servers serve the variables (the embedding tables partitioned over
them), the chief and the workers train between-graph on their shards of the input, the
evaluator evaluates every new checkpoint. Only the chief records params.json, evaluates the
final checkpoint and exports the SavedModel.
"""

import json
import math
import os
import time
from typing import Any, Dict, Optional

import tensorflow as tf

import numpy as np
from absl import logging

from model_fn import calibration as C
from model_fn import esmm, export, layers, memory, mmoe
from model_fn import table_sizing
from model_fn import input_fn as I
from model_fn import metrics as M
from model_fn.params import (DEFAULT_KEEP_CHECKPOINTS, DEFAULT_MEMORY_LIMIT_GB, FITTED_PARAMS, MODEL_SPECS,
                             RUNTIME_PARAMS, SHAPE_PARAMS, resolve_params, table_rows, upgrade_recorded)
from preprocessing import features as F
from preprocessing import transform as T

PARAMS_FILE = "params.json"
TASK_STEPS_DIR = "task_steps"     # MODEL_DIR/task_steps/<task>.json: steps each process trained


def is_distributed(config: tf.estimator.RunConfig) -> bool:
  return bool(config.cluster_spec.as_dict())


def task_name(config: tf.estimator.RunConfig) -> str:
  """'chief-0', 'worker-1', 'ps-0', 'evaluator-0' on a cluster; 'local' on one machine."""
  return f"{config.task_type}-{config.task_id}" if is_distributed(config) else "local"


def _session_config(config: tf.estimator.RunConfig) -> tf.compat.v1.ConfigProto:
  """Threads from the machine; on a cluster a training task sees only the parameter servers and
  itself, so it neither waits for the other workers to start nor hangs when they have exited."""
  session = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=0, inter_op_parallelism_threads=0)
  if is_distributed(config) and config.task_type in ("chief", "worker") and config.num_ps_replicas:
    session.device_filters.extend(["/job:ps", f"/job:{config.task_type}/task:{config.task_id}"])
  return session


class TaskStepsHook(tf.estimator.SessionRunHook):
  """Counts the training steps this process ran; writes MODEL_DIR/task_steps/<task>.json at the end
  (on a cluster: how much each worker contributed to the global step)."""

  def __init__(self, model_dir: str, task: str):
    self._path = os.path.join(model_dir, TASK_STEPS_DIR, f"{task}.json")
    self._task = task

  def begin(self):
    self._global_step = tf.compat.v1.train.get_global_step()
    self._steps, self._last = 0, None

  def before_run(self, run_context):
    return tf.estimator.SessionRunArgs(self._global_step)

  def after_run(self, run_context, run_values):
    self._steps += 1
    self._last = int(run_values.results)

  def end(self, session):
    tf.io.gfile.makedirs(os.path.dirname(self._path))
    with tf.io.gfile.GFile(self._path, "w") as f:
      json.dump({"task": self._task, "steps": self._steps, "global_step_seen_last": self._last}, f)


class ProgressHook(tf.estimator.SessionRunHook):
  """Logs ``progress: step N of M (P%), R steps/s, about T left`` at most every ``every_secs``
  seconds while training (run_local.sh shows these lines while a model trains)."""

  def __init__(self, train_steps: int, every_secs: float = 20.0):
    self._total = int(train_steps)
    self._every = every_secs

  def begin(self):
    self._global_step = tf.compat.v1.train.get_global_step()
    self._start_step = self._start = None
    self._last_log = time.monotonic()

  def before_run(self, run_context):
    return tf.estimator.SessionRunArgs(self._global_step)

  def after_run(self, run_context, run_values):
    step, now = int(run_values.results), time.monotonic()
    if self._start_step is None:
      self._start_step, self._start = step, now
      return
    if now - self._last_log < self._every:
      return
    self._last_log = now
    rate = (step - self._start_step) / max(now - self._start, 1e-9)
    left = max(self._total - step, 0) / rate if rate > 0 else float("inf")
    logging.info("progress: step %d of %d (%d%%), %.1f steps/s, about %s left", step, self._total,
                 100 * step // max(self._total, 1), rate,
                 f"{int(left // 60)}m{int(left % 60):02d}s" if left != float("inf") else "unknown")


def task_steps(model_dir: str) -> Dict[str, int]:
  """{task: training steps it ran} from the TaskStepsHook files of a model_dir."""
  out = {}
  for path in tf.io.gfile.glob(os.path.join(model_dir, TASK_STEPS_DIR, "*.json")):
    with tf.io.gfile.GFile(path) as f:
      rec = json.load(f)
    out[rec["task"]] = rec["steps"]
  return out


def model_fn_for(params) -> Any:
  """The model_fn for ``params['model']``: esmm_model_fn for the two-tower models, mmoe_model_fn
  for the multi-task networks."""
  return esmm.esmm_model_fn if MODEL_SPECS[params["model"]]["network"] == "towers" else mmoe.mmoe_model_fn


def make_estimator(model_dir: str, params: Dict[str, Any], seed: int = 42,
                   save_checkpoints_steps: int = 1000,
                   warm_start_from: Optional[str] = None,
                   keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS) -> tf.estimator.Estimator:
  """``warm_start_from``: a model dir (or checkpoint) whose trainable variables initialise a
  model dir without checkpoints (the daily retrain starts from yesterday's model).

  The RunConfig reads TF_CONFIG; ``params['embedding_partitions']`` 0 (the default) becomes
  the number of parameter servers (1 on one machine). A model_dir's calibration.json
  (model_fn/calibration.py) is applied to the heads unless ``params['calibration']`` is given."""
  config = tf.estimator.RunConfig(
      model_dir=model_dir, tf_random_seed=seed, save_checkpoints_steps=save_checkpoints_steps,
      keep_checkpoint_max=keep_checkpoints, log_step_count_steps=100)
  config = config.replace(session_config=_session_config(config))
  if not params.get("embedding_partitions"):
    params = {**params, "embedding_partitions": max(1, config.num_ps_replicas)}
  if params.get("calibration") is None:
    calibrations = C.load(model_dir)
    if calibrations:
      params = {**params, "calibration": calibrations}
  warm = tf.estimator.WarmStartSettings(ckpt_to_initialize_from=warm_start_from) if warm_start_from else None
  return tf.estimator.Estimator(model_fn_for(params), config=config, params=params, warm_start_from=warm)


class ModelDirError(ValueError):
  """A model_dir (or warm-start source) that does not fit this run; the message says why."""


def _json(params: Dict[str, Any]) -> Dict[str, Any]:
  return json.loads(json.dumps({k: v for k, v in params.items() if k not in RUNTIME_PARAMS}))


# Recorded in params.json but not part of a model's identity: they only initialise variables.
INIT_PARAMS = ("base_rates",)
# Recorded, but what they decide is recorded too: the rows they gave each table (field_rows).
SIZING_PARAMS = ("table_rows_per_id",)


def _identity(params: Dict[str, Any]) -> Dict[str, Any]:
  """The params that make a model what it is, with the rows of each table however they were given."""
  out = {k: v for k, v in params.items() if k not in INIT_PARAMS + SIZING_PARAMS}
  if out.get("hash_buckets"):
    out["field_rows"] = table_rows(params)
  return out


def schema_difference(old_buckets: Dict[str, int], new_buckets: Dict[str, int]) -> str:
  """What changed between two transform schemas ({field: hash buckets}), in words."""
  parts = []
  gone = sorted(set(old_buckets) - set(new_buckets))
  new = sorted(set(new_buckets) - set(old_buckets))
  changed = sorted(k for k in set(old_buckets) & set(new_buckets) if old_buckets[k] != new_buckets[k])
  if gone:
    parts.append(f"fields only in the model: {gone[:8]}")
  if new:
    parts.append(f"fields only in the transform output: {new[:8]}")
  if changed:
    parts.append("hash buckets changed: " + ", ".join(
        f"{k} {old_buckets[k]} -> {new_buckets[k]}" for k in changed[:5]) + (" ..." if len(changed) > 5 else ""))
  return "; ".join(parts)


def check_transform_matches(params: Dict[str, Any], model_dir: str, tft_output, transform_dir: str) -> None:
  """A trained model reads only transform outputs of the schema it was trained on."""
  got = T.transformed_hash_buckets(tft_output)
  fmt = I.transform_format(transform_dir)
  if params.get("format") != fmt or params.get("hash_buckets") != got:
    detail = (f"format {params.get('format')} vs {fmt}" if params.get("format") != fmt
              else schema_difference(params.get("hash_buckets") or {}, got))
    raise ModelDirError(
        f"the model in {model_dir} was trained on a transform output of another schema than "
        f"{transform_dir} ({detail}); use the preprocessing output it was trained on, or train a "
        "new model on this one")


def _recorded_params(path: str) -> Dict[str, Any]:
  """A params.json, with the params added after it was written (params.upgrade_recorded)."""
  with tf.io.gfile.GFile(path) as f:
    recorded = json.load(f)
  try:
    return upgrade_recorded(recorded)
  except ValueError as e:
    raise ModelDirError(f"{os.path.dirname(path)} holds {e}") from None


def check_model_dir(model_dir: str, params: Dict[str, Any], what: str = "--model_dir") -> None:
  """Refuses a dir whose checkpoints are not of this model: without params.json (not written
  by this project's trainer) or with other params (another model, or another transform schema)."""
  checkpoint = tf.train.latest_checkpoint(model_dir) if tf.io.gfile.isdir(model_dir) else None
  if not checkpoint:
    return
  path = os.path.join(model_dir, PARAMS_FILE)
  if not tf.io.gfile.exists(path):
    raise ModelDirError(
        f"{what} {model_dir} holds checkpoints ({os.path.basename(checkpoint)}) but no {PARAMS_FILE}: "
        "they are not from model_fn.train, so they cannot be resumed; use another directory")
  old = _identity(_recorded_params(path))
  new = _identity(_json(params))
  if old == new:
    return
  if old.get("format") != new.get("format") or old.get("hash_buckets") != new.get("hash_buckets"):
    detail = (f"format {old.get('format')} vs {new.get('format')}" if old.get("format") != new.get("format")
              else schema_difference(old.get("hash_buckets") or {}, new.get("hash_buckets") or {}))
    raise ModelDirError(
        f"{what} {model_dir} holds a model trained on a transform output of another schema ({detail}); "
        "train into another directory, or on the preprocessing output it was trained on")
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  raise ModelDirError(
      f"{what} {model_dir} holds checkpoints of another model: "
      + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
      + "; use another directory, or the same params to resume")


def _shapes(params: Dict[str, Any]) -> Dict[str, Any]:
  """The SHAPE_PARAMS of params, with the rows each table has (however they were given) as field_rows."""
  out = {k: params.get(k) for k in SHAPE_PARAMS if k != "table_rows"}
  out["field_rows"] = table_rows(params) if params.get("hash_buckets") else None
  return out


def resolve_field_rows(params: Dict[str, Any], model_dir: str, transform_dir: str,
                       warm_start_from: Optional[str] = None) -> Dict[str, Any]:
  """Resolved params with ``field_rows``: those of the model_dir's checkpoints when it resumes one,
  else the warm-start source's tables (a warm start copies them, so their shapes are fixed), else
  sized from the transform output's distinct ids (table_sizing). Recorded in params.json."""
  if params.get("field_rows"):
    return params
  own = os.path.join(model_dir, PARAMS_FILE)
  if tf.io.gfile.isdir(model_dir) and tf.train.latest_checkpoint(model_dir) and tf.io.gfile.exists(own):
    recorded = _recorded_params(own)
    return {**params, "field_rows": recorded.get("field_rows"), "table_rows_per_id": recorded["table_rows_per_id"]}
  source = warm_start_from and os.path.join(warm_start_from, PARAMS_FILE)
  if source and tf.io.gfile.exists(source):
    recorded = _recorded_params(source)
    if recorded.get("hash_buckets") == params["hash_buckets"] and recorded.get("fields") == params["fields"]:
      return {**params, "field_rows": table_rows(recorded)}
    return params    # refused by check_warm_start, naming what differs
  return {**params, "field_rows": table_sizing.resolve_field_rows(params, I.distinct_ids(transform_dir))}


def check_warm_start(source: str, params: Dict[str, Any]) -> None:
  """A warm start copies variables by name and shape: the source must have the same shapes."""
  path = os.path.join(source, PARAMS_FILE)
  if not tf.io.gfile.exists(path):
    return   # a bare checkpoint: TF checks it variable by variable
  recorded = _recorded_params(path)
  old = _shapes(recorded)
  new = _shapes(_json(params))
  diff = [k for k in old if old.get(k) != new.get(k)]
  if diff:
    detail = (schema_difference(old.get("hash_buckets") or {}, new.get("hash_buckets") or {})
              if diff == ["hash_buckets"] else ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}"
                                                         for k in diff[:6] if k != "hash_buckets"))
    raise ModelDirError(f"cannot warm start from {source}: its variables have other shapes ({detail})")
  for key in FITTED_PARAMS:
    if recorded[key] != params[key]:
      # Same shapes, another function: its weights were fitted to what the recorded value computes.
      raise ModelDirError(f"cannot warm start from {source}: it was trained with --{key}={recorded[key]}, this "
                          f"run has {params[key]}: give {key}={recorded[key]} (model_fn.train --{key}="
                          f"{recorded[key]}), or start cold (orchestration.daily --nowarm_start)")


def save_params(model_dir: str, params: Dict[str, Any]) -> None:
  """Records the params next to the checkpoints; a model_dir of another model is refused
  (check_model_dir). Placement params (RUNTIME_PARAMS) are not part of a model's identity."""
  check_model_dir(model_dir, params)
  tf.io.gfile.makedirs(model_dir)
  with tf.io.gfile.GFile(os.path.join(model_dir, PARAMS_FILE), "w") as f:
    json.dump(_json(params), f, indent=2, sort_keys=True)


def load_params(model_dir: str) -> Dict[str, Any]:
  """The params a model_dir was trained with (params added since filled in: upgrade_recorded)."""
  return _recorded_params(os.path.join(model_dir, PARAMS_FILE))


def train_and_evaluate(transform_dir: str, model_dir: str, params: Dict[str, Any], batch_size: int,
                       num_epochs: float = 1.0, train_steps: int = 0, eval_steps: int = 0,
                       seed: int = 42, save_checkpoints_steps: int = 1000,
                       do_export: bool = True, warm_start_from: Optional[str] = None,
                       eval_throttle_secs: int = 30, train_input: str = "auto",
                       calibration: str = C.DEFAULT_METHOD,
                       calibration_holdout: Optional[float] = None,
                       conversion_scale: float = 1.0,
                       memory_limit_gb: float = DEFAULT_MEMORY_LIMIT_GB,
                       keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS) -> Dict[str, Any]:
  """Trains to the step budget (resuming), evaluates, exports. Returns metrics and export path.

  The step budget is global: on a cluster the chief and the workers together train
  ``train_steps`` steps. ``eval_throttle_secs``: on a cluster, the evaluator's shortest
  interval between evaluations (on one machine every checkpoint is evaluated). ``train_input``:
  what training reads (input_fn.train_files: ``auto`` takes the column blocks when the
  preprocessing run wrote them). ``calibration`` (model_fn/calibration.py): the method fitted to
  the trained towers' logits and built into the evaluation and the SavedModel: ``bias`` (the
  default) refits each output bias on the whole train split; ``platt`` and ``isotonic`` are
  fitted on a held-out ``calibration_holdout`` share of the train split (default 0.05), which
  training then does not read; ``none`` keeps the towers' own values. ``conversion_scale``: the
  pCVR calibration is fitted to the conversions times it (orchestration/delay.py; needs a calibration).

  Each table's rows (params ``field_rows``) are resolved by resolve_field_rows; a run whose
  estimated peak memory (model_fn/memory.py) exceeds ``memory_limit_gb`` (0: what this machine
  has available) is refused (memory.DoesNotFit) before anything is built or written, and so is
  one whose model dir (``keep_checkpoints`` checkpoints and the SavedModel) will not fit the disk.

  The output biases start at the logits of the train split's base rates (params
  ``base_rates``, read from the preprocessing run's label counts unless given); ``format`` and
  ``hash_buckets`` are read from the transform output unless given."""
  conversion_scale = C.check_conversion_scale(calibration, conversion_scale)   # before any training
  tft_output = I.load_transform_output(transform_dir)
  I.require_rows(transform_dir)     # an empty split: an error before anything is written, not NaN metrics
  # What the data decide unless given: the format and every field's hash buckets (the schema).
  if params.get("format") is None:
    params = dict(params, format=I.transform_format(transform_dir))
  if params.get("hash_buckets") is None:
    params = dict(params, hash_buckets=T.transformed_hash_buckets(tft_output))
  calibration_holdout = I.holdout_share(C.holdout_fraction(calibration, calibration_holdout))
  params = dict(params, train_holdout=calibration_holdout)
  if params.get("base_rates") is None:
    params["base_rates"] = I.base_rates(transform_dir)
    if params["base_rates"] is None:
      logging.warning("%s records no label counts (preprocessed by an older version): the output "
                      "biases start at 0; preprocess again to start them at the base rates", transform_dir)
  params = resolve_params(resolve_field_rows(resolve_params(params), model_dir, transform_dir, warm_start_from))
  I.require_labels(tft_output, params["model"], transform_dir)
  train_rows = I.split_rows(transform_dir, "train")
  # The chief alone fits the calibration.
  calibrates = calibration != "none" and tf.estimator.RunConfig().is_chief
  calibration_rows = round(train_rows * (calibration_holdout or 1.0)) if calibrates else 0
  estimate = memory.check_fits(params, memory_limit_gb, calibration_rows)
  disk = memory.check_disk(params, model_dir, keep_checkpoints)
  tables = table_sizing.report(table_rows(params), I.distinct_ids(transform_dir), transform_dir)
  logging.info("%s\nmemory estimate: %s GiB\ndisk estimate: %s GiB", table_sizing.format_report(tables),
               ", ".join(f"{k} {v / memory.GIB:.2f}" for k, v in estimate.items()),
               ", ".join(f"{k} {v / memory.GIB:.2f}" for k, v in disk.items()))
  if train_steps <= 0:
    rows = train_rows * (1 - calibration_holdout)
    train_steps = max(1, math.ceil(num_epochs * rows / batch_size))
  params["train_steps"] = train_steps
  holdout = "exclude" if calibration_holdout > 0 else "all"
  check_model_dir(model_dir, params)
  if warm_start_from:
    check_warm_start(warm_start_from, params)
  # Trained and evaluated uncalibrated ({}: not the model_dir's calibration.json of an earlier run).
  estimator = make_estimator(model_dir, {**params, "calibration": {}}, seed, save_checkpoints_steps,
                             warm_start_from, keep_checkpoints)
  config = estimator.config
  task = task_name(config)
  if config.is_chief:
    save_params(model_dir, params)
    # A calibration of earlier checkpoints must not be applied to the ones trained now.
    C.remove(model_dir)
  train_pattern, block_rows = I.train_files(transform_dir, train_input)
  grouped = I.layout(transform_dir) == F.GROUPED
  train_fn = I.make_input_fn(train_pattern, tft_output, batch_size, training=True, num_epochs=None,
                             seed=seed, fields=params["fields"], block_rows=block_rows, grouped=grouped,
                             holdout=holdout, holdout_fraction=calibration_holdout,
                             start_at=start_offset(seed, I.train_records(transform_dir, block_rows),
                                                   len(tf.io.gfile.glob(train_pattern))))
  eval_input = I.make_input_fn(tft_output=tft_output, batch_size=batch_size, training=False,
                               fields=params["fields"], **I.split_input(transform_dir, "eval"))
  train_spec = tf.estimator.TrainSpec(train_fn, max_steps=train_steps,
                                      hooks=[TaskStepsHook(model_dir, task), ProgressHook(train_steps)])
  eval_spec = tf.estimator.EvalSpec(eval_input, steps=eval_steps or None,
                                    throttle_secs=eval_throttle_secs if is_distributed(config) else 0,
                                    start_delay_secs=0)
  result = tf.estimator.train_and_evaluate(estimator, train_spec, eval_spec)
  if not config.is_chief:
    # A worker is done when the global step reaches the budget; the evaluator after it has
    # evaluated the final checkpoint (parameter servers never get here: they serve until stopped).
    out = {"task": task, "model_dir": model_dir, "train_steps": train_steps}
    if result and result[0] is not None:
      out["metrics"] = M.finite_or_none(result[0], f"{task} eval metrics of {model_dir}")
    return out
  # train_and_evaluate returns (None, None) when the budget was already spent (a rerun of a
  # finished model_dir): evaluate the final checkpoint then.
  eval_metrics = result[0] if result and result[0] is not None else estimator.evaluate(
      eval_input, steps=eval_steps or None)
  if calibration != "none":
    calibrations = fit_calibration(estimator, train_pattern, tft_output, block_rows, params, calibration,
                                   calibration_holdout, conversion_scale, grouped)
    C.save(model_dir, calibrations)
    estimator = make_estimator(model_dir, {**params, "calibration": calibrations}, seed,
                               save_checkpoints_steps, keep_checkpoints=keep_checkpoints)
    eval_metrics = estimator.evaluate(eval_input, steps=eval_steps or None, name="calibrated")
  metrics = M.finite_or_none(eval_metrics, f"eval metrics of {model_dir}")   # NaN: null, with a warning
  out = {"task": task, "model_dir": model_dir, "train_steps": train_steps, "metrics": metrics,
         "task_steps": task_steps(model_dir),
         # What train_matmul_dtype "auto" became on this machine (a run's record of its arithmetic).
         "train_compute_dtype": layers.matmul_dtype(params, training=True).name,
         "tables": tables, "memory_estimate": estimate}
  if do_export:
    # The Estimator writes each export under export/temp-<time> and renames it when complete;
    # a run killed mid-export leaves such a dir, removed here.
    for stale in tf.io.gfile.glob(os.path.join(model_dir, "export", "temp-*")):
      tf.io.gfile.rmtree(stale)
    path = estimator.export_saved_model(
        os.path.join(model_dir, "export"),
        export.make_serving_input_receiver_fn(tft_output, params["format"]))
    out["saved_model"] = path.decode() if isinstance(path, bytes) else path
  with tf.io.gfile.GFile(os.path.join(model_dir, "train_result.json"), "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  return out




def start_offset(seed: int, records: int, files: int = 1) -> int:
  """Where in the training input a run with ``seed`` starts (input_fn's ``start_at``): within the
  first file's worth of ``records`` (the files' order is the seed's already), so that skipping
  there reads at most about one file."""
  span = records // max(1, files)
  return int(np.random.default_rng([seed, 7]).integers(span)) if span > 1 else 0


def fit_calibration(estimator: tf.estimator.Estimator, train_pattern: str, tft_output, block_rows: int,
                    params: Dict[str, Any], method: str, holdout_fraction: float,
                    conversion_scale: float = 1.0, grouped: bool = False) -> Dict[str, Any]:
  """Fits ``method`` to the uncalibrated tower logits on the train split's held-out slice, or on the
  whole train split when ``holdout_fraction`` is 0 (the conversions times ``conversion_scale``)."""
  data_fn = I.make_input_fn(train_pattern, tft_output, 4096, training=False, labels_as_features=True,
                            fields=params["fields"], block_rows=block_rows, grouped=grouped,
                            holdout="only" if holdout_fraction > 0 else "all", holdout_fraction=holdout_fraction)
  data = C.HeadData()
  for batch in estimator.predict(data_fn, yield_single_examples=False):
    data.add(batch["label_click"], batch["label_conversion"], batch["ctr_logit"], batch["cvr_logit"])
  where = f"the held-out {holdout_fraction:.0%} of the train split" if holdout_fraction else "the train split"
  impressions = data.impressions()
  try:
    return data.fit(method, holdout_fraction, conversion_scale)
  except ValueError as e:
    raise ValueError(f"cannot fit the {method} calibration on {where} ({impressions} "
                     f"impressions): {e}; use another --calibration_holdout or --calibration=none") from None
