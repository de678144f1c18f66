"""Serving latency of the exported SavedModel, in process (tf.saved_model.load).

  .venv/bin/python benchmarks/serving_latency.py [--train_impressions=40000] [--train_steps=300] \
      [--batch_sizes=1,256] [--calls=2000] [--seconds=20]

Builds a model the way a user does (synthetic Ali-CCP data -> pipeline.preprocess ->
model_fn.estimator.train_and_evaluate, which exports the TF Serving SavedModel), then:

Latency: the exported SavedModel loaded in process (tf.saved_model.load); calls of its
``regression`` signature (serialized *raw* tf.Examples in: parsing + the TFT transform + the
model; pCVR out) on test impressions, per batch size: p50/p99 per call and examples/s.

Overhead of parsing + transform over the model alone: one TF1 graph built from the same code as
the export (the serving receiver, then esmm_model_fn in PREDICT mode, the checkpoint restored),
run two ways in one session: fed the serialized raw tf.Examples (the full path), or fed the
receiver's output, the already transformed ids and weights of the same examples (computed once,
outside the timing), so that only the model runs. Ratio = full / model alone (target at batch
256: <= 1.5). Calls alternate between the measured paths (round robin) so that drift in the
machine's speed falls on all of them alike. Writes benchmarks/results/serving_latency.{json,md}.
"""

import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import results_io  # noqa: E402
from datagen import synthetic  # noqa: E402
from model_fn import calibration as C  # noqa: E402
from model_fn import estimator as E  # noqa: E402
from model_fn import export  # noqa: E402
from model_fn import input_fn as I  # noqa: E402
from model_fn import params as P  # noqa: E402
from pipeline import preprocess  # noqa: E402
from pipeline.sources import aliccp  # noqa: E402
from preprocessing import features as F  # noqa: E402
from preprocessing import transform as T  # noqa: E402

FLAGS = flags.FLAGS
OVERHEAD_TARGET = 1.5


def define_flags():
  flags.DEFINE_integer("train_impressions", 40_000, "Train impressions of the synthetic data.")
  flags.DEFINE_integer("test_impressions", 4_000, "Test impressions (the requests are made of these).")
  flags.DEFINE_integer("max_hash_buckets", 100_000, "Preprocessing cap on hash buckets (rows per table).")
  flags.DEFINE_integer("train_steps", 300, "Training steps (batch 256) before export.")
  flags.DEFINE_list("batch_sizes", ["1", "256"], "Examples per call.")
  flags.DEFINE_integer("calls", 2000, "Most timed calls per signature and batch size.")
  flags.DEFINE_float("seconds", 20.0, "Most seconds of timed calls per batch size (all signatures).")
  flags.DEFINE_integer("warmup_calls", 20, "Untimed calls per signature before timing.")
  flags.DEFINE_string("work_dir", None, "Where data and models go (default: a temp dir, removed).")
  flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                      "Where to write the results.")


def raw_requests(raw_dir: str, split: str, n: int) -> List[bytes]:
  """The first ``n`` impressions of a split joined with their user side, as the serialized raw
  tf.Examples a client sends (labels and sample id left out)."""
  known = frozenset(f.name for f in F.fields("aliccp"))
  common = {}
  with open(os.path.join(raw_dir, f"common_features_{split}.csv"), "rb") as f:
    for line in f:
      try:
        row = aliccp.parse_common_line(line, known)[0]
      except aliccp.BadRecord:
        continue   # the synthetic data's anomalies, set aside by the job too
      common[row["index"]] = row["features"]
  out = []
  with open(os.path.join(raw_dir, f"sample_skeleton_{split}.csv"), "rb") as f:
    for line in f:
      try:
        row = aliccp.parse_skeleton_line(line, known)[0]
      except aliccp.BadRecord:
        continue
      if row["index"] not in common:
        continue
      instance = aliccp.to_raw_instance(row, common[row["index"]])
      client = {k: v for k, v in instance.items() if k not in F.RAW_LABELS and k != F.SAMPLE_ID}
      out.append(T.raw_example(client, "aliccp").SerializeToString())
      if len(out) == n:
        break
  return out


class SessionPaths:
  """The serving graph (receiver + model) in a TF1 session, callable on raw examples or on the
  receiver's output (the transformed features) to run the model alone."""

  def __init__(self, tft_output, model_dir: str):
    # The params the model was trained with and its calibration, as the export applies them.
    params = {**E.load_params(model_dir), "calibration": C.load(model_dir) or {}}
    self.graph = tf.Graph()
    with self.graph.as_default():
      receiver = export.make_serving_input_receiver_fn(tft_output, params["format"])()
      spec = E.model_fn_for(params)(receiver.features, None, tf.estimator.ModeKeys.PREDICT, params)
      self.cvr = spec.predictions["cvr"]
      self.serialized = receiver.receiver_tensors[export.RECEIVER_KEY]
      self.features = receiver.features
      self.session = tf.compat.v1.Session(graph=self.graph)
      self.session.run(tf.compat.v1.tables_initializer())
      tf.compat.v1.train.Saver().restore(self.session, tf.train.latest_checkpoint(model_dir))

  def full(self, serialized):
    return self.session.run(self.cvr, {self.serialized: serialized})

  def model_feed(self, serialized):
    """The feed that runs only the model: each transformed feature's tensors, with their values
    for ``serialized``."""
    values = self.session.run(self.features, {self.serialized: serialized})
    feed = {}
    for name, tensor in self.features.items():
      if isinstance(tensor, tf.SparseTensor):
        feed.update({tensor.indices: values[name].indices, tensor.values: values[name].values,
                     tensor.dense_shape: values[name].dense_shape})
      else:
        feed[tensor] = values[name]
    return feed

  def model_only(self, feed):
    return self.session.run(self.cvr, feed)


def percentile_ms(seconds: List[float], q: float) -> float:
  return round(float(np.percentile(np.asarray(seconds) * 1000.0, q)), 3)


def time_calls(calls: Dict[str, callable], max_calls: int, max_seconds: float, warmup: int):
  """Round-robin timed calls of each function; {name: [seconds per call]}."""
  for fn in calls.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in calls}
  deadline = time.perf_counter() + max_seconds
  while min(len(t) for t in times.values()) < max_calls and time.perf_counter() < deadline:
    for name, fn in calls.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def main(argv):
  del argv
  tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
  own_work = FLAGS.work_dir is None
  work = FLAGS.work_dir or tempfile.mkdtemp(prefix="bench_serving_")
  try:
    raw, out, model_dir = (os.path.join(work, d) for d in ("raw", "transformed", "model"))
    if not os.path.exists(os.path.join(out, F.RECONCILIATION)):
      synthetic.generate(raw, FLAGS.train_impressions, FLAGS.test_impressions)
      preprocess.run("aliccp", preprocess._input_patterns(raw, {}), out, [],
                     max_hash_buckets=FLAGS.max_hash_buckets, overwrite=True)
    tft_output = I.load_transform_output(out)
    params = P.resolve_params({"model": "esmm", "format": "aliccp",
                               "hash_buckets": T.transformed_hash_buckets(tft_output)})
    if os.path.exists(model_dir):
      shutil.rmtree(model_dir)
    result = E.train_and_evaluate(out, model_dir, params, batch_size=256, train_steps=FLAGS.train_steps,
                                  save_checkpoints_steps=FLAGS.train_steps)
    loaded = tf.saved_model.load(result["saved_model"])
    paths = SessionPaths(tft_output, model_dir)
    largest = max(int(b) for b in FLAGS.batch_sizes)
    serialized = raw_requests(raw, "test", max(largest, 1024))
    rows = []
    for batch in (int(b) for b in FLAGS.batch_sizes):
      # Requests cycle over the test impressions, so consecutive calls are not identical.
      starts = list(range(0, len(serialized) - batch + 1, max(1, batch)))[:64] or [0]
      raw_batches = [serialized[s:s + batch] for s in starts]
      constants = [tf.constant(b) for b in raw_batches]
      feeds = [paths.model_feed(b) for b in raw_batches]
      # The three paths score alike (the session graph is the export's graph).
      a = loaded.signatures["regression"](inputs=constants[0])["outputs"].numpy().reshape(-1)
      np.testing.assert_allclose(paths.full(raw_batches[0]).reshape(-1), a, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(paths.model_only(feeds[0]).reshape(-1), a, rtol=1e-4, atol=1e-6)
      counter = {"i": 0}

      def nxt():
        counter["i"] = (counter["i"] + 1) % len(starts)
        return counter["i"]

      calls = {
          "SavedModel regression": lambda: loaded.signatures["regression"](inputs=constants[nxt()])["outputs"].numpy(),
          "session: full path": lambda: paths.full(raw_batches[nxt()]),
          "session: model alone": lambda: paths.model_only(feeds[nxt()]),
      }
      times = time_calls(calls, FLAGS.calls, FLAGS.seconds, FLAGS.warmup_calls)
      for name, t in times.items():
        rows.append({"batch": batch, "path": name, "calls": len(t),
                     "p50_ms": percentile_ms(t, 50), "p99_ms": percentile_ms(t, 99),
                     "examples_per_second": round(batch * len(t) / sum(t))})
  finally:
    if own_work:
      shutil.rmtree(work, ignore_errors=True)

  overhead = {}
  for batch in (int(b) for b in FLAGS.batch_sizes):
    by = {r["path"]: r for r in rows if r["batch"] == batch}
    full, alone = by["session: full path"], by["session: model alone"]
    overhead[batch] = {"p50": round(full["p50_ms"] / alone["p50_ms"], 2),
                       "throughput": round(alone["examples_per_second"] / full["examples_per_second"], 2)}
  command = ("python benchmarks/serving_latency.py --train_impressions=%d --train_steps=%d "
             "--batch_sizes=%s --calls=%d --seconds=%g" % (
                 FLAGS.train_impressions, FLAGS.train_steps, ",".join(FLAGS.batch_sizes),
                 FLAGS.calls, FLAGS.seconds))
  machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"TensorFlow {tf.__version__}, CPU")
  numbers = {"command": command, "machine": machine, "rows": rows, "overhead": overhead,
             "overhead_target_batch_256": OVERHEAD_TARGET, "max_hash_buckets": FLAGS.max_hash_buckets,
             "fields": len(F.fields("aliccp"))}
  lines = [f"Command: `{command}`", "", f"Machine: {machine}", "",
           "| batch | path | calls | p50 ms | p99 ms | examples/s |",
           "|---:|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['batch']} | {r['path']} | {r['calls']:,} | {r['p50_ms']} | {r['p99_ms']} | "
                 f"{r['examples_per_second']:,} |")
  lines += ["", "Overhead of the full path (raw tf.Example parsing + TFT transform + model) over "
            "the model alone on the transformed features, in one session (full / model alone):", "",
            "| batch | p50 latency ratio | throughput ratio | target |", "|---:|---:|---:|---|"]
  for batch, o in overhead.items():
    target = (f"<= {OVERHEAD_TARGET}: {'met' if o['p50'] <= OVERHEAD_TARGET else 'NOT met'}"
              if batch == 256 else "")
    lines.append(f"| {batch} | {o['p50']} | {o['throughput']} | {target} |")
  results_io.write(FLAGS.results_dir, "serving_latency", numbers, "\n".join(lines))


if __name__ == "__main__":
  define_flags()
  app.run(main)
