"""Serving: a receiver of serialized *raw* tf.Examples that applies the TFT graph in the
SavedModel, and the signatures TF Serving reads.

Signatures (method names as TF Serving expects them):
  regression       tensorflow/serving/regress  inputs: serialized tf.Example -> outputs: pCVR
  serving_default  the same as regression
  predict          tensorflow/serving/predict  examples -> ctr, cvr, ctcvr
"""

import tensorflow as tf

from preprocessing import features as F
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


def _checked_weights(raw, fmt: str):
  """Weights must be finite and non-negative, as the preprocessing job requires of training rows:
  a request that breaks this fails with the field's name instead of getting a score."""
  raw = dict(raw)
  for field in F.fields(fmt):
    if not field.weighted:
      continue
    w = raw[field.raw_weights]
    ok = tf.debugging.Assert(
        tf.reduce_all(tf.math.is_finite(w.values) & (w.values >= 0)),
        [f"{field.raw_weights}: weights must be finite and non-negative; got", w.values], summarize=8)
    with tf.control_dependencies([ok]):
      raw[field.raw_weights] = tf.SparseTensor(w.indices, tf.identity(w.values), w.dense_shape)
  return raw


# The name of the node that refuses a request holding bytes that are not a serialized tf.Example:
# TensorFlow's error names it ("[[{{node ...}}]]").
NOT_AN_EXAMPLE = "inputs_must_be_serialized_tf_Examples"


def _checked_serialized(serialized: tf.Tensor) -> tf.Tensor:
  """``serialized``, once every element has decoded as a tf.Example proto.

  tf.io.parse_example fails on such bytes with an error that quotes them; from Python (a loaded
  SavedModel's signature) TensorFlow then fails to decode its own message as UTF-8 and raises a
  misleading ``TypeError: ... unexpected keyword argument 'inputs'``. tf.io.decode_proto fails
  first instead, with a DataLossError that names this node and quotes nothing."""
  check = tf.io.decode_proto(serialized, "tensorflow.Example", ["features"], [tf.string],
                             name=NOT_AN_EXAMPLE)
  # A data dependency (a control dependency alone let the graph run ParseExample first): the
  # positions of ``serialized`` plus 0 computed from decode_proto's output (its sizes are >= 0).
  zero = tf.reduce_sum(tf.minimum(check.sizes, 0))
  return tf.gather(serialized, tf.range(tf.size(serialized)) + tf.cast(zero, tf.int32))


def make_serving_input_receiver_fn(tft_output, fmt: str):
  """Raw serialized tf.Examples in; the TFT transform applied in-graph.

  Every field is optional and unknown fields are ignored; a field of the wrong type
  (``Data types don't match``, naming the key), weights that are not finite and
  non-negative, ids and weights of unequal length, or bytes that are not a serialized
  tf.Example (a DataLossError naming NOT_AN_EXAMPLE) fail the request with an error."""
  raw_spec = T.raw_feature_spec(fmt, with_labels=False, with_sample_id=False)

  def serving_input_receiver_fn():
    serialized = tf.compat.v1.placeholder(tf.string, [None], name="input_example_tensor")
    raw = _checked_weights(tf.io.parse_example(_checked_serialized(serialized), raw_spec), fmt)
    transformed = tft_output.transform_raw_features(raw, drop_unused_features=True)
    return tf.estimator.export.ServingInputReceiver(transformed, {RECEIVER_KEY: serialized})

  return serving_input_receiver_fn
