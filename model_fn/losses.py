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


def ips_risk(cvr_loss: tf.Tensor, click: tf.Tensor, propensity: tf.Tensor) -> tf.Tensor:
  """ESCM2-IPS's counterfactual CVR risk: the clicked impressions' CVR loss weighted by
  1 / propensity (pCTR), averaged over every impression of the batch; an unbiased estimate of
  the CVR loss over the entire space when the propensities are right."""
  return tf.reduce_mean(click * cvr_loss / propensity)


def dr_risk(cvr_loss: tf.Tensor, imputed_loss: tf.Tensor, click: tf.Tensor,
            propensity: tf.Tensor) -> tf.Tensor:
  """ESCM2-DR's doubly robust CVR risk (the DR-JL estimator of Wang et al., ICML 2019): for
  every impression the imputed error, the CVR loss against the imputed label; on clicked
  impressions the IPS-weighted difference between the real error and the imputed one."""
  return tf.reduce_mean(imputed_loss + click * (cvr_loss - imputed_loss) / propensity)


def imputation_loss(cvr_loss: tf.Tensor, imputed_loss: tf.Tensor, click: tf.Tensor,
                    propensity: tf.Tensor) -> tf.Tensor:
  """The imputation model's loss: the squared difference between the real and the imputed error
  on clicked impressions, IPS-weighted, averaged over every impression of the batch."""
  return tf.reduce_mean(click * tf.square(cvr_loss - imputed_loss) / propensity)
