"""What the data give ESMM to correct, and what each model's pCVR encodes: diagnostics on the
models compare_models.py trained.

  .venv/bin/python benchmarks/esmm_diagnostics.py <the flags given to compare_models.py>

Reads the data and model directories of ``benchmarks/compare_models.py`` run with the same
flags (it trains nothing) and measures, on the test split with the generator's ground
truth:

The data (does the synthetic click selection give ESMM anything to fix?)
  * how far clicks select on conversion propensity: the AUC of the true pCVR at telling
    clicked from unclicked impressions (0.5: no selection), the mean true pCVR of clicked
    over unclicked impressions, and the correlation of the true click and conversion logits;
  * the oracle's CVR AUC on clicked vs all impressions (does the clicked space rank like
    the entire space?);
  * data sparsity: the share of test impressions whose item had no click (no conversion) in
    the train split, i.e. where a clicked-only CVR model has an untrained item embedding.

Each model (what does its pCVR actually encode?)
  * corr(logit pCVR, true CVR logit) and corr(logit pCVR, true CTR logit) over all test
    impressions: a pCVR should follow the first and, beyond what the two share, not the
    second;
  * corr(logit pCVR, CTR error), the CTR error being logit(true pCTR) - logit(pCTR): under
    the CTCVR loss only the product pCTR x pCVR is pinned to the data, so whatever the CTR
    tower misses can be absorbed by the CVR tower;
  * the CVR AUC over all impressions, against the counterfactual conversions, of the
    model's pCVR and of its pCTCVR divided by the *true* pCTR: if the second is far better,
    the model learned pCTCVR but split it wrongly between its two factors;
  * the entire-space CVR AUC on test impressions whose item had a click in the train split and
    on those whose item had none, where a clicked-only CVR model has an untrained item embedding.

Writes benchmarks/results/esmm_diagnostics_<world>.{json,md}.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import compare_models as C  # noqa: E402  (benchmarks/ is this script's directory)
import results_io  # noqa: E402
from model_fn import evaluation  # noqa: E402
from model_fn import metrics as M  # noqa: E402
from pipeline.sources import aliccp  # noqa: E402

FLAGS = flags.FLAGS   # compare_models.py's flags: the same flags name the same data and models

MODEL_COLUMNS = (
    ("CVR AUC all vs truth: pCVR", "auc_pcvr"),
    ("... of pCTCVR / true pCTR", "auc_ctcvr_over_true_ctr"),
    ("corr(pCVR, true CVR logit)", "corr_true_cvr"),
    ("corr(pCVR, true CTR logit)", "corr_true_ctr"),
    ("corr(pCVR, CTR error)", "corr_ctr_error"),
    ("corr(pCTR, true CTR logit)", "ctr_fit"),
    ("CVR AUC all vs truth, items clicked in train", "auc_pcvr_seen_items"),
    ("... items never clicked in train", "auc_pcvr_unseen_items"),
)


def _logit(p: np.ndarray) -> np.ndarray:
  p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
  return np.log(p) - np.log1p(-p)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.corrcoef(a, b)[0, 1])


def item_ids(skeleton: str) -> tuple:
  """(sample_id, item id, click, conversion) per row of a raw Ali-CCP skeleton file."""
  item_prefix = "205" + aliccp.FIELD_SEP
  ids, items, clicks, convs = [], [], [], []
  with open(skeleton, encoding="utf-8") as f:
    for line in f:
      parts = line.rstrip("\n").split(",", 5)
      item = next((t.split(aliccp.FIELD_SEP)[1].split(aliccp.VALUE_SEP)[0] for t in parts[5].split(aliccp.ITEM_SEP)
                   if t.startswith(item_prefix)), "")
      ids.append(parts[0])
      items.append(item)
      clicks.append(int(parts[1]))
      convs.append(int(parts[2]))
  return np.array(ids), np.array(items), np.array(clicks), np.array(convs)


def items_never_clicked_in_train(raw: str) -> dict:
  """{test sample id: whether its item had no click in the train split}."""
  sid, items, _, _ = item_ids(os.path.join(raw, "sample_skeleton_test.csv"))
  _, train_items, train_click, _ = item_ids(os.path.join(raw, "sample_skeleton_train.csv"))
  clicked_items = set(train_items[train_click == 1])
  return {s: i not in clicked_items for s, i in zip(sid, items)}


def data_diagnostics(raw: str) -> dict:
  truth = evaluation.read_ground_truth(os.path.join(raw, "ground_truth_test.csv"))
  sid, items, click, conv = item_ids(os.path.join(raw, "sample_skeleton_test.csv"))
  truth = evaluation.align_truth(sid, truth)
  _, train_items, train_click, train_conv = item_ids(os.path.join(raw, "sample_skeleton_train.csv"))
  clicked_items = set(train_items[train_click == 1])
  converted_items = set(train_items[(train_click == 1) & (train_conv == 1)])
  cvr_logit, ctr_logit = _logit(truth["true_pcvr"]), _logit(truth["true_pctr"])
  cf = truth["counterfactual_conversion"]
  clicked = click == 1
  return {
      "auc_true_pcvr_for_click": M.exact_auc(click, truth["true_pcvr"]),
      "auc_true_pctr_for_click": M.exact_auc(click, truth["true_pctr"]),
      "pcvr_clicked_over_unclicked": float(truth["true_pcvr"][clicked].mean() / truth["true_pcvr"][~clicked].mean()),
      "corr_true_logits": _corr(ctr_logit, cvr_logit),
      "oracle_cvr_auc_clicked": M.exact_auc(cf[clicked], truth["true_pcvr"][clicked]),
      "oracle_cvr_auc_all": M.exact_auc(cf, truth["true_pcvr"]),
      "test_items_without_train_click": float(np.mean([i not in clicked_items for i in items])),
      "test_items_without_train_conversion": float(np.mean([i not in converted_items for i in items])),
      "train_clicks": int(train_click.sum()), "train_conversions": int((train_click * train_conv).sum()),
  }


def model_diagnostics(p: dict, truth_all: dict, unseen_item: dict) -> dict:
  """What a model's eval-split predictions ``p`` encode (see the module doc); ``unseen_item``:
  items_never_clicked_in_train."""
  truth = evaluation.align_truth(p["sample_id"], truth_all)
  true_ctr = _logit(truth["true_pctr"])
  cvr = _logit(p["cvr"])
  cf = truth["counterfactual_conversion"]
  unseen = np.array([unseen_item[s] for s in evaluation.sample_id_strings(p["sample_id"])])
  return {
      "auc_pcvr_seen_items": M.exact_auc(cf[~unseen], p["cvr"][~unseen]),
      "auc_pcvr_unseen_items": M.exact_auc(cf[unseen], p["cvr"][unseen]),
      "auc_pcvr": M.exact_auc(cf, p["cvr"]),
      "auc_ctcvr_over_true_ctr": M.exact_auc(cf, np.log(np.maximum(p["ctcvr"], 1e-30)) - np.log(truth["true_pctr"])),
      "corr_true_cvr": _corr(cvr, _logit(truth["true_pcvr"])),
      "corr_true_ctr": _corr(cvr, true_ctr),
      "corr_ctr_error": _corr(cvr, true_ctr - _logit(p["ctr"])),
      "ctr_fit": _corr(_logit(p["ctr"]), true_ctr),
  }


def _markdown(data: dict, summary: dict, meta: dict) -> str:
  d = data
  lines = [
      f"Command: `{meta['command']}`", "",
      f"Machine: {meta['machine']}. Models: those of `compare_models.py` on {meta['data']}, seeds "
      f"{', '.join(meta['seeds'])}. Wall time {meta['seconds']:.0f} s.", "",
      "**The data.** How much sample selection bias and sparsity the generator has (test split; "
      f"train split: {d['train_clicks']:,} clicks, {d['train_conversions']:,} conversions):", "",
      "| measure | value |", "|---|---:|",
      f"| AUC of the true pCVR at telling clicked from unclicked impressions (0.5 = no selection) "
      f"| {100 * d['auc_true_pcvr_for_click']:.2f} |",
      f"| (for scale: AUC of the true pCTR at the same) | {100 * d['auc_true_pctr_for_click']:.2f} |",
      f"| mean true pCVR, clicked / unclicked impressions | {d['pcvr_clicked_over_unclicked']:.3f} |",
      f"| corr(true CTR logit, true CVR logit) | {d['corr_true_logits']:.3f} |",
      f"| oracle CVR AUC, clicked impressions | {100 * d['oracle_cvr_auc_clicked']:.2f} |",
      f"| oracle CVR AUC, all impressions (counterfactual) | {100 * d['oracle_cvr_auc_all']:.2f} |",
      f"| test impressions whose item had no click in train | {100 * d['test_items_without_train_click']:.1f} % |",
      f"| test impressions whose item had no conversion in train "
      f"| {100 * d['test_items_without_train_conversion']:.1f} % |", "",
      "**The models.** What each pCVR encodes, over all test impressions (mean ± std over seeds; "
      "corr = Pearson correlation of logits; CTR error = logit(true pCTR) − logit(pCTR)):", "",
      "| model | " + " | ".join(h for h, _ in MODEL_COLUMNS) + " |",
      "|---|" + "---:|" * len(MODEL_COLUMNS)]
  for name, s in summary.items():
    cells = [(f"{100 * s[k]['mean']:.2f} ± {100 * s[k]['std']:.2f}" if k.startswith("auc")
              else f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}") for _, k in MODEL_COLUMNS]
    lines.append(f"| {C.LABELS.get(name, name)} | " + " | ".join(cells) + " |")
  lines += ["", "AUC in %."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  start = time.perf_counter()
  names = [name for name, _, _ in C.parse_models(FLAGS.models, FLAGS.params)]
  root, raw, _ = C.data_root()
  if not os.path.isdir(os.path.join(root, "models")):
    raise SystemExit(f"error: no models under {root}; run benchmarks/compare_models.py with the same flags first")
  data = data_diagnostics(raw)
  truth_all = evaluation.read_ground_truth(os.path.join(raw, "ground_truth_test.csv"))
  unseen_item = items_never_clicked_in_train(raw)
  runs = []
  for seed in FLAGS.seeds:
    for model in names:
      r = model_diagnostics(C.predictions(root, model, seed), truth_all, unseen_item)
      runs.append({"model": model, "seed": int(seed), **r})
      print(f"{model:10s} seed {seed}: " + "  ".join(f"{k}={r[k]:.4f}" for _, k in MODEL_COLUMNS), flush=True)
  summary = {}
  for model in names:
    rows = [r for r in runs if r["model"] == model]
    summary[model] = {k: {"mean": float(np.mean([r[k] for r in rows])),
                          "std": float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0}
                      for _, k in MODEL_COLUMNS}
  meta = {
      "command": C.command("esmm_diagnostics.py", ("world", "num_train", "num_test", "data_seed",
                                                    "seeds", "models", "params", "max_hash_buckets", "tag")),
      "machine": results_io.machine(),
      "data": (f"{FLAGS.num_train:,} train / {FLAGS.num_test:,} test impressions (data seed {FLAGS.data_seed}, "
               f"{FLAGS.world} world, click_selection {C.click_selection():g})"),
      "seeds": FLAGS.seeds, "seconds": time.perf_counter() - start,
  }
  results_io.write(FLAGS.results_dir, C.results_name("esmm_diagnostics"),
                   {"meta": meta, "data": data, "summary": summary, "runs": runs}, _markdown(data, summary, meta))


if __name__ == "__main__":
  app.run(main)
