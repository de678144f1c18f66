"""The training-dynamics and model pieces behind model quality, on small graphs and numpy
references: output biases at the base rates, ESCM2's risks, masked click-space losses, pooling,
the learning-rate schedule, and the post-hoc calibrations."""

import math

import numpy as np
import pytest
import tensorflow as tf

from model_fn import calibration, esmm, heads, layers, losses, mmoe
from model_fn.params import resolve_params

from graph_inputs import feature_batch, label_batch, model_params


def _sigmoid(z):
  return 1 / (1 + np.exp(-z))


def _log_loss(y, logit):
  p = _sigmoid(logit)
  return -(y * np.log(p) + (1 - y) * np.log(1 - p))


@pytest.mark.parametrize("model", ["esmm", "base", "escm2_dr", "mmoe", "ple", "shared_bottom"])
def test_first_predictions_are_the_base_rates(model):
  """Every tower's output bias starts at the logit of its base rate, so before any step pCTR is
  the click rate and pCVR the conversion rate on clicks (the embeddings start near zero)."""
  rates = {"ctr": 0.04, "cvr": 0.11}
  fn = esmm.esmm_model_fn if model in esmm.ESMM_MODELS else mmoe.mmoe_model_fn
  with tf.Graph().as_default():
    tf.compat.v1.set_random_seed(0)
    spec = fn(feature_batch(), None, tf.estimator.ModeKeys.PREDICT, model_params(model, base_rates=rates))
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      p = sess.run(spec.predictions)
  np.testing.assert_allclose(p["ctr"], rates["ctr"], rtol=2e-3)
  np.testing.assert_allclose(p["cvr"], rates["cvr"], rtol=2e-3)
  np.testing.assert_allclose(p["ctcvr"], rates["ctr"] * rates["cvr"], rtol=4e-3)


def test_without_base_rates_the_biases_start_at_zero():
  with tf.Graph().as_default():
    spec = esmm.esmm_model_fn(feature_batch(), None, tf.estimator.ModeKeys.PREDICT, model_params("esmm"))
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      p = sess.run(spec.predictions)
  np.testing.assert_allclose(p["ctr"], 0.5, atol=2e-3)


def test_base_rates_are_checked():
  assert resolve_params(model_params("esmm", base_rates={"ctr": 0.1, "cvr": 0.2}))["base_rates"] == {
      "ctr": 0.1, "cvr": 0.2}
  for bad in ({"ctr": 0.0, "cvr": 0.2}, {"ctr": 0.1}, {"ctr": 1.0, "cvr": 0.5}):
    with pytest.raises(ValueError, match="base_rates"):
      resolve_params(model_params("esmm", base_rates=bad))


def _risk_inputs(seed=0, n=64):
  rng = np.random.default_rng(seed)
  click = (rng.random(n) < 0.3).astype(np.float64)
  conversion = click * (rng.random(n) < 0.4)
  return (click, conversion, rng.normal(-2, 1, n), rng.normal(-1, 1, n), rng.normal(-1.5, 1, n))


def test_ips_and_dr_risks_match_numpy():
  click, conversion, ctr_logit, cvr_logit, imputed_logit = _risk_inputs()
  propensity = np.maximum(_sigmoid(ctr_logit), 0.05)
  cvr_loss = _log_loss(conversion, cvr_logit)
  got = losses.ips_risk(tf.constant(cvr_loss), tf.constant(click), tf.constant(propensity)).numpy()
  np.testing.assert_allclose(got, np.sum(click * cvr_loss / propensity) / len(click), rtol=1e-9)
  # DR-JL: the imputed error is the CVR loss against the imputed label.
  r = _sigmoid(imputed_logit)
  imputed = -(r * np.log(_sigmoid(cvr_logit)) + (1 - r) * np.log(1 - _sigmoid(cvr_logit)))
  want = np.mean(imputed + click * (cvr_loss - imputed) / propensity)
  got = losses.dr_risk(tf.constant(cvr_loss), tf.constant(imputed), tf.constant(click),
                       tf.constant(propensity)).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-9)
  want = np.mean(click * (cvr_loss - imputed) ** 2 / propensity)
  got = losses.imputation_loss(tf.constant(cvr_loss), tf.constant(imputed), tf.constant(click),
                               tf.constant(propensity)).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-9)


def _objective(model, click, conversion, ctr_logit, cvr_logit, imputed_logit, **kw):
  """(total loss, {term: loss}, gradients wrt the logits) of ``model``'s objective."""
  with tf.Graph().as_default():
    logits = [tf.constant(v, tf.float32) for v in (ctr_logit, cvr_logit, imputed_logit)]
    labels = {"click": tf.constant(click, tf.float32), "conversion": tf.constant(conversion, tf.float32),
              "ctcvr": tf.constant(click * conversion, tf.float32)}
    h = heads.heads_from_logits(logits[0], logits[1])
    h["imputed_cvr_logit"] = logits[2]
    p = resolve_params(model_params(model, **kw))
    per_example = heads.per_example_losses(labels, h)
    terms = {name: loss for name, loss, _ in heads.task_losses(labels, h, per_example, p)}
    total = heads.total_loss(labels, h, per_example, p)
    grads = tf.gradients(total, logits)
    with tf.compat.v1.Session() as sess:
      return sess.run([total, terms, [g if g is not None else tf.zeros_like(x) for g, x in zip(grads, logits)]])


def test_escm2_objectives_match_numpy():
  click, conversion, a, b, c = _risk_inputs(1)
  w = 0.3
  ctcvr = click * conversion
  log_p = -np.log1p(np.exp(-a)) - np.log1p(np.exp(-b))
  ctcvr_loss = -(ctcvr * log_p + (1 - ctcvr) * np.log1p(-np.exp(log_p)))
  base = np.mean(_log_loss(click, a)) + np.mean(ctcvr_loss)
  propensity = np.maximum(_sigmoid(a), 0.01)
  cvr_loss = _log_loss(conversion, b)
  total, terms, _ = _objective("escm2_ips", click, conversion, a, b, c, counterfactual_loss_weight=w)
  assert set(terms) == {"ctr", "ctcvr", "counterfactual_ips"}
  np.testing.assert_allclose(total, base + w * np.mean(click * cvr_loss / propensity), rtol=1e-5)
  r = _sigmoid(c)
  imputed = -(r * np.log(_sigmoid(b)) + (1 - r) * np.log(1 - _sigmoid(b)))
  dr = np.mean(imputed + click * (cvr_loss - imputed) / propensity)
  imputation = np.mean(click * (cvr_loss - imputed) ** 2 / propensity)
  total, terms, _ = _objective("escm2_dr", click, conversion, a, b, c, counterfactual_loss_weight=w)
  assert set(terms) == {"ctr", "ctcvr", "counterfactual_dr", "imputation"}
  np.testing.assert_allclose(terms["counterfactual_dr"], dr, rtol=1e-5)
  np.testing.assert_allclose(total, base + w * (dr + imputation), rtol=1e-5)


def test_the_propensity_trains_nothing_in_the_counterfactual_risk():
  """IPS weights are constants: the CTR logit's gradient is the CTR and CTCVR losses' alone."""
  inputs = _risk_inputs(2)
  _, _, g_ips = _objective("escm2_ips", *inputs)
  _, _, g_esmm = _objective("esmm", *inputs, cvr_loss_weight=0.0)     # ESCM2's ESMM: no click-space loss
  np.testing.assert_allclose(g_ips[0], g_esmm[0], rtol=1e-5, atol=1e-8)
  assert not np.allclose(g_ips[1], g_esmm[1])


@pytest.mark.parametrize("model, extra", [("base", {}), ("mmoe", {}), ("esmm", {"cvr_loss_weight": 1.0}),
                                          ("escm2_ips", {})])
def test_click_space_losses_ignore_unclicked_rows(model, extra):
  """Changing the conversion label or the pCVR of an unclicked impression changes nothing in the
  click-space CVR loss (nor in the IPS risk); changing a clicked one's pCVR does."""
  click, conversion, a, b, c = _risk_inputs(3)
  _, terms, grads = _objective(model, click, conversion, a, b, c, **extra)
  unclicked = click == 0
  _, other_unclicked, _ = _objective(model, click, np.where(unclicked, 1.0, conversion), a,
                                     np.where(unclicked, b + 3.0, b), c, **extra)
  _, other_clicked, _ = _objective(model, click, conversion, a, np.where(unclicked, b, b + 1.0), c, **extra)
  names = [n for n in ("cvr_on_clicks", "counterfactual_ips") if n in terms]
  assert names
  for name in names:
    np.testing.assert_allclose(other_unclicked[name], terms[name], rtol=1e-6)
    assert not np.isclose(other_clicked[name], terms[name])
  if "cvr_on_clicks" in terms:
    want = np.sum(click * _log_loss(conversion, b)) / click.sum()
    np.testing.assert_allclose(terms["cvr_on_clicks"], want, rtol=1e-5)
  if model in ("base", "mmoe"):
    # No entire-space CVR term: an unclicked impression's pCVR gets no gradient at all.
    assert np.all(grads[1][unclicked] == 0) and np.any(grads[1][~unclicked] != 0)


def test_masked_mean_is_zero_without_clicks():
  got = losses.masked_mean(tf.constant([1.0, 2.0]), tf.constant([0.0, 0.0])).numpy()
  assert got == 0.0


@pytest.mark.parametrize("pooling", ["sum", "mean", "sqrtn"])
def test_pooling_of_weighted_values(pooling):
  table = np.arange(12, dtype=np.float32).reshape(6, 2)
  ids = tf.SparseTensor([[0, 0], [0, 1], [0, 2], [2, 0]], tf.constant([1, 4, 5, 3], tf.int64), [3, 3])
  weights = tf.SparseTensor([[0, 0], [0, 1], [0, 2], [2, 0]], tf.constant([2.0, 0.5, 0.0, 3.0]), [3, 3])
  got = layers._pool(tf.constant(table), ids, weights, pooling, "p").numpy()
  w0 = np.array([2.0, 0.5])      # the zero weight is not a value
  row0 = w0 @ table[[1, 4]]
  norm = {"sum": (1.0, 1.0), "mean": (w0.sum(), 3.0), "sqrtn": (np.sqrt((w0 ** 2).sum()), 3.0)}[pooling]
  np.testing.assert_allclose(got[0], row0 / norm[0], rtol=1e-6)
  np.testing.assert_array_equal(got[1], [0, 0])                 # no value: zeros
  np.testing.assert_allclose(got[2], 3.0 * table[3] / norm[1], rtol=1e-6)


def test_warmup_linear_decay_schedule():
  p = resolve_params(model_params("esmm", learning_rate_schedule="warmup_linear_decay", warmup_steps=10,
                             train_steps=110))
  steps = [0, 4, 9, 10, 60, 109, 110, 200]
  got = [heads.learning_rate_scale(p, tf.constant(s, tf.int64)).numpy() for s in steps]
  want = [0.1, 0.5, 1.0, 1.0, 0.5, 0.01, 0.0, 0.0]
  np.testing.assert_allclose(got, want, atol=1e-6)
  constant = resolve_params(model_params("esmm"))
  assert heads.learning_rate_scale(constant, tf.constant(5, tf.int64)).numpy() == 1.0


def test_platt_fit_recovers_a_known_distortion():
  rng = np.random.default_rng(0)
  z = rng.normal(-2.5, 1.2, 200_000)
  y = (rng.random(z.size) < _sigmoid(0.6 * z + 0.4)).astype(float)
  spec = calibration.fit_platt(y, z)
  assert spec["a"] == pytest.approx(0.6, abs=0.03) and spec["b"] == pytest.approx(0.4, abs=0.08)
  # A slope that would come out negative is held at 1 and only the intercept is fitted.
  flat = calibration.fit_platt(y, -z)
  assert flat["a"] == 1.0
  np.testing.assert_allclose(np.mean(_sigmoid(-z + flat["b"])), y.mean(), rtol=1e-6)


def test_isotonic_fit_is_increasing_and_calibrated_on_average():
  rng = np.random.default_rng(1)
  z = rng.normal(-2, 1.5, 100_000)
  y = (rng.random(z.size) < _sigmoid(np.tanh(z) + z - 1)).astype(float)
  spec = calibration.fit_isotonic(y, z)
  assert np.all(np.diff(spec["x"]) > 0) and np.all(np.diff(spec["y"]) > 0)
  out = calibration.apply_numpy(spec, z)
  assert np.all(np.diff(out[np.argsort(z)]) >= -1e-12)          # ranking kept
  np.testing.assert_allclose(np.mean(_sigmoid(out)), y.mean(), rtol=0.03)
  with pytest.raises(ValueError, match="both positive and negative"):
    calibration.fit_isotonic(np.zeros(10), np.arange(10.0))



def _funnel(seed: int, n: int = 200_000):
  """Clicks, conversions and (distorted) tower logits of a CTR ~ 0.2, CVR ~ 0.1 funnel."""
  rng = np.random.default_rng(seed)
  ctr_logit, cvr_logit = rng.normal(-1.5, 1.0, n), rng.normal(-2.5, 1.2, n)
  click = (rng.random(n) < _sigmoid(ctr_logit)).astype(float)
  conversion = click * (rng.random(n) < _sigmoid(0.7 * cvr_logit - 0.3))
  return click, conversion, ctr_logit, cvr_logit


@pytest.mark.parametrize("method,rtol", [("bias", 1e-6), ("platt", 1e-4), ("isotonic", 0.03)])
def test_cvr_fit_to_scaled_conversions_predicts_the_scaled_rate(method, rtol):
  """Soft labels (conversions x 1.3, for conversions still to arrive): the mean pCVR on clicks is
  1.3 x the observed CVR; pCTR is untouched."""
  click, conversion, ctr_logit, cvr_logit = _funnel(5)
  out = calibration.fit_heads(method, click, conversion, ctr_logit, cvr_logit, conversion_scale=1.3)
  plain = calibration.fit_heads(method, click, conversion, ctr_logit, cvr_logit)
  clicked = click > 0
  assert out["conversion_scale"] == 1.3 and plain["conversion_scale"] == 1.0
  assert out["conversions"] == int(conversion.sum()) and out["ctr"] == plain["ctr"]
  pcvr = _sigmoid(calibration.apply_numpy(out["cvr"], cvr_logit[clicked]))
  np.testing.assert_allclose(pcvr.mean(), 1.3 * conversion[clicked].mean(), rtol=rtol)
  if method != "bias":
    assert np.all(np.diff(pcvr[np.argsort(cvr_logit[clicked])]) >= -1e-12)     # ranking kept


@pytest.mark.parametrize("method", ["bias", "platt", "isotonic"])
def test_a_pass_gathered_in_batches_is_compact_and_fits_as_whole_columns(method, monkeypatch):
  """The calibration pass over a whole train split: each impression keeps a click byte and its
  float32 CTR logit, a clicked one its conversion and CVR logit; the fit, computed chunk by
  chunk, is the fit of the whole columns at once."""
  click, conversion, ctr_logit, cvr_logit = _funnel(8, 50_000)
  whole = calibration.fit_heads(method, click, conversion, ctr_logit.astype(np.float32),
                                cvr_logit.astype(np.float32))
  data = calibration.HeadData()
  for part in np.array_split(np.arange(click.size), 13):
    data.add(click[part].astype(np.int64), conversion[part].astype(np.int64),
             ctr_logit[part].astype(np.float32), cvr_logit[part].astype(np.float32))
  assert data.impressions() == click.size
  assert data.nbytes() == click.size * 5 + int(click.sum()) * 8
  monkeypatch.setattr(calibration, "CHUNK_ROWS", 4096)
  batched = data.fit(method)
  for head in ("ctr", "cvr"):
    assert batched[head]["method"] == whole[head]["method"]
    for key in set(whole[head]) - {"method"}:
      np.testing.assert_allclose(batched[head][key], whole[head][key], rtol=1e-9, atol=1e-12)
  assert {k: batched[k] for k in ("impressions", "clicks", "conversions")} == \
      {k: whole[k] for k in ("impressions", "clicks", "conversions")}
  # The fits themselves, against what defines them, computed here over the whole columns.
  z, y = ctr_logit.astype(np.float32).astype(np.float64), click
  fitted = calibration.apply_numpy(batched["ctr"], z) if method != "isotonic" else None
  if method == "bias":          # the mean prediction is the observed rate
    np.testing.assert_allclose(_sigmoid(fitted).mean(), y.mean(), rtol=1e-9)
  elif method == "platt":       # the log loss is stationary in the slope and the intercept
    r = _sigmoid(fitted) - y
    np.testing.assert_allclose([r @ z / z.size, r.mean()], 0, atol=1e-9)


def test_a_calibration_pass_refuses_mismatched_or_invalid_columns():
  data = calibration.HeadData()
  with pytest.raises(ValueError, match="one click, conversion and logit per impression"):
    data.add(np.ones(4), np.zeros(4), np.zeros(3, np.float32), np.zeros(4, np.float32))
  for bad in (np.array([0.0, np.nan, 1.0]), np.array([0, -1, 1])):
    with pytest.raises(ValueError, match="finite and >= 0"):
      data.add(bad, np.zeros(3), np.zeros(3, np.float32), np.zeros(3, np.float32))
  assert data.impressions() == 0
  with pytest.raises(ValueError, match="one label per logit"):
    calibration.fit_platt(np.array([0.0, 1.0, 0.0]), np.zeros(2))


def test_conversion_scale_must_be_positive_and_needs_a_calibration():
  click, conversion, ctr_logit, cvr_logit = _funnel(6, 1000)
  for bad in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="finite and > 0"):
      calibration.fit_heads("bias", click, conversion, ctr_logit, cvr_logit, conversion_scale=bad)
  assert calibration.fit_heads("bias", click, conversion, ctr_logit, cvr_logit,
                               conversion_scale=0.8)["conversion_scale"] == 0.8
  with pytest.raises(ValueError, match="mean below 1"):       # no probability has that mean
    calibration.fit_bias(np.array([0.0, 3.0, 3.0]), np.zeros(3))
  with pytest.raises(ValueError, match="through the calibration"):
    calibration.check_conversion_scale("none", 1.2)


@pytest.mark.parametrize("spec", [None, {"method": "platt", "a": 0.7, "b": -0.3},
                                  {"method": "isotonic", "x": [-3.0, -1.0, 2.0], "y": [-4.0, -1.5, 0.5]},
                                  {"method": "isotonic", "x": [0.5], "y": [-1.0]}])
def test_calibration_graph_matches_numpy(spec):
  z = np.linspace(-8, 6, 301)
  got = calibration.apply(spec, tf.constant(z, tf.float64)).numpy()
  np.testing.assert_allclose(got, calibration.apply_numpy(spec, z), rtol=1e-12, atol=1e-12)
  assert np.all(np.diff(got) > 0)
  # The serving graph computes in float32.
  got32 = calibration.apply(spec, tf.constant(z, tf.float32)).numpy()
  np.testing.assert_allclose(got32, calibration.apply_numpy(spec, z), rtol=1e-5, atol=1e-5)


def test_isotonic_fit_on_tied_and_thin_logits_stays_strictly_increasing():
  """Tied logits (a model that scores many rows alike) and blocks whose smoothed rates would
  cross: the knots and their values still strictly increase, and no value is NaN."""
  rng = np.random.default_rng(4)
  z = np.repeat([-3.0, -2.0, -2.0, -1.0], 2500)                 # ties across quantile bins
  y = (rng.random(z.size) < 0.04 + 0.02 * (z + 3)).astype(float)
  for zz in (z, np.full(5000, 0.7)):
    spec = calibration.fit_isotonic(y[:zz.size], zz)
    assert np.all(np.diff(spec["x"]) > 0) and np.all(np.diff(spec["y"]) > 0)
    out = calibration.apply(spec, tf.constant(np.concatenate([zz[:10], spec["x"]]), tf.float32)).numpy()
    assert np.all(np.isfinite(out))
  # Raw rates 10/1000 < 20/1999 whose pseudo-count smoothing at a 4% prior would reverse them.
  y = np.zeros(2999 + 9001)
  z = np.concatenate([np.full(1000, -2.0), np.full(1999, -1.0), np.full(9001, 1.0)])
  y[:10], y[1000:1020], y[2999:2999 + 330] = 1, 1, 1
  spec = calibration.fit_isotonic(y, z, bins=3)
  assert np.all(np.diff(spec["y"]) > 0)


def test_isotonic_fit_of_a_barely_trained_model_keeps_float32_serving_exact():
  """Logits packed within a few thousandths (a model after a few steps): knots closer than
  MIN_KNOT_GAP are pooled, so the float32 serving graph stays within float32 rounding of numpy."""
  rng = np.random.default_rng(7)
  z = -4.5 + 1e-3 * rng.standard_normal(20_000)
  y = (rng.random(z.size) < 0.011).astype(float)
  spec = calibration.fit_isotonic(y, z)
  assert np.all(np.diff(spec["x"]) >= calibration.MIN_KNOT_GAP)
  z32 = z.astype(np.float32)
  got = calibration.apply(spec, tf.constant(z32)).numpy()
  np.testing.assert_allclose(_sigmoid(got), _sigmoid(calibration.apply_numpy(spec, z32)), rtol=2e-5)
  spread = calibration.fit_isotonic(y, np.linspace(-6, -2, z.size) + 1e-3 * rng.standard_normal(z.size))
  assert len(spread["x"]) > 1 and np.all(np.diff(spread["x"]) >= calibration.MIN_KNOT_GAP)


def test_calibrated_heads_keep_the_towers_values():
  spec = {"ctr": {"method": "platt", "a": 1.0, "b": math.log(2)}, "cvr": None}
  with tf.Graph().as_default():
    h = heads.heads_from_logits(tf.constant([0.0, 1.0]), tf.constant([-1.0, 2.0]), spec)
    with tf.compat.v1.Session() as sess:
      out = sess.run(h)
  np.testing.assert_allclose(out["ctr_uncalibrated"], _sigmoid(np.array([0.0, 1.0])), rtol=1e-6)
  np.testing.assert_allclose(out["ctr"], _sigmoid(np.array([0.0, 1.0]) + math.log(2)), rtol=1e-6)
  np.testing.assert_allclose(out["cvr"], out["cvr_uncalibrated"], rtol=1e-7)
  np.testing.assert_allclose(out["ctcvr"], out["ctr"] * out["cvr"], rtol=1e-6)


def _predict_from(checkpoint, params):
  with tf.Graph().as_default():
    spec = esmm.esmm_model_fn(feature_batch(), None, tf.estimator.ModeKeys.PREDICT, params)
    names = sorted(v.name for v in tf.compat.v1.global_variables())
    with tf.compat.v1.Session() as sess:
      tf.compat.v1.train.Saver().restore(sess, checkpoint)
      return sess.run(spec.predictions["cvr"]), names


def test_prediction_reads_the_moving_average_of_the_dense_weights(tmp_path):
  """With dense_ema_decay, training keeps an average of every dense weight (not of the tables)
  and a prediction graph restored from the checkpoint reads the averages instead of the weights."""
  params = model_params("esmm", dense_ema_decay=0.5)
  with tf.Graph().as_default():
    tf.compat.v1.set_random_seed(0)
    tf.compat.v1.train.create_global_step()
    train = esmm.esmm_model_fn(feature_batch(), label_batch(), tf.estimator.ModeKeys.TRAIN, params)
    dense = [v for v in tf.compat.v1.trainable_variables() if "/table_" not in v.name]
    shadows = [v for v in tf.compat.v1.global_variables() if v.name.endswith("/ExponentialMovingAverage:0")]
    assert sorted(v.name.rsplit("/", 1)[0] for v in shadows) == sorted(v.name.split(":")[0] for v in dense)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      for _ in range(5):
        sess.run(train.train_op)
      checkpoint = tf.compat.v1.train.Saver().save(sess, str(tmp_path / "model.ckpt"))
  averaged, names = _predict_from(checkpoint, params)
  plain, plain_names = _predict_from(checkpoint, model_params("esmm", dense_ema_decay=0.0))
  assert {n for n in names if "/table_" not in n} == {v.name for v in shadows}
  assert not any(n.endswith("/ExponentialMovingAverage:0") for n in plain_names)
  assert not np.allclose(averaged, plain)


CHECK_FLAG_DEFAULTS = """
from absl import flags
from model_fn import train
from model_fn.params import DEFAULT_PARAMS, RUNTIME_PARAMS
train.define_flags()
flags.FLAGS(["train"])
for name in train.PARAM_FLAGS:
  want = DEFAULT_PARAMS[name] if name in DEFAULT_PARAMS else RUNTIME_PARAMS[name]
  assert flags.FLAGS[name].value == want, (name, flags.FLAGS[name].value, want)
for name in train.UNIT_FLAGS:
  assert [int(u) for u in flags.FLAGS[name].value] == DEFAULT_PARAMS[name], name
print("checked", len(train.PARAM_FLAGS) + len(train.UNIT_FLAGS))
"""


def test_train_flags_default_to_the_params():
  """model_fn.train's flags take their defaults from DEFAULT_PARAMS (one source for every default)."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", CHECK_FLAG_DEFAULTS], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": root})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "checked 35"


def test_a_params_json_of_an_earlier_version_reads_as_what_it_trained(tmp_path):
  """A params.json written when the objective followed from the model, before the moving average,
  the base-rate biases, the holdout, the pooling param (sum then) and the hidden layers' params
  (plain ReLUs then): it reads with the loss
  weights and settings it trained with, so its model still evaluates, serves and warm-starts a new
  one; its MMoE variants, which no longer exist, are refused by name."""
  import json
  from model_fn import estimator as E
  old = {"model": "esmm", "format": "aliccp", "hash_buckets": {"101": 8}, "objective": "esmm",
         "ctr_loss_weight": 1.0, "ctcvr_loss_weight": 1.0, "cvr_loss_weight": 1.0, "embedding_dim": 18}
  (tmp_path / "params.json").write_text(json.dumps(old))
  p = E.load_params(str(tmp_path))
  assert "objective" not in p and p["cvr_loss_weight"] == 0.0 and p["ctcvr_loss_weight"] == 1.0
  assert (p["dense_ema_decay"], p["output_bias_init"], p["train_holdout"], p["pooling"]) == (0.0, "zero", 0.0, "sum")
  assert (p["hidden_activation"], p["hidden_norm"]) == ("relu", "none")
  assert resolve_params(p)["ple_levels"] is None        # the two-tower shapes it had
  (tmp_path / "params.json").write_text(json.dumps(dict(old, model="base", objective="base")))
  assert E.load_params(str(tmp_path))["ctcvr_loss_weight"] == 0.0
  for model in ("mmoe", "mmoe_esmm"):
    (tmp_path / "params.json").write_text(json.dumps(dict(old, model=model)))
    with pytest.raises(E.ModelDirError, match=f"a model '{model}' of an earlier version"):
      E.load_params(str(tmp_path))


def test_progress_hook_logs_the_step_the_share_and_the_time_left(caplog):
  from model_fn import estimator as E
  with tf.Graph().as_default():
    step = tf.compat.v1.train.get_or_create_global_step()
    bump = tf.compat.v1.assign_add(step, 1)
    hook = E.ProgressHook(train_steps=10, every_secs=0.0)
    with caplog.at_level("INFO"), tf.compat.v1.train.MonitoredSession(hooks=[hook]) as session:
      for _ in range(4):
        session.run(bump)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
  # The first step only starts the clock; each later one logs (every_secs 0).
  assert len(lines) == 3
  assert lines[-1].startswith("progress: step 3 of 10 (30%), ") and "steps/s, about " in lines[-1]
  assert lines[-1].endswith(" left") and "m" in lines[-1].split("about ")[1]
