"""From the two tower logits to an EstimatorSpec: predictions, losses, metrics, train op.

Shared by every model_fn of the project, so each model only builds its logits.

Objectives (``params['objective']``):
  esmm: w_ctr * logloss(click, pCTR) + w_ctcvr * logloss(click AND conversion, pCTCVR),
        over all impressions; pCVR has no label of its own (ESMM, Ma et al. 2018). MMoE
        trains on the same objective, with pCTCVR its own task instead of pCTR x pCVR.
  base: w_ctr * logloss(click, pCTR) over all impressions + logloss(conversion, pCVR) over
        clicked impressions only: the usual practice ESMM improves on (the paper's BASE).
With ``uncertainty_weighting`` each task loss L is replaced by exp(-s) L + s/2 with a
learned s = log sigma^2 per task (Kendall et al. 2018), on top of the static weights.
"""

from typing import Dict, List, Optional

import tensorflow as tf

from model_fn import export, losses, metrics, optimizers
from model_fn.layers import EMBEDDING_COLLECTION

# Features copied into the predictions when present (prediction on the eval split);
# labels get a prefix so that they never collide with a head of the same name.
PASSTHROUGH = {"sample_id": "sample_id", "click": "label_click",
               "conversion": "label_conversion", "ctcvr": "label_ctcvr"}


def heads_from_logits(ctr_logit: tf.Tensor, cvr_logit: Optional[tf.Tensor] = None,
                      ctcvr_logit: Optional[tf.Tensor] = None) -> Dict[str, tf.Tensor]:
  """Probabilities and logits of the three heads from the network's two outputs.

  Either ``cvr_logit`` (ESMM's product structure: pCTCVR = pCTR x pCVR) or
  ``ctcvr_logit`` (MMoE's parallel CTCVR task: pCVR = pCTCVR / pCTR, clipped) is given.
  """
  if (cvr_logit is None) == (ctcvr_logit is None):
    raise ValueError("give exactly one of cvr_logit (product heads) and ctcvr_logit (direct heads)")
  ctr = tf.sigmoid(ctr_logit)
  if cvr_logit is not None:
    cvr = tf.sigmoid(cvr_logit)
    return {"ctr": ctr, "cvr": cvr, "ctcvr": ctr * cvr,
            "ctr_logit": ctr_logit, "cvr_logit": cvr_logit,
            "ctcvr_logit": losses.ctcvr_logits(ctr_logit, cvr_logit)}
  cvr_logit = losses.division_cvr_logits(ctr_logit, ctcvr_logit)
  return {"ctr": ctr, "cvr": tf.sigmoid(cvr_logit), "ctcvr": tf.sigmoid(ctcvr_logit),
          "ctr_logit": ctr_logit, "cvr_logit": cvr_logit, "ctcvr_logit": ctcvr_logit}


def per_example_losses(labels, heads: Dict[str, tf.Tensor], product: bool) -> Dict[str, tf.Tensor]:
  """Per-example log loss of each head; the CTCVR loss of product heads in log space."""
  if product:
    ctcvr = losses.ctcvr_log_loss(labels["ctcvr"], heads["ctr_logit"], heads["cvr_logit"])
  else:
    ctcvr = losses.sigmoid_log_loss(labels["ctcvr"], heads["ctcvr_logit"])
  return {"ctr": losses.sigmoid_log_loss(labels["click"], heads["ctr_logit"]),
          "cvr": losses.sigmoid_log_loss(labels["conversion"], heads["cvr_logit"]),
          "ctcvr": ctcvr}


def _uncertainty_weighted(name: str, loss: tf.Tensor) -> tf.Tensor:
  """Kendall et al. (2018) for a classification task: exp(-s) * L + s / 2, s = log sigma^2 learned."""
  with tf.compat.v1.variable_scope("uncertainty_weighting", reuse=tf.compat.v1.AUTO_REUSE):
    log_var = tf.compat.v1.get_variable(f"log_variance_{name}", [], tf.float32,
                                        initializer=tf.compat.v1.zeros_initializer())
  tf.compat.v1.summary.scalar(f"task_weight/{name}", tf.exp(-log_var))
  return tf.exp(-log_var) * loss + 0.5 * log_var


def total_loss(labels, per_example: Dict[str, tf.Tensor], params) -> tf.Tensor:
  """The training objective: the weighted sum of the two task losses (see the module doc)."""
  tasks = [("ctr", tf.reduce_mean(per_example["ctr"]), params["ctr_loss_weight"])]
  if params["objective"] == "esmm":
    tasks.append(("ctcvr", tf.reduce_mean(per_example["ctcvr"]), params["ctcvr_loss_weight"]))
  elif params["objective"] == "base":
    tasks.append(("cvr_on_clicks", losses.masked_mean(per_example["cvr"], labels["click"]),
                  params["cvr_loss_weight"]))
  else:
    raise ValueError(f"unknown objective {params['objective']!r}")
  total = 0.0
  for name, loss, weight in tasks:
    tf.compat.v1.summary.scalar(f"loss/{name}", loss)
    if params["uncertainty_weighting"]:
      loss = _uncertainty_weighted(name, loss)
    total += weight * loss
  return total


def _optimizer(name: str, learning_rate: float):
  if name == "adagrad":
    return tf.compat.v1.train.AdagradOptimizer(learning_rate, initial_accumulator_value=0.1)
  if name == "adam":
    return tf.compat.v1.train.AdamOptimizer(learning_rate)
  if name == "lazy_adam":
    return optimizers.LazyAdamOptimizer(learning_rate)
  if name == "ftrl":
    return tf.compat.v1.train.FtrlOptimizer(learning_rate)
  if name == "sgd":
    return tf.compat.v1.train.GradientDescentOptimizer(learning_rate)
  raise ValueError(f"unknown optimizer {name!r}; choose adagrad, adam, lazy_adam, ftrl or sgd")


def train_op(loss: tf.Tensor, params) -> tf.Operation:
  """Embedding tables and dense layers get their own optimizers.

  Tables default to lazy_adam, Adam that touches only the batch's rows
  (model_fn/optimizers.py); adagrad's sparse update does too. Plain Adam on a table of 2^20
  rows updates every row and its slots every step (20x slower, see shared/docs/design.md).
  The dense layers use Adam, as in the paper.
  """
  tables: List[tf.Variable] = tf.compat.v1.get_collection(EMBEDDING_COLLECTION)
  table_set = set(id(t) for t in tables)
  dense = [v for v in tf.compat.v1.trainable_variables() if id(v) not in table_set]
  grads = tf.gradients(loss, tables + dense)
  global_step = tf.compat.v1.train.get_or_create_global_step()
  with tf.control_dependencies(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)):
    ops = [_optimizer(params["optimizer"], params["learning_rate"]).apply_gradients(
        zip(grads[len(tables):], dense), global_step=global_step)]
    if tables:
      ops.append(_optimizer(params["embedding_optimizer"], params["embedding_learning_rate"])
                 .apply_gradients(zip(grads[:len(tables)], tables)))
  return tf.group(*ops)


def estimator_spec(features, labels, mode, params, heads: Dict[str, tf.Tensor], product: bool,
                   gates: Optional[Dict[str, tf.Tensor]] = None) -> tf.estimator.EstimatorSpec:
  """The EstimatorSpec of any model of the project from its heads (``heads_from_logits``).

  ``gates``: MMoE's softmax gate weights per task, [batch, num_experts]; their per-expert
  means become predictions (``gate_<task>``), TensorBoard summaries and eval metrics
  (``gate/<task>/expert_<i>``), so gate utilisation is visible.
  """
  gates = gates or {}
  if mode == tf.estimator.ModeKeys.PREDICT:
    predictions = {k: heads[k] for k in ("ctr", "cvr", "ctcvr", "ctr_logit", "cvr_logit", "ctcvr_logit")}
    for task, g in gates.items():
      predictions[f"gate_{task}"] = g
    for key, name in PASSTHROUGH.items():
      if key in features:
        predictions[name] = features[key]
    return tf.estimator.EstimatorSpec(mode, predictions=predictions,
                                      export_outputs=export.export_outputs(predictions))
  for task, g in gates.items():
    mean = tf.reduce_mean(g, axis=0)
    for e in range(g.shape[-1]):
      tf.compat.v1.summary.scalar(f"gate/{task}/expert_{e}", mean[e])
  per_example = per_example_losses(labels, heads, product)
  loss = total_loss(labels, per_example, params)
  if mode == tf.estimator.ModeKeys.EVAL:
    ops = metrics.task_metrics(labels, heads, per_example)
    ops.update(metrics.gate_metrics(gates))
    return tf.estimator.EstimatorSpec(mode, loss=loss, eval_metric_ops=ops)
  return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op(loss, params))
