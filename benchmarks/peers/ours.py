"""This project's ESMM in the peer benchmark (run with this project's .venv by
benchmarks/peer_throughput.py): the Estimator and esmm_model_fn read the transformed gzip
TFRecords (the train column blocks when the data has them) through model_fn.input_fn, as
`python -m model_fn.train` does; Adam on the dense
layers, and on the tables the optimizer of the configuration's params (the trainer's default:
lazy Adam, updating only the batch's rows). ``--data`` is the
transform output; only ``--fields`` are parsed and embedded, each table ``--table_rows`` rows."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tensorflow as tf  # noqa: E402

import common  # noqa: E402
from model_fn import estimator as E  # noqa: E402
from model_fn import evaluation  # noqa: E402
from model_fn import input_fn as I  # noqa: E402
from model_fn.params import resolve_params  # noqa: E402
from preprocessing import transform as T  # noqa: E402


class ClockHook(tf.estimator.SessionRunHook):
  def __init__(self, clock: common.Clock):
    self.clock = clock

  def after_run(self, run_context, run_values):
    self.clock.step()
    if self.clock.done:
      run_context.request_stop()


def main():
  args = common.parse_args(__doc__)
  tf.get_logger().setLevel("ERROR")
  tft_output = I.load_transform_output(args.data)
  params = resolve_params({
      "model": "esmm", "format": I.transform_format(args.data),
      "hash_buckets": T.transformed_hash_buckets(tft_output), "fields": args.fields,
      "table_rows": args.table_rows, "embedding_dim": args.embedding_dim,
      "ctr_hidden_units": args.hidden, "cvr_hidden_units": args.hidden, **args.params})
  model_dir = os.path.join(args.work_dir, "model")
  estimator = E.make_estimator(model_dir, params, seed=args.seed, save_checkpoints_steps=10**9)
  E.save_params(model_dir, params)
  clock = common.Clock(args.warmup_steps, args.seconds)
  pattern, block_rows = I.train_files(args.data)
  train_input = I.make_input_fn(pattern, tft_output, args.batch_size, training=True,
                                num_epochs=None if args.seconds > 0 else args.epochs,
                                seed=args.seed, fields=args.fields, block_rows=block_rows)
  estimator.train(train_input, hooks=[ClockHook(clock)])
  predictions = None
  if args.seconds <= 0:
    p = evaluation.predict(model_dir, args.data)
    predictions = {"ctr": p["ctr"], "cvr": p["cvr"], "ctcvr": p["ctcvr"],
                   "click": p["label_click"], "conversion": p["label_conversion"]}
  common.write_result(args, "this project (Estimator, TFRecords)", clock, predictions)


if __name__ == "__main__":
  main()
