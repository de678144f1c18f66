"""Serving: a receiver of serialized *raw* tf.Examples that applies the TFT graph in the
SavedModel, and the signatures TF Serving reads.

Signatures (method names as TF Serving expects them):
  regression       tensorflow/serving/regress  inputs: serialized tf.Example -> outputs: pCVR
  serving_default  the same as regression
  predict          tensorflow/serving/predict  examples -> ctr, cvr, ctcvr
"""

import tensorflow as tf

from preprocessing import transform as T

RECEIVER_KEY = "examples"
PREDICT_KEYS = ("ctr", "cvr", "ctcvr")


def export_outputs(predictions):
  regression = tf.estimator.export.RegressionOutput(value=predictions["cvr"])
  return {
      tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY: regression,
      "regression": regression,
      "predict": tf.estimator.export.PredictOutput({k: predictions[k] for k in PREDICT_KEYS}),
  }


def make_serving_input_receiver_fn(tft_output, fmt: str):
  """Raw serialized tf.Examples in; the TFT transform applied in-graph; every field optional."""
  raw_spec = T.raw_feature_spec(fmt, with_labels=False, with_sample_id=False)

  def serving_input_receiver_fn():
    serialized = tf.compat.v1.placeholder(tf.string, [None], name="input_example_tensor")
    raw = tf.io.parse_example(serialized, raw_spec)
    transformed = tft_output.transform_raw_features(raw, drop_unused_features=True)
    return tf.estimator.export.ServingInputReceiver(transformed, {RECEIVER_KEY: serialized})

  return serving_input_receiver_fn
