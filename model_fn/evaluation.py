"""Scoring trained models on the eval split, the paper's protocol (library; CLI: model_fn.evaluate).

Per model: CTR and CTCVR AUC over all impressions, CVR AUC over clicked impressions,
log loss and calibration (mean prediction / observed rate) per task, all exact (numpy).
With a ground-truth file (synthetic data) also the CVR AUC over *all* impressions against
the true counterfactual conversions -- the quantity ESMM is meant to improve -- and an
``oracle`` row scored with the true probabilities, the ceiling for any model.
"""

import array
import csv
import gzip
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from model_fn import estimator as E
from model_fn import input_fn as I
from model_fn import metrics as M
from model_fn.heads import UNCALIBRATED_SUFFIX

GATE_PREFIX = "gate_"
# A calibrated model's towers scored without their calibration: a report row of its own.
UNCALIBRATED_ROW = ":uncalibrated"


def predict(model_dir: str, transform_dir: str, batch_size: int = 4096) -> Dict[str, np.ndarray]:
  """Predictions on the eval split with labels and sample ids passed through."""
  params = E.load_params(model_dir)
  tft_output = I.load_transform_output(transform_dir)
  E.check_transform_matches(params, model_dir, tft_output, transform_dir)
  estimator = E.make_estimator(model_dir, params)
  input_fn = I.make_input_fn(tft_output=tft_output, batch_size=batch_size, training=False,
                             labels_as_features=True, **I.split_input(transform_dir, "eval"))
  chunks: Dict[str, List[np.ndarray]] = {}
  for batch in estimator.predict(input_fn, yield_single_examples=False):
    for k, v in batch.items():
      v = np.asarray(v)
      # Gate weights stay [batch, experts]; every other prediction is one value per example.
      chunks.setdefault(k, []).append(v if k.startswith(GATE_PREFIX) else v.reshape(-1))
  return {k: np.concatenate(v) for k, v in chunks.items()}


def sample_id_strings(ids: np.ndarray) -> np.ndarray:
  """Sample ids as str (Ali-CCP's are int64, Avazu's are strings that overflow int64)."""
  ids = np.asarray(ids)
  if ids.dtype.kind == "U":
    return ids
  if ids.dtype.kind in "SO":
    return np.array([i.decode() if isinstance(i, bytes) else str(i) for i in ids])
  return ids.astype(np.int64).astype(str)


def _canonical_int64(text: str) -> bool:
  """A non-negative int64 written as str(int) writes it (no sign, no leading zero)."""
  return (text.isascii() and text.isdigit() and (len(text) == 1 or text[0] != "0")
          and len(text) <= 19 and int(text) <= np.iinfo(np.int64).max)


def read_ground_truth(path: str) -> Dict[str, np.ndarray]:
  """datagen.synthetic's ground truth (``.csv`` or ``.csv.gz``, local or any tf.io.gfile path),
  streamed into arrays: sample ids int64 where they all are integers (Ali-CCP), else str."""
  ints, strs = array.array("q"), None
  cols = {"true_pctr": array.array("d"), "true_pcvr": array.array("d"), "counterfactual_conversion": array.array("b")}
  with tf.io.gfile.GFile(path, "rb") as raw:
    stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
    rows = csv.reader(line.decode("utf-8") for line in stream)
    header = next(rows)
    at = {name: header.index(name) for name in ["sample_id", *cols]}
    for row in rows:
      sid = row[at["sample_id"]]
      if strs is None:
        if _canonical_int64(sid):
          ints.append(int(sid))
        else:
          strs = [str(i) for i in ints]   # exact: every id so far is its int's str
      if strs is not None:
        strs.append(sid)
      cols["true_pctr"].append(float(row[at["true_pctr"]]))
      cols["true_pcvr"].append(float(row[at["true_pcvr"]]))
      cols["counterfactual_conversion"].append(int(row[at["counterfactual_conversion"]]))
  out = {"sample_id": np.array(strs, dtype=str) if strs is not None else np.frombuffer(ints, np.int64)}
  out.update({k: np.frombuffer(v, {"d": np.float64, "b": np.int8}[v.typecode]).astype(
      np.int64 if v.typecode == "b" else np.float64) for k, v in cols.items()})
  return out


def align_truth(sample_ids: np.ndarray, truth: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Ground-truth columns in the order of ``sample_ids``; every id must be present."""
  sample_ids = np.asarray(sample_ids)
  if truth["sample_id"].dtype.kind != "i" or sample_ids.dtype.kind not in "iu":
    sample_ids = sample_id_strings(sample_ids)
    truth = dict(truth, sample_id=sample_id_strings(truth["sample_id"]))
  order = np.argsort(truth["sample_id"], kind="stable")
  sorted_ids = truth["sample_id"][order]
  pos = np.searchsorted(sorted_ids, sample_ids)
  pos = np.minimum(pos, len(sorted_ids) - 1)
  if not np.all(sorted_ids[pos] == sample_ids):
    missing = int(np.sum(sorted_ids[pos] != sample_ids))
    raise ValueError(f"{missing} evaluated sample ids are not in the ground-truth file")
  return {k: v[order][pos] for k, v in truth.items()}


def score(click, conversion, ctr, cvr, ctcvr=None,
          truth: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, float]:
  """The protocol's metrics from labels and predicted probabilities.

  ``ctcvr`` defaults to ctr * cvr (ESMM's structure); MMoE predicts it as a task of its own.
  """
  click = np.asarray(click, np.float64)
  ctcvr_label = click * np.asarray(conversion, np.float64)
  if ctcvr is None:
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
  for head, pred in (("ctr", ctr), ("cvr", cvr), ("ctcvr", ctcvr)):
    out[f"spread/{head}"] = M.spread(pred)
  if truth is not None:
    cf = truth["counterfactual_conversion"]
    out["auc/cvr_all_vs_truth"] = M.exact_auc(cf, cvr)
    out["calibration/cvr_all_vs_truth"] = float(np.mean(cvr) / np.mean(truth["true_pcvr"]))
  return out


def constant_heads(report: Dict[str, Dict[str, Optional[float]]]) -> List[str]:
  """'model: head' of each report row's heads that predict a constant (M.CONSTANT_SPREAD); a row's
  uncalibrated twin is left out (calibration keeps a constant constant), and so is a null figure."""
  return [f"{name}: {key.split('/', 1)[1]}" for name, row in report.items() if not name.endswith(UNCALIBRATED_ROW)
          for key, value in row.items()
          if key.startswith("spread/") and value is not None and value < M.CONSTANT_SPREAD]


def gate_means(p: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """MMoE: the mean gate weight of each expert per task over the eval split ({} otherwise)."""
  return {k[len(GATE_PREFIX):]: p[k].mean(axis=0) for k in sorted(p) if k.startswith(GATE_PREFIX)}


def report_rows(name: str, p: Dict[str, np.ndarray], truth_all: Optional[Dict[str, np.ndarray]] = None):
  """(report rows, curves) of one model's eval-split predictions ``p`` (``predict``'s output): the
  row ``name``, and for a calibrated model ``name:uncalibrated`` (its towers before calibration)."""
  truth = align_truth(p["sample_id"], truth_all) if truth_all else None
  rows = {name: score(p["label_click"], p["label_conversion"], p["ctr"], p["cvr"], p["ctcvr"], truth)}
  curves = {name: {k: p[k] for k in ("label_click", "label_conversion", "ctr", "cvr", "ctcvr")}}
  gates = gate_means(p)
  if gates:
    curves[name]["gates"] = gates
    for task, weights in gates.items():
      for e, w in enumerate(weights):
        rows[name][f"gate/{task}/expert_{e}"] = float(w)
  if "cvr" + UNCALIBRATED_SUFFIX in p:
    raw = {h: p[h + UNCALIBRATED_SUFFIX] for h in ("ctr", "cvr", "ctcvr")}
    rows[name + UNCALIBRATED_ROW] = score(p["label_click"], p["label_conversion"], raw["ctr"], raw["cvr"],
                                          raw["ctcvr"], truth)
    curves[name + UNCALIBRATED_ROW] = {**{k: p[k] for k in ("label_click", "label_conversion")}, **raw}
  if truth is not None:
    for curve in curves.values():
      curve["counterfactual_conversion"] = truth["counterfactual_conversion"]
  return rows, curves


def oracle_rows(p: Dict[str, np.ndarray], truth_all: Dict[str, np.ndarray]):
  """(report rows, curves) of the ``oracle``: the true probabilities scored the same way, the ceiling."""
  truth = align_truth(p["sample_id"], truth_all)
  rows = {"oracle": score(p["label_click"], p["label_conversion"], truth["true_pctr"], truth["true_pcvr"], None,
                          truth)}
  curves = {"oracle": {"label_click": p["label_click"], "label_conversion": p["label_conversion"],
                       "ctr": truth["true_pctr"], "cvr": truth["true_pcvr"],
                       "ctcvr": truth["true_pctr"] * truth["true_pcvr"],
                       "counterfactual_conversion": truth["counterfactual_conversion"]}}
  return rows, curves


def evaluate(models: List[Tuple[str, str]], transform_dir: str, ground_truth: Optional[str] = None,
             batch_size: int = 4096):
  """Scores each (name, model_dir) on the eval split.

  Returns (report, curves): ``report[name]`` the metrics (plus ``gate/<task>/expert_<i>``
  for gated networks), ``curves[name]`` the aligned labels and predictions the charts of
  ``model_fn.report`` are drawn from. With ``ground_truth`` an ``oracle`` row is added; a
  calibrated model also gets a ``<name>:uncalibrated`` row (its towers before calibration), so
  the report shows its reliability before and after.
  """
  I.require_rows(transform_dir, ("eval",))
  truth_all = read_ground_truth(ground_truth) if ground_truth else None
  report, curves = {}, {}
  for name, model_dir in models:
    p = predict(model_dir, transform_dir, batch_size)
    rows, model_curves = report_rows(name, p, truth_all)
    for row in rows.values():
      row["model_dir"] = model_dir
    report.update(rows)
    curves.update(model_curves)
  if truth_all is not None:
    rows, oracle_curves = oracle_rows(p, truth_all)
    report.update(rows)
    curves.update(oracle_curves)
  return report, curves


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


def format_gates(report: Dict[str, Dict[str, float]]) -> str:
  """MMoE gate utilisation: mean gate weight per task (rows) and expert (columns)."""
  lines = []
  for name, r in report.items():
    keys = [k for k in r if k.startswith("gate/")]
    if not keys:
      continue
    tasks = sorted({k.split("/")[1] for k in keys})
    experts = sorted({int(k.split("_")[-1]) for k in keys})
    lines.append(f"gate utilisation of {name} (mean gate weight per task and expert):")
    lines.append("| task | " + " | ".join(f"e{e}" for e in experts) + " |")
    lines.append("|---|" + "---:|" * len(experts))
    for task in tasks:
      lines.append(f"| {task} | " + " | ".join(f"{r[f'gate/{task}/expert_{e}']:.3f}" for e in experts) + " |")
  return "\n".join(lines)


