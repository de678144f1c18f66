"""Post-hoc calibration of the CTR and CVR heads: fitted on a held-out slice of the train split,
applied to the tower logits inside the prediction graph, so the SavedModel (and TF Serving)
returns calibrated probabilities.

A calibration maps a tower's logit to a new logit, strictly increasing, so rankings and AUCs
do not change:
  bias      logit + b: the output bias refitted so that the mean prediction matches the observed
            rate (by default on the whole train split after training: one parameter per head)
  platt     a * logit + b (a > 0), fitted by logistic regression of the label on the logit
  isotonic  the pool-adjacent-violators fit of the label rate over quantile bins of the logit,
            interpolated linearly (in logit space) between the bins' centres and continued with
            slope 1 beyond the outermost ones
pCTR is fitted on every held-out impression (label click), pCVR on the clicked ones (label
conversion); pCTCVR stays pCTR x pCVR. With a ``conversion_scale`` r the pCVR labels are soft,
r x conversion: an estimate of the eventual conversions of days whose conversions have not all
arrived (orchestration/delay.py), so the calibrated pCVR is corrected for them (fake negatives).

A calibration is a JSON object ({"method": "bias" or "platt", "a": .., "b": ..} or
{"method": "isotonic", "x": [..], "y": [..]}); a model's are in MODEL_DIR/calibration.json.
"""

import json
import math
import os
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

METHODS = ("none", "bias", "platt", "isotonic")
DEFAULT_METHOD = "bias"
CALIBRATION_FILE = "calibration.json"
# The share of the train split each method is fitted on when none is given: a held-out slice
# (records whose hash falls in bucket 0 of round(1 / fraction) buckets, not trained on), or 0:
# the whole train split after training (one parameter per head cannot overfit it).
DEFAULT_HOLDOUT = {"bias": 0.0, "platt": 0.05, "isotonic": 0.05}
ISOTONIC_BINS = 64
MIN_BIN_POSITIVES = 5
# Isotonic knots closer than this (in logits) are pooled: a steeper map would turn float32
# rounding of the tower logit into visible changes of the served probability.
MIN_KNOT_GAP = 1e-2
# Rows a Platt or bias fit computes on at a time (its float64 temporaries: about 100 bytes each).
CHUNK_ROWS = 1 << 20


def apply(spec: Optional[dict], logit: tf.Tensor) -> tf.Tensor:
  """The calibrated logit of ``logit`` under ``spec`` (None: unchanged)."""
  if not spec:
    return logit
  if spec["method"] in ("bias", "platt"):
    return float(spec["a"]) * logit + float(spec["b"])
  if spec["method"] == "isotonic":
    x = tf.constant(spec["x"], logit.dtype)
    y = tf.constant(spec["y"], logit.dtype)
    k = len(spec["x"])
    if k == 1:
      return logit - x[0] + y[0]
    i = tf.clip_by_value(tf.searchsorted(x[None, :], logit[None, :])[0], 1, k - 1)
    x0, x1 = tf.gather(x, i - 1), tf.gather(x, i)
    y0, y1 = tf.gather(y, i - 1), tf.gather(y, i)
    inside = y0 + (logit - x0) * (y1 - y0) / (x1 - x0)
    return tf.where(logit < x[0], y[0] + logit - x[0], tf.where(logit > x[-1], y[-1] + logit - x[-1], inside))
  raise ValueError(f"unknown calibration method {spec.get('method')!r}; known: {METHODS[1:]}")


def apply_numpy(spec: Optional[dict], logit: np.ndarray) -> np.ndarray:
  """``apply`` in numpy (the reference the graph is tested against)."""
  logit = np.asarray(logit, np.float64)
  if not spec:
    return logit
  if spec["method"] in ("bias", "platt"):
    return spec["a"] * logit + spec["b"]
  x, y = np.asarray(spec["x"]), np.asarray(spec["y"])
  if len(x) == 1:
    return logit - x[0] + y[0]
  out = np.interp(logit, x, y)
  return np.where(logit < x[0], y[0] + logit - x[0], np.where(logit > x[-1], y[-1] + logit - x[-1], out))


def logit(p):
  """log(p / (1 - p)), with p clipped into (0, 1)."""
  p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
  return np.log(p) - np.log1p(-p)


def _finite_and_nonnegative(y: np.ndarray) -> bool:
  return not (y.dtype.kind == "f" and not np.all(np.isfinite(y))) and not np.any(y < 0)


def _labels_and_logits(labels, logits):
  """Labels (0/1, or soft: >= 0, possibly above 1) and float logits, not copied where they are
  arrays already (a whole train split's pass: no float64 copy of it); ValueError unless some
  label is 0 and some is positive, and their mean (the rate fitted) is below 1."""
  y = np.asarray(labels)
  z = np.asarray(logits)
  if z.dtype.kind != "f":
    z = z.astype(np.float64)
  if y.shape != z.shape:
    raise ValueError(f"calibration needs one label per logit, got labels {y.shape} and logits {z.shape}")
  if y.size == 0 or not np.any(y > 0) or not np.any(y == 0):
    raise ValueError("calibration needs both positive and negative labels")
  rate = float(np.mean(y, dtype=np.float64))
  if not _finite_and_nonnegative(y) or rate >= 1:
    raise ValueError(f"calibration labels must be finite and >= 0 with a mean below 1, got mean {rate}")
  return y, z


def _chunks(n: int):
  return (slice(start, start + CHUNK_ROWS) for start in range(0, n, CHUNK_ROWS))


def _chunk_loss(y: np.ndarray, u: np.ndarray) -> float:
  """Summed log loss of sigmoid(u) against y."""
  return float(np.sum(np.logaddexp(0.0, u) - y * u))


def _nll(y: np.ndarray, z: np.ndarray, a: float, b: float) -> float:
  """Mean log loss of sigmoid(a z + b) against y, summed in float64 chunk by chunk."""
  return sum(_chunk_loss(y[part], a * z[part].astype(np.float64) + b) for part in _chunks(len(z))) / len(z)


def _newton_terms(y: np.ndarray, z: np.ndarray, a: float, b: float):
  """The mean log loss of sigmoid(a z + b) and its summed gradient and Hessian in (a, b), in one
  pass chunk by chunk."""
  loss, grad, hess = 0.0, np.zeros(2), np.zeros((2, 2))
  for part in _chunks(len(z)):
    zc = z[part].astype(np.float64)
    u = a * zc + b
    loss += _chunk_loss(y[part], u)
    p = 1 / (1 + np.exp(-np.clip(u, -500, 500)))
    r, w = p - y[part], p * (1 - p)
    wz = w @ zc
    grad += (r @ zc, r.sum())
    hess += ((w @ (zc * zc), wz), (wz, w.sum()))
  return loss / len(z), grad, hess


def fit_platt(labels: np.ndarray, logits: np.ndarray, fit_slope: bool = True) -> dict:
  """Logistic regression of ``labels`` on ``logits`` (Newton's method with backtracking, from the
  identity); a slope that comes out at or below 0 (a model worse than constant on this slice) is
  fixed at 1 and only b fitted. Memory beyond the inputs: CHUNK_ROWS rows' temporaries."""
  y, z = _labels_and_logits(labels, logits)

  def newton(fit_slope: bool):
    theta = np.array([1.0, 0.0])                 # (a, b)
    for _ in range(100):
      loss, grad, hess = _newton_terms(y, z, *theta)
      hess += 1e-9 * np.eye(2)
      if not fit_slope:
        grad[0], hess[0, 1], hess[1, 0], hess[0, 0] = 0.0, 0.0, 0.0, 1.0
      step = np.linalg.solve(hess, grad)
      t = 1.0
      while t > 1e-8 and _nll(y, z, *(theta - t * step)) > loss:
        t /= 2
      theta = theta - t * step
      if np.max(np.abs(t * step)) < 1e-10:
        break
    return float(theta[0]), float(theta[1])

  a, b = newton(fit_slope)
  if a <= 0:
    a, b = newton(False)
  return {"method": "platt" if fit_slope else "bias", "a": a, "b": b}


def fit_bias(labels: np.ndarray, logits: np.ndarray) -> dict:
  """The shift b of the logits that makes the mean of sigmoid(logit + b) the observed rate."""
  return fit_platt(labels, logits, fit_slope=False)


def fit_isotonic(labels: np.ndarray, logits: np.ndarray, bins: int = ISOTONIC_BINS) -> dict:
  """Pool-adjacent-violators over quantile bins of the logits (each bin with at least
  MIN_BIN_POSITIVES positives where the data allow); knots at the pooled blocks' mean logits.

  A block's rate carries one pseudo-observation at the overall rate (a block of only negatives
  stays finite), and blocks are pooled until the rates strictly increase and the knots are at
  least MIN_KNOT_GAP apart, so the map is strictly increasing and its slope bounded."""
  y, z = _labels_and_logits(labels, logits)
  bins = max(1, min(bins, int(np.count_nonzero(y)) // MIN_BIN_POSITIVES))
  prior = float(np.mean(y, dtype=np.float64))
  order = np.argsort(z, kind="mergesort")
  # Blocks: [sum of labels, count, sum of logits].
  pooled: List[List[float]] = []
  rate = lambda b: (b[0] + prior) / (b[1] + 1)
  for part in np.array_split(order, bins):
    if not len(part):
      continue
    pooled.append([float(y[part].sum(dtype=np.float64)), float(len(part)),
                   float(z[part].sum(dtype=np.float64))])
    while len(pooled) > 1 and (rate(pooled[-2]) >= rate(pooled[-1])
                               or pooled[-1][2] / pooled[-1][1] - pooled[-2][2] / pooled[-2][1] < MIN_KNOT_GAP):
      last = pooled.pop()
      pooled[-1] = [pooled[-1][i] + last[i] for i in range(3)]
  return {"method": "isotonic", "x": [float(s_z / n) for _, n, s_z in pooled],
          "y": [float(logit(rate(b))) for b in pooled]}


def fit(method: str, labels: np.ndarray, logits: np.ndarray) -> Optional[dict]:
  if method == "none":
    return None
  if method == "bias":
    return fit_bias(labels, logits)
  if method == "platt":
    return fit_platt(labels, logits)
  if method == "isotonic":
    return fit_isotonic(labels, logits)
  raise ValueError(f"calibration must be one of {METHODS}, got {method!r}")


def holdout_fraction(method: str, holdout: Optional[float]) -> float:
  """The share of the train split ``method`` is fitted on (None: its default, DEFAULT_HOLDOUT)."""
  if method not in METHODS:
    raise ValueError(f"calibration must be one of {METHODS}, got {method!r}")
  if method == "none":
    return 0.0
  fraction = DEFAULT_HOLDOUT[method] if holdout is None else float(holdout)
  if not 0 <= fraction < 0.5:
    raise ValueError(f"calibration_holdout must be in [0, 0.5), got {fraction}")
  return fraction


def check_conversion_scale(method: str, conversion_scale: float) -> float:
  """``conversion_scale`` as a float: finite and > 0, and 1 unless a calibration is fitted."""
  scale = float(conversion_scale)
  if not (math.isfinite(scale) and scale > 0):
    raise ValueError(f"conversion_scale must be finite and > 0, got {conversion_scale}")
  if method == "none" and scale != 1.0:
    raise ValueError(f"conversion_scale {scale} needs a calibration (the correction is applied "
                     "through the calibration), got calibration 'none'")
  return scale


def _floats(values) -> np.ndarray:
  """A flat float array: float32 and float64 as they come (no copy), anything else as float32."""
  out = np.asarray(values).reshape(-1)
  return out if out.dtype in (np.float32, np.float64) else out.astype(np.float32)


class HeadData:
  """The labels and tower logits the heads' calibrations are fitted to, gathered batch by batch
  and kept compact (a pass over a whole train split): each impression's click (1 byte) and CTR
  logit, and for the clicked ones only, the conversion and the CVR logit."""

  KEYS = ("click", "ctr_logit", "conversion", "cvr_logit")

  def __init__(self):
    self._parts: Dict[str, list] = {k: [] for k in self.KEYS}

  def add(self, click, conversion, ctr_logit, cvr_logit) -> None:
    """One batch: four columns of one value per impression; clicks finite and >= 0."""
    click, conversion = np.asarray(click).reshape(-1), np.asarray(conversion).reshape(-1)
    ctr_logit, cvr_logit = _floats(ctr_logit), _floats(cvr_logit)
    if not click.size == conversion.size == ctr_logit.size == cvr_logit.size:
      raise ValueError(f"calibration needs one click, conversion and logit per impression, got "
                       f"{click.size}, {conversion.size}, {ctr_logit.size} and {cvr_logit.size}")
    if not _finite_and_nonnegative(click):
      raise ValueError("calibration labels must be finite and >= 0: a click label is not")
    clicked = click > 0
    self._parts["click"].append(clicked)
    self._parts["ctr_logit"].append(ctr_logit)
    self._parts["conversion"].append(conversion[clicked].astype(np.float32))
    self._parts["cvr_logit"].append(cvr_logit[clicked])

  def impressions(self) -> int:
    return sum(part.size for part in self._parts["click"])

  def nbytes(self) -> int:
    return sum(part.nbytes for parts in self._parts.values() for part in parts)

  def _take(self, key: str) -> np.ndarray:
    """One column as one array; its batches are let go (the next column reuses their memory)."""
    parts, self._parts[key] = self._parts[key], []
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)

  def fit(self, method: str, holdout: float = 0.0, conversion_scale: float = 1.0) -> Dict[str, dict]:
    """{"ctr": spec, "cvr": spec, ...}: CTR fitted on every impression, CVR on the clicked ones'
    conversions times ``conversion_scale`` (soft labels: their estimated eventual conversions).
    The data are consumed."""
    scale = check_conversion_scale(method, conversion_scale)
    click, ctr_logit = self._take("click"), self._take("ctr_logit")
    ctr = fit(method, click, ctr_logit)
    impressions, clicks = int(click.size), int(np.count_nonzero(click))
    del click, ctr_logit
    converted = self._take("conversion").astype(np.float64)
    return {"method": method, "holdout": holdout, "conversion_scale": scale, "ctr": ctr,
            "cvr": fit(method, converted * scale, self._take("cvr_logit")),
            "impressions": impressions, "clicks": clicks, "conversions": int(np.sum(converted))}


def fit_heads(method: str, click: np.ndarray, conversion: np.ndarray, ctr_logit: np.ndarray,
              cvr_logit: np.ndarray, holdout: float = 0.0, conversion_scale: float = 1.0) -> Dict[str, dict]:
  """HeadData.fit of whole columns: labels and uncalibrated logits of the held-out slice, or of
  the whole train split when ``holdout`` is 0."""
  data = HeadData()
  data.add(click, conversion, ctr_logit, cvr_logit)
  return data.fit(method, holdout, conversion_scale)


def save(model_dir: str, calibrations: Dict[str, dict]) -> None:
  with tf.io.gfile.GFile(os.path.join(model_dir, CALIBRATION_FILE), "w") as f:
    json.dump(calibrations, f, indent=2, sort_keys=True)


def remove(model_dir: str) -> None:
  path = os.path.join(model_dir, CALIBRATION_FILE)
  if tf.io.gfile.exists(path):
    tf.io.gfile.remove(path)


def load(model_dir: str) -> Optional[Dict[str, dict]]:
  """A model_dir's calibrations, or None when it has none."""
  path = os.path.join(model_dir, CALIBRATION_FILE)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)
