"""Scoring trained models on the eval split, the paper's protocol (library; CLI: model_fn.evaluate).

Per model: CTR and CTCVR AUC over all impressions, CVR AUC over clicked impressions,
log loss and calibration (mean prediction / observed rate) per task, all exact (numpy).
With a ground-truth file (synthetic data) also the CVR AUC over *all* impressions against
the true counterfactual conversions -- the quantity ESMM is meant to improve -- and an
``oracle`` row scored with the true probabilities, the ceiling for any model.
"""

import csv
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from model_fn import estimator as E
from model_fn import input_fn as I
from model_fn import metrics as M


def predict(model_dir: str, transform_dir: str, batch_size: int = 4096) -> Dict[str, np.ndarray]:
  """Predictions on the eval split with labels and sample ids passed through."""
  params = E.load_params(model_dir)
  tft_output = I.load_transform_output(transform_dir)
  estimator = E.make_estimator(model_dir, params)
  input_fn = I.make_input_fn(I.split_files(transform_dir, "eval"), tft_output, batch_size,
                             training=False, labels_as_features=True)
  chunks: Dict[str, List[np.ndarray]] = {}
  for batch in estimator.predict(input_fn, yield_single_examples=False):
    for k, v in batch.items():
      chunks.setdefault(k, []).append(np.asarray(v).reshape(-1))
  return {k: np.concatenate(v) for k, v in chunks.items()}


def read_ground_truth(path: str) -> Dict[str, np.ndarray]:
  with tf.io.gfile.GFile(path) as f:
    rows = list(csv.DictReader(f))
  return {
      "sample_id": np.array([int(r["sample_id"]) for r in rows], np.int64),
      "true_pctr": np.array([float(r["true_pctr"]) for r in rows]),
      "true_pcvr": np.array([float(r["true_pcvr"]) for r in rows]),
      "counterfactual_conversion": np.array([int(r["counterfactual_conversion"]) for r in rows]),
  }


def align_truth(sample_ids: np.ndarray, truth: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Ground-truth columns in the order of ``sample_ids``; every id must be present."""
  order = np.argsort(truth["sample_id"])
  sorted_ids = truth["sample_id"][order]
  pos = np.searchsorted(sorted_ids, sample_ids)
  pos = np.minimum(pos, len(sorted_ids) - 1)
  if not np.all(sorted_ids[pos] == sample_ids):
    missing = int(np.sum(sorted_ids[pos] != sample_ids))
    raise ValueError(f"{missing} evaluated sample ids are not in the ground-truth file")
  return {k: v[order][pos] for k, v in truth.items()}


def score(click, conversion, ctr, cvr, truth: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, float]:
  """The protocol's metrics from labels and predicted probabilities."""
  click = np.asarray(click, np.float64)
  ctcvr_label = click * np.asarray(conversion, np.float64)
  ctcvr = np.asarray(ctr, np.float64) * np.asarray(cvr, np.float64)
  out = {
      "auc/ctr": M.exact_auc(click, ctr),
      "auc/ctcvr": M.exact_auc(ctcvr_label, ctcvr),
      "auc/cvr_clicked": M.exact_auc(conversion, cvr, weights=click),
      "log_loss/ctr": M.log_loss(click, ctr),
      "log_loss/ctcvr": M.log_loss(ctcvr_label, ctcvr),
      "log_loss/cvr_clicked": M.log_loss(conversion, cvr, weights=click),
      "calibration/ctr": M.calibration_ratio(click, ctr),
      "calibration/ctcvr": M.calibration_ratio(ctcvr_label, ctcvr),
      "calibration/cvr_clicked": M.calibration_ratio(conversion, cvr, weights=click),
      "examples": float(len(click)), "clicks": float(click.sum()), "conversions": float(ctcvr_label.sum()),
  }
  if truth is not None:
    cf = truth["counterfactual_conversion"]
    out["auc/cvr_all_vs_truth"] = M.exact_auc(cf, cvr)
    out["calibration/cvr_all_vs_truth"] = float(np.mean(cvr) / np.mean(truth["true_pcvr"]))
  return out


def evaluate(models: List[Tuple[str, str]], transform_dir: str, ground_truth: Optional[str] = None,
             batch_size: int = 4096) -> Dict[str, Dict[str, float]]:
  truth_all = read_ground_truth(ground_truth) if ground_truth else None
  report = {}
  for name, model_dir in models:
    p = predict(model_dir, transform_dir, batch_size)
    truth = align_truth(p["sample_id"], truth_all) if truth_all else None
    report[name] = score(p["label_click"], p["label_conversion"], p["ctr"], p["cvr"], truth)
    report[name]["model_dir"] = model_dir
  if truth_all is not None:
    # The ceiling: the true probabilities scored the same way.
    report["oracle"] = score(p["label_click"], p["label_conversion"], truth["true_pctr"], truth["true_pcvr"], truth)
  return report


COLUMNS = (("CTR AUC", "auc/ctr"), ("CTCVR AUC", "auc/ctcvr"), ("CVR AUC clicked", "auc/cvr_clicked"),
           ("CVR AUC all (truth)", "auc/cvr_all_vs_truth"), ("calib CTR", "calibration/ctr"),
           ("calib CVR clicked", "calibration/cvr_clicked"), ("calib CTCVR", "calibration/ctcvr"),
           ("logloss CTCVR", "log_loss/ctcvr"))


def format_table(report: Dict[str, Dict[str, float]]) -> str:
  cols = [(h, k) for h, k in COLUMNS if any(k in r for r in report.values())]
  lines = ["| model | " + " | ".join(h for h, _ in cols) + " |",
           "|---|" + "---:|" * len(cols)]
  for name, r in report.items():
    lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4f}" if k in r else "" for _, k in cols) + " |")
  return "\n".join(lines)


