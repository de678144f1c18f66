"""Conversion delay: how much of a day's conversions have arrived, estimated from the logs.

A model trained on immature days (clicks whose conversion has not arrived count as negatives)
underestimates pCVR; fake-negative calibration (in the spirit of Ktena et al., RecSys 2019)
scales the CVR labels back up by the share of conversions still to come. This module estimates
that share from the relabel counts (pipeline.relabel.reconcile's ``days``: per impression day its
clicks and its attributed conversions by lag, the whole days from impression to conversion).

A day d has age e_d = run_date - d (days). Conversion logs are read up to the run date, so its
conversions of lag k are observed only when k <= e_d (a censored count). The estimator, for each
lag k = 0..K with K = min(attribution_days, oldest age):

  c_k = sum over days with e_d >= k of conv_{d,k} / sum over the same days of clicks_d

the conversions per click at lag k, a ratio over every day old enough to have seen lag k (it
assumes the CVR and the delay distribution are stationary over the window). The delay CDF is
F(e) = sum_{k<=e} c_k / sum_{k<=K} c_k. Lags beyond K are not observable in the window: F is
relative to K (the share of the conversions within K days that have arrived after e days), so
with a window shorter than the attribution window the correction misses the conversions later
than K days.

Numpy and the standard library only, so the daily driver can call it outside Beam and TF.
"""

import datetime
import math
from typing import Dict, List, Sequence

import numpy as np

# The least completeness a day's conversions are divided by: a day of age 0 whose F(0) is tiny
# (or estimated from few conversions) would otherwise scale its handful of conversions without
# bound. It caps the scale of any one day at 1 / MIN_COMPLETENESS = 20.
MIN_COMPLETENESS = 0.05


def _date(yyyymmdd: str) -> datetime.date:
  return datetime.datetime.strptime(yyyymmdd, "%Y%m%d").date()


def age(date: str, run_date: str) -> int:
  """Whole days from ``date`` to ``run_date`` (YYYYMMDD); ValueError when ``date`` is later."""
  e = (_date(run_date) - _date(date)).days
  if e < 0:
    raise ValueError(f"day {date} is after the run date {run_date}")
  return e


def _by_lag(date: str, day: dict) -> Dict[int, int]:
  """{lag: conversions} of a day of the relabel record."""
  if "clicks" not in day or "conversions_by_lag" not in day:
    raise ValueError(f"day {date} of the relabel record has no clicks or conversions_by_lag "
                     "(relabeled by an older version)")
  out = {}
  for lag, n in day["conversions_by_lag"].items():
    k = int(lag)
    if k < 0 or n < 0:
      raise ValueError(f"day {date}: {n} conversions at lag {lag}")
    out[k] = int(n)
  return out


def estimate(days: Dict[str, dict], run_date: str, attribution_days: int) -> dict:
  """The delay distribution from ``days`` (date -> {"clicks", "conversions_by_lag", ...}):
  {"max_lag": K, "rate_by_lag": [c_0..c_K], "cdf": [F(0)..F(K)], "days_used": [days per lag],
  "conversions": total counted}; with no conversions the cdf is all 1.0 and a "note" says so."""
  if attribution_days < 0:
    raise ValueError(f"attribution_days must be >= 0, got {attribution_days}")
  if not days:
    raise ValueError("no days to estimate the conversion delay from")
  ages = {d: age(d, run_date) for d in days}
  max_lag = min(int(attribution_days), max(ages.values()))
  conv = np.zeros(max_lag + 1)
  clicks = np.zeros(max_lag + 1)
  used = np.zeros(max_lag + 1, np.int64)
  for d, day in days.items():
    by_lag = _by_lag(d, day)
    for k, n in by_lag.items():
      if k > min(ages[d], attribution_days):
        raise ValueError(f"day {d} has {n} conversions at lag {k}, beyond its age {ages[d]} or the "
                         f"attribution window {attribution_days} (a wrong run date {run_date}?)")
    if sum(by_lag.values()) > day["clicks"]:
      raise ValueError(f"day {d} has more conversions ({sum(by_lag.values())}) than clicks ({day['clicks']})")
    seen = min(ages[d], max_lag)
    clicks[:seen + 1] += day["clicks"]
    used[:seen + 1] += 1
    for k, n in by_lag.items():
      conv[k] += n
  rate = np.divide(conv, clicks, out=np.zeros_like(conv), where=clicks > 0)
  out = {"max_lag": max_lag, "rate_by_lag": [float(c) for c in rate], "days_used": [int(n) for n in used],
         "conversions": int(conv.sum())}
  if rate.sum() <= 0:
    return dict(out, cdf=[1.0] * (max_lag + 1), note="no conversions in the window: nothing to correct")
  cdf = np.cumsum(rate) / rate.sum()
  cdf[-1] = 1.0
  return dict(out, cdf=[float(f) for f in cdf])


def completeness(est: dict, age_days: int) -> float:
  """F(min(age, K)): the estimated share of a day's conversions (within K lag days) that have
  arrived when it is ``age_days`` old."""
  if age_days < 0:
    raise ValueError(f"age must be >= 0, got {age_days}")
  if age_days >= est["max_lag"]:
    return 1.0
  return float(est["cdf"][age_days])


def conversion_scale(est: dict, days: Dict[str, dict], train_days: Sequence[str], run_date: str) -> float:
  """r = sum_d conv_d / F(e_d) / sum_d conv_d over ``train_days``: the factor by which their known
  conversions are multiplied to estimate their eventual ones (F floored at MIN_COMPLETENESS;
  1.0 without conversions)."""
  known: List[float] = []
  eventual: List[float] = []
  for d in train_days:
    if d not in days:
      raise ValueError(f"train day {d} is not in the relabel record")
    n = sum(_by_lag(d, days[d]).values())
    known.append(n)
    eventual.append(n / max(completeness(est, age(d, run_date)), MIN_COMPLETENESS))
  if sum(known) == 0:
    return 1.0
  return math.fsum(eventual) / math.fsum(known)
