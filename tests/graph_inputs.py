"""Small transformed-feature batches and model params for tests that build model graphs."""

import numpy as np
import tensorflow as tf

BUCKETS = {"101": 40, "205": 60, "150_14": 30}
BATCH = 6


def feature_batch(seed=0):
  """A batch of transformed features for BUCKETS (150_14 is weighted and multi-valued)."""
  rng = np.random.default_rng(seed)
  feats = {}
  for name, n in BUCKETS.items():
    rows = [list(rng.integers(0, n, size=rng.integers(0, 4))) for _ in range(BATCH)]
    indices = [[r, j] for r, ids in enumerate(rows) for j in range(len(ids))]
    values = [v for ids in rows for v in ids]
    shape = [BATCH, max(1, max(len(r) for r in rows))]
    feats[f"id_{name}"] = tf.SparseTensor(np.array(indices, np.int64).reshape(-1, 2),
                                          np.array(values, np.int64), shape)
    if name == "150_14":
      feats[f"wt_{name}"] = tf.SparseTensor(np.array(indices, np.int64).reshape(-1, 2),
                                            rng.random(len(values)).astype(np.float32), shape)
  return feats


def label_batch(seed=1):
  rng = np.random.default_rng(seed)
  click = (rng.random(BATCH) < 0.5).astype(np.float32)
  conversion = click * (rng.random(BATCH) < 0.5)
  return {"click": tf.constant(click), "conversion": tf.constant(conversion, tf.float32),
          "ctcvr": tf.constant(click * conversion, tf.float32)}


def model_params(model, **kw):
  return dict({"model": model, "hash_buckets": BUCKETS, "embedding_dim": 4, "num_experts": 3,
               "expert_hidden_units": [8, 5], "tower_hidden_units": [6],
               "ctr_hidden_units": [6], "cvr_hidden_units": [6],
               # Read the weights themselves: these graphs predict with the variables they train.
               "dense_ema_decay": 0.0}, **kw)
