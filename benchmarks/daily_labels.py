"""Daily retrain with late conversions: the default label strategy against naive daily training.

  .venv/bin/python benchmarks/daily_labels.py [--num_days=9] [--impressions_per_day=12000]

Generates daily logs with delayed conversions (pipeline.synthetic.generate_daily, with
ground truth) and runs pipeline.daily for every day from the fourth on, twice, in separate
work and serving dirs:

(Every run publishes: the gate is opened wide, the comparison is of the label strategies.)

  wait       the default: train only on days whose labels are mature (older than the eval
             day), warm-started from yesterday's model
  naive      also train on the newest, immature days, where clicks that have not converted
             yet are negatives (what a job that ignores conversion delay does)
  wait_cold  the default strategy without warm start: every day a fresh model, num_epochs
             over the window (what warm starting is measured against)

Every run's model is scored on one common yardstick: a fully labelled test split of the same
world (generate_daily's test_impressions, every conversion known): CVR AUC over all
impressions against the counterfactual conversions, CVR AUC on clicked impressions, CTCVR
AUC, and calibration (mean pCVR / mean true pCVR over all impressions; mean pCVR / CVR on
clicks; mean pCTCVR / CTCVR rate). The label completeness of each run's training days is
reported too. Writes
benchmarks/results/daily_labels.{json,md}.
"""

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from model_fn import evaluation  # noqa: E402
from pipeline import daily, preprocess, synthetic  # noqa: E402
from preprocessing import features as F  # noqa: E402

import results_io  # noqa: E402  (benchmarks/ is this script's directory)

FLAGS = flags.FLAGS
VARIANTS = {"wait": ("wait", True), "naive": ("naive", True), "wait_cold": ("wait", False)}
flags.DEFINE_integer("num_days", 9, "Days of logs.")
flags.DEFINE_integer("impressions_per_day", 12_000, "Impressions per day.")
flags.DEFINE_integer("window_days", 5, "pipeline.daily --window_days.")
flags.DEFINE_integer("maturity_days", 2, "pipeline.daily --maturity_days.")
flags.DEFINE_float("num_epochs", 2.0, "Epochs per daily run.")
flags.DEFINE_integer("batch_size", 1024, "pipeline.daily --batch_size.")
flags.DEFINE_integer("max_hash_buckets", 1 << 14, "Hash bucket cap.")
flags.DEFINE_integer("seed", 2018, "Data seed.")
flags.DEFINE_integer("num_users", 20_000, "Distinct users of the world.")
flags.DEFINE_integer("num_items", 30_000, "Distinct items of the world.")
flags.DEFINE_float("ctr", 0.04, "Mean click-through rate of the world.")
flags.DEFINE_float("cvr", 0.05, "Mean post-click conversion rate of the world.")
flags.DEFINE_list("variants", list(VARIANTS), f"Which of {list(VARIANTS)} to run.")
flags.DEFINE_integer("test_impressions", 100_000, "Fully labelled test impressions every model is scored on.")
flags.DEFINE_integer("holdout_percent", 20, "pipeline.daily --holdout_percent.")
flags.DEFINE_string("work_dir", "/tmp/daily_labels", "Logs, runs and serving dirs.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where to write daily_labels.{json,md}.")



def _test_set(logs: str) -> str:
  """The generator's fully labelled test split, preprocessed once with the same job."""
  out = os.path.join(FLAGS.work_dir, "test_transformed")
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
      "published": bool(result.get("published")),
  }


def _command() -> str:
  names = ("num_days", "impressions_per_day", "num_users", "num_items", "ctr", "cvr", "window_days",
           "maturity_days", "num_epochs", "batch_size", "max_hash_buckets", "seed", "test_impressions", "holdout_percent")
  return ("python benchmarks/daily_labels.py " + " ".join(f"--{n}={FLAGS[n].value}" for n in names)
          + f" --variants={','.join(FLAGS.variants)}")


def main(argv):
  del argv
  unknown = set(FLAGS.variants) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f"--variants: unknown {sorted(unknown)}; have {list(VARIANTS)}")
  start = time.perf_counter()
  logs = os.path.join(FLAGS.work_dir, "logs")
  if not os.path.exists(os.path.join(logs, "done")):
    synthetic.generate_daily(logs, FLAGS.num_days, FLAGS.impressions_per_day, num_users=FLAGS.num_users,
                             num_items=FLAGS.num_items, ctr=FLAGS.ctr, cvr=FLAGS.cvr, seed=FLAGS.seed,
                             test_impressions=FLAGS.test_impressions)
    open(os.path.join(logs, "done"), "w").close()
  days = sorted(d.split("=")[1] for d in os.listdir(os.path.join(logs, "impressions")))
  test_dir = _test_set(logs)
  truth = os.path.join(logs, "test", "ground_truth_test.csv")
  rows = []
  for variant in FLAGS.variants:
    strategy, warm_start = VARIANTS[variant]
    for date in days[FLAGS.maturity_days + 1:]:
      r = daily.run(date, logs, os.path.join(FLAGS.work_dir, variant, "work"),
                    os.path.join(FLAGS.work_dir, variant, "serving"), window_days=FLAGS.window_days,
                    maturity_days=FLAGS.maturity_days, label_strategy=strategy, num_epochs=FLAGS.num_epochs,
                    batch_size=FLAGS.batch_size,
                    max_hash_buckets=FLAGS.max_hash_buckets, max_metric_drop=1.0, gate_metrics=("auc/ctr",),
                    ground_truth_dir=os.path.join(logs, "ground_truth"), holdout_percent=FLAGS.holdout_percent,
                    warm_start=warm_start)
      row = {"strategy": variant, **_score(r, test_dir, truth)}
      rows.append(row)
      print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
  keys = (("train labels complete", "train_label_completeness", "pct"),
          ("CVR AUC all vs truth", "cvr_auc_all_vs_truth", "pct"),
          ("CVR AUC clicked", "cvr_auc_clicked", "pct"),
          ("CTCVR AUC", "ctcvr_auc", "pct"),
          ("calib pCVR / true pCVR", "calibration_cvr_vs_truth", "ratio"),
          ("calib CVR clicked", "calibration_cvr_clicked", "ratio"),
          ("calib CTCVR", "calibration_ctcvr", "ratio"))
  command = _command()
  fmt = lambda v, kind: f"{100 * v:.1f}" if kind == "pct" else f"{v:.3f}"
  lines = [f"Command: `{command}`", "",
           f"Machine: {platform.machine()}, {os.cpu_count()} cores. Wall time {time.perf_counter() - start:.0f} s. "
           f"One ESMM per day and variant (wait and naive warm-started from the model the variant published "
           f"the day before, wait_cold trained from scratch); every model scored on the same "
           f"{FLAGS.test_impressions:,} fully labelled test impressions of the same world (all conversions "
           f"known, plus the generator's true pCVR).", "",
           "| run date | eval day | variant | train days | " + " | ".join(h for h, _, _ in keys) + " |",
           "|---|---|---|---|" + "---:|" * len(keys)]
  for date in days[FLAGS.maturity_days + 1:]:
    for row in (r for r in rows if r["date"] == date):
      lines.append(f"| {date} | {row['eval_day']} | {row['strategy']} | {len(row['train_days'])} | "
                   + " | ".join(fmt(row[k], kind) for _, k, kind in keys) + " |")
  lines += ["", "Mean over the run dates:", "", "| variant | " + " | ".join(h for h, _, _ in keys) + " |",
            "|---|" + "---:|" * len(keys)]
  summary = {}
  for variant in FLAGS.variants:
    mine = [r for r in rows if r["strategy"] == variant]
    summary[variant] = {k: float(np.mean([r[k] for r in mine])) for _, k, _ in keys}
    lines.append(f"| {variant} | " + " | ".join(fmt(summary[variant][k], kind) for _, k, kind in keys) + " |")
  lines += ["", "AUC and completeness in %. Calibration: mean prediction over the test split / the true rate "
            "(true pCVR, observed CVR on clicks, observed CTCVR)."]
  results_io.write(FLAGS.results_dir, "daily_labels", {"command": command, "rows": rows, "summary": summary},
                   "\n".join(lines))


if __name__ == "__main__":
  app.run(main)
