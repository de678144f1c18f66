"""Log losses computed from logits in log space: finite for every logit value.

pCTCVR = sigmoid(a) * sigmoid(b) is never formed and then logged. With sp = softplus:
  log p     = -sp(-a) - sp(-b)
  log (1-p) = logsumexp(-a, -b, -a-b) - sp(-a) - sp(-b)
because 1 - s(a)s(b) = (e^-a + e^-b + e^(-a-b)) / ((1+e^-a)(1+e^-b)).
"""

import tensorflow as tf


def log_ctcvr(ctr_logits: tf.Tensor, cvr_logits: tf.Tensor):
  """(log pCTCVR, log (1 - pCTCVR)) from the two tower logits."""
  a, b = ctr_logits, cvr_logits
  log_denominator = tf.nn.softplus(-a) + tf.nn.softplus(-b)
  log_p = -log_denominator
  log_1mp = tf.reduce_logsumexp(tf.stack([-a, -b, -a - b], axis=0), axis=0) - log_denominator
  return log_p, log_1mp


def ctcvr_logits(ctr_logits: tf.Tensor, cvr_logits: tf.Tensor) -> tf.Tensor:
  """The logit of pCTCVR, log p - log(1-p), for ranking and histograms."""
  log_p, log_1mp = log_ctcvr(ctr_logits, cvr_logits)
  return log_p - log_1mp


def division_cvr_logits(ctr_logits: tf.Tensor, ctcvr_logits: tf.Tensor,
                        max_probability: float = 1.0 - 1e-6) -> tf.Tensor:
  """The logit of pCVR = pCTCVR / pCTR, for models that predict CTCVR as a task of its own.

  Computed in log space and clipped to ``max_probability`` (two separate networks do not
  guarantee pCTCVR <= pCTR), so it is finite for every pair of logits.
  """
  log_p = tf.math.log_sigmoid(ctcvr_logits) - tf.math.log_sigmoid(ctr_logits)
  log_p = tf.minimum(log_p, tf.math.log(tf.constant(max_probability, log_p.dtype)))
  return log_p - tf.math.log(-tf.math.expm1(log_p))


def sigmoid_log_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """Per-example binary log loss of sigmoid(logits)."""
  return tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)


def ctcvr_log_loss(labels: tf.Tensor, ctr_logits: tf.Tensor, cvr_logits: tf.Tensor) -> tf.Tensor:
  """Per-example binary log loss of pCTCVR = sigmoid(ctr) * sigmoid(cvr) against ``labels``."""
  log_p, log_1mp = log_ctcvr(ctr_logits, cvr_logits)
  return -(labels * log_p + (1.0 - labels) * log_1mp)


def masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
  """Mean of ``values`` where ``mask`` is 1; 0 when the mask is empty."""
  return tf.math.divide_no_nan(tf.reduce_sum(values * mask), tf.reduce_sum(mask))
