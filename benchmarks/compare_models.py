"""The ESMM paper's Table 2 on synthetic data with ground truth, every model of the project,
several seeds each, on the same rows, with paired differences against BASE.

  .venv/bin/python benchmarks/compare_models.py [--world=selection|control] [--seeds=1,2,3,4,5] \
      [--num_train=600000] [--num_test=200000] [--models=base,esmm,...] [--calibration=none]

Generates synthetic Ali-CCP-layout data (datagen.synthetic, data seed --data_seed) in one of two
worlds: ``selection`` (the generator's default: users click more of what they would buy, at
datagen.synthetic's documented strength) or ``control`` (clicks do not select on conversion
propensity); preprocesses it once with the Beam/TFT job; trains every model with every seed
(the seed sets the initialisation and where in the data each run starts, see
model_fn.estimator.start_offset; models alternate within a seed) and scores the test split
(model_fn.evaluation.evaluate) by the paper's protocol: CVR AUC on clicked impressions, CTCVR
and CTR AUC over all impressions; plus the CVR AUC over *all* impressions against the true
counterfactual conversions, which only synthetic data can give, and the calibration of every
head. Every model is compared with BASE seed by seed: the mean paired difference and its 95%
t-interval. Writes benchmarks/results/compare_models_<world>.{json,md,png}.
"""

import json
import os
import shutil
import sys
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from datagen import synthetic  # noqa: E402
from model_fn import calibration as CAL  # noqa: E402
from model_fn import estimator as E  # noqa: E402
from model_fn import evaluation  # noqa: E402
from model_fn import input_fn as I  # noqa: E402
from model_fn.params import DEFAULT_PARAMS, MODELS, resolve_params  # noqa: E402
from pipeline import preprocess  # noqa: E402
from preprocessing import features as F  # noqa: E402
from preprocessing import transform as T  # noqa: E402

import results_io  # noqa: E402  (benchmarks/ is this script's directory)

FLAGS = flags.FLAGS
WORLDS = {"selection": synthetic.DEFAULT_CLICK_SELECTION, "control": 0.0}
DEFAULT_MODELS = ["base", "esmm_ns", "esmm", "escm2_ips", "escm2_dr", "shared_bottom", "mmoe", "cgc", "ple"]
flags.DEFINE_integer("num_train", 600_000, "Train impressions.")
flags.DEFINE_integer("num_test", 200_000, "Test impressions.")
flags.DEFINE_integer("data_seed", 2018, "Seed of the synthetic data (one data set for every run).")
flags.DEFINE_enum("world", "selection", list(WORLDS), "selection: the generator's default click/conversion "
                  "selection; control: clicks do not select on conversion propensity.")
flags.DEFINE_list("seeds", ["1", "2", "3", "4", "5"], "Model seeds; every model is trained once per seed.")
flags.DEFINE_float("num_epochs", 1.0, "Epochs over the train split, the same for every model "
                   "(lazy Adam tables overfit from the second).")
flags.DEFINE_integer("batch_size", 1024, "Examples per step.")
flags.DEFINE_list("models", DEFAULT_MODELS,
                  "Models to compare: MODEL, or a variant NAME=MODEL:KEY=VALUE[;KEY=VALUE] with "
                  "params overridden (e.g. esmm_w25=esmm:ctcvr_loss_weight=25; the key layout=grouped "
                  "trains and scores on the data preprocessed with --layout=grouped instead). The "
                  "first is the reference of the paired differences (base by default).")
flags.DEFINE_string("params", "", "KEY=VALUE[;KEY=VALUE] params of every model, under a --models entry's own "
                    "(e.g. pooling=sum).")
flags.DEFINE_enum("calibration", CAL.DEFAULT_METHOD, list(CAL.METHODS), "Calibration of every model "
                  "(model_fn.train --calibration).")
flags.DEFINE_float("calibration_holdout", None, "Share of the train split the calibration is fitted on, "
                   "held out from training (model_fn.train --calibration_holdout; default: the method's).")
flags.DEFINE_integer("max_hash_buckets", 1 << 17, "Cap on the hash buckets of every field.")
flags.DEFINE_boolean("keep_checkpoints", False, "Keep each model's checkpoints (by default only its "
                     "eval-split predictions and params are kept, which the results and "
                     "esmm_diagnostics.py are computed from; a rerun reuses them).")
flags.DEFINE_string("tag", "", "Suffix of the results files (for runs of other models than the default set).")
flags.DEFINE_string("work_dir", "/tmp/esmm_compare", "Data and models; data, and the predictions of a model "
                    "name and seed, are reused when present.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where to write compare_models_<world>.{json,md,png}.")

# (column, metric key, kind): the paper's Table 2 columns first, then the entire-space CVR AUC
# and the calibration of every head (mean prediction / observed rate).
METRICS = (("CVR AUC (clicked)", "auc/cvr_clicked", "auc"), ("CTCVR AUC", "auc/ctcvr", "auc"),
           ("CTR AUC", "auc/ctr", "auc"), ("CVR AUC all vs truth", "auc/cvr_all_vs_truth", "auc"),
           ("calib CTR", "calibration/ctr", "calibration"),
           ("calib CVR clicked", "calibration/cvr_clicked", "calibration"),
           ("calib CTCVR", "calibration/ctcvr", "calibration"))
UNCALIBRATED = "uncalibrated/"
LABELS = {"base": "BASE", "esmm_ns": "ESMM-NS", "esmm": "ESMM", "escm2_ips": "ESCM2-IPS", "escm2_dr": "ESCM2-DR",
          "shared_bottom": "Shared-Bottom", "mmoe": "MMoE", "cgc": "CGC", "ple": "PLE",
          "oracle": "oracle (true probabilities)"}


def parse_params(text: str, where: str) -> Dict[str, object]:
  """{key: value} of KEY=VALUE[;KEY=VALUE] (a value is JSON where it parses, else a string)."""
  params = {}
  for item in filter(None, text.split(";")):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"{where}: {item!r} is not KEY=VALUE")
    try:
      params[key] = json.loads(value)
    except json.JSONDecodeError:
      params[key] = value
  return params


def parse_models(specs, common: str = "") -> List[Tuple[str, str, Dict[str, object]]]:
  """(name, model, params overrides) per --models entry, over the ``common`` params (--params);
  see the flags' help."""
  out = []
  base = parse_params(common, "--params")
  for spec in specs:
    name, sep, rest = spec.partition("=")
    model, _, overrides = rest.partition(":") if sep else (name, "", "")
    params = {**base, **parse_params(overrides, f"--models entry {spec!r}")}
    if model not in MODELS:
      raise ValueError(f"--models entry {spec!r}: model must be one of {MODELS}")
    out.append((name, model, params))
  if len({n for n, _, _ in out}) != len(out):
    raise ValueError("--models names must be distinct")
  return out


def click_selection() -> float:
  return WORLDS[FLAGS.world]


# The --models override key that picks the preprocessing output's layout (not a model param).
LAYOUT_KEY = "layout"


def data_root(layout: str = F.ROWS) -> Tuple[str, str, str]:
  """(root, raw dir, preprocessed dir of ``layout``) of the data configuration the flags name."""
  key = (f"n{FLAGS.num_train}_{FLAGS.num_test}_s{FLAGS.data_seed}_h{FLAGS.max_hash_buckets}"
         f"_c{click_selection():g}")
  root = os.path.join(FLAGS.work_dir, key)
  return root, os.path.join(root, "raw"), os.path.join(root, "preprocessed" + ("" if layout == F.ROWS else "_" + layout))


def results_name(name: str) -> str:
  """Results file name without extension: one per world, tagged runs get files of their own."""
  return f"{name}_{FLAGS.world}" + (f"_{FLAGS.tag}" if FLAGS.tag else "")


def command(script: str, names) -> str:
  """The command line that reproduces a result, from the flags that matter."""
  values = {"seeds": ",".join(FLAGS.seeds), "models": ",".join(FLAGS.models)}
  return f"python benchmarks/{script} " + " ".join(
      f"--{n}={values.get(n, FLAGS[n].value)}" for n in names
      if n not in ("tag", "calibration_holdout", "params") or FLAGS[n].value is not None and FLAGS[n].value != "")


def _data(layout: str = F.ROWS):
  """Synthetic raw data and its preprocessing output in ``layout``, made once per data configuration."""
  root, raw, out = data_root(layout)
  if not os.path.exists(os.path.join(out, F.RECONCILIATION)):
    start = time.perf_counter()
    if not os.path.exists(os.path.join(raw, "ground_truth_test.csv")):
      synthetic.generate(raw, FLAGS.num_train, FLAGS.num_test, seed=FLAGS.data_seed,
                         click_selection=click_selection())
    preprocess.run("aliccp", preprocess._input_patterns(raw, {}), out, [],
                   max_hash_buckets=FLAGS.max_hash_buckets, overwrite=True, layout=layout)
    logging.info("%s data ready in %.0f s", layout, time.perf_counter() - start)
  return root, raw, out


def embedding_params() -> str:
  """The tables' optimizer, learning rate and init of the trainer's defaults, as the results
  name them (a --models entry's overrides are in its name's spec)."""
  p = resolve_params({"hash_buckets": {"101": 1}, **parse_params(FLAGS.params, "--params")})
  return (f"{p['embedding_optimizer']}, learning rate {p['embedding_learning_rate']:g}, init stddev "
          f"{p['embedding_init_stddev']:g}, pooling {p['pooling']} (the trainer's defaults and --params, "
          "unless a --models entry overrides them)")


def _model_dir(root: str, model: str, seed) -> str:
  return os.path.join(root, "models", f"{model}_seed{seed}")


def _summary(runs, reference: str):
  """Per model and metric: mean ± std over seeds, and the paired difference to ``reference``."""
  out = {}
  by = {(r["model"], r["seed"]): r["metrics"] for r in runs}
  for name in dict.fromkeys(r["model"] for r in runs):
    seeds = [r["seed"] for r in runs if r["model"] == name]
    out[name] = {"runs": len(seeds)}
    keys = [k for _, k, _ in METRICS]
    keys += [UNCALIBRATED + k for k in keys if all(UNCALIBRATED + k in by[name, s] for s in seeds)]
    for key in keys:
      out[name][key] = results_io.t_interval(np.array([by[name, s][key] for s in seeds], np.float64))
      if name not in (reference, "oracle") and all((reference, s) in by for s in seeds):
        diff = np.array([by[name, s][key] - by[reference, s][key] for s in seeds], np.float64)
        out[name][key]["paired_difference"] = results_io.t_interval(diff)
  return out


def _cell(s: dict, kind: str) -> str:
  if kind == "auc":
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
  return f"{s['mean']:.3f} ± {s['std']:.3f}"


def _markdown(summary, meta, reference: str) -> str:
  ref = LABELS.get(reference, reference)
  lines = [f"Command: `{meta['command']}`", "",
           f"Machine: {meta['machine']}. Data: {meta['data']}. Wall time {meta['seconds']:.0f} s.", "",
           f"Embedding tables: {meta['embedding']}. Calibration: {meta['calibration']}.", "",
           f"AUC (%) and calibration on the test split, mean ± std over model seeds ({', '.join(meta['seeds'])}; "
           "a seed sets the initialisation and where in the train split the run starts); the oracle "
           "row scores the generator's true probabilities.", "",
           "| model | " + " | ".join(h for h, _, _ in METRICS) + " |",
           "|---|" + "---:|" * len(METRICS)]
  for name, s in summary.items():
    lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(_cell(s[k], kind) for _, k, kind in METRICS) + " |")
  paired = [(name, s) for name, s in summary.items() if "paired_difference" in s[METRICS[0][1]]]
  if paired:
    lines += ["", f"Paired differences against {ref}, seed by seed: mean [95% t-interval]; AUC in points.", "",
              "| model | " + " | ".join(h for h, _, _ in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
  for name, s in paired:
    cells = []
    for _, k, kind in METRICS:
      d = s[k]["paired_difference"]
      scale, fmt = (100, ".2f") if kind == "auc" else (1, ".3f")
      cells.append(f"{scale * d['mean']:+{fmt}} [{scale * d['low']:+{fmt}}, {scale * d['high']:+{fmt}}]")
    lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
  uncalibrated = [(h, k) for h, k, kind in METRICS if kind == "calibration"]
  rows = [(name, s) for name, s in summary.items() if UNCALIBRATED + uncalibrated[0][1] in s]
  if rows:
    lines += ["", f"Calibration of the towers before the calibration step ({meta['calibration']}), "
              "mean ± std over the seeds:", "",
              "| model | " + " | ".join(h for h, _ in uncalibrated) + " |", "|---|" + "---:|" * len(uncalibrated)]
    for name, s in rows:
      lines.append(f"| {LABELS.get(name, name)} | "
                   + " | ".join(_cell(s[UNCALIBRATED + k], "calibration") for _, k in uncalibrated) + " |")
  lines += ["", "CVR AUC (clicked): conversion label on clicked test impressions (the paper's CVR AUC). "
            "CVR AUC all vs truth: pCVR of every test impression against its counterfactual conversion "
            "(would it have converted had it been clicked), the entire-space quantity ESMM targets. "
            "Calibration: mean prediction / observed rate (CVR on clicked impressions)."]
  return "\n".join(lines) + "\n"


def _chart(summary, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  aucs = [(h, k) for h, k, kind in METRICS if kind == "auc"]
  models = [m for m in summary if m != "oracle"]
  fig, axes = plt.subplots(1, len(aucs), figsize=(4.2 * len(aucs), 4.2))
  colors = plt.get_cmap("tab10")
  for ax, (title, key) in zip(axes, aucs):
    means = [100 * summary[m][key]["mean"] for m in models]
    stds = [100 * summary[m][key]["std"] for m in models]
    ax.bar(range(len(models)), means, yerr=stds, capsize=4, color=[colors(i) for i in range(len(models))])
    if "oracle" in summary:
      ax.axhline(100 * summary["oracle"][key]["mean"], color="black", ls="--", lw=1, label="oracle")
      ax.legend(loc="lower right", fontsize=8)
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, low - 3), max(means + [100 * summary.get("oracle", {}).get(key, {"mean": 0})["mean"]]) + 2)
    ax.set_xticks(range(len(models)), [LABELS.get(m, m) for m in models], rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("AUC (%)")
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle(f"Test AUC, mean ± std over seeds (synthetic Ali-CCP layout with ground truth, {FLAGS.world} "
               "world)", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


PREDICTIONS = "eval_predictions.npz"      # in a model dir: its eval-split predictions
RUN_RECORD = "compare_run.json"           # in a model dir: how long the run trained


def predictions(root: str, name: str, seed) -> Dict[str, np.ndarray]:
  """The eval-split predictions of model ``name``, seed ``seed`` (cached in its model dir)."""
  with np.load(os.path.join(_model_dir(root, name, seed), PREDICTIONS)) as f:
    return {k: f[k] for k in f.files}


def _train_and_predict(root: str, out: str, name: str, model: str, overrides, buckets, seed) -> float:
  """Trains one model (unless its predictions from a run of the same settings and trainer defaults
  are cached), caches its eval-split predictions and removes its checkpoints (each holds every
  table and its optimizer slots: about 0.7 GB here) unless --keep_checkpoints; returns the
  training seconds."""
  model_dir = _model_dir(root, name, seed)
  record = os.path.join(model_dir, RUN_RECORD)
  overrides = dict(overrides)
  layout = overrides.pop(LAYOUT_KEY, F.ROWS)
  out = _data(layout)[2]
  # The defaults too: a cached run of another version's defaults (e.g. its pooling) is not reused.
  settings = {"model": model, "overrides": overrides, "defaults": DEFAULT_PARAMS, "calibration": FLAGS.calibration,
              "num_epochs": FLAGS.num_epochs, "batch_size": FLAGS.batch_size,
              **({LAYOUT_KEY: layout} if layout != F.ROWS else {})}
  if FLAGS.calibration_holdout is not None:
    settings["calibration_holdout"] = FLAGS.calibration_holdout
  if os.path.exists(os.path.join(model_dir, PREDICTIONS)) and os.path.exists(record):
    with open(record) as f:
      done = json.load(f)
    if done.get("settings") == json.loads(json.dumps(settings)):
      return done["seconds"]
  if os.path.exists(model_dir):       # another run's (other settings), or unfinished
    shutil.rmtree(model_dir)
  t0 = time.perf_counter()
  E.train_and_evaluate(out, model_dir, {"model": model, "hash_buckets": buckets, **overrides},
                       FLAGS.batch_size, num_epochs=FLAGS.num_epochs, seed=int(seed),
                       save_checkpoints_steps=100_000, do_export=False, calibration=FLAGS.calibration,
                       calibration_holdout=FLAGS.calibration_holdout)
  seconds = round(time.perf_counter() - t0, 1)
  p = evaluation.predict(model_dir, out)
  np.savez_compressed(os.path.join(model_dir, PREDICTIONS),
                      **{k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in p.items()})
  if not FLAGS.keep_checkpoints:
    for path in os.listdir(model_dir):
      if path.startswith(("model.ckpt-", "checkpoint", "graph.pbtxt", "events.out")):
        os.remove(os.path.join(model_dir, path))
  with open(record, "w") as f:
    json.dump({"seconds": seconds, "settings": settings}, f)
  return seconds


def main(argv):
  del argv
  start = time.perf_counter()
  models = parse_models(FLAGS.models, FLAGS.params)
  reference = models[0][0]
  root, raw, out = _data()
  tft_output = I.load_transform_output(out)
  buckets = T.transformed_hash_buckets(tft_output)
  truth = evaluation.read_ground_truth(os.path.join(raw, "ground_truth_test.csv"))
  runs = []
  for seed in FLAGS.seeds:
    for name, model, overrides in models:
      seconds = _train_and_predict(root, out, name, model, overrides, buckets, seed)
      p = predictions(root, name, seed)
      rows, _ = evaluation.report_rows(name, p, truth)
      metrics = dict(rows[name])
      # A calibrated model's towers before its calibration (evaluation's ":uncalibrated" row).
      for key, value in rows.get(name + evaluation.UNCALIBRATED_ROW, {}).items():
        if key.startswith("calibration/"):
          metrics[UNCALIBRATED + key] = value
      runs.append({"model": name, "seed": int(seed), "seconds": seconds, "metrics": metrics})
      print(f"{name:10s} seed {seed}: " + "  ".join(f"{k}={metrics[k]:.4f}" for _, k, _ in METRICS), flush=True)
  oracle = evaluation.oracle_rows(p, truth)[0]["oracle"]
  runs.append({"model": "oracle", "seed": 0, "seconds": 0.0, "metrics": oracle})
  summary = _summary(runs, reference)
  meta = {
      "command": command("compare_models.py", ("world", "num_train", "num_test", "data_seed", "seeds",
                                                "num_epochs", "models", "params", "calibration",
                                                "calibration_holdout", "max_hash_buckets", "tag")),
      "machine": results_io.machine(),
      "data": (f"{I.split_rows(out, 'train'):,} train / {I.split_rows(out, 'eval'):,} test impressions, "
               f"{int(oracle['clicks']):,} test clicks, {int(oracle['conversions']):,} test conversions, "
               f"{FLAGS.world} world (click_selection {click_selection():g})"),
      "seeds": FLAGS.seeds, "seconds": time.perf_counter() - start,
      "embedding": embedding_params(), "reference": reference,
      "calibration": FLAGS.calibration + ("" if FLAGS.calibration_holdout is None else
                                          f", fitted on a held-out {FLAGS.calibration_holdout:g} of the train split"),
  }
  base = results_io.write(FLAGS.results_dir, results_name("compare_models"),
                          {"meta": meta, "summary": summary, "runs": runs}, _markdown(summary, meta, reference))
  _chart(summary, base + ".png")


if __name__ == "__main__":
  app.run(main)
