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
from absl import flags

from model_fn import estimator as E
from model_fn import report as R
from model_fn.evaluation import constant_heads, evaluate, format_gates, format_table
from model_fn.metrics import finite_or_none
from preprocessing import cli

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS):
  """The command-line flags (only when run as a program, so the module imports as a library),
  defined into ``fv``; validate_flags checks them together before any work."""
  fl = cli.Define(fv)
  fl.DEFINE_string("transform_dir", None, "Output dir of pipeline.preprocess (its eval split is scored).")
  fl.DEFINE_alias("data", "transform_dir")
  fl.DEFINE_list("models", None, "NAME:MODEL_DIR pairs to evaluate, e.g. esmm:/m/esmm,base:/m/base.")
  fl.DEFINE_string("model_dir", None, "One model to evaluate (named after its params' model).")
  fl.DEFINE_string("ground_truth", None, "ground_truth_test.csv of datagen.synthetic (optional).")
  fl.DEFINE_string("output", None, "Write the metrics as JSON here (optional).")
  fl.DEFINE_string("report_dir", None, "Charts and index.html go here (see the module doc).")
  fl.DEFINE_integer("batch_size", 4096, "Prediction batch size.", lower_bound=1)


def validate_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Every flag before any work (run by the flags parser, preprocessing/cli.py): the paths that
  must exist do, and the models are named NAME:MODEL_DIR pairs of model_fn.train's model dirs."""
  if not fv["transform_dir"].value:
    raise cli.UsageError("--data (the preprocessing output) is required")
  if not tf.io.gfile.isdir(fv["transform_dir"].value):
    raise cli.UsageError(f"--data={fv['transform_dir'].value} does not exist (give the --output_dir of a "
                         "pipeline.preprocess run)")
  if fv["ground_truth"].value and not tf.io.gfile.exists(fv["ground_truth"].value):
    raise cli.UsageError(f"--ground_truth={fv['ground_truth'].value} does not exist")
  try:
    _models(fv, load=False)
  except ValueError as e:
    raise cli.UsageError(str(e)) from None


def _models(fv: flags.FlagValues = FLAGS, load: bool = True):
  """[(name, model_dir)] of --model_dir and --models; ``load`` False: checks without reading params."""
  models = []
  if fv["model_dir"].value:
    model_dir = fv["model_dir"].value
    if not tf.io.gfile.isdir(model_dir):
      raise ValueError(f"--model_dir={model_dir} does not exist")
    models.append((E.load_params(model_dir)["model"] if load and tf.io.gfile.exists(
        os.path.join(model_dir, E.PARAMS_FILE)) else f"(--model_dir {model_dir})", model_dir))
  for item in fv["models"].value or []:
    name, sep, path = item.partition(":")
    if not sep or not name or not path:
      raise ValueError(f"--models item {item!r} is not NAME:MODEL_DIR")
    if not tf.io.gfile.isdir(path):
      raise ValueError(f"--models: {path} (model {name}) does not exist")
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
    return cli.EXIT_USAGE
  print(format_table(report))
  for head in constant_heads(report):
    print(f"warning: {head} predicts the same value for every impression (a dead tower: its AUC "
          "is 0.5 by construction); train again, e.g. with another --seed or --pooling", file=sys.stderr)
  gates = format_gates(report)
  if gates:
    print()
    print(gates)
  if FLAGS.output:
    with tf.io.gfile.GFile(FLAGS.output, "w") as f:   # an undefined metric: null, with a warning
      json.dump({name: finite_or_none(row, f"{name}'s metrics") for name, row in report.items()}, f,
                indent=2, sort_keys=True)
  report_dir = FLAGS.report_dir or (
      # Beside --output (a gs:// URL stays one).
      os.path.join(os.path.dirname(cli.absolute(FLAGS.output)), "report") if FLAGS.output
      else os.path.join(models[0][1], "report"))
  index = R.write_report(report_dir, report, curves,
                         title=f"Evaluation on {FLAGS.transform_dir}")
  print(f"\nreport: {index}")
  return 0


if __name__ == "__main__":
  cli.run(main, define_flags, validate_flags)
