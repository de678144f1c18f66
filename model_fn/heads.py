"""From the tower logits to an EstimatorSpec: predictions, losses, metrics, train op.

Shared by every model_fn of the project, so each model only builds its logits.

Every model has a CTR and a CVR tower; pCTCVR = pCTR x pCVR. The objective is the weighted sum
of the task losses the params ask for (model_fn/params.py has each model's weights):
  ctr             w_ctr * logloss(click, pCTR) over all impressions
  ctcvr           w_ctcvr * logloss(click AND conversion, pCTCVR) over all impressions (ESMM)
  cvr             w_cvr * logloss(conversion, pCVR) over clicked impressions (BASE, multi-task)
  counterfactual  w_cf * ESCM2's counterfactual CVR risk (losses.ips_risk / losses.dr_risk), and
                  with DR the imputation tower's own loss
With ``uncertainty_weighting`` each task loss L is replaced by exp(-s) L + s/2 with a
learned s = log sigma^2 per task (Kendall et al. 2018), on top of the static weights.
"""

from typing import Dict, List, Optional

import tensorflow as tf

from model_fn import averaging, calibration, export, losses, metrics, optimizers
from model_fn.layers import EMBEDDING_COLLECTION

# Features copied into the predictions when present (prediction on the eval split);
# labels get a prefix so that they never collide with a head of the same name.
PASSTHROUGH = {"sample_id": "sample_id", "click": "label_click",
               "conversion": "label_conversion", "ctcvr": "label_ctcvr"}
UNCALIBRATED_SUFFIX = "_uncalibrated"


def heads_from_logits(ctr_logit: tf.Tensor, cvr_logit: tf.Tensor,
                      calibrations: Optional[Dict[str, dict]] = None) -> Dict[str, tf.Tensor]:
  """Probabilities and logits of the three heads: pCTR, pCVR and pCTCVR = pCTR x pCVR.

  ``calibrations`` ({"ctr": spec, "cvr": spec}, model_fn/calibration.py) maps the tower logits
  before the heads are formed; the towers' own values are kept as ``<head>_uncalibrated``.
  """
  out = {}
  if calibrations:
    raw = {"ctr": ctr_logit, "cvr": cvr_logit}
    for head in ("ctr", "cvr"):
      out[head + UNCALIBRATED_SUFFIX] = tf.sigmoid(raw[head])
    out["ctcvr" + UNCALIBRATED_SUFFIX] = out["ctr" + UNCALIBRATED_SUFFIX] * out["cvr" + UNCALIBRATED_SUFFIX]
    ctr_logit = calibration.apply(calibrations.get("ctr"), ctr_logit)
    cvr_logit = calibration.apply(calibrations.get("cvr"), cvr_logit)
  ctr, cvr = tf.sigmoid(ctr_logit), tf.sigmoid(cvr_logit)
  out.update({"ctr": ctr, "cvr": cvr, "ctcvr": ctr * cvr,
              "ctr_logit": ctr_logit, "cvr_logit": cvr_logit,
              "ctcvr_logit": losses.ctcvr_logits(ctr_logit, cvr_logit)})
  return out


def per_example_losses(labels, heads: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
  """Per-example log loss of each head; the CTCVR loss in log space from the two logits."""
  return {"ctr": losses.sigmoid_log_loss(labels["click"], heads["ctr_logit"]),
          "cvr": losses.sigmoid_log_loss(labels["conversion"], heads["cvr_logit"]),
          "ctcvr": losses.ctcvr_log_loss(labels["ctcvr"], heads["ctr_logit"], heads["cvr_logit"])}


def _uncertainty_weighted(name: str, loss: tf.Tensor) -> tf.Tensor:
  """Kendall et al. (2018) for a classification task: exp(-s) * L + s / 2, s = log sigma^2 learned."""
  with tf.compat.v1.variable_scope("uncertainty_weighting", reuse=tf.compat.v1.AUTO_REUSE):
    log_var = tf.compat.v1.get_variable(f"log_variance_{name}", [], tf.float32,
                                        initializer=tf.compat.v1.zeros_initializer())
  tf.compat.v1.summary.scalar(f"task_weight/{name}", tf.exp(-log_var))
  return tf.exp(-log_var) * loss + 0.5 * log_var


def task_losses(labels, heads: Dict[str, tf.Tensor], per_example: Dict[str, tf.Tensor],
                params) -> List[tuple]:
  """[(name, batch loss, weight)] of the objective's terms with a weight above 0."""
  click = labels["click"]
  tasks = [("ctr", tf.reduce_mean(per_example["ctr"]), params["ctr_loss_weight"]),
           ("ctcvr", tf.reduce_mean(per_example["ctcvr"]), params["ctcvr_loss_weight"]),
           ("cvr_on_clicks", losses.masked_mean(per_example["cvr"], click), params["cvr_loss_weight"])]
  risk = params["counterfactual"]
  if risk:
    propensity = tf.maximum(tf.stop_gradient(heads["ctr"]), params["propensity_floor"])
    weight = params["counterfactual_loss_weight"]
    if risk == "ips":
      tasks.append(("counterfactual_ips", losses.ips_risk(per_example["cvr"], click, propensity), weight))
    else:
      # The imputed error: pCVR's log loss against the imputation tower's label. The DR risk
      # trains the CVR tower (toward the imputed label on every impression); the imputation
      # loss trains only the imputation tower.
      imputed_label = tf.sigmoid(heads["imputed_cvr_logit"])
      cvr_logit = heads["cvr_logit"]
      imputed_error = losses.sigmoid_log_loss(tf.stop_gradient(imputed_label), cvr_logit)
      tasks.append(("counterfactual_dr", losses.dr_risk(per_example["cvr"], imputed_error, click, propensity),
                    weight))
      error_of_imputation = losses.sigmoid_log_loss(imputed_label, tf.stop_gradient(cvr_logit))
      tasks.append(("imputation", losses.imputation_loss(tf.stop_gradient(per_example["cvr"]),
                                                         error_of_imputation, click, propensity), weight))
  return [t for t in tasks if t[2] > 0]


def weighted_task_losses(labels, heads: Dict[str, tf.Tensor], per_example: Dict[str, tf.Tensor],
                         params) -> Dict[str, tf.Tensor]:
  """{term: its weighted contribution to the objective} (see the module doc)."""
  out = {}
  for name, loss, weight in task_losses(labels, heads, per_example, params):
    tf.compat.v1.summary.scalar(f"loss/{name}", loss)
    if params["uncertainty_weighting"]:
      loss = _uncertainty_weighted(name, loss)
    out[name] = weight * loss
  return out


def total_loss(labels, heads: Dict[str, tf.Tensor], per_example: Dict[str, tf.Tensor], params) -> tf.Tensor:
  """The training objective: the weighted sum of the task losses (see the module doc)."""
  return tf.add_n(list(weighted_task_losses(labels, heads, per_example, params).values()))


def _optimizer(kind: str, learning_rate, **kw):
  """An optimizer of ``kind``; ``kw`` (e.g. ``name``, which names its slots) goes to its constructor."""
  if kind == "adagrad":
    return tf.compat.v1.train.AdagradOptimizer(learning_rate, initial_accumulator_value=0.1, **kw)
  if kind == "adam":
    return tf.compat.v1.train.AdamOptimizer(learning_rate, **kw)
  if kind == "lazy_adam":
    return optimizers.LazyAdamOptimizer(learning_rate, **kw)
  if kind == "ftrl":
    return tf.compat.v1.train.FtrlOptimizer(learning_rate, **kw)
  if kind == "sgd":
    return tf.compat.v1.train.GradientDescentOptimizer(learning_rate, **kw)
  raise ValueError(f"unknown optimizer {kind!r}; choose adagrad, adam, lazy_adam, ftrl or sgd")


def learning_rate_scale(params, global_step: tf.Tensor) -> tf.Tensor:
  """The factor of both learning rates at ``global_step``: 1 (``constant``), or for
  ``warmup_linear_decay`` a linear rise over ``warmup_steps`` and a linear fall to 0 at
  ``train_steps``."""
  if params["learning_rate_schedule"] == "constant":
    return tf.constant(1.0)
  step = tf.cast(global_step, tf.float32)
  warmup = float(params["warmup_steps"])
  total = float(max(params["train_steps"], params["warmup_steps"] + 1))
  rise = tf.minimum(1.0, (step + 1.0) / warmup) if warmup > 0 else tf.constant(1.0)
  fall = tf.clip_by_value((total - step) / max(1.0, total - warmup), 0.0, 1.0)
  return rise * fall


def train_op(total: tf.Tensor, terms: Dict[str, tf.Tensor], params) -> tf.Operation:
  """Embedding tables and dense layers get their own optimizers.

  Tables default to lazy_adam, Adam that touches only the batch's rows
  (model_fn/optimizers.py); adagrad's sparse update does too. Plain Adam on a table of 2^20
  rows updates every row and its slots every step (20x slower than Adagrad). The dense layers
  use Adam, as in the paper. Both learning rates follow ``learning_rate_scale``.

  ``total``: the objective; ``terms``: its weighted terms (``weighted_task_losses``). With
  ``embedding_update`` ``per_loss`` each term's gradient on the tables gets an optimizer of its
  own, so an adaptive optimizer scales each task's steps by that task's own gradient history
  instead of by the sum's, which the CTR loss dominates; the dense layers follow the sum.
  """
  tables: List[tf.Variable] = tf.compat.v1.get_collection(EMBEDDING_COLLECTION)
  table_set = set(id(t) for t in tables)
  dense = [v for v in tf.compat.v1.trainable_variables() if id(v) not in table_set]
  global_step = tf.compat.v1.train.get_or_create_global_step()
  scale = learning_rate_scale(params, global_step)
  tf.compat.v1.summary.scalar("learning_rate_scale", scale)
  table_lr = params["embedding_learning_rate"] * scale
  if params["embedding_update"] == "per_loss" and tables:
    grads = tf.gradients(total, dense)
    table_updates = [(_optimizer(params["embedding_optimizer"], table_lr, name=f"embedding_{name}"),
                      tf.gradients(loss, tables)) for name, loss in sorted(terms.items())]
  else:
    grads = tf.gradients(total, tables + dense)
    table_updates = [(_optimizer(params["embedding_optimizer"], table_lr), grads[:len(tables)])] if tables else []
    grads = grads[len(tables):]
  with tf.control_dependencies(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)):
    ops = [_optimizer(params["optimizer"], params["learning_rate"] * scale).apply_gradients(
        zip(grads, dense), global_step=global_step)]
    for optimizer, table_grads in table_updates:
      pairs = [(g, t) for g, t in zip(table_grads, tables) if g is not None]
      if pairs:
        ops.append(optimizer.apply_gradients(pairs))
  return averaging.maintain(params, tf.group(*ops), dense, global_step)


PREDICTION_KEYS = ("ctr", "cvr", "ctcvr", "ctr_logit", "cvr_logit", "ctcvr_logit")


def estimator_spec(features, labels, mode, params, heads: Dict[str, tf.Tensor],
                   gates: Optional[Dict[str, tf.Tensor]] = None) -> tf.estimator.EstimatorSpec:
  """The EstimatorSpec of any model of the project from its heads (``heads_from_logits``, plus
  ``imputed_cvr_logit`` for a DR counterfactual risk).

  ``gates``: the softmax gate weights per task of a gated network, [batch, experts]; their
  per-expert means become predictions (``gate_<task>``), TensorBoard summaries and eval
  metrics (``gate/<task>/expert_<i>``), so gate utilisation is visible.
  """
  gates = gates or {}
  if mode == tf.estimator.ModeKeys.PREDICT:
    predictions = {k: heads[k] for k in PREDICTION_KEYS}
    predictions.update({k: v for k, v in heads.items() if k.endswith(UNCALIBRATED_SUFFIX)})
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
  per_example = per_example_losses(labels, heads)
  terms = weighted_task_losses(labels, heads, per_example, params)
  loss = tf.add_n(list(terms.values()))
  if mode == tf.estimator.ModeKeys.EVAL:
    ops = metrics.task_metrics(labels, heads, per_example)
    ops.update(metrics.gate_metrics(gates))
    return tf.estimator.EstimatorSpec(mode, loss=loss, eval_metric_ops=ops)
  return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op(loss, terms, params))
