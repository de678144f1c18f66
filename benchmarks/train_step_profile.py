"""Where a training step of this project's ESMM spends its CPU, on the peer benchmark's data.

  .venv/bin/python benchmarks/peer_throughput.py --prepare_only     # the data, once
  .venv/bin/python benchmarks/train_step_profile.py [--table_rows=10000,1000000] [--repeats=3]

Same shape as benchmarks/peer_throughput.py (its 14 single-valued fields, embedding 18, towers
360-200-80, batch 1024, the project's default optimizers unless --params says otherwise), one
TF1 session per measurement, in this process:

  input    the training input_fn alone (gzip TFRecords -> shuffled, parsed batches)
  step     the train op alone, fed one parsed batch cached in memory (no reading or parsing)
  full     the input_fn feeding the train op, as training runs

input and full run once per --train_inputs: ``blocks`` (the train column blocks, what training
reads) and ``examples`` (one tf.Example per row, what it read before the blocks).

Examples/s of each (median of --repeats runs of --seconds, the three alternating so that drift
in the machine's speed falls on all alike). Then --trace_steps traced steps of ``step``: the time
of the ops by part of the model (tower forward/backward, pooling forward/backward, optimizer
updates) and by op type. Op times are summed over the threads that ran them, so their total
exceeds the wall time of a step when ops run in parallel; the shares are what matter.

What the figures tell: how much of a step is the dense towers (the same arithmetic in every
system at equal shapes) and how much is this project's own input path and embedding code.
Writes benchmarks/results/train_step_profile.{json,md}.
"""

import collections
import json
import os
import re
import statistics
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import results_io  # noqa: E402  (benchmarks/ is this script's directory)
from model_fn import esmm  # noqa: E402
from model_fn import input_fn as I  # noqa: E402
from model_fn.params import resolve_params  # noqa: E402
from peer_throughput import FIELDS, ROOT  # noqa: E402
from preprocessing import transform as T  # noqa: E402

FLAGS = flags.FLAGS

def modes():
  """input:<train input>..., step, full:<train input>... (input and full once per --train_inputs)."""
  return ([f"input:{t}" for t in FLAGS.train_inputs] + ["step"]
          + [f"full:{t}" for t in FLAGS.train_inputs])
OPTIMIZER_SCOPES = ("Adam", "Adagrad", "Ftrl", "GradientDescent")


def define_flags():
  flags.DEFINE_string("data", os.path.join(ROOT, "runs", "bench_peers", "preprocessed"),
                      "Transform output to train on (peer_throughput.py --prepare_only writes it).")
  flags.DEFINE_list("table_rows", ["10000", "1000000"], "Rows per embedding table.")
  flags.DEFINE_integer("repeats", 3, "Runs per mode and size.")
  flags.DEFINE_float("seconds", 10.0, "Timed seconds of a run.")
  flags.DEFINE_integer("warmup_steps", 20, "Steps before the timed window.")
  flags.DEFINE_integer("trace_steps", 20, "Traced steps per size.")
  flags.DEFINE_integer("batch_size", 1024, "Batch size.")
  flags.DEFINE_string("params", "{}", "JSON of model params over the defaults (e.g. "
                      "'{\"embedding_optimizer\": \"lazy_adam\"}').")
  flags.DEFINE_multi_enum("train_inputs", ["blocks", "examples"], ["blocks", "examples"],
                          "What the input reads, each measured: the train column blocks, the train "
                          "tf.Examples.")
  flags.DEFINE_string("results_dir", os.path.join(ROOT, "benchmarks", "results"), "Output dir.")
  flags.DEFINE_string("name", "train_step_profile", "Results file stem.")


def _params(rows: int) -> Dict[str, object]:
  tft_output = I.load_transform_output(FLAGS.data)
  return resolve_params({
      "model": "esmm", "format": I.transform_format(FLAGS.data),
      "hash_buckets": T.transformed_hash_buckets(tft_output), "fields": list(FIELDS),
      "table_rows": rows, "embedding_dim": 18, "ctr_hidden_units": [360, 200, 80],
      "cvr_hidden_units": [360, 200, 80], **json.loads(FLAGS.params)})


def _graph(mode: str, rows: int):
  """(graph, op to run per step) of one measurement mode."""
  graph = tf.Graph()
  with graph.as_default():
    tf.compat.v1.set_random_seed(1)
    tft_output = I.load_transform_output(FLAGS.data)
    pattern, block_rows = I.train_files(FLAGS.data, mode.split(":")[1] if ":" in mode
                                        else FLAGS.train_inputs[0])
    ds = I.make_input_fn(pattern, tft_output, FLAGS.batch_size, training=True, seed=1,
                         fields=list(FIELDS), block_rows=block_rows)()
    if mode == "step":
      ds = ds.take(1).cache().repeat()
    features, labels = tf.compat.v1.data.make_one_shot_iterator(ds).get_next()
    if mode.startswith("input"):
      op = features
    else:
      op = esmm.esmm_model_fn(features, labels, tf.estimator.ModeKeys.TRAIN, _params(rows)).train_op
    init = tf.compat.v1.global_variables_initializer()
  return graph, op, init


def measure(mode: str, rows: int) -> float:
  """Examples/s of one run of ``mode``."""
  graph, op, init = _graph(mode, rows)
  with tf.compat.v1.Session(graph=graph) as sess:
    sess.run(init)
    for _ in range(FLAGS.warmup_steps):
      sess.run(op)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < FLAGS.seconds:
      sess.run(op)
      steps += 1
    return steps * FLAGS.batch_size / (time.perf_counter() - t0)


def part_of(node: str) -> str:
  """The part of the model an op of the train step belongs to, from its name."""
  top = node.split("/")[0]
  # A second optimizer of the same class gets a numbered scope (the tables' lazy Adam: Adam_1).
  if re.sub(r"_\d+$", "", top) in OPTIMIZER_SCOPES:
    return "embedding optimizer" if "update_embeddings" in node else "dense optimizer"
  backward = top == "gradients"
  if "tower" in node:
    part = "towers"
  elif "pool_" in node or "embeddings" in node:
    part = "embedding lookup and pooling"
  else:
    part = "loss, heads, input"
  return f"{part}, {'backward' if backward else 'forward'}"


def trace(rows: int) -> Dict[str, Dict[str, float]]:
  """Op milliseconds per step by part and by op type, over --trace_steps traced steps."""
  graph, op, init = _graph("step", rows)
  by_part, by_type = collections.Counter(), collections.Counter()
  with tf.compat.v1.Session(graph=graph) as sess:
    sess.run(init)
    for _ in range(FLAGS.warmup_steps):
      sess.run(op)
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    for _ in range(FLAGS.trace_steps):
      meta = tf.compat.v1.RunMetadata()
      sess.run(op, options=options, run_metadata=meta)
      for dev in meta.step_stats.dev_stats:
        for ns in dev.node_stats:
          micros = ns.op_end_rel_micros - ns.op_start_rel_micros
          by_part[part_of(ns.node_name)] += micros
          by_type[ns.timeline_label.split("(")[0].split("=")[-1].strip()] += micros
  scale = 1000.0 * FLAGS.trace_steps
  return {"by_part": {k: v / scale for k, v in by_part.most_common()},
          "by_type": {k: v / scale for k, v in by_type.most_common(12)}}


_HEAD = {"input": "input alone ({})", "step": "train step alone (cached batch)",
         "full": "full: input ({}) + step"}


def markdown(meta, throughput, traces) -> str:
  lines = ["# Where a training step spends its CPU", "",
           f"Command: `python benchmarks/train_step_profile.py {meta['argv']}`", "",
           f"Machine: {meta['machine']}. Data: {meta['data']}; fields {', '.join(FIELDS)}; "
           f"embedding 18, towers 360-200-80, batch {FLAGS.batch_size}; params {FLAGS.params}.", "",
           "## Examples per second (median; all runs in brackets)", "",
           "| rows per table | " + " | ".join(_HEAD[m.split(":")[0]].format(*m.split(":")[1:]) for m in modes())
           + "".join(f" | input's share of a full step's CPU ({t})" for t in FLAGS.train_inputs) + " |",
           "|---:" * (1 + len(modes()) + len(FLAGS.train_inputs)) + "|"]
  for rows, runs in throughput.items():
    med = {m: statistics.median(runs[m]) for m in modes()}
    shares = [(1 / med[f"input:{t}"]) / (1 / med[f"input:{t}"] + 1 / med["step"]) for t in FLAGS.train_inputs]
    cells = [f"{med[m]:,.0f} ({', '.join(f'{r:,.0f}' for r in runs[m])})" for m in modes()]
    lines.append(f"| {int(rows):,} | " + " | ".join(cells) + "".join(f" | {x:.0%}" for x in shares) + " |")
  lines += ["", "Input's share: (1/input) / (1/input + 1/step), the share of the CPU a full step "
            "spends on input when the two share the cores without overlap.", ""]
  for rows, tr in traces.items():
    total = sum(tr["by_part"].values())
    lines += [f"## Op time per traced step at {int(rows):,} rows per table (summed over threads)", "",
              "| part | ms | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {v / total:.1%} |" for k, v in tr["by_part"].items()]
    lines += [f"| total | {total:.2f} | |", "", "| op type (top 12) | ms | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {v / total:.1%} |" for k, v in tr["by_type"].items()]
    lines.append("")
  return "\n".join(lines)


def main(argv):
  del argv
  tf.compat.v1.disable_eager_execution()
  tf.get_logger().setLevel("ERROR")
  if not tf.io.gfile.exists(FLAGS.data):
    raise SystemExit(f"{FLAGS.data} does not exist: run `python benchmarks/peer_throughput.py "
                     "--prepare_only` first, or give --data")
  sizes = [int(s) for s in FLAGS.table_rows]
  throughput: Dict[str, Dict[str, List[float]]] = {str(s): {m: [] for m in modes()} for s in sizes}
  for r in range(FLAGS.repeats):
    for s in sizes:
      for m in modes():
        eps = measure(m, s)
        throughput[str(s)][m].append(eps)
        print(f"repeat {r + 1}, {s:,} rows, {m}: {eps:,.0f} examples/s", flush=True)
  traces = {str(s): trace(s) for s in sizes}
  meta = {"argv": " ".join(sys.argv[1:]),
          "machine": results_io.machine(),
          "data": f"{I.split_rows(FLAGS.data, 'train'):,} train impressions in {os.path.relpath(FLAGS.data, ROOT)}"}
  results_io.write(FLAGS.results_dir, FLAGS.name,
                   {"meta": meta, "throughput": throughput, "trace": traces}, markdown(meta, throughput, traces))


if __name__ == "__main__":
  define_flags()
  app.run(main)
