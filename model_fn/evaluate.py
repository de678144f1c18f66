"""Evaluation report of trained models on the eval split, the paper's protocol.

  python -m model_fn.evaluate --transform_dir=PREPROCESSED --models=esmm:DIR,base:DIR \
      [--ground_truth=RAW/ground_truth_test.csv] [--output=report.json]

Prints the metrics table (see model_fn/evaluation.py for what each column is).
"""

import json
import sys

import tensorflow as tf
from absl import app, flags

from model_fn.evaluation import evaluate, format_table

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (only when run as a program, so the module imports as a library)."""
  flags.DEFINE_string("transform_dir", None, "Output dir of pipeline.preprocess (its eval split is scored).")
  flags.DEFINE_list("models", None, "NAME:MODEL_DIR pairs to evaluate, e.g. esmm:/m/esmm,base:/m/base.")
  flags.DEFINE_string("ground_truth", None, "ground_truth_test.csv of pipeline.synthetic (optional).")
  flags.DEFINE_string("output", None, "Write the report as JSON here (optional).")
  flags.DEFINE_integer("batch_size", 4096, "Prediction batch size.")


def main(argv):
  del argv
  if not FLAGS.transform_dir or not FLAGS.models:
    print("error: --transform_dir and --models are required", file=sys.stderr)
    return 2
  models = []
  for item in FLAGS.models:
    name, sep, path = item.partition(":")
    if not sep:
      print(f"error: --models item {item!r} is not NAME:MODEL_DIR", file=sys.stderr)
      return 2
    models.append((name, path))
  report = evaluate(models, FLAGS.transform_dir, FLAGS.ground_truth, FLAGS.batch_size)
  print(format_table(report))
  if FLAGS.output:
    with tf.io.gfile.GFile(FLAGS.output, "w") as f:
      json.dump(report, f, indent=2, sort_keys=True)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
