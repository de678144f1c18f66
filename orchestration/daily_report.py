"""The daily retrain's monitoring report: WORK/report.md, rewritten after every run from the
runs' result.json files.

  decisions    per run date: the gate's decision and why, and the version served after it
  holdout      per run date: the candidate's gate metrics with their intervals and the paired
               difference to the served model
  calibration  the calibration trend of the model served after each run (mean prediction /
               observed rate on that run's holdout, per head, with intervals)
"""

import json
import os
from typing import Dict, List, Optional

import tensorflow as tf

from orchestration import gate
from pipeline import publish

REPORT = "report.md"
RESULT = "result.json"


def load_results(work_dir: str) -> List[Dict]:
  """Every finished run's result.json under WORK/runs, by date."""
  out = []
  for path in sorted(tf.io.gfile.glob(os.path.join(work_dir, "runs", "*", RESULT))):
    with tf.io.gfile.GFile(path) as f:
      out.append(json.load(f))
  return sorted(out, key=lambda r: r["date"])


def _interval(c: Optional[Dict], key: str = "ratio", low: str = "low", high: str = "high",
              signed: bool = False) -> str:
  return gate.fmt_interval(c.get(key), c.get(low), c.get(high), signed) if c else "-"


def _published(r: Dict) -> bool:
  """The gate let the candidate out and its version is served (also when a rerun found it
  already published)."""
  return bool(r.get("published") or (not r.get("refused") and r.get("version") == int(r["date"])))


def _served_after(r: Dict) -> str:
  if _published(r):
    return f"v{r.get('version')}"
  return f"v{r['served_before']} (kept)" if r.get("served_before") else "none"


def render(results: List[Dict]) -> str:
  lines = ["# Daily retrain report", "",
           "Written by orchestration.daily after every run. Intervals are the gate's (DeLong for AUC differences, the delta method for "
           "calibration), on each run's holdout of its eval day; the conversion heads' calibration is against the "
           "eval day's estimated eventual conversions (observed / the estimated share arrived).", "",
           "## Decisions", "", "| run date | eval day | strategy | holdout clicks / conversions | served after | decision |",
           "|---|---|---|---:|---|---|"]
  for r in results:
    g = r.get("gate") or {}
    c = r.get("candidate") or {}
    decision = g.get("decision") or ("published" if _published(r) else "; ".join(r.get("refused", [])))
    if r.get("refused") and g.get("refused"):
      decision += ": " + "; ".join(g["refused"])
    lines.append(f"| {r['date']} | {r['plan']['eval_day']} | {r['plan']['strategy']} | "
                 f"{c.get('clicks', 0):.0f} / {c.get('conversions', 0):.0f} | {_served_after(r)} | "
                 f"{decision.replace('|', '/')} |")
  metrics = sorted({m for r in results for m in (r.get("gate") or {}).get("comparisons", {})})
  if metrics:
    lines += ["", "## Holdout figures", "", "Candidate against the model served before the run, on the same rows.", "",
              "| run date | metric | candidate | served | difference | verdict |", "|---|---|---|---|---|---|"]
    for r in results:
      for m, c in (r.get("gate") or {}).get("comparisons", {}).items():
        lines.append(f"| {r['date']} | {m} | {_interval(c, 'auc_a', 'low_a', 'high_a')} | "
                     f"{_interval(c, 'auc_b', 'low_b', 'high_b')} | {_interval(c, 'diff', signed=True)} | "
                     f"{c.get('verdict')} |")
  lines += ["", "## Calibration of the served model", "",
            "Mean prediction / observed rate on each run's holdout; the band is the gate's.", "",
            "| run date | served after | band | " + " | ".join(gate.HEADS) + " |",
            "|---|---|---|" + "---|" * len(gate.HEADS)]
  for r in results:
    g = r.get("gate") or {}
    cal = g.get("calibration", {}).get("candidate" if _published(r) else "served")
    if not cal:
      continue
    band = g.get("band") or [None, None]
    lines.append(f"| {r['date']} | {_served_after(r)} | [{band[0]}, {band[1] if band[1] is not None else 'inf'}] | "
                 + " | ".join(_interval(cal.get(h)) for h in gate.HEADS) + " |")
  return "\n".join(lines) + "\n"


def write(work_dir: str) -> str:
  """Rewrites WORK/report.md from the finished runs; returns its path."""
  # Runs of other dates may rewrite it at the same time.
  return publish.write_atomic(os.path.join(work_dir, REPORT), render(load_results(work_dir)))

