"""TensorFlow Transform preprocessing_fn and the raw feature specs it reads.

Everything here is stateless (hashing, weight alignment, label derivation), so the
transform is identical for every day and every split; nothing is analysed that could
drift between runs. The hash bucket count of each field is written into the
transformed schema (int domain), from where the model reads its table sizes, so
preprocessing and training cannot disagree.
"""

from typing import Dict, Mapping, Optional

import tensorflow as tf
from tensorflow_transform import schema_inference
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from preprocessing import features as F


def raw_feature_spec(fmt: str, with_labels: bool = True, with_sample_id: bool = True) -> Dict:
  """tf.io feature spec of the raw (pre-hash) features of ``fmt``.

  The serving receiver uses ``with_labels=False, with_sample_id=False``: a client
  sends only the raw categorical values, and every one of them may be missing.
  """
  spec = {}
  for f in F.fields(fmt):
    spec[f.raw_ids] = tf.io.VarLenFeature(tf.int64)
    if f.weighted:
      spec[f.raw_weights] = tf.io.VarLenFeature(tf.float32)
  if with_labels:
    for label in F.RAW_LABELS:
      spec[label] = tf.io.FixedLenFeature([], tf.int64)
  if with_sample_id:
    spec[F.SAMPLE_ID] = tf.io.FixedLenFeature([], tf.int64)
  return spec


def raw_metadata(fmt: str) -> dataset_metadata.DatasetMetadata:
  return dataset_metadata.DatasetMetadata(
      schema_utils.schema_from_feature_spec(raw_feature_spec(fmt)))


def _aligned_weights(field: F.Field, ids: tf.SparseTensor, weights: tf.SparseTensor) -> tf.SparseTensor:
  """Weights re-indexed like ``ids``, after checking that both have the same entries."""
  same_count = tf.debugging.assert_equal(
      tf.shape(ids.values), tf.shape(weights.values),
      message=f"field {field.name}: {field.raw_ids} and {field.raw_weights} must have "
              "the same number of values in every example")
  with tf.control_dependencies([same_count]):
    same_rows = tf.debugging.assert_equal(
        ids.indices, tf.identity(weights.indices),
        message=f"field {field.name}: {field.raw_ids} and {field.raw_weights} must have "
                "the same number of values in every example")
  with tf.control_dependencies([same_rows]):
    values = tf.identity(weights.values)
  return tf.SparseTensor(ids.indices, values, ids.dense_shape)


def hash_ids(ids: tf.Tensor, buckets: int) -> tf.Tensor:
  """Stateless hash of raw ids (any dtype) into ``[0, buckets)``."""
  strings = ids if ids.dtype == tf.string else tf.strings.as_string(ids)
  hashed = tf.strings.to_hash_bucket_fast(strings, buckets)
  schema_inference.set_tensor_schema_override(
      hashed, tf.constant(0, tf.int64), tf.constant(buckets - 1, tf.int64))
  return hashed


def make_preprocessing_fn(fmt: str, max_hash_buckets: Optional[int] = None):
  """Returns the TFT ``preprocessing_fn`` for input format ``fmt``."""
  buckets = F.hash_buckets(fmt, max_hash_buckets)
  schema = F.fields(fmt)

  def preprocessing_fn(inputs: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    outputs = {}
    for field in schema:
      ids = inputs[field.raw_ids]
      hashed = hash_ids(ids.values, buckets[field.name])
      outputs[field.ids] = tf.SparseTensor(ids.indices, hashed, ids.dense_shape)
      if field.weighted:
        outputs[field.weights] = _aligned_weights(field, ids, inputs[field.raw_weights])
    if F.CLICK in inputs and F.CONVERSION in inputs:
      click = inputs[F.CLICK]
      conversion = inputs[F.CONVERSION]
      outputs[F.CLICK] = click
      outputs[F.CONVERSION] = conversion
      outputs[F.CTCVR] = click * conversion
    if F.SAMPLE_ID in inputs:
      outputs[F.SAMPLE_ID] = tf.identity(inputs[F.SAMPLE_ID])
    return outputs

  return preprocessing_fn


def transformed_hash_buckets(tft_output) -> Dict[str, int]:
  """Bucket count per transformed id feature, read back from the transformed schema."""
  out = {}
  for feature in tft_output.transformed_metadata.schema.feature:
    if feature.name.startswith(F.ID_PREFIX):
      if not feature.HasField("int_domain"):
        raise ValueError(f"transformed feature {feature.name} has no int domain; "
                         "was it produced by this project's preprocessing_fn?")
      out[feature.name[len(F.ID_PREFIX):]] = int(feature.int_domain.max) + 1
  return out


def raw_example(instance: Mapping, fmt: str) -> tf.train.Example:
  """A raw instance dict (as the readers produce it) as the tf.Example a client would send.

  Empty fields are left out, as a client would; labels and sample_id only if present.
  """
  feature = {}
  spec = raw_feature_spec(fmt)
  for name, s in spec.items():
    if name not in instance:
      continue
    value = instance[name]
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
      continue
    if s.dtype == tf.int64:
      feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
    else:
      feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
  return tf.train.Example(features=tf.train.Features(feature=feature))
