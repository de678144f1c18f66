"""The daily retrain's publish decision, taken on evidence.

The candidate and the served model are scored on the same holdout rows. Per gate metric (an
AUC) the gate takes the paired difference candidate - served with its interval
(model_fn.intervals.auc_comparison); per head, each model's calibration ratio (mean prediction /
observed rate) with its interval. Then, in this order:

  refuse     the candidate's calibration of a head is outside the band beyond the noise (its
             whole interval outside ``band``)
  publish    no model is served, or the served model's calibration is outside the band beyond
             the noise and the candidate's point estimates are all inside it (the candidate
             replaces it even if it ranks worse: a miscalibrated pCVR misprices every bid)
  refuse     a gate metric is worse beyond the noise: the difference's upper bound is below
             -max_drop (with max_drop -g < 0: refused unless the interval reaches a gain of g)
  undecided  a gate metric whose holdout has fewer than ``min_positives`` positive labels cannot
             tell signal from noise: the decision says so and follows ``undecided`` ("publish":
             the fresher model, or "keep": the served one)
  publish    otherwise (every difference better, or within the noise)

Each decision reads one bound of a two-sided interval at ``confidence``: at 95%, a one-sided
test at 2.5% per metric and head. A head's calibration is judged against the labels the eval
day will have (``label_completeness``: the estimated share of its conversions that have arrived;
the conversion heads' observed rates are divided by it).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from model_fn import intervals
from model_fn import metrics as M

GATE_METRICS = ("auc/ctr", "auc/ctcvr", "auc/cvr_clicked")
DEFAULT_METRICS = ("auc/ctcvr", "auc/cvr_clicked")
HEADS = ("ctr", "cvr_clicked", "ctcvr")
DEFAULT_BAND = (0.8, 1.25)
DEFAULT_MIN_POSITIVES = 100
UNDECIDED_POLICIES = ("publish", "keep")
DEFAULT_UNDECIDED = "publish"
DEFAULT_MAX_DROP = 0.0
DEFAULT_CONFIDENCE = intervals.DEFAULT_CONFIDENCE


def _task(p: Dict[str, np.ndarray], name: str) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
  """(labels, scores, weights) of a metric or head: CTR and CTCVR over every row, CVR on clicks."""
  click = np.asarray(p["label_click"], np.float64)
  conversion = np.asarray(p["label_conversion"], np.float64)
  task = name.split("/")[-1]
  if task == "ctr":
    return click, p["ctr"], None
  if task == "ctcvr":
    return click * conversion, p["ctcvr"], None
  if task == "cvr_clicked":
    return conversion, p["cvr"], click
  raise ValueError(f"unknown gate task {name!r}; known: {GATE_METRICS}")


def calibration(p: Dict[str, np.ndarray], confidence: float = intervals.DEFAULT_CONFIDENCE,
                label_completeness: float = 1.0) -> Dict[str, Dict]:
  """Per head, the calibration ratio with its interval; the conversion heads' against the observed
  conversions divided by ``label_completeness``."""
  out = {}
  for head in HEADS:
    c = intervals.calibration_ratio(*_task(p, head), confidence=confidence)
    if head != "ctr":
      c = {**c, **{k: c[k] * label_completeness for k in ("ratio", "low", "high", "se")}}
    out[head] = c
  return out


def _outside(c: Dict[str, float], band: Sequence[float]) -> bool:
  return bool(np.isfinite(c["ratio"]) and (c["high"] < band[0] or c["low"] > band[1]))


def fmt_interval(value: Optional[float], low: Optional[float], high: Optional[float],
                 signed: bool = False) -> str:
  """``value [low, high]``; "undefined" for a NaN or null value."""
  if value is None or not np.isfinite(value):
    return "undefined"
  f = "{:+.4f}" if signed else "{:.4f}"
  return f"{f.format(value)} [{f.format(low)}, {f.format(high)}]"


def _inside(cal: Dict[str, Dict], band: Sequence[float]) -> bool:
  """Every head's point estimate inside the band."""
  return all(np.isfinite(c["ratio"]) and band[0] <= c["ratio"] <= band[1] for c in cal.values())


def _miscalibrated(cal: Dict[str, Dict], band: Sequence[float]) -> List[str]:
  return [f"calibration/{h} {fmt_interval(c['ratio'], c['low'], c['high'])} outside the band "
          f"[{band[0]:g}, {band[1]:g}]" for h, c in cal.items() if _outside(c, band)]


class ConfigError(ValueError):
  """A gate setting out of its domain; ``setting`` names it (a parameter of ``decide``)."""

  def __init__(self, setting: str, message: str):
    super().__init__(message)
    self.setting = setting


def check_config(metrics: Sequence[str], band: Sequence[float], min_positives: int, undecided: str,
                 confidence: float) -> None:
  """Raises ConfigError naming the setting that is wrong."""
  unknown = [m for m in metrics if m not in GATE_METRICS]
  if unknown or not metrics:
    raise ConfigError("metrics", f"gate metrics must be among {', '.join(GATE_METRICS)}; got "
                      f"{', '.join(metrics) or 'none'}")
  if len(band) != 2 or not 0 <= band[0] < 1 < band[1]:
    raise ConfigError("band", f"the calibration band must be two numbers LOW,HIGH with 0 <= LOW < 1 < HIGH "
                      f"(HIGH may be inf), got {list(band)}")
  if min_positives < 0:
    raise ConfigError("min_positives", f"the minimum positives must be at least 0, got {min_positives}")
  if undecided not in UNDECIDED_POLICIES:
    raise ConfigError("undecided", f"the undecided policy must be one of {UNDECIDED_POLICIES}, got {undecided!r}")
  if not 0.5 <= confidence < 1:
    raise ConfigError("confidence", f"the confidence must be in [0.5, 1), got {confidence}")


def decide(candidate: Dict[str, np.ndarray], served: Optional[Dict[str, np.ndarray]],
           metrics: Sequence[str] = DEFAULT_METRICS, max_drop: float = DEFAULT_MAX_DROP,
           band: Sequence[float] = DEFAULT_BAND, min_positives: int = DEFAULT_MIN_POSITIVES,
           undecided: str = DEFAULT_UNDECIDED, confidence: float = DEFAULT_CONFIDENCE,
           label_completeness: float = 1.0) -> Dict:
  """The decision on ``candidate`` against ``served`` (None: nothing served), both the labels and
  predictions of the same holdout rows (label_click, label_conversion, ctr, cvr, ctcvr). Returns {"publish", "decision" (one line), "refused"
  (the reasons, empty when published), "comparisons" (per metric: the paired AUC figures and a
  verdict), "calibration" ({"candidate": .., "served": ..} per head)}; every figure JSON-ready."""
  check_config(metrics, band, min_positives, undecided, confidence)
  if served is not None and not all(np.array_equal(np.asarray(candidate[k]), np.asarray(served[k]))
                                    for k in ("label_click", "label_conversion")):
    raise ValueError("candidate and served model were not scored on the same holdout rows")
  if not 0 < label_completeness <= 1:
    raise ValueError(f"label_completeness must be in (0, 1], got {label_completeness}")
  cal = {"candidate": calibration(candidate, confidence, label_completeness)}
  if served is not None:
    cal["served"] = calibration(served, confidence, label_completeness)
  out = {"comparisons": {}, "calibration": cal, "refused": [], "band": list(band), "confidence": confidence,
         "min_positives": min_positives, "max_drop": max_drop, "undecided_policy": undecided,
         "label_completeness": label_completeness}
  bad = _miscalibrated(cal["candidate"], band)
  if bad:
    return _finish(out, False, "refused: the candidate is miscalibrated beyond the noise", bad)
  dead = [f"{head}: {candidate[head][0]:.6g} for every impression of the holdout" for head in ("ctr", "cvr")
          if len(candidate[head]) > 1 and M.spread(candidate[head]) < M.CONSTANT_SPREAD]
  if dead:     # its calibration can look right, and with nothing served nothing else would refuse it
    return _finish(out, False, "refused: a head of the candidate predicts a constant (a dead tower)", dead)
  if served is None:
    return _finish(out, True, "published: no model is served")
  worse, unclear = [], []
  for m in metrics:
    labels, a, weights = _task(candidate, m)
    c = intervals.auc_comparison(labels, a, _task(served, m)[1], weights, confidence)
    if c["positives"] < max(min_positives, 2) or c["negatives"] < 2:
      c["verdict"] = "too few positives"
      unclear.append(f"{m}: {c['positives']:.0f} positive and {c['negatives']:.0f} negative labels on "
                     f"the holdout, at least {max(min_positives, 2)} positives needed")
    elif c["high"] < -max_drop:
      c["verdict"] = "worse"
      worse.append(f"{m} {c['auc_a']:.4f} vs served {c['auc_b']:.4f}: difference "
                   f"{fmt_interval(c['diff'], c['low'], c['high'], signed=True)} is below "
                   f"{-max_drop:+g} beyond the noise")
    else:
      c["verdict"] = "better" if c["low"] > 0 else "within noise"
    out["comparisons"][m] = c
  served_bad = _miscalibrated(cal["served"], band)
  if served_bad and _inside(cal["candidate"], band):
    return _finish(out, True, "published: the served model is miscalibrated beyond the noise ("
                   + "; ".join(served_bad) + ")")
  if worse:
    return _finish(out, False, "refused: the candidate is worse beyond the noise", worse)
  if unclear:
    if undecided == "keep":
      return _finish(out, False, "refused: the holdout is too small to tell; policy --undecided=keep", unclear)
    return _finish(out, True, f"published: the holdout is too small to tell ({'; '.join(unclear)}); "
                   "policy --undecided=publish")
  verdicts = ", ".join(f"{m} {c['verdict']}" for m, c in out["comparisons"].items())
  return _finish(out, True, f"published: no gate metric worse beyond the noise ({verdicts})")


def _finish(out: Dict, publish: bool, decision: str, refused: Sequence[str] = ()) -> Dict:
  out.update(publish=publish, decision=decision, refused=list(refused))
  return M.json_ready(out)


def summary_lines(d: Dict) -> List[str]:
  """The decision's figures, each with its interval, as printed by the daily run."""
  lines = []
  for m, c in d["comparisons"].items():
    lines.append(f"  {m}: candidate {fmt_interval(c['auc_a'], c['low_a'], c['high_a'])}, served "
                 f"{fmt_interval(c['auc_b'], c['low_b'], c['high_b'])}, difference "
                 f"{fmt_interval(c['diff'], c['low'], c['high'], signed=True)} ({c['verdict']}; "
                 f"{c['positives']:.0f} positives)")
  for who, cal in d["calibration"].items():
    lines.append(f"  calibration of the {who}: " + "  ".join(
        f"{h} {fmt_interval(c['ratio'], c['low'], c['high'])}" for h, c in cal.items()))
  high = d["band"][1]
  lines.append(f"  gate ({d['confidence']:.0%} intervals, calibration band [{d['band'][0]:g}, "
               f"{'inf' if high is None else format(high, 'g')}]): {d['decision']}")
  return lines
