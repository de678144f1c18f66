"""Two facts about this TensorFlow build's CPU arithmetic that the profile of a training step rests on.

  .venv/bin/python benchmarks/onednn_checks.py [--rows=1024] [--cols=360] [--calls=50]

1. What a cast between float32 and bfloat16 costs alone: ``tf.cast`` of a [rows, cols] tensor in
   a ``tf.function`` (10 independent casts per call, --calls calls), both directions, next to a
   float32 multiply of the same tensor. The trace of a training step
   (benchmarks/train_step_profile.py) times each op from its start to its end, which can include
   what it waits for inside a step; this is the cast's own cost to compare with.
2. Whether oneDNN's implicit bfloat16 for float32 math reaches TensorFlow's float32 matmuls:
   ``TF_SET_ONEDNN_FPMATH_MODE=BF16`` (read by TF 2.15) and oneDNN's ``ONEDNN_DEFAULT_FPMATH_MODE=BF16``.
   Each setting runs in a fresh process (both are read once per process) a float32 MatMul and a
   MatMul + BiasAdd + ReLU (which grappler fuses) of a [rows, 252] by [252, cols] product, and
   reports the largest error against float64 relative to the largest value. bfloat16 arithmetic
   shows as an error near 1e-3 (the explicit bfloat16 matmul, run too, is the yardstick);
   float32 as about 1e-7.

Writes benchmarks/results/onednn_checks.{json,md}.
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import results_io  # noqa: E402

FLAGS = flags.FLAGS
SETTINGS = (("none", {}), ("TF_SET_ONEDNN_FPMATH_MODE=BF16", {"TF_SET_ONEDNN_FPMATH_MODE": "BF16"}),
            ("ONEDNN_DEFAULT_FPMATH_MODE=BF16", {"ONEDNN_DEFAULT_FPMATH_MODE": "BF16"}))
FPMATH_VARIABLES = tuple(k for _, env in SETTINGS for k in env)
INNER = 10   # casts per tf.function call
WIDTH = 252  # the matmuls' inner dimension: the peer benchmark's 14 fields x embedding 18


def define_flags():
  flags.DEFINE_integer("rows", 1024, "Rows of the tensors (a training batch).")
  flags.DEFINE_integer("cols", 360, "Columns (the towers' first layer).")
  flags.DEFINE_integer("calls", 50, "Timed calls per cast (each does 10 casts).")
  flags.DEFINE_boolean("matmul_errors_only", False, "Internal: print this process's matmul errors "
                       "as JSON and exit (run once per fpmath setting).")
  flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                      "Output dir.")
  flags.DEFINE_string("name", "onednn_checks", "Results file stem.")


def matmul_errors(rows: int, cols: int) -> dict:
  """Largest |result - float64| / largest |float64| of each matmul form, in this process."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((rows, WIDTH)).astype(np.float32)
  b = rng.standard_normal((WIDTH, cols)).astype(np.float32)
  c = rng.standard_normal(cols).astype(np.float32)
  exact = a.astype(np.float64) @ b.astype(np.float64)
  forms = {
      "float32 MatMul": (tf.function(tf.matmul), exact),
      "float32 MatMul + BiasAdd + ReLU": (
          tf.function(lambda x, y: tf.nn.relu(tf.nn.bias_add(tf.matmul(x, y), c))),
          np.maximum(exact + c.astype(np.float64), 0)),
      "bfloat16 MatMul (explicit casts)": (
          tf.function(lambda x, y: tf.cast(tf.matmul(tf.cast(x, tf.bfloat16), tf.cast(y, tf.bfloat16)),
                                           tf.float32)), exact)}
  out = {}
  for name, (fn, ref) in forms.items():
    got = fn(tf.constant(a), tf.constant(b)).numpy().astype(np.float64)
    out[name] = float(np.abs(got - ref).max() / np.abs(ref).max())
  return out


def cast_ms(rows: int, cols: int, calls: int) -> dict:
  """Milliseconds per op of each cast alone (and of a float32 multiply, for scale)."""
  x32 = tf.constant(np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32))
  x16 = tf.cast(x32, tf.bfloat16)
  ops = {"float32 -> bfloat16": lambda: tf.cast(x32, tf.bfloat16),
         "bfloat16 -> float32": lambda: tf.cast(x16, tf.float32),
         "float32 multiply (x * 1.0)": lambda: x32 * 1.0}
  out = {}
  for name, op in ops.items():
    fn = tf.function(lambda op=op: [op() for _ in range(INNER)])
    fn()
    t = time.perf_counter()
    for _ in range(calls):
      fn()
    out[name] = (time.perf_counter() - t) / calls / INNER * 1e3
  return out


def main(argv):
  if FLAGS.matmul_errors_only:
    print(json.dumps(matmul_errors(FLAGS.rows, FLAGS.cols)))
    return
  errors = {}
  clean = {k: v for k, v in os.environ.items() if k not in FPMATH_VARIABLES}
  for label, env in SETTINGS:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--matmul_errors_only",
                           f"--rows={FLAGS.rows}", f"--cols={FLAGS.cols}"],
                          env={**clean, **env}, capture_output=True, text=True, check=True)
    errors[label] = json.loads(proc.stdout.strip().splitlines()[-1])
  casts = cast_ms(FLAGS.rows, FLAGS.cols, FLAGS.calls)
  forms = list(next(iter(errors.values())))
  machine = results_io.machine()
  lines = ["# oneDNN checks: casts alone, and implicit bfloat16 for float32 matmuls", "",
           f"Command: `python benchmarks/onednn_checks.py {' '.join(argv[1:])}`", "",
           f"Machine: {machine}. TensorFlow {tf.__version__}.", "",
           f"## A cast alone ([{FLAGS.rows}, {FLAGS.cols}], ms per op, {FLAGS.calls} x {INNER} ops)", "",
           "| op | ms |", "|---|---:|"]
  lines += [f"| {k} | {v:.3f} |" for k, v in casts.items()]
  lines += ["", f"## Largest error against float64 ([{FLAGS.rows}, {WIDTH}] x [{WIDTH}, {FLAGS.cols}], "
            "relative to the largest value), by fpmath setting", "",
            "| setting | " + " | ".join(forms) + " |", "|---|" + "---:|" * len(forms)]
  lines += [f"| {label} | " + " | ".join(f"{errors[label][f]:.2e}" for f in forms) + " |"
            for label, _ in SETTINGS]
  reached = [label for label, _ in SETTINGS[1:]
             if errors[label]["float32 MatMul"] > 10 * errors["none"]["float32 MatMul"]]
  lines += ["", "A setting reaches the float32 MatMul when its error there grows towards the "
            f"bfloat16 one. Reached: {', '.join(reached) if reached else 'none'}."]
  results_io.write(FLAGS.results_dir, FLAGS.name,
                   {"casts_ms": casts, "matmul_errors": errors, "fpmath_reaches_float32_matmul": reached,
                    "meta": {"machine": machine, "tensorflow": tf.__version__,
                             "argv": argv[1:]}},
                   "\n".join(lines))


if __name__ == "__main__":
  define_flags()
  app.run(main)
