"""Dead units of a trained model: how each hidden layer and output logit behaves on the eval split.

  .venv/bin/python benchmarks/tower_activations.py --data=PREPROCESSED --model_dir=MODEL \
      [--batches=10] [--name=tower_activations_NAME]

Builds the model's prediction graph (the weights evaluation and serving read) over the first
``--batches`` batches of about 4,096 impressions of the eval split and prints, per hidden layer
(ReLU or leaky ReLU), its units, the units that are not positive on any impression scored (dead:
for a ReLU no gradient reaches them, so they stay dead; a leaky ReLU's still pass a fifth of theirs),
the mean share of units positive per impression and the largest activation; per
output logit its mean, standard deviation and range. A tower whose last hidden layer is all
dead predicts its logit's bias for every impression. Writes benchmarks/results/NAME.{json,md}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import results_io  # noqa: E402  (benchmarks/ is this script's directory)
from model_fn import estimator as E  # noqa: E402
from model_fn import input_fn as I  # noqa: E402

FLAGS = flags.FLAGS
BATCH = 4096


def define_flags():
  flags.DEFINE_string("data", None, "Output dir of pipeline.preprocess (its eval split is scored).")
  flags.DEFINE_string("model_dir", None, "A model dir of model_fn.train.")
  flags.DEFINE_integer("batches", 10, "Eval batches of 4,096 impressions scored.", lower_bound=1)
  flags.DEFINE_string("name", "tower_activations", "Results file name.")
  flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                      "Where to write the results.")
  flags.mark_flags_as_required(["data", "model_dir"])


def layer_stats(values: np.ndarray) -> dict:
  """A hidden layer's [impressions, units] activations, or a logit's [impressions]."""
  if values.ndim == 1:
    return {"kind": "logit", "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}
  active = values > 0
  return {"kind": "relu", "units": int(values.shape[1]), "dead": int((~active.any(axis=0)).sum()),
          "active_share": float(active.mean()), "max": float(values.max())}


def activations(model_dir: str, transform_dir: str, batches: int):
  """({layer name: layer_stats} of every hidden layer's activation and output logit of the model's prediction graph,
  the impressions scored)."""
  params = E.load_params(model_dir)
  tft_output = I.load_transform_output(transform_dir)
  with tf.Graph().as_default() as g:
    input_fn = I.make_input_fn(tft_output=tft_output, batch_size=BATCH, training=False,
                               **I.split_input(transform_dir, "eval"))
    features, labels = tf.compat.v1.data.make_one_shot_iterator(input_fn()).get_next()
    E.model_fn_for(params)(features, labels, tf.estimator.ModeKeys.PREDICT, params)
    layers = {op.name: op.outputs[0] for op in g.get_operations()
              if op.type in ("Relu", "LeakyRelu") or (op.type == "BiasAdd" and op.name.endswith("logit/BiasAdd"))}
    got = {name: [] for name in layers}
    with tf.compat.v1.Session() as session:
      tf.compat.v1.train.Saver().restore(session, tf.train.latest_checkpoint(model_dir))
      for _ in range(batches):
        try:
          out = session.run(layers)
        except tf.errors.OutOfRangeError:
          break
        for name, value in out.items():
          got[name].append(np.squeeze(value, axis=-1) if value.shape[-1] == 1 and "logit" in name else value)
  stats = {name: layer_stats(np.concatenate(v)) for name, v in got.items() if v}
  return stats, sum(len(v) for v in next(iter(got.values())))


def markdown(n: dict) -> str:
  lines = [f"# Activations of {n['model_dir']}", "", f"`{n['command']}`: {n['impressions']:,} eval impressions.",
           "", "| layer | units | dead | active share | max |", "|---|---:|---:|---:|---:|"]
  lines += [f"| {name} | {s['units']} | {s['dead']} | {s['active_share']:.3f} | {s['max']:.3g} |"
            for name, s in n["layers"].items() if s["kind"] == "relu"]
  lines += ["", "| logit | mean | std | min | max |", "|---|---:|---:|---:|---:|"]
  lines += [f"| {name} | {s['mean']:.3f} | {s['std']:.4f} | {s['min']:.3f} | {s['max']:.3f} |"
            for name, s in n["layers"].items() if s["kind"] == "logit"]
  return "\n".join(lines)


def main(argv):
  del argv
  layers, impressions = activations(FLAGS.model_dir, FLAGS.data, FLAGS.batches)
  n = {"command": " ".join([".venv/bin/python benchmarks/tower_activations.py", *sys.argv[1:]]),
       "model_dir": FLAGS.model_dir, "impressions": impressions, "layers": layers}
  results_io.write(FLAGS.results_dir, FLAGS.name, n, markdown(n))


if __name__ == "__main__":
  define_flags()
  app.run(main)
