"""Estimator plumbing shared by the entry points: build, record params, train and export.

No flags here: ``model_fn.train`` and ``model_fn.evaluate`` both import it.

On a cluster the same code runs in every task; ``TF_CONFIG`` (set by the cluster manager, or
by pipeline.launch_local_cluster) says which. ``tf.estimator.train_and_evaluate`` then runs
the task's role: parameter servers serve the variables (the embedding tables partitioned over
them), the chief and the workers train between-graph on their shards of the input, the
evaluator evaluates every new checkpoint. Only the chief records params.json, evaluates the
final checkpoint and exports the SavedModel.
"""

import json
import math
import os
from typing import Any, Dict, Optional

import tensorflow as tf

from model_fn import esmm, export, mmoe
from model_fn import input_fn as I
from model_fn.params import MMOE_MODELS, RUNTIME_PARAMS, resolve_params

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


def task_steps(model_dir: str) -> Dict[str, int]:
  """{task: training steps it ran} from the TaskStepsHook files of a model_dir."""
  out = {}
  for path in tf.io.gfile.glob(os.path.join(model_dir, TASK_STEPS_DIR, "*.json")):
    with tf.io.gfile.GFile(path) as f:
      rec = json.load(f)
    out[rec["task"]] = rec["steps"]
  return out


def model_fn_for(params) -> Any:
  """The model_fn for ``params['model']``: mmoe_model_fn for the MMoE family, else esmm_model_fn."""
  return mmoe.mmoe_model_fn if params["model"] in MMOE_MODELS else esmm.esmm_model_fn


def make_estimator(model_dir: str, params: Dict[str, Any], seed: int = 42,
                   save_checkpoints_steps: int = 1000,
                   warm_start_from: Optional[str] = None) -> tf.estimator.Estimator:
  """``warm_start_from``: a model dir (or checkpoint) whose trainable variables initialise a
  model dir without checkpoints (the daily retrain starts from yesterday's model).

  The RunConfig reads TF_CONFIG; ``params['embedding_partitions']`` 0 (the default) becomes
  the number of parameter servers (1 on one machine)."""
  config = tf.estimator.RunConfig(
      model_dir=model_dir, tf_random_seed=seed, save_checkpoints_steps=save_checkpoints_steps,
      keep_checkpoint_max=3, log_step_count_steps=100)
  config = config.replace(session_config=_session_config(config))
  if not params.get("embedding_partitions"):
    params = {**params, "embedding_partitions": max(1, config.num_ps_replicas)}
  warm = tf.estimator.WarmStartSettings(ckpt_to_initialize_from=warm_start_from) if warm_start_from else None
  return tf.estimator.Estimator(model_fn_for(params), config=config, params=params, warm_start_from=warm)


def save_params(model_dir: str, params: Dict[str, Any]) -> None:
  """Records the params next to the checkpoints; a model_dir of another architecture is refused.
  Placement params (RUNTIME_PARAMS) are not part of a model's identity and are left out."""
  params = {k: v for k, v in params.items() if k not in RUNTIME_PARAMS}
  tf.io.gfile.makedirs(model_dir)
  path = os.path.join(model_dir, PARAMS_FILE)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      old = json.load(f)
    if tf.train.latest_checkpoint(model_dir) and old != json.loads(json.dumps(params)):
      diff = sorted(k for k in set(old) | set(params) if old.get(k) != json.loads(json.dumps(params)).get(k))
      raise ValueError(f"{model_dir} holds checkpoints of a model with other params ({diff}); "
                       "use another --model_dir or delete it")
  with tf.io.gfile.GFile(path, "w") as f:
    json.dump(params, f, indent=2, sort_keys=True)


def load_params(model_dir: str) -> Dict[str, Any]:
  with tf.io.gfile.GFile(os.path.join(model_dir, PARAMS_FILE)) as f:
    return json.load(f)


def train_and_evaluate(transform_dir: str, model_dir: str, params: Dict[str, Any], batch_size: int,
                       num_epochs: float = 1.0, train_steps: int = 0, eval_steps: int = 0,
                       seed: int = 42, save_checkpoints_steps: int = 1000,
                       do_export: bool = True, warm_start_from: Optional[str] = None,
                       eval_throttle_secs: int = 30) -> Dict[str, Any]:
  """Trains to the step budget (resuming), evaluates, exports. Returns metrics and export path.

  The step budget is global: on a cluster the chief and the workers together train
  ``train_steps`` steps. ``eval_throttle_secs``: on a cluster, the evaluator's shortest
  interval between evaluations (on one machine every checkpoint is evaluated)."""
  tft_output = I.load_transform_output(transform_dir)
  params = resolve_params(params)
  I.require_labels(tft_output, params["model"], transform_dir)
  if train_steps <= 0:
    train_steps = max(1, math.ceil(num_epochs * I.split_rows(transform_dir, "train") / batch_size))
  estimator = make_estimator(model_dir, params, seed, save_checkpoints_steps, warm_start_from)
  config = estimator.config
  task = task_name(config)
  if config.is_chief:
    save_params(model_dir, params)
  train_input = I.make_input_fn(I.split_files(transform_dir, "train"), tft_output, batch_size,
                                training=True, num_epochs=None, seed=seed)
  eval_input = I.make_input_fn(I.split_files(transform_dir, "eval"), tft_output, batch_size,
                               training=False)
  train_spec = tf.estimator.TrainSpec(train_input, max_steps=train_steps,
                                      hooks=[TaskStepsHook(model_dir, task)])
  eval_spec = tf.estimator.EvalSpec(eval_input, steps=eval_steps or None,
                                    throttle_secs=eval_throttle_secs if is_distributed(config) else 0,
                                    start_delay_secs=0)
  result = tf.estimator.train_and_evaluate(estimator, train_spec, eval_spec)
  if not config.is_chief:
    # A worker is done when the global step reaches the budget; the evaluator after it has
    # evaluated the final checkpoint (parameter servers never get here: they serve until stopped).
    out = {"task": task, "model_dir": model_dir, "train_steps": train_steps}
    if result and result[0] is not None:
      out["metrics"] = {k: float(v) for k, v in result[0].items()}
    return out
  # train_and_evaluate returns (None, None) when the budget was already spent (a rerun of a
  # finished model_dir): evaluate the final checkpoint then.
  eval_metrics = result[0] if result and result[0] is not None else estimator.evaluate(
      eval_input, steps=eval_steps or None)
  metrics = {k: float(v) for k, v in eval_metrics.items()}
  out = {"task": task, "model_dir": model_dir, "train_steps": train_steps, "metrics": metrics,
         "task_steps": task_steps(model_dir)}
  if do_export:
    path = estimator.export_saved_model(
        os.path.join(model_dir, "export"),
        export.make_serving_input_receiver_fn(tft_output, params["format"]))
    out["saved_model"] = path.decode() if isinstance(path, bytes) else path
  with tf.io.gfile.GFile(os.path.join(model_dir, "train_result.json"), "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  return out


