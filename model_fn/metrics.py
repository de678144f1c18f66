"""Evaluation metrics, following the ESMM paper's protocol.

CTR and CTCVR AUC over all impressions, CVR AUC over clicked impressions only; log loss
and calibration (mean prediction / observed rate) per task.

AUC: CVR probabilities are tiny, so an AUC on a few fixed thresholds in probability
space is useless. ``histogram_auc`` bins scores in *logit* space (2^16 bins over
[-20, 20], ~0.0006 logit wide) and counts positives and negatives per bin: fixed memory
for any eval size. Pairs that share a bin count as ties, so it is off the exact AUC by at most
half the share of positive-negative pairs closer than a bin: ~1e-4 for a trained model, more for
one whose logits all sit within a few bins. ``exact_auc`` is the numpy reference used by the
evaluation report.
"""

import math
from typing import Dict, Optional

import numpy as np
import tensorflow as tf
from absl import logging

AUC_BINS = 1 << 16
AUC_RANGE = (-20.0, 20.0)


def json_ready(obj):
  """``obj`` (nested dicts, lists, numbers) with every NaN or infinite float as None (JSON null)."""
  if isinstance(obj, dict):
    return {k: json_ready(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_ready(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def finite_or_none(metrics: Dict[str, object], where: str) -> Dict[str, object]:
  """``metrics`` to be written as JSON: a NaN or infinite number (an AUC of a split without a
  positive or a negative label, say) becomes None (JSON null), never NaN, with a warning that
  names it; other values are kept."""
  out, undefined = {}, []
  for k, v in metrics.items():
    if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
      v = float(v)
      if not math.isfinite(v):
        undefined.append(k)
        v = None
    out[k] = v
  if undefined:
    logging.warning("%s: %s undefined (NaN or infinite), written as null", where, ", ".join(sorted(undefined)))
  return out


def _metric_variable(name: str, shape, dtype=tf.float64):
  return tf.compat.v1.get_variable(
      name, shape, dtype, initializer=tf.compat.v1.zeros_initializer(), trainable=False,
      collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES, tf.compat.v1.GraphKeys.METRIC_VARIABLES])


def histogram_auc(labels: tf.Tensor, scores: tf.Tensor, weights: Optional[tf.Tensor] = None,
                  name: str = "auc", num_bins: int = AUC_BINS, score_range=AUC_RANGE):
  """Streaming ROC AUC of ``scores`` (logits or any monotone transform of them).

  Returns (value_tensor, update_op) like tf.compat.v1.metrics. Examples with weight 0
  are left out. The value is NaN while there are no positives or no negatives.
  """
  lo, hi = score_range
  with tf.compat.v1.variable_scope(None, default_name=name):
    pos_hist = _metric_variable("positives", [num_bins])
    neg_hist = _metric_variable("negatives", [num_bins])
    labels = tf.cast(tf.reshape(labels, [-1]), tf.float64)
    scores = tf.cast(tf.reshape(scores, [-1]), tf.float64)
    w = tf.ones_like(labels) if weights is None else tf.cast(tf.reshape(weights, [-1]), tf.float64)
    position = (scores - lo) / (hi - lo) * num_bins
    bins = tf.cast(tf.clip_by_value(tf.floor(position), 0, num_bins - 1), tf.int32)
    update = tf.group(
        tf.compat.v1.assign_add(pos_hist, tf.math.unsorted_segment_sum(w * labels, bins, num_bins)),
        tf.compat.v1.assign_add(neg_hist, tf.math.unsorted_segment_sum(w * (1 - labels), bins, num_bins)))
    value = auc_from_histograms(pos_hist, neg_hist)
  return value, update


def auc_from_histograms(pos_hist: tf.Tensor, neg_hist: tf.Tensor) -> tf.Tensor:
  """AUC from per-bin counts ordered by score; pairs within one bin count as ties."""
  neg_below = tf.cumsum(neg_hist, exclusive=True)
  pairs = tf.reduce_sum(pos_hist) * tf.reduce_sum(neg_hist)
  wins = tf.reduce_sum(pos_hist * (neg_below + 0.5 * neg_hist))
  return tf.where(pairs > 0, wins / tf.maximum(pairs, 1.0), tf.constant(np.nan, tf.float64))


def calibration(labels: tf.Tensor, probabilities: tf.Tensor, weights=None, name="calibration"):
  """Mean prediction / observed rate (1.0 is calibrated) as (value, update_op)."""
  with tf.compat.v1.variable_scope(None, default_name=name):
    mean_p, update_p = tf.compat.v1.metrics.mean(probabilities, weights=weights)
    mean_y, update_y = tf.compat.v1.metrics.mean(labels, weights=weights)
    return tf.math.divide_no_nan(mean_p, mean_y), tf.group(update_p, update_y)


def task_metrics(labels: Dict[str, tf.Tensor], heads: Dict[str, tf.Tensor],
                 losses: Dict[str, tf.Tensor]) -> Dict[str, tuple]:
  """Eval metric ops of the paper's protocol for the heads ctr, cvr, ctcvr.

  ``heads`` has ``<task>`` probabilities and ``<task>_logit`` scores; ``losses`` has the
  per-example log loss of each task.
  """
  click = labels["click"]
  ops = {}
  # task: (label, weights, metric name) -- CVR is measured on clicked impressions only, named
  # cvr_clicked as in model_fn.evaluation.score.
  tasks = {"ctr": (click, None, "ctr"), "ctcvr": (labels["ctcvr"], None, "ctcvr"),
           "cvr": (labels["conversion"], click, "cvr_clicked")}
  for task, (y, w, name) in tasks.items():
    ops[f"auc/{name}"] = histogram_auc(y, heads[f"{task}_logit"], w, name=f"auc_{task}")
    ops[f"log_loss/{name}"] = tf.compat.v1.metrics.mean(losses[task], weights=w)
    ops[f"calibration/{name}"] = calibration(y, heads[task], w, name=f"calibration_{task}")
    ops[f"label_mean/{name}"] = tf.compat.v1.metrics.mean(y, weights=w)
    ops[f"prediction_mean/{name}"] = tf.compat.v1.metrics.mean(heads[task], weights=w)
  return ops


def gate_metrics(gates: Dict[str, tf.Tensor]) -> Dict[str, tuple]:
  """Mean gate weight of each expert per task over the eval set (MMoE's gate utilisation)."""
  ops = {}
  for task, g in gates.items():
    for e in range(g.shape[-1]):
      ops[f"gate/{task}/expert_{e}"] = tf.compat.v1.metrics.mean(g[:, e])
  return ops


def exact_auc(labels, scores, weights=None) -> float:
  """Exact ROC AUC (ties count one half) in numpy; NaN without both classes."""
  labels = np.asarray(labels, np.float64).ravel()
  scores = np.asarray(scores, np.float64).ravel()
  w = np.ones_like(labels) if weights is None else np.asarray(weights, np.float64).ravel()
  keep = w > 0
  labels, scores, w = labels[keep], scores[keep], w[keep]
  order = np.argsort(scores, kind="mergesort")
  labels, scores, w = labels[order], scores[order], w[order]
  # Group tied scores.
  boundaries = np.flatnonzero(np.diff(scores)) + 1
  starts = np.concatenate([[0], boundaries])
  pos = np.add.reduceat(w * labels, starts) if len(labels) else np.array([])
  neg = np.add.reduceat(w * (1 - labels), starts) if len(labels) else np.array([])
  total = pos.sum() * neg.sum()
  if total <= 0:
    return float("nan")
  neg_below = np.cumsum(neg) - neg
  return float(np.sum(pos * (neg_below + 0.5 * neg)) / total)


def log_loss(labels, probabilities, weights=None, eps=1e-12) -> float:
  y = np.asarray(labels, np.float64)
  p = np.clip(np.asarray(probabilities, np.float64), eps, 1 - eps)
  w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64)
  return float(np.sum(-w * (y * np.log(p) + (1 - y) * np.log(1 - p))) / max(w.sum(), 1e-12))


def calibration_ratio(labels, probabilities, weights=None) -> float:
  y = np.asarray(labels, np.float64)
  p = np.asarray(probabilities, np.float64)
  w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64)
  observed = np.sum(w * y)
  return float(np.sum(w * p) / observed) if observed > 0 else float("nan")


# A head whose predictions vary by less than this share of their mean predicts one value for
# every impression (a tower whose ReLUs all went dead): its AUC of 0.5 is no ranking at all.
CONSTANT_SPREAD = 1e-6


def spread(probabilities) -> float:
  """The standard deviation of the predictions over their mean (below CONSTANT_SPREAD: constant)."""
  p = np.asarray(probabilities)
  return float(np.std(p, dtype=np.float64) / max(np.mean(p, dtype=np.float64), 1e-30))
