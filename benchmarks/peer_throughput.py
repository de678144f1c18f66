"""Training throughput and quality against the peer libraries, side by side in one run.

  .venv/bin/python benchmarks/peer_throughput.py [--impressions=1000000] [--test_impressions=200000] \
      [--sizes=10000,100000,1000000] [--repeats=5] [--seconds=20] [--auc_sizes=10000,100000] \
      [--epochs=1] [--auc_seeds=6] [--systems=ours,ours_float32,deepctr,deepctr_bf16,rechub]
  .venv/bin/python benchmarks/peer_throughput.py --from_results=benchmarks/results/peer_throughput.json

Systems (each in a process of its own, see benchmarks/peers/):
  ours            this project with the trainer's defaults: Estimator + esmm_model_fn reading its
                  gzip TFRecords (the train split's column blocks, as model_fn.train does;
                  model_fn.input_fn); Adam on the dense layers, lazy Adam 1e-3 on the tables
                  (updating only the batch's rows: model_fn/optimizers.py), init stddev 1e-4, and
                  --train_matmul_dtype=auto: the towers in bfloat16 on a machine with native
                  bfloat16 (the results' machine line says whether this one has), else float32
  ours_float32    the same with the towers in float32 whatever the machine
                  (--train_matmul_dtype=float32)
  ours_adagrad    (opt-in, like the next ones) Adagrad 0.05 on the tables, init stddev 0.05,
                  float32
  ours_adagrad_bf16  the same with --train_matmul_dtype=bfloat16
  ours_lazy_adam  lazy Adam tables with init stddev 0.05, float32
  deepctr         DeepCTR 0.9.4 ESMM (Keras), model.fit on in-memory numpy arrays, Adam
  deepctr_bf16    the same under Keras's mixed_bfloat16 policy: DeepCTR on the bfloat16 hardware
                  that this project's defaults use (its documentation does not use it); its own
                  ratio column, not part of the targets, which compare against the peers as
                  documented
  rechub          torch-rechub 0.9.0 ESMM (PyTorch 2.13.0 CPU), DataGenerator/DataLoader +
                  MTLTrainer, Adam
Each configuration of this project names all its params, so a later change of the trainer's
defaults does not change what an earlier results file measured.
The peers live in their own virtual environment, .venv-peers, which this script creates from
benchmarks/peers/requirements.lock when missing (never in the project's dependencies).

Data: synthetic Ali-CCP-layout impressions (datagen.synthetic), preprocessed once by this
project's Beam/TFT job with --max_hash_buckets = the largest size. The same hashed ids go to
every system: this project reads the TFRecords, the peers a numpy export of them. torch-rechub's
ESMM takes single-valued fields only, so all three get the same reduced field set: the
single-valued Ali-CCP fields (FIELDS). Each table has min(field's buckets, size) rows: ids are
folded modulo the size (this project: params['table_rows'], in its graph; peers: in numpy).
Same embedding dim (18), towers (360-200-80), batch (1024), epochs. Each system keeps its own
documented optimizer (above). The targets are checked for each of this project's configurations
on its own.

Throughput: examples/s between step --warmup_steps and --seconds later, --repeats runs per system
and size, the systems alternating (the order rotates each repeat) and each repeat running every
size, so that drift in the machine's speed falls on all sizes alike; the median is reported.
Quality: --auc_seeds runs per system and size in --auc_sizes (model seeds --seed, --seed + 1,
...; the data stays the same) each train --epochs full passes, then the test split is scored
here with one AUC function for all: CTR and CTCVR AUC over all impressions, CVR AUC over
clicked impressions (the paper's protocol). The tables give each AUC's mean and standard
deviation over the seeds, and the targets compare means: on 200k test impressions the CTCVR
and CVR AUCs of one run move from seed to seed by more than the 0.005 tolerance of the "no
worse" target (standard deviations over 3 seeds: CVR AUC on clicks DeepCTR
0.009-0.010, this project 0.002-0.005, torch-rechub 0.010-0.046), so one run per system cannot
tell the systems apart; 6 seeds (the default) bring the standard error of DeepCTR's mean CVR AUC
to about 0.004 (0.006 with 3). Two invocations on the same preprocessed files have given the
same AUCs to the last digit for the same system and seed. Preprocessing again reorders the
train rows (the peers' arrays follow the job's output files, and the runner decides which rows
share a column block), and so moves every system's AUCs by about a seed's noise. Peak memory: each run's
peak resident set (VmHWM). Writes benchmarks/results/peer_throughput.{json,md,png};
--from_results renders them again from the per-run records of a results JSON.
"""

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

import results_io  # noqa: E402  (benchmarks/ is this script's directory)

FLAGS = flags.FLAGS
PEERS_DIR = os.path.join(ROOT, "benchmarks", "peers")
PEERS_VENV = os.path.join(ROOT, ".venv-peers")
PEERS_LOCK = os.path.join(PEERS_DIR, "requirements.lock")
# The single-valued Ali-CCP fields (torch-rechub's ESMM takes no multi-valued or weighted field).
FIELDS = ("101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "216", "301")
SYSTEMS = {
    "ours": ("this project (defaults: lazy Adam tables, towers bfloat16 where native)", "ours.py"),
    "ours_float32": ("this project (defaults, towers float32)", "ours.py"),
    "ours_adagrad": ("this project (Adagrad tables, init 0.05, float32)", "ours.py"),
    "ours_adagrad_bf16": ("this project (Adagrad tables, init 0.05, bfloat16)", "ours.py"),
    "ours_lazy_adam": ("this project (lazy Adam tables, init 0.05, float32)", "ours.py"),
    "deepctr": ("DeepCTR 0.9.4", "deepctr_esmm.py"),
    "deepctr_bf16": ("DeepCTR 0.9.4, Keras mixed_bfloat16", "deepctr_esmm.py"),
    "rechub": ("torch-rechub 0.9.0", "rechub_esmm.py"),
}
# The peers as their documentation runs them: the speed and quality targets compare against these.
PEERS = ("deepctr", "rechub")
# Peer variants beyond their documentation (what the peer's script is told, benchmarks/peers/):
# shown with a ratio of their own, not counted in the targets.
PEER_PARAMS = {"deepctr_bf16": {"keras_policy": "mixed_bfloat16"}}
# This project's configurations, each naming its embedding params and compute dtype.
DEFAULTS = {"embedding_optimizer": "lazy_adam", "embedding_learning_rate": 1e-3,
            "embedding_init_stddev": 1e-4, "train_matmul_dtype": "auto"}
ADAGRAD = {"embedding_optimizer": "adagrad", "embedding_learning_rate": 0.05, "embedding_init_stddev": 0.05,
           "train_matmul_dtype": "float32"}
OURS = {"ours": DEFAULTS, "ours_float32": {**DEFAULTS, "train_matmul_dtype": "float32"},
        "ours_adagrad": ADAGRAD, "ours_adagrad_bf16": {**ADAGRAD, "train_matmul_dtype": "bfloat16"},
        "ours_lazy_adam": {**DEFAULTS, "embedding_init_stddev": 0.05, "train_matmul_dtype": "float32"}}
# The systems a plain invocation runs (--systems): the trainer's defaults as they are, and with
# float32 towers, and the peers, DeepCTR also in bfloat16; the others are opt-in.
DEFAULT_SYSTEMS = ("ours", "ours_float32", "deepctr", "deepctr_bf16", "rechub")
# The speed targets: this project's examples/s over the faster peer's, by table size.
SPEEDUP_TARGETS = {10_000: 1.0, 100_000: 3.0, 1_000_000: 20.0}
FLAT_TARGET = 1.25        # own examples/s at the smallest size / at the largest
AUC_TOLERANCE = 0.005     # "no worse": at most this far below the best peer
AUC_METRICS = ("ctr", "ctcvr", "cvr_clicked")  # the keys _aucs returns


def define_flags():
  flags.DEFINE_integer("impressions", 1_000_000, "Train impressions.")
  flags.DEFINE_integer("test_impressions", 200_000, "Test impressions.")
  flags.DEFINE_integer("num_users", 200_000, "Distinct users of the synthetic world.")
  flags.DEFINE_integer("num_items", 500_000, "Distinct items of the synthetic world.")
  flags.DEFINE_list("sizes", ["10000", "100000", "1000000"], "Rows per embedding table.")
  flags.DEFINE_list("auc_sizes", ["10000", "100000"], "Sizes at which every system trains "
                    "--epochs full passes and is scored on the test split.")
  flags.DEFINE_integer("epochs", 1, "Passes over the train split for the quality runs.")
  flags.DEFINE_integer("auc_seeds", 6, "Quality runs per system and size, model seeds --seed, "
                       "--seed + 1, ...")
  flags.DEFINE_integer("repeats", 5, "Throughput runs per system and size (their median; with 3, one slow "
                       "run moved the ratio at 100k rows across its target).")
  flags.DEFINE_float("seconds", 20.0, "Timed seconds of a throughput run.")
  flags.DEFINE_integer("warmup_steps", 20, "Steps before the timed window.")
  flags.DEFINE_list("systems", list(DEFAULT_SYSTEMS), f"Systems to run, of {', '.join(SYSTEMS)}.")
  flags.DEFINE_string("work_dir", os.path.join(ROOT, "runs", "bench_peers"), "Data and run scratch.")
  flags.DEFINE_string("preprocess_args", "--direct_num_workers=2 --direct_running_mode=multi_processing",
                      "Extra flags of the preprocessing run (Beam options).")
  flags.DEFINE_string("results_dir", os.path.join(ROOT, "benchmarks", "results"), "Output dir.")
  flags.DEFINE_string("name", "peer_throughput", "Results file stem.")
  flags.DEFINE_integer("seed", 1, "Data and model seed.")
  flags.DEFINE_string("from_results", None, "Re-render the tables, targets and chart from the "
                      "runs recorded in this results JSON (no run is made).")
  flags.DEFINE_boolean("prepare_only", False, "Generate and preprocess the data (and build "
                       ".venv-peers), then stop.")


def _run(cmd: List[str], log: str, timeout: float = 7200) -> None:
  with open(log, "w") as f:
    proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
                               "PYTHONHASHSEED": "0"})
  if proc.returncode != 0:
    tail = open(log).read()[-3000:]
    raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); log {log}:\n{tail}")


def ensure_peers_venv() -> str:
  """.venv-peers from benchmarks/peers/requirements.lock (rebuilt when the lock changes)."""
  python = os.path.join(PEERS_VENV, "bin", "python")
  stamp = hashlib.sha256(open(PEERS_LOCK, "rb").read()).hexdigest()
  stamp_file = os.path.join(PEERS_VENV, ".lock-sha256")
  if os.path.exists(python) and os.path.exists(stamp_file) and open(stamp_file).read() == stamp:
    return python
  print(f"building {PEERS_VENV} from {PEERS_LOCK} (a few minutes)", flush=True)
  shutil.rmtree(PEERS_VENV, ignore_errors=True)
  subprocess.run([sys.executable, "-m", "venv", PEERS_VENV], check=True)
  subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "-r", PEERS_LOCK], check=True)
  with open(stamp_file, "w") as f:
    f.write(stamp)
  return python


def prepare_data(work: str, max_rows: int) -> Dict[str, object]:
  """Synthetic raw data and its preprocessing (reused when the same config was done before)."""
  from datagen import synthetic
  from preprocessing import features as F
  config = {"impressions": FLAGS.impressions, "test": FLAGS.test_impressions, "users": FLAGS.num_users,
            "items": FLAGS.num_items, "seed": FLAGS.seed, "max_hash_buckets": max_rows,
            # Data prepared before the train column blocks existed is prepared again.
            "train_block_rows": F.DEFAULT_BLOCK_ROWS,
            # ... and so is data prepared before the job shuffled the blocks over the split.
            "train_blocks_shuffled": True}
  raw, out = os.path.join(work, "raw"), os.path.join(work, "preprocessed")
  config_file = os.path.join(work, "data_config.json")
  if os.path.exists(config_file) and json.load(open(config_file)).get("config") == config:
    return json.load(open(config_file))
  shutil.rmtree(work, ignore_errors=True)
  os.makedirs(work)
  t = time.time()
  synthetic.generate(raw, num_train=FLAGS.impressions, num_test=FLAGS.test_impressions,
                     num_users=FLAGS.num_users, num_items=FLAGS.num_items, seed=FLAGS.seed)
  generate_s = time.time() - t
  t = time.time()
  _run([sys.executable, "-m", "pipeline.preprocess", "--format=aliccp", f"--input_dir={raw}",
        f"--output_dir={out}", f"--max_hash_buckets={max_rows}", *FLAGS.preprocess_args.split()],
       os.path.join(work, "preprocess.log"))
  preprocess_s = time.time() - t
  arrays = os.path.join(work, "arrays")
  counts = export_arrays(out, arrays)
  info = {"config": config, "raw": raw, "transform_dir": out, "arrays": arrays,
          "generate_s": generate_s, "preprocess_s": preprocess_s,
          "preprocess_args": FLAGS.preprocess_args, **counts}
  with open(config_file, "w") as f:
    json.dump(info, f, indent=2)
  return info


def export_arrays(transform_dir: str, arrays: str) -> Dict[str, object]:
  """The transformed TFRecords as numpy arrays for the peers: ids [n, FIELDS] and the labels.
  A field without a value in a row (about 1.3% of these cells in the synthetic data) gets id 0
  there (this project pools no value to zeros); counted in the results."""
  import tensorflow as tf
  from model_fn import input_fn as I
  from preprocessing import features as F
  tft_output = I.load_transform_output(transform_dir)
  os.makedirs(arrays, exist_ok=True)
  counts = {}
  for split, name in (("train", "train"), ("eval", "test")):
    fn = I.make_input_fn(I.split_files(transform_dir, split), tft_output, 8192, training=False,
                         labels_as_features=True, fields=list(FIELDS))
    ids, labels, missing = [], {k: [] for k in F.LABELS}, 0
    for features, _ in fn():
      cols = []
      for f in FIELDS:
        sp = features[F.ID_PREFIX + f]
        dense = tf.sparse.to_dense(tf.sparse.reset_shape(sp, [sp.dense_shape[0], 1]), default_value=-1)
        col = dense.numpy()[:, 0]
        missing += int((col < 0).sum())
        cols.append(np.maximum(col, 0))
      ids.append(np.stack(cols, axis=1))
      for k in F.LABELS:
        labels[k].append(features[k].numpy().reshape(-1))
    np.savez(os.path.join(arrays, f"{name}.npz"), ids=np.concatenate(ids),
             **{k: np.concatenate(v).astype(np.int8) for k, v in labels.items()})
    counts[f"{name}_rows"] = int(sum(len(a) for a in ids))
    counts[f"{name}_missing_ids"] = missing
  return counts


def _aucs(pred_file: str) -> Dict[str, float]:
  p = np.load(pred_file)
  click, conv = p["click"] > 0.5, p["conversion"] > 0.5
  ctcvr = click & conv
  return {"ctr": roc_auc_score(click, p["ctr"]), "ctcvr": roc_auc_score(ctcvr, p["ctcvr"]),
          "cvr_clicked": roc_auc_score(conv[click], p["cvr"][click])}


def run_one(system: str, size: int, data: Dict[str, object], peers_python: str, tag: str,
            seconds: float, seed: int) -> Dict[str, object]:
  python = sys.executable if system in OURS else peers_python
  run_dir = os.path.join(FLAGS.work_dir, "runs", tag)
  shutil.rmtree(run_dir, ignore_errors=True)
  os.makedirs(run_dir)
  out = os.path.join(run_dir, "result.json")
  from model_fn import input_fn as I
  from preprocessing import transform as T
  buckets = T.transformed_hash_buckets(I.load_transform_output(data["transform_dir"]))
  cmd = [python, os.path.join(PEERS_DIR, SYSTEMS[system][1]),
         f"--data={data['transform_dir'] if system in OURS else data['arrays']}",
         f"--fields={','.join(FIELDS)}", f"--table_rows={size}",
         f"--buckets={json.dumps({f: buckets[f] for f in FIELDS})}", f"--seconds={seconds}",
         f"--epochs={FLAGS.epochs}", f"--warmup_steps={FLAGS.warmup_steps}", f"--seed={seed}",
         f"--work_dir={run_dir}", f"--out={out}"]
  params = OURS.get(system, PEER_PARAMS.get(system))
  if params:
    cmd.append(f"--params={json.dumps(params)}")
  t = time.time()
  _run(cmd, os.path.join(run_dir, "log.txt"))
  result = json.load(open(out))
  result["wall_s"] = time.time() - t
  result["model_seed"] = seed
  if params:  # what the key meant in this run, whatever it means later
    result["params"] = params
  if "predictions" in result:
    result["auc"] = {k: float(v) for k, v in _aucs(result["predictions"]).items()}
  print(f"  {tag}: {result['examples_per_s']:,.0f} examples/s, peak {result['peak_rss_mb']:,.0f} MB"
        + (f", AUC {result['auc']}" if "auc" in result else ""), flush=True)
  return result


def summarize(runs: List[Dict[str, object]], systems: List[str], sizes: List[int]) -> Dict[str, object]:
  thr, mem, auc = {}, {}, {}
  for s in systems:
    for n in sizes:
      rs = [r for r in runs if r["key"] == s and r["table_rows"] == n]
      if not rs:
        continue
      timed = [r["examples_per_s"] for r in rs if r["mode"] == "throughput"]
      if timed:
        thr[f"{s}@{n}"] = {"median": statistics.median(timed), "runs": timed}
      # Only runs that read their own peak (VmHWM); see benchmarks/peers/common.py.
      measured = [r["peak_rss_mb"] for r in rs if r.get("peak_rss_source") == "VmHWM"]
      if measured:
        mem[f"{s}@{n}"] = max(measured)
      scored = [r for r in rs if "auc" in r]
      if scored:
        auc[f"{s}@{n}"] = _auc_summary(scored)
  return {"throughput": thr, "peak_rss_mb": mem, "auc": auc}


def _auc_summary(scored: List[Dict[str, object]]) -> Dict[str, object]:
  """Each AUC's mean and standard deviation over the runs (seeds) of one system and size."""
  out: Dict[str, object] = {"seeds": [r.get("model_seed") for r in scored],
                            "epoch_examples_per_s": statistics.median(r["examples_per_s"] for r in scored)}
  for metric in AUC_METRICS:
    vals = [r["auc"][metric] for r in scored]
    out[metric] = statistics.fmean(vals)
    out[f"{metric}_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
    out[f"{metric}_runs"] = vals
  return out


def _mean_sd(a: Dict[str, object], metric: str) -> str:
  sd = a.get(f"{metric}_sd")
  return f"{a[metric]:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")


def targets(summary, systems, sizes) -> List[Dict[str, object]]:
  """The speed and quality targets, for each of this project's configurations on its own."""
  thr, out = summary["throughput"], []
  peers = [p for p in PEERS if p in systems]
  for ours in (o for o in OURS if o in systems):
    name = SYSTEMS[ours][0]
    for n in sizes:
      if f"{ours}@{n}" not in thr or not peers:
        continue
      best = max(thr[f"{p}@{n}"]["median"] for p in peers)
      goal = SPEEDUP_TARGETS.get(n)
      ratio = thr[f"{ours}@{n}"]["median"] / best
      out.append({"target": f"{name}, {n:,} rows: " + (f">= {goal}x the faster peer" if goal else "vs faster peer"),
                  "value": f"{ratio:.2f}x", "met": None if goal is None else bool(ratio >= goal)})
    if len(sizes) > 1 and all(f"{ours}@{n}" in thr for n in (sizes[0], sizes[-1])):
      slow = thr[f"{ours}@{sizes[0]}"]["median"] / thr[f"{ours}@{sizes[-1]}"]["median"]
      out.append({"target": f"{name}, examples/s at {sizes[0]:,} / at {sizes[-1]:,} <= {FLAT_TARGET}",
                  "value": f"{slow:.2f}", "met": bool(slow <= FLAT_TARGET)})
    for key, a in summary["auc"].items():
      s, n = key.split("@")
      if s != ours:
        continue
      for metric in AUC_METRICS:
        peer_vals = [summary["auc"][f"{p}@{n}"][metric] for p in peers if f"{p}@{n}" in summary["auc"]]
        if peer_vals:
          best = max(peer_vals)
          out.append({"target": f"{name}, {metric} AUC at {int(n):,} rows >= best peer - {AUC_TOLERANCE} "
                                f"(means over {len(a['seeds'])} seeds)",
                      "value": f"{a[metric]:.4f} vs {best:.4f}", "met": bool(a[metric] >= best - AUC_TOLERANCE)})
  return out


def markdown(meta, summary, goals, systems, sizes) -> str:
  thr = summary["throughput"]
  ours = [o for o in OURS if o in systems]
  # Ratio columns: against the faster documented peer, and against each peer variant run.
  refs = ([("faster peer", PEERS)] if any(p in systems for p in PEERS) else []) + \
      [(SYSTEMS[v][0], (v,)) for v in PEER_PARAMS if v in systems]
  lines = ["# Training throughput against the peer libraries", "", f"Command: `{meta['command']}`", "",
           f"Machine: {meta['machine']}. Wall time {meta['seconds']:.0f} s. {meta['data']}", "",
           "## Examples per second (median of the runs; all runs in brackets)", "",
           "| " + " | ".join(["rows per table"] + [SYSTEMS[s][0] for s in systems]
                             + [f"{SYSTEMS[o][0]} / {ref}" for ref, _ in refs for o in ours]) + " |",
           "|---:|" + "---:|" * (len(systems) + len(refs) * len(ours))]
  for n in sizes:
    cells, ratios = [], []
    for s in systems:
      t = thr.get(f"{s}@{n}")
      cells.append(f"{t['median']:,.0f} ({', '.join(f'{v:,.0f}' for v in t['runs'])})" if t else "-")
    for _, keys in refs:
      peers = [thr[f"{p}@{n}"]["median"] for p in keys if f"{p}@{n}" in thr]
      for o in ours:
        ratios.append(f"{thr[f'{o}@{n}']['median'] / max(peers):.2f}x" if f"{o}@{n}" in thr and peers else "-")
    lines.append(f"| {n:,} | " + " | ".join(cells + ratios) + " |")
  lines += ["", "## Peak memory (MB, peak resident set (VmHWM) of the training process, max over its runs)", "",
            "| rows per table | " + " | ".join(SYSTEMS[s][0] for s in systems) + " |",
            "|---:|" + "---:|" * len(systems)]
  for n in sizes:
    lines.append(f"| {n:,} | " + " | ".join(
        f"{summary['peak_rss_mb'][f'{s}@{n}']:,.0f}" if f"{s}@{n}" in summary["peak_rss_mb"] else "-"
        for s in systems) + " |")
  if summary["auc"]:
    lines += ["", f"## Test AUCs after {FLAGS.epochs} epoch(s) of {meta['train_rows']:,} impressions "
              "(CTR, CTCVR over all test impressions; CVR over clicked ones)", "",
              "Mean ± standard deviation over the model seeds (the runs' values are in the JSON).", "",
              "| rows per table | system | seeds | CTR AUC | CTCVR AUC | CVR AUC (clicked) | examples/s over the epoch |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for key, a in sorted(summary["auc"].items(), key=lambda kv: (int(kv[0].split("@")[1]), kv[0])):
      s, n = key.split("@")
      lines.append(f"| {int(n):,} | {SYSTEMS[s][0]} | {len(a['seeds'])} | {_mean_sd(a, 'ctr')} | "
                   f"{_mean_sd(a, 'ctcvr')} | {_mean_sd(a, 'cvr_clicked')} | {a['epoch_examples_per_s']:,.0f} |")
  if goals:
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---:|---|"]
    lines += [f"| {g['target']} | {g['value']} | {'-' if g['met'] is None else ('yes' if g['met'] else 'NO')} |"
              for g in goals]
  return "\n".join(lines) + "\n"


def chart(path: str, summary, systems, sizes) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for s in systems:
    xs = [n for n in sizes if f"{s}@{n}" in summary["throughput"]]
    ax.plot(xs, [summary["throughput"][f"{s}@{n}"]["median"] for n in xs], marker="o", label=SYSTEMS[s][0])
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("rows per embedding table")
  ax.set_ylabel("training examples / s (median)")
  ax.set_title("ESMM training throughput, batch 1024, 2-core CPU")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def render(meta, runs, data, systems, sizes, auc_sizes) -> None:
  summary = summarize(runs, systems, sorted(set(sizes + auc_sizes)))
  goals = targets(summary, systems, sizes)
  md = markdown(meta, summary, goals, systems, sizes)
  results_io.write(FLAGS.results_dir, FLAGS.name,
                   {"meta": meta, "summary": summary, "targets": goals, "runs": runs, "data": data}, md)
  if summary["throughput"]:  # a quality-only invocation (--repeats=0) has no speed to chart
    chart(os.path.join(FLAGS.results_dir, FLAGS.name + ".png"), summary, systems, sizes)


def rerender(path: str) -> None:
  """Tables, targets and chart again from the per-run records of an earlier invocation."""
  old = json.load(open(path))
  runs = old["runs"]
  systems = [s for s in SYSTEMS if any(r["key"] == s for r in runs)]
  sizes = sorted({r["table_rows"] for r in runs if r["mode"] == "throughput"})
  auc_sizes = sorted({r["table_rows"] for r in runs if r["mode"] == "epochs"})
  render(old["meta"], runs, old["data"], systems, sizes, auc_sizes)


def main(argv):
  del argv
  if FLAGS.from_results:
    rerender(FLAGS.from_results)
    return
  start = time.time()
  systems = [s for s in FLAGS.systems if s in SYSTEMS]
  sizes = sorted(int(n) for n in FLAGS.sizes)
  auc_sizes = sorted(int(n) for n in FLAGS.auc_sizes)
  peers_python = ensure_peers_venv() if any(s in PEERS for s in systems) else ""
  data = prepare_data(FLAGS.work_dir, max(sizes + auc_sizes))
  print(f"data: {data['train_rows']:,} train / {data['test_rows']:,} test impressions; "
        f"preprocessing {data['preprocess_s']:.0f} s", flush=True)
  if FLAGS.prepare_only:
    return
  runs = []
  # Each repeat runs every size and every system (the order of the systems rotates), so that a
  # drift in the machine's speed falls on all sizes alike, not on the last size measured.
  for rep in range(FLAGS.repeats):
    for n in sizes:
      order = systems[rep % len(systems):] + systems[:rep % len(systems)]
      for s in order:
        r = run_one(s, n, data, peers_python, f"{s}-{n}-r{rep}", FLAGS.seconds, FLAGS.seed)
        runs.append({**r, "key": s})
  for seed in range(FLAGS.seed, FLAGS.seed + FLAGS.auc_seeds):
    for n in auc_sizes:
      for s in systems:
        r = run_one(s, n, data, peers_python, f"{s}-{n}-epochs-s{seed}", 0.0, seed)
        runs.append({**r, "key": s})
  meta = {"command": "python benchmarks/peer_throughput.py " + " ".join(sys.argv[1:]),
          "machine": results_io.machine(),
          "seconds": time.time() - start, "train_rows": data["train_rows"],
          "data": (f"Data: {data['train_rows']:,} train / {data['test_rows']:,} test synthetic Ali-CCP "
                   f"impressions ({FLAGS.num_users:,} users, {FLAGS.num_items:,} items), fields "
                   f"{', '.join(FIELDS)} (single-valued; the same for all three), embedding 18, towers "
                   f"360-200-80, batch 1024. Preprocessing (this project's Beam/TFT job, "
                   f"{data['preprocess_args'] or 'defaults'}) took {data['preprocess_s']:.0f} s.")}
  render(meta, runs, data, systems, sizes, auc_sizes)


if __name__ == "__main__":
  define_flags()
  app.run(main)
