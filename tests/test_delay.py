"""The conversion-delay estimate: hand-computed counts, censoring, the floor, and a simulation."""

import datetime
from fractions import Fraction

import numpy as np
import pytest

from orchestration import delay

RUN = "20141030"


def _before(days: int, run: str = RUN) -> str:
  return (datetime.datetime.strptime(run, "%Y%m%d") - datetime.timedelta(days=days)).strftime("%Y%m%d")


def _day(clicks: int, by_lag: dict) -> dict:
  return {"clicks": clicks, "conversions_by_lag": {str(k): n for k, n in by_lag.items()},
          "impressions_read": 10 * clicks}


# Ages 2, 1, 0: lag 1 is seen by the two older days, lag 2 only by the oldest.
DAYS = {_before(2): _day(100, {0: 10, 1: 5, 2: 5}),
        _before(1): _day(200, {0: 20, 1: 6}),
        _before(0): _day(100, {0: 6})}


def test_rates_and_cdf_by_hand():
  est = delay.estimate(DAYS, RUN, attribution_days=5)
  assert est["max_lag"] == 2                      # the oldest day's age, below the window
  c = [Fraction(36, 400), Fraction(11, 300), Fraction(5, 100)]
  np.testing.assert_allclose(est["rate_by_lag"], [float(x) for x in c], rtol=1e-12)
  np.testing.assert_allclose(est["cdf"], [108 / 212, 152 / 212, 1.0], rtol=1e-12)
  assert est["days_used"] == [3, 2, 1] and est["conversions"] == 52 and "note" not in est
  assert delay.completeness(est, 0) == pytest.approx(108 / 212)
  assert delay.completeness(est, 1) == pytest.approx(152 / 212)
  assert delay.completeness(est, 2) == delay.completeness(est, 9) == 1.0
  r = (20 + 26 * Fraction(212, 152) + 6 * Fraction(212, 108)) / 52
  assert delay.conversion_scale(est, DAYS, sorted(DAYS), RUN) == pytest.approx(float(r), rel=1e-12)
  assert delay.conversion_scale(est, DAYS, [_before(2)], RUN) == 1.0     # a mature day


def test_the_attribution_window_bounds_the_lags():
  days = {**DAYS, _before(2): _day(100, {0: 10, 1: 5})}
  est = delay.estimate(days, RUN, attribution_days=1)
  assert est["max_lag"] == 1 and est["days_used"] == [3, 2]
  np.testing.assert_allclose(est["cdf"], [108 / 152, 1.0], rtol=1e-12)
  with pytest.raises(ValueError, match="lag 2"):          # relabel attributes none beyond the window
    delay.estimate({_before(2): _day(100, {2: 5})}, RUN, attribution_days=1)


def test_without_conversions_nothing_is_corrected():
  days = {_before(k): _day(50 * k, {}) for k in range(4)}     # the newest day has 0 clicks
  est = delay.estimate(days, RUN, attribution_days=7)
  assert est["max_lag"] == 3 and est["cdf"] == [1.0] * 4 and est["conversions"] == 0 and "note" in est
  assert delay.conversion_scale(est, days, sorted(days), RUN) == 1.0


def test_a_young_day_is_scaled_at_most_by_the_floor():
  days = {_before(1): _day(1000, {0: 1, 1: 99}), _before(0): _day(1000, {0: 1})}
  est = delay.estimate(days, RUN, attribution_days=3)
  assert est["cdf"][0] == pytest.approx(0.01) and est["cdf"][0] < delay.MIN_COMPLETENESS
  assert delay.conversion_scale(est, days, [_before(0)], RUN) == pytest.approx(1 / delay.MIN_COMPLETENESS)


def test_errors_name_what_is_wrong():
  with pytest.raises(ValueError, match="20141031"):
    delay.estimate({**DAYS, "20141031": _day(10, {})}, RUN, 5)
  with pytest.raises(ValueError, match="beyond its age"):      # conversions read past the run date
    delay.estimate({_before(1): _day(100, {2: 1})}, RUN, 5)
  with pytest.raises(ValueError, match="older version"):
    delay.estimate({RUN: {"impressions_read": 3}}, RUN, 5)
  with pytest.raises(ValueError, match="more conversions"):
    delay.estimate({RUN: _day(1, {0: 2})}, RUN, 5)
  with pytest.raises(ValueError, match="no days"):
    delay.estimate({}, RUN, 5)
  with pytest.raises(ValueError, match="attribution_days"):
    delay.estimate(DAYS, RUN, -1)
  est = delay.estimate(DAYS, RUN, 5)
  with pytest.raises(ValueError, match="age"):
    delay.completeness(est, -1)
  with pytest.raises(ValueError, match="after the run date"):
    delay.conversion_scale(est, {**DAYS, "20141031": _day(10, {0: 1})}, ["20141031"], RUN)
  with pytest.raises(ValueError, match="not in the relabel record"):
    delay.conversion_scale(est, DAYS, ["20140101"], RUN)


def test_simulated_censored_delays_are_recovered():
  """10 days of 10^5 clicks at CVR 0.1, lags from a known distribution (some beyond the 7-day
  window, dropped as relabel does), each day censored at its age."""
  rng = np.random.default_rng(11)
  pmf = np.array([0.45, 0.2, 0.1, 0.07, 0.05, 0.04, 0.03, 0.02, 0.04])    # the last: lag 8+
  window = 7
  true_cdf = np.cumsum(pmf[:window + 1]) / pmf[:window + 1].sum()
  days, eventual, known = {}, {}, {}
  for e in range(10):
    d = _before(e)
    lags = rng.choice(len(pmf), size=rng.binomial(100_000, 0.1), p=pmf)
    lags = lags[lags <= window]
    eventual[d] = lags.size
    counts = np.bincount(lags[lags <= e], minlength=window + 1)
    known[d] = int(counts.sum())
    days[d] = _day(100_000, {k: int(n) for k, n in enumerate(counts) if n})
  est = delay.estimate(days, RUN, window)
  assert est["max_lag"] == window and est["days_used"] == [10, 9, 8, 7, 6, 5, 4, 3]
  np.testing.assert_allclose(est["cdf"], true_cdf, atol=0.01)
  train = [_before(e) for e in range(5)]             # the newest, immature days
  truth = sum(eventual[d] for d in train) / sum(known[d] for d in train)
  assert truth > 1.2
  assert delay.conversion_scale(est, days, train, RUN) == pytest.approx(truth, rel=0.02)
