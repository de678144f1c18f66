"""From the two tower logits to an EstimatorSpec: predictions, losses, metrics, train op.

Shared by every model_fn of the project, so each model only builds its logits.

Objectives (``params['objective']``):
  esmm: w_ctr * logloss(click, pCTR) + w_ctcvr * logloss(click AND conversion, pCTR * pCVR),
        over all impressions; pCVR has no label of its own (ESMM, Ma et al. 2018).
  base: w_ctr * logloss(click, pCTR) over all impressions + logloss(conversion, pCVR) over
        clicked impressions only: the usual practice ESMM improves on (the paper's BASE).
"""

from typing import Dict, List

import tensorflow as tf

from model_fn import export, losses, metrics

# Features copied into the predictions when present (prediction on the eval split);
# labels get a prefix so that they never collide with a head of the same name.
PASSTHROUGH = {"sample_id": "sample_id", "click": "label_click",
               "conversion": "label_conversion", "ctcvr": "label_ctcvr"}
EMBEDDING_COLLECTION = "esmm_embedding_tables"


def heads_from_logits(ctr_logit: tf.Tensor, cvr_logit: tf.Tensor) -> Dict[str, tf.Tensor]:
  ctr = tf.sigmoid(ctr_logit)
  cvr = tf.sigmoid(cvr_logit)
  return {"ctr": ctr, "cvr": cvr, "ctcvr": ctr * cvr,
          "ctr_logit": ctr_logit, "cvr_logit": cvr_logit,
          "ctcvr_logit": losses.ctcvr_logits(ctr_logit, cvr_logit)}


def per_example_losses(labels, ctr_logit, cvr_logit) -> Dict[str, tf.Tensor]:
  return {"ctr": losses.sigmoid_log_loss(labels["click"], ctr_logit),
          "cvr": losses.sigmoid_log_loss(labels["conversion"], cvr_logit),
          "ctcvr": losses.ctcvr_log_loss(labels["ctcvr"], ctr_logit, cvr_logit)}


def total_loss(labels, per_example: Dict[str, tf.Tensor], params) -> tf.Tensor:
  ctr = tf.reduce_mean(per_example["ctr"])
  if params["objective"] == "esmm":
    second = tf.reduce_mean(per_example["ctcvr"])
    tf.compat.v1.summary.scalar("loss/ctcvr", second)
    weight = params["ctcvr_loss_weight"]
  elif params["objective"] == "base":
    second = losses.masked_mean(per_example["cvr"], labels["click"])
    tf.compat.v1.summary.scalar("loss/cvr_on_clicks", second)
    weight = params["cvr_loss_weight"]
  else:
    raise ValueError(f"unknown objective {params['objective']!r}")
  tf.compat.v1.summary.scalar("loss/ctr", ctr)
  return params["ctr_loss_weight"] * ctr + weight * second


def _optimizer(name: str, learning_rate: float):
  if name == "adagrad":
    return tf.compat.v1.train.AdagradOptimizer(learning_rate, initial_accumulator_value=0.1)
  if name == "adam":
    return tf.compat.v1.train.AdamOptimizer(learning_rate)
  if name == "ftrl":
    return tf.compat.v1.train.FtrlOptimizer(learning_rate)
  if name == "sgd":
    return tf.compat.v1.train.GradientDescentOptimizer(learning_rate)
  raise ValueError(f"unknown optimizer {name!r}; choose adagrad, adam, ftrl or sgd")


def train_op(loss: tf.Tensor, params) -> tf.Operation:
  """Embedding tables and dense layers get their own optimizers.

  Tables default to Adagrad, whose sparse update touches only the rows in the batch;
  dense Adam on a table of 2^20 rows updates every row and its slots every step (20x
  slower, see shared/docs/design.md). The dense layers use Adam, as in the paper.
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


def estimator_spec(features, labels, mode, params, ctr_logit, cvr_logit) -> tf.estimator.EstimatorSpec:
  heads = heads_from_logits(ctr_logit, cvr_logit)
  if mode == tf.estimator.ModeKeys.PREDICT:
    predictions = {k: heads[k] for k in ("ctr", "cvr", "ctcvr", "ctr_logit", "cvr_logit")}
    for key, name in PASSTHROUGH.items():
      if key in features:
        predictions[name] = features[key]
    return tf.estimator.EstimatorSpec(mode, predictions=predictions,
                                      export_outputs=export.export_outputs(predictions))
  per_example = per_example_losses(labels, ctr_logit, cvr_logit)
  loss = total_loss(labels, per_example, params)
  if mode == tf.estimator.ModeKeys.EVAL:
    return tf.estimator.EstimatorSpec(mode, loss=loss,
                                      eval_metric_ops=metrics.task_metrics(labels, heads, per_example))
  return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op(loss, params))
