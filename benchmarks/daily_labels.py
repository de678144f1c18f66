"""Daily retrain with late conversions: the label strategies against each other.

  .venv/bin/python benchmarks/daily_labels.py [--num_days=9] [--impressions_per_day=12000] [--seeds=1,2,3]

Per seed (the seed of the generated world, its data and the models), generates daily logs with
delayed conversions (datagen.synthetic.generate_daily, with ground truth) and runs
orchestration.daily for every day from the fourth on, once per variant, in separate work and
serving dirs (every run publishes: the gate is opened wide, the comparison is of the label
strategies):

  wait       the default: train only on days whose labels are mature (older than the eval
             day), warm-started from yesterday's model
  naive      also train on the newest, immature days, where clicks that have not converted
             yet are negatives (what a job that ignores conversion delay does)
  corrected  naive's days, with pCVR calibrated to the conversions still to come (the delay
             distribution estimated from the logs, orchestration.delay)
  wait_cold  the default strategy without warm start: every day a fresh model, num_epochs
             over the window (what warm starting is measured against)

Every run's model is scored on one common yardstick: a fully labelled test split of the same
world (generate_daily's test_impressions, every conversion known): CVR AUC over all
impressions against the counterfactual conversions, CVR AUC on clicked impressions, CTCVR
AUC, and calibration (mean pCVR / mean true pCVR over all impressions; mean pCVR / CVR on
clicks; mean pCTCVR / CTCVR rate). The label completeness of each run's training days is
reported too. Per seed the figures are averaged over the run dates; the summary gives the mean
over seeds, and the paired differences corrected - naive (ranking) and corrected / wait
(calibration) with 95% t-intervals over seeds. Writes benchmarks/results/daily_labels.{json,md}.
"""

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from datagen import synthetic  # noqa: E402
from model_fn import evaluation  # noqa: E402
from orchestration import daily  # noqa: E402
from pipeline import preprocess  # noqa: E402
from preprocessing import features as F  # noqa: E402

import results_io  # noqa: E402  (benchmarks/ is this script's directory)

FLAGS = flags.FLAGS
VARIANTS = {"wait": ("wait", True), "naive": ("naive", True), "corrected": ("corrected", True),
            "wait_cold": ("wait", False)}
flags.DEFINE_integer("num_days", 9, "Days of logs.")
flags.DEFINE_integer("impressions_per_day", 12_000, "Impressions per day.")
flags.DEFINE_integer("window_days", 5, "orchestration.daily --window_days.")
flags.DEFINE_integer("maturity_days", 2, "orchestration.daily --maturity_days.")
flags.DEFINE_float("num_epochs", 2.0, "Epochs per daily run.")
flags.DEFINE_integer("batch_size", 1024, "orchestration.daily --batch_size.")
flags.DEFINE_integer("max_hash_buckets", 1 << 14, "Hash bucket cap.")
flags.DEFINE_list("seeds", ["2018"], "Seeds: of the generated world and its data, and of the models.")
flags.DEFINE_integer("num_users", 20_000, "Distinct users of the world.")
flags.DEFINE_integer("num_items", 30_000, "Distinct items of the world.")
flags.DEFINE_float("ctr", 0.04, "Mean click-through rate of the world.")
flags.DEFINE_float("cvr", 0.05, "Mean post-click conversion rate of the world.")
flags.DEFINE_list("variants", ["wait", "naive", "corrected"], f"Which of {list(VARIANTS)} to run.")
flags.DEFINE_integer("test_impressions", 100_000, "Fully labelled test impressions every model is scored on.")
flags.DEFINE_integer("holdout_percent", 20, "orchestration.daily --holdout_percent.")
flags.DEFINE_string("work_dir", "/tmp/daily_labels", "Logs, runs and serving dirs.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where to write daily_labels.{json,md}.")



def _test_set(logs: str, work_dir: str) -> str:
  """The generator's fully labelled test split, preprocessed once with the same job."""
  out = os.path.join(work_dir, "test_transformed")
  if not os.path.exists(os.path.join(out, F.RECONCILIATION)):
    test = os.path.join(logs, "test")
    split = {"skeleton": os.path.join(test, "sample_skeleton_test.csv"),
             "common": os.path.join(test, "common_features_test.csv")}
    preprocess.run("aliccp", {"train": split, "eval": split}, out, [], max_hash_buckets=FLAGS.max_hash_buckets,
                   overwrite=True)
  return out


def _score(result: dict, test_dir: str, truth: str) -> dict:
  report, _ = evaluation.evaluate([("m", result["model_dir"])], test_dir, truth)
  m = report["m"]
  train_days = result["plan"]["train_days"]
  completeness = result["label_completeness"]
  known = sum(completeness[d]["known"] for d in train_days)
  total = sum(completeness[d]["eventual"] for d in train_days)
  return {
      "date": result["date"], "eval_day": result["plan"]["eval_day"], "train_days": train_days,
      "train_label_completeness": known / total if total else 1.0,
      "cvr_auc_all_vs_truth": m["auc/cvr_all_vs_truth"], "cvr_auc_clicked": m["auc/cvr_clicked"],
      "ctcvr_auc": m["auc/ctcvr"], "calibration_cvr_vs_truth": m["calibration/cvr_all_vs_truth"],
      "calibration_ctcvr": m["calibration/ctcvr"], "calibration_cvr_clicked": m["calibration/cvr_clicked"],
      "conversion_scale": result.get("delay", {}).get("conversion_scale", 1.0),
      "published": bool(result.get("published")),
  }


KEYS = (("train labels complete", "train_label_completeness", "pct"),
        ("CVR AUC all vs truth", "cvr_auc_all_vs_truth", "pct"),
        ("CVR AUC clicked", "cvr_auc_clicked", "pct"),
        ("CTCVR AUC", "ctcvr_auc", "pct"),
        ("calib pCVR / true pCVR", "calibration_cvr_vs_truth", "ratio"),
        ("calib CVR clicked", "calibration_cvr_clicked", "ratio"),
        ("calib CTCVR", "calibration_ctcvr", "ratio"))
RANKING = [k for _, k, kind in KEYS[1:] if kind == "pct"]
CALIBRATION = [k for _, k, kind in KEYS if kind == "ratio"]


def _command() -> str:
  names = ("num_days", "impressions_per_day", "num_users", "num_items", "ctr", "cvr", "window_days",
           "maturity_days", "num_epochs", "batch_size", "max_hash_buckets", "test_impressions", "holdout_percent")
  return ("python benchmarks/daily_labels.py " + " ".join(f"--{n}={FLAGS[n].value}" for n in names)
          + f" --seeds={','.join(FLAGS.seeds)} --variants={','.join(FLAGS.variants)}")


def _run_seed(seed: int) -> list:
  """Every variant's daily runs over one world; one scored row per run date and variant."""
  work = os.path.join(FLAGS.work_dir, f"seed_{seed}")
  logs = os.path.join(work, "logs")
  if not os.path.exists(os.path.join(logs, "done")):
    synthetic.generate_daily(logs, FLAGS.num_days, FLAGS.impressions_per_day, num_users=FLAGS.num_users,
                             num_items=FLAGS.num_items, ctr=FLAGS.ctr, cvr=FLAGS.cvr, seed=seed,
                             test_impressions=FLAGS.test_impressions)
    open(os.path.join(logs, "done"), "w").close()
  days = sorted(d.split("=")[1] for d in os.listdir(os.path.join(logs, "impressions")))
  test_dir = _test_set(logs, work)
  truth = os.path.join(logs, "test", "ground_truth_test.csv")
  rows = []
  for variant in FLAGS.variants:
    strategy, warm_start = VARIANTS[variant]
    for date in days[FLAGS.maturity_days + 1:]:
      r = daily.run(date, logs, os.path.join(work, variant, "work"), os.path.join(work, variant, "serving"),
                    window_days=FLAGS.window_days, maturity_days=FLAGS.maturity_days, label_strategy=strategy,
                    num_epochs=FLAGS.num_epochs, batch_size=FLAGS.batch_size,
                    max_hash_buckets=FLAGS.max_hash_buckets, max_metric_drop=1.0, gate_metrics=("auc/ctr",),
                    calibration_band=(0.0, float("inf")), min_gate_positives=0,
                    ground_truth_dir=os.path.join(logs, "ground_truth"), holdout_percent=FLAGS.holdout_percent,
                    warm_start=warm_start, seed=seed)
      row = {"seed": seed, "strategy": variant, **_score(r, test_dir, truth)}
      rows.append(row)
      print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
  return rows


def _per_seed(rows: list, variant: str) -> dict:
  """{seed: {metric: mean over the run dates}} of a variant."""
  out = {}
  for seed in sorted({r["seed"] for r in rows}):
    mine = [r for r in rows if r["strategy"] == variant and r["seed"] == seed]
    out[seed] = {k: float(np.mean([r[k] for r in mine])) for _, k, _ in KEYS}
  return out


def _paired(rows: list, a: str, b: str, keys, ratio: bool) -> dict:
  """Per metric, the t-interval over seeds of a - b (or a / b with ``ratio``) of the seeds' means."""
  pa, pb = _per_seed(rows, a), _per_seed(rows, b)
  return {k: results_io.t_interval([pa[s][k] / pb[s][k] if ratio else pa[s][k] - pb[s][k] for s in pa])
          for k in keys}


def main(argv):
  del argv
  unknown = set(FLAGS.variants) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f"--variants: unknown {sorted(unknown)}; have {list(VARIANTS)}")
  start = time.perf_counter()
  rows = [row for seed in FLAGS.seeds for row in _run_seed(int(seed))]
  command = _command()
  fmt = lambda v, kind: f"{100 * v:.1f}" if kind == "pct" else f"{v:.3f}"
  lines = [f"Command: `{command}`", "",
           f"Machine: {platform.machine()}, {os.cpu_count()} cores. Wall time {time.perf_counter() - start:.0f} s. "
           f"Per seed one world; one ESMM per day and variant (wait, naive and corrected warm-started from the "
           f"model the variant published the day before, wait_cold trained from scratch); every model scored on "
           f"the same {FLAGS.test_impressions:,} fully labelled test impressions of its world (all conversions "
           f"known, plus the generator's true pCVR).", "",
           "Mean over the run dates, then over the seeds (± the seeds' standard deviation):", "",
           "| variant | " + " | ".join(h for h, _, _ in KEYS) + " |", "|---|" + "---:|" * len(KEYS)]
  summary = {}
  for variant in FLAGS.variants:
    per_seed = _per_seed(rows, variant)
    summary[variant] = {k: results_io.t_interval([v[k] for v in per_seed.values()]) for _, k, _ in KEYS}
    cell = lambda k, kind: (fmt(summary[variant][k]["mean"], kind)
                            + (f" ± {fmt(summary[variant][k]['std'], kind)}" if len(per_seed) > 1 else ""))
    lines.append(f"| {variant} | " + " | ".join(cell(k, kind) for _, k, kind in KEYS) + " |")
  paired = {}
  if {"corrected", "naive", "wait"} <= set(FLAGS.variants) and len(FLAGS.seeds) > 1:
    paired = {"ranking corrected - naive": _paired(rows, "corrected", "naive", RANKING, ratio=False),
              "ranking corrected - wait": _paired(rows, "corrected", "wait", RANKING, ratio=False),
              "calibration corrected / wait": _paired(rows, "corrected", "wait", CALIBRATION, ratio=True),
              "calibration naive / wait": _paired(rows, "naive", "wait", CALIBRATION, ratio=True)}
    names = {k: h for h, k, _ in KEYS}
    lines += ["", f"Paired over {len(FLAGS.seeds)} seeds (each seed's mean over its run dates; 95% t-intervals):", "",
              "| comparison | metric | mean | 95% interval |", "|---|---|---:|---|"]
    for title, figures in paired.items():
      for k, t in figures.items():
        kind = "ratio" if title.startswith("calibration") else "pct"
        lines.append(f"| {title} | {names[k]} | {fmt(t['mean'], kind)} | [{fmt(t['low'], kind)}, {fmt(t['high'], kind)}] |")
  lines += ["", "Per run date:", "",
            "| seed | run date | eval day | variant | train days | " + " | ".join(h for h, _, _ in KEYS) + " |",
            "|---|---|---|---|---|" + "---:|" * len(KEYS)]
  for row in rows:
    lines.append(f"| {row['seed']} | {row['date']} | {row['eval_day']} | {row['strategy']} | {len(row['train_days'])} | "
                 + " | ".join(fmt(row[k], kind) for _, k, kind in KEYS) + " |")
  lines += ["", "AUC and completeness in %. Calibration: mean prediction over the test split / the true rate "
            "(true pCVR, observed CVR on clicks, observed CTCVR)."]
  results_io.write(FLAGS.results_dir, "daily_labels",
                   {"command": command, "rows": rows, "summary": summary, "paired": paired}, "\n".join(lines))


if __name__ == "__main__":
  app.run(main)
