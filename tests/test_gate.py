"""The daily gate's intervals against a paired bootstrap, and its decisions on constructed models."""

import json

import numpy as np
import pytest

from model_fn import intervals
from model_fn import metrics as M
from orchestration import gate


def _scores(rng, n=4000, rate=0.1):
  """Labels and two correlated score vectors of different skill."""
  y = (rng.random(n) < rate).astype(float)
  shared = rng.normal(size=n)
  a = 1.0 * y + shared + 0.5 * rng.normal(size=n)
  b = 0.8 * y + shared + 0.5 * rng.normal(size=n)
  return y, a, b


def test_delong_matches_exact_auc_and_a_paired_bootstrap():
  rng = np.random.default_rng(0)
  y, a, b = _scores(rng)
  c = intervals.auc_comparison(y, a, b)
  assert c["auc_a"] == pytest.approx(M.exact_auc(y, a), abs=1e-12)
  assert c["auc_b"] == pytest.approx(M.exact_auc(y, b), abs=1e-12)
  ref = intervals.bootstrap(lambda yy, aa, bb: M.exact_auc(yy, aa) - M.exact_auc(yy, bb), (y, a, b),
                            replicates=1000)
  assert c["se_diff"] == pytest.approx(ref["se"], rel=0.12)
  assert c["low"] == pytest.approx(ref["low"], abs=0.2 * ref["se"] + 0.002)
  assert c["high"] == pytest.approx(ref["high"], abs=0.2 * ref["se"] + 0.002)
  single = intervals.bootstrap(M.exact_auc, (y, a), replicates=1000)
  assert c["se_a"] == pytest.approx(single["se"], rel=0.12)
  # The pairing: the difference is more certain than either AUC.
  assert c["se_diff"] < 0.8 * min(c["se_a"], c["se_b"])


def test_delong_with_ties_and_weights_equals_the_auc_on_the_kept_rows():
  rng = np.random.default_rng(1)
  y = (rng.random(3000) < 0.2).astype(float)
  a = np.round(y + rng.normal(size=3000), 1)            # many ties
  b = np.round(0.5 * y + rng.normal(size=3000), 1)
  w = (rng.random(3000) < 0.5).astype(float)
  c = intervals.auc_comparison(y, a, b, weights=w)
  keep = w > 0
  assert c["auc_a"] == pytest.approx(M.exact_auc(y[keep], a[keep]), abs=1e-12)
  assert c["positives"] == y[keep].sum()
  # Identical scores: difference 0 with no spread.
  same = intervals.auc_comparison(y, a, a)
  assert same["diff"] == 0 and same["se_diff"] == pytest.approx(0, abs=1e-12)
  assert np.isnan(intervals.auc_comparison(np.zeros(10), a[:10], b[:10])["diff"])


def test_calibration_interval_matches_a_bootstrap():
  rng = np.random.default_rng(2)
  p = rng.uniform(0.01, 0.2, 20000)
  y = (rng.random(p.size) < p / 1.1).astype(float)       # predictions 10% high
  c = intervals.calibration_ratio(y, p)
  assert c["ratio"] == pytest.approx(M.calibration_ratio(y, p))
  ref = intervals.bootstrap(lambda yy, pp: pp.sum() / yy.sum(), (y, p), replicates=1000)
  assert c["se"] == pytest.approx(ref["se"], rel=0.12)
  assert c["low"] == pytest.approx(ref["low"], rel=0.01) and c["high"] == pytest.approx(ref["high"], rel=0.01)
  assert c["low"] < 1.1 < c["high"]


def _model(rng, click, conversion, skill, scale=1.0):
  """Predictions of a model with ranking ``skill`` whose probabilities are ``scale`` x calibrated."""
  n = click.size
  ctr = 1 / (1 + np.exp(-(np.log(0.1 / 0.9) + skill * (click - 0.1) * 3 + rng.normal(0, 1, n))))
  ctr *= 0.1 / ctr.mean()
  cvr = 1 / (1 + np.exp(-(np.log(0.2 / 0.8) + skill * (conversion - 0.2) * 3 + rng.normal(0, 1, n))))
  cvr *= (conversion[click > 0].mean() / cvr[click > 0].mean())
  ctcvr = ctr * cvr * (np.mean(click * conversion) / np.mean(ctr * cvr))
  return {"label_click": click, "label_conversion": conversion, "ctr": ctr, "cvr": cvr * scale,
          "ctcvr": ctcvr * scale}


@pytest.fixture(scope="module")
def world():
  rng = np.random.default_rng(3)
  n = 40000
  click = (rng.random(n) < 0.1).astype(float)
  conversion = click * (rng.random(n) < 0.2)
  return rng, click, conversion


def test_a_clearly_better_or_equally_good_candidate_is_published(world):
  rng, click, conversion = world
  served = _model(rng, click, conversion, skill=0.6)
  better = gate.decide(_model(rng, click, conversion, skill=1.2), served)
  assert better["publish"] and better["comparisons"]["auc/ctcvr"]["verdict"] == "better"
  assert better["comparisons"]["auc/ctcvr"]["low"] > 0
  same = gate.decide(_model(rng, click, conversion, skill=0.6), served)
  assert same["publish"] and {c["verdict"] for c in same["comparisons"].values()} <= {"within noise", "better"}
  assert "within noise" in {c["verdict"] for c in same["comparisons"].values()}


def test_a_candidate_worse_beyond_the_noise_is_refused_citing_the_interval(world):
  rng, click, conversion = world
  served = _model(rng, click, conversion, skill=1.2)
  d = gate.decide(_model(rng, click, conversion, skill=0.4), served)
  assert not d["publish"] and d["refused"]
  c = d["comparisons"]["auc/cvr_clicked"]
  assert c["verdict"] == "worse" and c["high"] < 0
  assert "beyond the noise" in d["refused"][0] and "[" in d["refused"][0]
  # A tolerated drop larger than the difference lets it through.
  assert gate.decide(_model(rng, click, conversion, skill=0.4), served, max_drop=0.5)["publish"]


def test_calibration_outside_the_band_is_refused_and_a_miscalibrated_served_model_replaced(world):
  rng, click, conversion = world
  good = _model(rng, click, conversion, skill=1.0)
  low = _model(rng, click, conversion, skill=1.0, scale=0.3)
  d = gate.decide(low, good)
  assert not d["publish"] and any("calibration/cvr_clicked" in r and "outside the band" in r for r in d["refused"])
  assert gate.decide(low, None)["publish"] is False           # nothing served: still refused
  # Outside the band by its point estimate but not beyond the noise (a small holdout): not refused.
  n = 3000
  small = lambda m: {k: v[:n] for k, v in m.items()}
  noisy = gate.decide(small(_model(rng, click, conversion, skill=1.0, scale=1.3)), small(good))
  cvr = noisy["calibration"]["candidate"]["cvr_clicked"]
  assert cvr["ratio"] > 1.25 and cvr["low"] < 1.25 and not any("outside the band" in r for r in noisy["refused"])
  # The served model out of the band: a candidate inside it replaces it, even if it ranks worse.
  replace = gate.decide(_model(rng, click, conversion, skill=0.3), low)
  assert replace["publish"] and "served model is miscalibrated" in replace["decision"]
  assert replace["comparisons"]["auc/cvr_clicked"]["verdict"] == "worse"
  # ... but not by a candidate whose own point estimate is outside the band.
  high = gate.decide(small(_model(rng, click, conversion, skill=1.0, scale=1.3)), small(low))
  assert high["calibration"]["candidate"]["cvr_clicked"]["ratio"] > 1.25
  assert "served model is miscalibrated" not in high["decision"]
  # Against the eval day's eventual conversions: 90% arrived makes a model that predicts them
  # read 1.0 where the observed labels say 1/0.9.
  eventual = gate.calibration(_model(rng, click, conversion, 1.0, scale=1 / 0.9), label_completeness=0.9)
  assert eventual["cvr_clicked"]["ratio"] == pytest.approx(1.0) and eventual["ctr"]["ratio"] == pytest.approx(
      gate.calibration(good)["ctr"]["ratio"], rel=0.05)


def test_a_holdout_too_small_to_tell_follows_the_policy(world):
  rng, click, conversion = world
  n = 600                                                  # about 12 conversions
  small = lambda m: {k: v[:n] for k, v in m.items()}
  cand, served = small(_model(rng, click, conversion, 0.4)), small(_model(rng, click, conversion, 1.2))
  for policy, published in (("publish", True), ("keep", False)):
    d = gate.decide(cand, served, band=(0.0, float("inf")), undecided=policy)
    assert d["publish"] is published and "too small to tell" in d["decision"]
    assert d["comparisons"]["auc/ctcvr"]["verdict"] == "too few positives"
  assert gate.decide(cand, None)["publish"]                # nothing served: the candidate goes out


def test_a_holdout_without_positives_or_a_model_predicting_zero_is_json_ready(world):
  rng, click, conversion = world
  m = _model(rng, click, conversion, 1.0)
  none = dict(m, label_conversion=np.zeros_like(conversion))
  d = gate.decide(none, dict(none))
  json.dumps(d, allow_nan=False)
  assert d["publish"] and d["comparisons"]["auc/ctcvr"]["verdict"] == "too few positives"
  zero = dict(m, cvr=np.zeros_like(m["cvr"]), ctcvr=np.zeros_like(m["ctcvr"]))
  z = gate.decide(zero, m)
  json.dumps(z, allow_nan=False)
  assert not z["publish"] and any("calibration/cvr_clicked 0.0000" in r for r in z["refused"])
  assert gate.summary_lines(z)


def test_a_candidate_whose_cvr_head_is_constant_is_refused_even_with_nothing_served(world):
  """A dead CVR tower predicts its bias for every impression: calibrated, ranking nothing."""
  rng, click, conversion = world
  m = _model(rng, click, conversion, 1.0)
  rate = conversion[click > 0].mean()
  dead = dict(m, cvr=np.full_like(m["cvr"], rate), ctcvr=m["ctr"] * rate)
  for served in (None, m):
    d = gate.decide(dead, served)
    assert not d["publish"] and "dead tower" in d["decision"] and d["refused"][0].startswith("cvr: ")
    assert d["calibration"]["candidate"]["cvr_clicked"]["ratio"] == pytest.approx(1.0)


def test_the_gate_refuses_bad_settings_and_rows_that_differ(world):
  rng, click, conversion = world
  m = _model(rng, click, conversion, 1.0)
  for kwargs in ({"metrics": ["auc/cvr"]}, {"band": (1.2, 2.0)}, {"undecided": "maybe"}, {"confidence": 1.0}):
    with pytest.raises(ValueError):
      gate.decide(m, m, **kwargs)
  other = dict(m, label_click=np.roll(m["label_click"], 1))
  with pytest.raises(ValueError, match="same holdout rows"):
    gate.decide(m, other)
