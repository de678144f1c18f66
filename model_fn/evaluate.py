"""Evaluation report of trained models on the eval split, the paper's protocol.

  python -m model_fn.evaluate --data=PREPROCESSED --model_dir=MODEL
  python -m model_fn.evaluate --data=PREPROCESSED --models=esmm:DIR,base:DIR,mmoe:DIR \
      [--ground_truth=RAW/ground_truth_test.csv] [--output=report.json] [--report_dir=DIR]

Prints the metrics table (see model_fn/evaluation.py for what each column is) and, for
MMoE, the gate utilisation per task and expert. Writes a report a person can look at:
ROC curves and reliability diagrams per task, MMoE gate heatmaps (PNG) and one
index.html linking them (model_fn/report.py), into --report_dir (default: REPORT next
to --output, else MODEL/report for the first model).
"""

import json
import os
import sys

import tensorflow as tf
from absl import app, flags

from model_fn import estimator as E
from model_fn import report as R
from model_fn.evaluation import evaluate, format_gates, format_table

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (only when run as a program, so the module imports as a library)."""
  flags.DEFINE_string("transform_dir", None, "Output dir of pipeline.preprocess (its eval split is scored).")
  flags.DEFINE_alias("data", "transform_dir")
  flags.DEFINE_list("models", None, "NAME:MODEL_DIR pairs to evaluate, e.g. esmm:/m/esmm,base:/m/base.")
  flags.DEFINE_string("model_dir", None, "One model to evaluate (named after its params' model).")
  flags.DEFINE_string("ground_truth", None, "ground_truth_test.csv of pipeline.synthetic (optional).")
  flags.DEFINE_string("output", None, "Write the metrics as JSON here (optional).")
  flags.DEFINE_string("report_dir", None, "Charts and index.html go here (see the module doc).")
  flags.DEFINE_integer("batch_size", 4096, "Prediction batch size.")


def _models():
  models = []
  if FLAGS.model_dir:
    models.append((E.load_params(FLAGS.model_dir)["model"], FLAGS.model_dir))
  for item in FLAGS.models or []:
    name, sep, path = item.partition(":")
    if not sep or not name or not path:
      raise ValueError(f"--models item {item!r} is not NAME:MODEL_DIR")
    models.append((name, path))
  if not models:
    raise ValueError("give --model_dir or --models")
  names = [n for n, _ in models]
  if len(set(names)) != len(names) or "oracle" in names:
    raise ValueError(f"model names must be distinct and not 'oracle': {names}")
  for name, path in models:
    if not tf.io.gfile.exists(os.path.join(path, E.PARAMS_FILE)):
      raise ValueError(f"{path} (model {name}) has no {E.PARAMS_FILE}: not a model_dir of model_fn.train")
  return models


def main(argv):
  del argv
  try:
    if not FLAGS.transform_dir:
      raise ValueError("--data (the preprocessing output) is required")
    models = _models()
    report, curves = evaluate(models, FLAGS.transform_dir, FLAGS.ground_truth, FLAGS.batch_size)
  except ValueError as e:     # includes IncompleteTransformOutput, raised by evaluate()
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_table(report))
  gates = format_gates(report)
  if gates:
    print()
    print(gates)
  if FLAGS.output:
    with tf.io.gfile.GFile(FLAGS.output, "w") as f:
      json.dump(report, f, indent=2, sort_keys=True)
  report_dir = FLAGS.report_dir or (
      os.path.join(os.path.dirname(os.path.abspath(FLAGS.output)), "report") if FLAGS.output
      else os.path.join(models[0][1], "report"))
  index = R.write_report(report_dir, report, curves,
                         title=f"Evaluation on {FLAGS.transform_dir}")
  print(f"\nreport: {index}")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
