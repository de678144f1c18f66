"""Where a training step of this project's ESMM spends its CPU, on the peer benchmark's data.

  .venv/bin/python benchmarks/peer_throughput.py --prepare_only     # the data, once
  .venv/bin/python benchmarks/train_step_profile.py [--table_rows=10000,1000000] [--repeats=3]
  .venv/bin/python benchmarks/train_step_profile.py --data=DIR/preprocessed --fields=all \
      --table_rows=8x --train_inputs=auto --name=NAME    # another transform output, e.g. full_scale.py's

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
from model_fn import table_sizing  # noqa: E402
from model_fn.params import resolve_params  # noqa: E402
from peer_throughput import FIELDS, ROOT  # noqa: E402
from preprocessing import features as F  # noqa: E402
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
  flags.DEFINE_list("table_rows", ["10000", "1000000"], "Rows per embedding table, each measured; "
                    "NUMx: tables sized at NUM rows per distinct id of the train split "
                    "(--table_rows_per_id), e.g. 8x.")
  flags.DEFINE_string("fields", "peer", "The fields embedded: peer (peer_throughput.py's 14 "
                      "single-valued fields) or all (every field of --data, crosses included).")
  flags.DEFINE_integer("repeats", 3, "Runs per mode and size.")
  flags.DEFINE_float("seconds", 10.0, "Timed seconds of a run.")
  flags.DEFINE_integer("warmup_steps", 20, "Steps before the timed window.")
  flags.DEFINE_integer("trace_steps", 20, "Traced steps per size.")
  flags.DEFINE_enum("trace", "step", ["step", "full"], "What the traced steps run: the train op "
                    "on one cached batch, or fed by the input (the first --train_inputs).")
  flags.DEFINE_integer("batch_size", 1024, "Batch size.")
  flags.DEFINE_string("params", "{}", "JSON of model params over the defaults (e.g. "
                      "'{\"embedding_optimizer\": \"lazy_adam\"}').")
  flags.DEFINE_multi_enum("train_inputs", ["blocks", "examples"], ["blocks", "examples", "auto"],
                          "What the input reads, each measured: the train column blocks, the train "
                          "tf.Examples, or what training reads (auto; the only one of grouped data).")
  flags.DEFINE_string("results_dir", os.path.join(ROOT, "benchmarks", "results"), "Output dir.")
  flags.DEFINE_string("name", "train_step_profile", "Results file stem.")


def _fields():
  """The embedded fields (None: every field of --data)."""
  return list(FIELDS) if FLAGS.fields == "peer" else None


def _params(size: str) -> Dict[str, object]:
  """Resolved ESMM params at one --table_rows entry: rows per table, or NUMx rows per distinct id."""
  tft_output = I.load_transform_output(FLAGS.data)
  per_id = float(size[:-1]) if size.endswith("x") else 0.0
  params = resolve_params({
      "model": "esmm", "format": I.transform_format(FLAGS.data),
      "hash_buckets": T.transformed_hash_buckets(tft_output), "fields": _fields(),
      "table_rows": 0 if per_id else int(size), "table_rows_per_id": per_id, "embedding_dim": 18,
      "ctr_hidden_units": [360, 200, 80], "cvr_hidden_units": [360, 200, 80], **json.loads(FLAGS.params)})
  return resolve_params({**params, "field_rows": table_sizing.resolve_field_rows(params, I.distinct_ids(FLAGS.data))})


def _graph(mode: str, size: str):
  """(graph, op to run per step, its batch's impressions, initializer) of one measurement mode.
  A grouped batch holds whole groups: its impressions vary around --batch_size."""
  graph = tf.Graph()
  with graph.as_default():
    tf.compat.v1.set_random_seed(1)
    tft_output = I.load_transform_output(FLAGS.data)
    pattern, block_rows = I.train_files(FLAGS.data, mode.split(":")[1] if ":" in mode
                                        else FLAGS.train_inputs[0])
    ds = I.make_input_fn(pattern, tft_output, FLAGS.batch_size, training=True, seed=1,
                         fields=_fields(), block_rows=block_rows,
                         grouped=I.layout(FLAGS.data) == F.GROUPED)()
    if mode == "step":
      ds = ds.take(1).cache().repeat()
    features, labels = tf.compat.v1.data.make_one_shot_iterator(ds).get_next()
    impressions = tf.shape(tf.nest.flatten(labels)[0])[0]
    if mode.startswith("input"):
      op = features
    else:
      op = esmm.esmm_model_fn(features, labels, tf.estimator.ModeKeys.TRAIN, _params(size)).train_op
    init = tf.compat.v1.global_variables_initializer()
  return graph, op, impressions, init


def measure(mode: str, size: str) -> float:
  """Examples (impressions) per second of one run of ``mode``."""
  graph, op, impressions, init = _graph(mode, size)
  with tf.compat.v1.Session(graph=graph) as sess:
    sess.run(init)
    for _ in range(FLAGS.warmup_steps):
      sess.run(op)
    examples, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < FLAGS.seconds:
      examples += sess.run([op, impressions])[1]
    return examples / (time.perf_counter() - t0)


def part_of(node: str) -> str:
  """The part of the model an op of the train step belongs to, from its name."""
  top = node.split("/")[0]
  # A second optimizer of the same class gets a numbered scope (the tables' lazy Adam: Adam_1).
  if re.sub(r"_\d+$", "", top) in OPTIMIZER_SCOPES:
    # The tables' scopes: embeddings (shared), ctr_embeddings and cvr_embeddings (base, esmm_ns).
    return "embedding optimizer" if re.search(r"update_(\w+_)?embeddings", node) else "dense optimizer"
  backward = top == "gradients"
  if "tower" in node:
    part = "towers"
  elif "pool_" in node or "embeddings" in node:
    part = "embedding lookup and pooling"
  else:
    part = "loss, heads, input"
  return f"{part}, {'backward' if backward else 'forward'}"


def trace(size: str) -> Dict[str, Dict[str, float]]:
  """Op milliseconds per step by part and by op type, over --trace_steps traced steps."""
  graph, op, _, init = _graph("step" if FLAGS.trace == "step" else f"full:{FLAGS.train_inputs[0]}", size)
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


def _size(size: str) -> str:
  """A --table_rows entry as the tables name it."""
  return f"{size[:-1]} per distinct id" if size.endswith("x") else f"{int(size):,}"


_TRACED = {"step": "the train op on one cached batch", "full": "the train op fed by the input"}
_HEAD = {"input": "input alone ({})", "step": "train step alone (cached batch)",
         "full": "full: input ({}) + step"}


def markdown(meta, throughput, traces) -> str:
  lines = ["# Where a training step spends its CPU", "",
           f"Command: `python benchmarks/train_step_profile.py {meta['argv']}`", "",
           f"Machine: {meta['machine']}. Data: {meta['data']}; fields {meta['fields']}; "
           f"embedding 18, towers 360-200-80, batch {FLAGS.batch_size}; params {FLAGS.params}.", "",
           "## Examples per second (median; all runs in brackets)", "",
           "| rows per table | " + " | ".join(_HEAD[m.split(":")[0]].format(*m.split(":")[1:]) for m in modes())
           + "".join(f" | input's share of a full step's CPU ({t})" for t in FLAGS.train_inputs) + " |",
           "|---:" * (1 + len(modes()) + len(FLAGS.train_inputs)) + "|"]
  for rows, runs in throughput.items():
    med = {m: statistics.median(runs[m]) for m in modes()}
    shares = [(1 / med[f"input:{t}"]) / (1 / med[f"input:{t}"] + 1 / med["step"]) for t in FLAGS.train_inputs]
    cells = [f"{med[m]:,.0f} ({', '.join(f'{r:,.0f}' for r in runs[m])})" for m in modes()]
    lines.append(f"| {_size(rows)} | " + " | ".join(cells) + "".join(f" | {x:.0%}" for x in shares) + " |")
  lines += ["", "Input's share: (1/input) / (1/input + 1/step), the share of the CPU a full step "
            "spends on input when the two share the cores without overlap.", ""]
  for rows, tr in traces.items():
    total = sum(tr["by_part"].values())
    lines += [f"## Op time per traced step at {_size(rows)} rows per table ({_TRACED[FLAGS.trace]}; "
              "summed over threads)", "",
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
  sizes = list(FLAGS.table_rows)
  throughput: Dict[str, Dict[str, List[float]]] = {s: {m: [] for m in modes()} for s in sizes}
  for r in range(FLAGS.repeats):
    for s in sizes:
      for m in modes():
        eps = measure(m, s)
        throughput[s][m].append(eps)
        print(f"repeat {r + 1}, {_size(s)} rows, {m}: {eps:,.0f} examples/s", flush=True)
  traces = {s: trace(s) for s in sizes}
  meta = {"argv": " ".join(sys.argv[1:]),
          "machine": results_io.machine(),
          "data": f"{I.split_rows(FLAGS.data, 'train'):,} train impressions in {os.path.relpath(FLAGS.data, ROOT)} "
                  f"({I.layout(FLAGS.data)} layout)",
          "fields": ", ".join(_fields() or T.transformed_hash_buckets(I.load_transform_output(FLAGS.data)))}
  results_io.write(FLAGS.results_dir, FLAGS.name,
                   {"meta": meta, "throughput": throughput, "trace": traces}, markdown(meta, throughput, traces))


if __name__ == "__main__":
  define_flags()
  app.run(main)
