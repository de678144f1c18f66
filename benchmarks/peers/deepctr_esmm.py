"""DeepCTR 0.9.4's ESMM in the peer benchmark (run with .venv-peers by
benchmarks/peer_throughput.py), used as its documentation shows: SparseFeat columns,
``model.compile("adam", ...)``, ``model.fit`` on a dict of in-memory numpy arrays.
Outputs [pCTR, pCTCVR]; pCVR = pCTCVR / pCTR for the CVR AUC."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402


def main():
  args = common.parse_args(__doc__)
  import tensorflow as tf
  from deepctr.feature_column import SparseFeat
  from deepctr.models import ESMM
  tf.get_logger().setLevel("ERROR")
  tf.keras.utils.set_random_seed(args.seed)
  unknown = set(args.params) - {"keras_policy"}
  if unknown:
    raise SystemExit(f"error: unknown DeepCTR params {sorted(unknown)}")
  if args.params.get("keras_policy"):
    # e.g. mixed_bfloat16: float32 variables, layers computing in bfloat16.
    tf.keras.mixed_precision.set_global_policy(args.params["keras_policy"])
  ids, labels = common.load_split(args.data, "train", args.fields, args.rows)
  columns = [SparseFeat(f"f{f}", vocabulary_size=args.rows[f], embedding_dim=args.embedding_dim)
             for f in args.fields]
  model = ESMM(columns, tower_dnn_hidden_units=tuple(args.hidden), task_types=("binary", "binary"),
               task_names=("ctr", "ctcvr"), seed=args.seed)
  model.compile("adam", loss=["binary_crossentropy", "binary_crossentropy"])
  clock = common.Clock(args.warmup_steps, args.seconds)

  class Timer(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
      clock.step()
      if clock.done:
        self.model.stop_training = True

  x = {f"f{f}": ids[:, j] for j, f in enumerate(args.fields)}
  model.fit(x, [labels["click"], labels["ctcvr"]], batch_size=args.batch_size,
            epochs=args.epochs if args.seconds <= 0 else 1, shuffle=True, verbose=0,
            callbacks=[Timer()])
  predictions = None
  if args.seconds <= 0:
    test_ids, test_labels = common.load_split(args.data, "test", args.fields, args.rows)
    ctr, ctcvr = model.predict({f"f{f}": test_ids[:, j] for j, f in enumerate(args.fields)},
                               batch_size=8192, verbose=0)
    # float32 whatever the policy (under mixed_bfloat16 the heads' outputs are bfloat16).
    ctr, ctcvr = ctr.reshape(-1).astype(np.float32), ctcvr.reshape(-1).astype(np.float32)
    predictions = {"ctr": ctr, "ctcvr": ctcvr, "cvr": np.clip(ctcvr / np.maximum(ctr, 1e-12), 0, 1),
                   "click": test_labels["click"], "conversion": test_labels["conversion"]}
  policy = args.params.get("keras_policy")
  common.write_result(args, "DeepCTR 0.9.4 ESMM (Keras, in-memory numpy" + (f", {policy})" if policy else ")"),
                      clock, predictions)


if __name__ == "__main__":
  main()
