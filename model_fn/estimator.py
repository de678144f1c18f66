"""Estimator plumbing shared by the entry points: build, record params, train and export.

No flags here: ``model_fn.train`` and ``model_fn.evaluate`` both import it.
"""

import json
import math
import os
from typing import Any, Dict, Optional

import tensorflow as tf

from model_fn import esmm, export, mmoe
from model_fn import input_fn as I
from model_fn.params import MMOE_MODELS, resolve_params

PARAMS_FILE = "params.json"


def model_fn_for(params) -> Any:
  """The model_fn for ``params['model']``: mmoe_model_fn for the MMoE family, else esmm_model_fn."""
  return mmoe.mmoe_model_fn if params["model"] in MMOE_MODELS else esmm.esmm_model_fn


def make_estimator(model_dir: str, params: Dict[str, Any], seed: int = 42,
                   save_checkpoints_steps: int = 1000,
                   warm_start_from: Optional[str] = None) -> tf.estimator.Estimator:
  """``warm_start_from``: a model dir (or checkpoint) whose trainable variables initialise a
  model dir without checkpoints (the daily retrain starts from yesterday's model)."""
  config = tf.estimator.RunConfig(
      model_dir=model_dir, tf_random_seed=seed, save_checkpoints_steps=save_checkpoints_steps,
      keep_checkpoint_max=3, log_step_count_steps=100,
      session_config=tf.compat.v1.ConfigProto(intra_op_parallelism_threads=0,
                                              inter_op_parallelism_threads=0))
  warm = tf.estimator.WarmStartSettings(ckpt_to_initialize_from=warm_start_from) if warm_start_from else None
  return tf.estimator.Estimator(model_fn_for(params), config=config, params=params, warm_start_from=warm)


def save_params(model_dir: str, params: Dict[str, Any]) -> None:
  """Records the params next to the checkpoints; a model_dir of another architecture is refused."""
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
                       do_export: bool = True, warm_start_from: Optional[str] = None) -> Dict[str, Any]:
  """Trains to the step budget (resuming), evaluates, exports. Returns metrics and export path."""
  tft_output = I.load_transform_output(transform_dir)
  params = resolve_params(params)
  I.require_labels(tft_output, params["model"], transform_dir)
  save_params(model_dir, params)
  if train_steps <= 0:
    train_steps = max(1, math.ceil(num_epochs * I.split_rows(transform_dir, "train") / batch_size))
  estimator = make_estimator(model_dir, params, seed, save_checkpoints_steps, warm_start_from)
  train_input = I.make_input_fn(I.split_files(transform_dir, "train"), tft_output, batch_size,
                                training=True, num_epochs=None, seed=seed)
  eval_input = I.make_input_fn(I.split_files(transform_dir, "eval"), tft_output, batch_size,
                               training=False)
  train_spec = tf.estimator.TrainSpec(train_input, max_steps=train_steps)
  eval_spec = tf.estimator.EvalSpec(eval_input, steps=eval_steps or None, throttle_secs=0,
                                    start_delay_secs=0)
  result = tf.estimator.train_and_evaluate(estimator, train_spec, eval_spec)
  # train_and_evaluate returns (None, None) when the budget was already spent (a rerun of a
  # finished model_dir): evaluate the final checkpoint then.
  eval_metrics = result[0] if result and result[0] is not None else estimator.evaluate(
      eval_input, steps=eval_steps or None)
  metrics = {k: float(v) for k, v in eval_metrics.items()}
  out = {"model_dir": model_dir, "train_steps": train_steps, "metrics": metrics}
  if do_export:
    path = estimator.export_saved_model(
        os.path.join(model_dir, "export"),
        export.make_serving_input_receiver_fn(tft_output, params["format"]))
    out["saved_model"] = path.decode() if isinstance(path, bytes) else path
  with tf.io.gfile.GFile(os.path.join(model_dir, "train_result.json"), "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  return out


