"""Confidence intervals for the figures a model is judged by on one evaluation set.

  auc_comparison     two models' ROC AUCs on the same rows and their difference, each with
                     DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988; the midrank form of
                     Sun & Xu 2014): the pairing removes the rows' shared noise, so a difference
                     of two AUCs is far more certain than either AUC alone
  calibration_ratio  sum of predictions / sum of labels with the delta-method variance of a
                     ratio estimator, the interval taken on the log scale (a ratio is positive)

Both are asymptotic (normal) intervals; tests check them against a paired bootstrap.
"""

import math
from typing import Dict, Sequence

import numpy as np
from scipy import stats

DEFAULT_CONFIDENCE = 0.95


def _z(confidence: float) -> float:
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  return float(stats.norm.ppf(0.5 + confidence / 2))


def _midranks(x: np.ndarray) -> np.ndarray:
  return stats.rankdata(x, method="average")


def _rows(labels, scores: Sequence, weights=None):
  y = np.asarray(labels, np.float64).ravel()
  s = np.stack([np.asarray(v, np.float64).ravel() for v in scores])
  if weights is not None:
    keep = np.asarray(weights, np.float64).ravel() > 0
    y, s = y[keep], s[:, keep]
  return y > 0, s


def auc_comparison(labels, a, b, weights=None, confidence: float = DEFAULT_CONFIDENCE) -> Dict[str, float]:
  """AUCs of scores ``a`` and ``b`` against binary ``labels`` (rows with ``weights`` 0 left out),
  each with its interval, and the difference a - b with its paired interval. Ties count one half.
  Without both classes the AUC figures are NaN."""
  pos, s = _rows(labels, (a, b), weights)
  m, n = int(pos.sum()), int((~pos).sum())
  out = {"positives": float(m), "negatives": float(n)}
  if m == 0 or n == 0:
    nan = float("nan")
    return {**out, **{k: nan for k in ("auc_a", "auc_b", "diff", "se_a", "se_b", "se_diff", "low_a",
                                       "high_a", "low_b", "high_b", "low", "high")}}
  x, y = s[:, pos], s[:, ~pos]
  v10 = np.empty((2, m))
  v01 = np.empty((2, n))
  auc = np.empty(2)
  for k in range(2):
    tz = _midranks(np.concatenate([x[k], y[k]]))
    tx, ty = _midranks(x[k]), _midranks(y[k])
    v10[k] = (tz[:m] - tx) / n          # per positive: the share of negatives ranked below it
    v01[k] = 1.0 - (tz[m:] - ty) / m    # per negative: the share of positives ranked above it
    auc[k] = v10[k].mean()
  cov = (np.cov(v10) if m > 1 else np.zeros((2, 2))) / m + (np.cov(v01) if n > 1 else np.zeros((2, 2))) / n
  z = _z(confidence)
  var_diff = max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)
  se = [math.sqrt(max(cov[k, k], 0.0)) for k in range(2)]
  diff, se_diff = float(auc[0] - auc[1]), math.sqrt(var_diff)
  return {**out, "auc_a": float(auc[0]), "auc_b": float(auc[1]), "diff": diff,
          "se_a": se[0], "se_b": se[1], "se_diff": se_diff,
          "low_a": float(auc[0] - z * se[0]), "high_a": float(auc[0] + z * se[0]),
          "low_b": float(auc[1] - z * se[1]), "high_b": float(auc[1] + z * se[1]),
          "low": diff - z * se_diff, "high": diff + z * se_diff}


def calibration_ratio(labels, probabilities, weights=None,
                      confidence: float = DEFAULT_CONFIDENCE) -> Dict[str, float]:
  """sum(p) / sum(y) over the rows (``weights`` > 0) with its interval: the ratio estimator's
  delta-method standard error sqrt(sum((p - r y)^2)) / sum(y), applied on the log scale.
  1 is calibrated; NaN without a positive label."""
  y, s = _rows(labels, (probabilities,), weights)
  p = s[0]
  y = y.astype(np.float64)
  observed = y.sum()
  if observed <= 0:
    nan = float("nan")
    return {"ratio": nan, "low": nan, "high": nan, "se": nan, "positives": 0.0, "rows": float(len(y))}
  r = float(p.sum() / observed)
  se = float(math.sqrt(np.sum((p - r * y) ** 2)) / observed)
  if r <= 0:          # predicts nothing: certainly below any band
    return {"ratio": 0.0, "low": 0.0, "high": 0.0, "se": se, "positives": float(observed), "rows": float(len(y))}
  half = _z(confidence) * se / r
  return {"ratio": r, "low": r * math.exp(-half), "high": r * math.exp(half), "se": se,
          "positives": float(observed), "rows": float(len(y))}


def bootstrap(statistic, arrays: Sequence[np.ndarray], replicates: int = 2000, seed: int = 0,
              confidence: float = DEFAULT_CONFIDENCE) -> Dict[str, float]:
  """Percentile interval of ``statistic(*arrays)`` over resamples of the rows (the same rows for
  every array: a paired bootstrap). The reference the asymptotic intervals are tested against."""
  rng = np.random.default_rng(seed)
  n = len(arrays[0])
  values = np.empty(replicates)
  for i in range(replicates):
    idx = rng.integers(0, n, n)
    values[i] = statistic(*(a[idx] for a in arrays))
  values = values[np.isfinite(values)]
  tail = (1 - confidence) / 2 * 100
  return {"low": float(np.percentile(values, tail)), "high": float(np.percentile(values, 100 - tail)),
          "se": float(values.std(ddof=1))}

