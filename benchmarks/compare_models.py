"""The ESMM paper's Table 2 on synthetic data with ground truth: BASE, ESMM-NS, ESMM, MMoE
and MMoE with ESMM's head, several seeds each, on the same rows.

  .venv/bin/python benchmarks/compare_models.py [--num_train=300000] [--num_test=150000] \
      [--seeds=1,2,3] [--num_epochs=1] [--models=base,esmm_ns,esmm,mmoe,mmoe_esmm]

Generates synthetic Ali-CCP-layout data (pipeline.synthetic, data seed --data_seed),
preprocesses it once with the Beam/TFT job, then trains every model with every seed
(model seeds, same data; models alternate within a seed) and scores the test split
(model_fn.evaluation.evaluate) by
the paper's protocol: CVR AUC on clicked impressions, CTCVR and CTR AUC over all
impressions; plus the CVR AUC over *all* impressions against the true counterfactual
conversions, which only synthetic data can give, and calibration. Writes mean +- std
per model to benchmarks/results/compare_models.{json,md,png}. All models share the
paper's settings (embedding 18, towers 360-200-80; MMoE 8 experts 256-128, towers
128-64), batch 1024, Adam 1e-3 on dense layers, and the trainer's defaults on the tables
(lazy Adam 1e-3, init stddev 1e-4; the results name the embedding params they ran with).
"""

import json
import os
import platform
import sys
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from model_fn import estimator as E  # noqa: E402
from model_fn import evaluation  # noqa: E402
from model_fn import input_fn as I  # noqa: E402
from model_fn.params import MODELS, resolve_params  # noqa: E402
from pipeline import preprocess, synthetic  # noqa: E402
from preprocessing import features as F  # noqa: E402
from preprocessing import transform as T  # noqa: E402

import results_io  # noqa: E402  (benchmarks/ is this script's directory)

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_train", 300_000, "Train impressions.")
flags.DEFINE_integer("num_test", 150_000, "Test impressions.")
flags.DEFINE_integer("data_seed", 2018, "Seed of the synthetic data (one data set for every run).")
flags.DEFINE_list("seeds", ["1", "2", "3"], "Model seeds; every model is trained once per seed.")
flags.DEFINE_float("num_epochs", 1.0, "Epochs over the train split, the same for every model "
                   "(lazy Adam tables overfit from the second).")
flags.DEFINE_integer("batch_size", 1024, "Examples per step.")
flags.DEFINE_list("models", ["base", "esmm_ns", "esmm", "mmoe", "mmoe_esmm"],
                  "Models to compare: MODEL, or a variant NAME=MODEL:KEY=VALUE[;KEY=VALUE] with "
                  "params overridden (e.g. esmm_w25=esmm:ctcvr_loss_weight=25).")
flags.DEFINE_integer("max_hash_buckets", 1 << 17, "Cap on the hash buckets of every field.")
flags.DEFINE_float("click_selection", 0.0, "pipeline.synthetic's click_selection: weight of the "
                   "conversion logit in the click logit (0: clicks do not select on pCVR).")
flags.DEFINE_string("tag", "", "Suffix of the results files (for runs of other models than the default set).")
flags.DEFINE_string("work_dir", "/tmp/esmm_compare", "Data and models; data is reused when present.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where to write compare_models.{json,md,png}.")

METRICS = (("CVR AUC (clicked)", "auc/cvr_clicked"), ("CTCVR AUC", "auc/ctcvr"), ("CTR AUC", "auc/ctr"),
           ("CVR AUC all vs truth", "auc/cvr_all_vs_truth"), ("calib CVR clicked", "calibration/cvr_clicked"),
           ("calib CTCVR", "calibration/ctcvr"))
LABELS = {"base": "BASE", "esmm_ns": "ESMM-NS", "esmm": "ESMM", "mmoe": "MMoE",
          "mmoe_esmm": "MMoE+ESMM head", "oracle": "oracle (true probabilities)"}


def parse_models(specs) -> List[Tuple[str, str, Dict[str, object]]]:
  """(name, model, params overrides) per --models entry; see the flag's help."""
  out = []
  for spec in specs:
    name, sep, rest = spec.partition("=")
    model, _, overrides = rest.partition(":") if sep else (name, "", "")
    params = {}
    for item in filter(None, overrides.split(";")):
      key, eq, value = item.partition("=")
      if not eq:
        raise ValueError(f"--models entry {spec!r}: {item!r} is not KEY=VALUE")
      try:
        params[key] = json.loads(value)
      except json.JSONDecodeError:
        params[key] = value
    if model not in MODELS:
      raise ValueError(f"--models entry {spec!r}: model must be one of {MODELS}")
    out.append((name, model, params))
  if len({n for n, _, _ in out}) != len(out):
    raise ValueError("--models names must be distinct")
  return out


def data_root() -> Tuple[str, str, str]:
  """(root, raw dir, preprocessed dir) of the data configuration the flags name."""
  key = f"n{FLAGS.num_train}_{FLAGS.num_test}_s{FLAGS.data_seed}_h{FLAGS.max_hash_buckets}"
  if FLAGS.click_selection:
    key += f"_c{FLAGS.click_selection:g}"
  root = os.path.join(FLAGS.work_dir, key)
  return root, os.path.join(root, "raw"), os.path.join(root, "preprocessed")


def results_name(name: str) -> str:
  """Results file name without extension; data with click selection and tagged runs get
  files of their own."""
  suffix = f"_selection{FLAGS.click_selection:g}" if FLAGS.click_selection else ""
  return name + suffix + (f"_{FLAGS.tag}" if FLAGS.tag else "")


def command(script: str, names) -> str:
  """The command line that reproduces a result, from the flags that matter."""
  values = {"seeds": ",".join(FLAGS.seeds), "models": ",".join(FLAGS.models)}
  return f"python benchmarks/{script} " + " ".join(
      f"--{n}={values.get(n, FLAGS[n].value)}" for n in names
      if n not in ("click_selection", "tag") or FLAGS[n].value)


def _data():
  """Synthetic raw data and its preprocessing output, made once per data configuration."""
  root, raw, out = data_root()
  if not os.path.exists(os.path.join(out, F.RECONCILIATION)):
    start = time.perf_counter()
    synthetic.generate(raw, FLAGS.num_train, FLAGS.num_test, seed=FLAGS.data_seed,
                       click_selection=FLAGS.click_selection)
    preprocess.run("aliccp", preprocess._input_patterns(raw, {}), out, [],
                   max_hash_buckets=FLAGS.max_hash_buckets, overwrite=True)
    logging.info("data ready in %.0f s", time.perf_counter() - start)
  return root, raw, out


def embedding_params() -> str:
  """The tables' optimizer, learning rate and init of the trainer's defaults, as the results
  name them (a --models entry's overrides are in its name's spec)."""
  p = resolve_params({"hash_buckets": {"101": 1}})
  return (f"{p['embedding_optimizer']}, learning rate {p['embedding_learning_rate']:g}, init stddev "
          f"{p['embedding_init_stddev']:g} (the trainer's defaults, unless a --models entry overrides them)")


def _model_dir(root: str, model: str, seed) -> str:
  return os.path.join(root, "models", f"{model}_seed{seed}")


def _summary(runs):
  out = {}
  for name in dict.fromkeys(r["model"] for r in runs):
    rows = [r for r in runs if r["model"] == name]
    out[name] = {"runs": len(rows)}
    for _, key in METRICS:
      values = np.array([r["metrics"][key] for r in rows], np.float64)
      out[name][key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
  return out


def _markdown(summary, meta) -> str:
  lines = [f"Command: `{meta['command']}`", "",
           f"Machine: {meta['machine']}. Data: {meta['data']}. Wall time {meta['seconds']:.0f} s.", "",
           f"Embedding tables: {meta['embedding']}.", "",
           "AUC and calibration on the test split, mean ± std over model seeds "
           f"({', '.join(meta['seeds'])}); the oracle row scores the generator's true probabilities.", "",
           "| model | " + " | ".join(h for h, _ in METRICS) + " |",
           "|---|" + "---:|" * len(METRICS)]
  for name, s in summary.items():
    cells = [f"{100 * s[k]['mean']:.2f} ± {100 * s[k]['std']:.2f}" if k.startswith("auc")
             else f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for _, k in METRICS]
    lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
  lines += ["", "AUC in %. CVR AUC (clicked): conversion label on clicked test impressions (the paper's "
            "CVR AUC). CVR AUC all vs truth: pCVR of every test impression against its counterfactual "
            "conversion (would it have converted had it been clicked), the entire-space quantity ESMM "
            "targets. Calibration: mean prediction / observed rate."]
  return "\n".join(lines) + "\n"


def _chart(summary, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  aucs = [(h, k) for h, k in METRICS if k.startswith("auc")]
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
  fig.suptitle("Test AUC, mean ± std over seeds (synthetic Ali-CCP layout with ground truth)", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  start = time.perf_counter()
  models = parse_models(FLAGS.models)
  root, raw, out = _data()
  tft_output = I.load_transform_output(out)
  buckets = T.transformed_hash_buckets(tft_output)
  truth_file = os.path.join(raw, "ground_truth_test.csv")
  runs = []
  for seed in FLAGS.seeds:
    seconds = {}
    for name, model, overrides in models:
      t0 = time.perf_counter()
      E.train_and_evaluate(out, _model_dir(root, name, seed),
                           {"model": model, "hash_buckets": buckets, **overrides},
                           FLAGS.batch_size, num_epochs=FLAGS.num_epochs, seed=int(seed),
                           save_checkpoints_steps=100_000, do_export=False)
      seconds[name] = round(time.perf_counter() - t0, 1)
    report, _ = evaluation.evaluate([(n, _model_dir(root, n, seed)) for n, _, _ in models], out, truth_file)
    for name, _, _ in models:
      runs.append({"model": name, "seed": int(seed), "seconds": seconds[name], "metrics": report[name]})
      print(f"{name:10s} seed {seed}: " + "  ".join(f"{k}={report[name][k]:.4f}" for _, k in METRICS), flush=True)
  oracle = report["oracle"]
  runs.append({"model": "oracle", "seed": 0, "seconds": 0.0, "metrics": oracle})
  summary = _summary(runs)
  meta = {
      "command": command("compare_models.py", ("num_train", "num_test", "data_seed", "click_selection",
                                                "seeds", "num_epochs", "models", "max_hash_buckets", "tag")),
      "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
      "data": (f"{I.split_rows(out, 'train'):,} train / {I.split_rows(out, 'eval'):,} test impressions, "
               f"{int(oracle['clicks']):,} test clicks, {int(oracle['conversions']):,} test conversions"),
      "seeds": FLAGS.seeds, "seconds": time.perf_counter() - start,
      "embedding": embedding_params(),
  }
  base = results_io.write(FLAGS.results_dir, results_name("compare_models"),
                          {"meta": meta, "summary": summary, "runs": runs}, _markdown(summary, meta))
  _chart(summary, base + ".png")


if __name__ == "__main__":
  app.run(main)
