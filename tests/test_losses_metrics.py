"""Loss numerics against a numpy reference, and the streaming AUC against scikit-learn."""

import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from model_fn import losses, metrics


def _np_ctcvr_loss(y, a, b):
  p = 1 / (1 + np.exp(-a)) * (1 / (1 + np.exp(-b)))
  return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_ctcvr_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  a, b = rng.normal(0, 3, 500), rng.normal(0, 3, 500)
  y = (rng.random(500) < 0.3).astype(np.float64)
  got = losses.ctcvr_log_loss(tf.constant(y), tf.constant(a), tf.constant(b)).numpy()
  np.testing.assert_allclose(got, _np_ctcvr_loss(y, a, b), rtol=1e-9, atol=1e-12)
  ctr = losses.sigmoid_log_loss(tf.constant(y), tf.constant(a)).numpy()
  p = 1 / (1 + np.exp(-a))
  np.testing.assert_allclose(ctr, -(y * np.log(p) + (1 - y) * np.log(1 - p)), rtol=1e-9)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_extreme_logits_give_finite_losses_and_gradients(dtype):
  vals = [-100.0, -30.0, 0.0, 30.0, 100.0]
  a, b = np.meshgrid(vals, vals)
  a, b = tf.constant(a.ravel(), dtype), tf.constant(b.ravel(), dtype)
  for label in (0.0, 1.0):
    y = tf.fill(tf.shape(a), tf.constant(label, dtype))
    with tf.GradientTape() as tape:
      tape.watch([a, b])
      loss = losses.ctcvr_log_loss(y, a, b)
    ga, gb = tape.gradient(loss, [a, b])
    for t in (loss, ga, gb, losses.ctcvr_logits(a, b)):
      assert np.all(np.isfinite(t.numpy())), (label, t)
  # Known values: both logits +100 and label 1 -> loss ~ 0; label 0 -> ~ 99.3 (= -log(2 e^-100)).
  one = losses.ctcvr_log_loss(tf.constant([1.0, 0.0], tf.float64), tf.constant([100.0, 100.0], tf.float64),
                              tf.constant([100.0, 100.0], tf.float64)).numpy()
  np.testing.assert_allclose(one, [2 * np.exp(-100), 100 - np.log(2)], rtol=1e-6, atol=1e-30)


def _streaming_auc(labels, scores, weights=None, batches=7):
  with tf.Graph().as_default():
    y = tf.compat.v1.placeholder(tf.float64, [None])
    s = tf.compat.v1.placeholder(tf.float64, [None])
    w = tf.compat.v1.placeholder(tf.float64, [None])
    value, update = metrics.histogram_auc(y, s, w)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.local_variables_initializer())
      weights = np.ones_like(labels) if weights is None else weights
      for idx in np.array_split(np.arange(len(labels)), batches):
        sess.run(update, {y: labels[idx], s: scores[idx], w: weights[idx]})
      return sess.run(value)


def test_histogram_auc_agrees_with_sklearn_on_tiny_probabilities():
  rng = np.random.default_rng(1)
  n = 40_000
  logit = rng.normal(-6.0, 1.5, n)           # CVR-like: probabilities ~ 0.0025
  p = 1 / (1 + np.exp(-logit))
  y = (rng.random(n) < p * 8).astype(np.float64)
  expected = roc_auc_score(y, p)
  assert abs(_streaming_auc(y, logit) - expected) < 0.002
  assert abs(metrics.exact_auc(y, p) - expected) < 1e-9


def test_histogram_auc_with_weights_is_the_auc_of_the_weighted_subset():
  rng = np.random.default_rng(2)
  n = 20_000
  s = rng.normal(0, 2, n)
  y = (rng.random(n) < 1 / (1 + np.exp(-s))).astype(np.float64)
  mask = (rng.random(n) < 0.2).astype(np.float64)
  expected = roc_auc_score(y[mask > 0], s[mask > 0])
  assert abs(_streaming_auc(y, s, mask) - expected) < 0.002
  assert abs(metrics.exact_auc(y, s, mask) - expected) < 1e-9


def test_exact_auc_counts_ties_as_half_and_is_nan_with_one_class():
  assert metrics.exact_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
  assert metrics.exact_auc([0, 0, 1], [0.1, 0.3, 0.2]) == 0.5
  assert np.isnan(metrics.exact_auc([0, 0], [0.1, 0.2]))


def test_a_head_that_predicts_one_value_for_every_impression_is_named():
  """A dead CVR tower scores an AUC of exactly 0.5 and may still be calibrated: the report names it."""
  from model_fn import evaluation
  rng = np.random.default_rng(0)
  click = (rng.random(2000) < 0.3).astype(float)
  conversion = click * (rng.random(2000) < 0.1)
  ctr = np.clip(0.3 + 0.1 * rng.normal(size=2000), 0.01, 0.99)
  dead = np.full(2000, np.float32(0.0052))
  rows = {"alive": evaluation.score(click, conversion, ctr, ctr / 3),
          "dead": evaluation.score(click, conversion, ctr, dead)}
  rows["dead" + evaluation.UNCALIBRATED_ROW] = rows["dead"]
  assert rows["dead"]["auc/cvr_clicked"] == 0.5 and rows["alive"]["spread/cvr"] > 0.1
  assert evaluation.constant_heads(rows) == ["dead: cvr"]
  rows["alive"]["spread/ctr"] = None          # an undefined figure, as the JSON report writes it
  assert evaluation.constant_heads(rows) == ["dead: cvr"]


def test_lazy_adam_moves_only_the_rows_in_the_batch_and_is_adam_on_them():
  from model_fn.optimizers import LazyAdamOptimizer
  init = np.random.RandomState(0).normal(size=(5, 3)).astype(np.float32)
  with tf.Graph().as_default():
    ids = tf.compat.v1.placeholder(tf.int64, [None])
    tables, steps = {}, {}
    for name, opt in (("lazy", LazyAdamOptimizer(0.1)), ("adam", tf.compat.v1.train.AdamOptimizer(0.1))):
      tables[name] = tf.compat.v1.get_variable(name, initializer=init, use_resource=True)
      steps[name] = opt.minimize(tf.reduce_sum(tf.square(tf.gather(tables[name], ids) - 1.0)))
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      # Step 1, a repeated id: both are Adam on the summed gradient; rows 2 and 4 do not move.
      sess.run(steps, {ids: [0, 1, 1, 3]})
      lazy, adam = sess.run([tables["lazy"], tables["adam"]])
      np.testing.assert_allclose(lazy, adam, rtol=1e-6)
      np.testing.assert_array_equal(lazy[[2, 4]], init[[2, 4]])
      assert not np.allclose(lazy[[0, 1, 3]], init[[0, 1, 3]])
      # Step 2 on row 2 only: Adam's momentum still moves rows 0, 1, 3; lazy Adam leaves them.
      sess.run(steps, {ids: [2]})
      lazy2, adam2 = sess.run([tables["lazy"], tables["adam"]])
      np.testing.assert_array_equal(lazy2[[0, 1, 3, 4]], lazy[[0, 1, 3, 4]])
      assert not np.allclose(adam2[[0, 1, 3]], adam[[0, 1, 3]])
      np.testing.assert_allclose(lazy2[2], adam2[2], rtol=1e-6)
