"""TensorFlow Transform preprocessing_fn and the raw feature specs it reads.

Everything here is stateless (hashing, weight alignment, label derivation, the hour of
day of Avazu's raw hour, feature crosses), so the transform is identical for every day
and every split; nothing is analysed that could drift between runs. The hash bucket
count of each field (crosses and the hour of day included) is written into the
transformed schema (int domain), from where the model reads its table sizes, so
preprocessing and training cannot disagree.

No Beam here (the trainer and the exporter import this module): the Beam side of the job,
encoding TFT's output into records and blocks, is pipeline/encode.py.
"""

from typing import Dict, List, Mapping, Optional, Sequence

import tensorflow as tf
import tensorflow_transform as tft
from tensorflow_transform import schema_inference
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from preprocessing import features as F

_DTYPES = {F.INT64: tf.int64, F.STRING: tf.string}


def raw_feature_spec(fmt: str, with_labels: bool = True, with_sample_id: bool = True,
                     labels: Optional[Sequence[str]] = None) -> Dict:
  """tf.io feature spec of the raw (pre-hash) features of ``fmt``.

  ``labels``: the raw labels the input has (default both ``click`` and ``conversion``;
  Avazu logs may have ``click`` only). ``with_sample_id`` adds the passthrough keys:
  ``sample_id`` (string for Avazu) and, for Avazu, ``day``.

  The serving receiver uses ``with_labels=False, with_sample_id=False``: a client
  sends only the raw categorical values, and every one of them may be missing.
  """
  spec = {}
  for f in F.fields(fmt):
    spec[f.raw_ids] = tf.io.VarLenFeature(_DTYPES[f.raw_dtype])
    if f.weighted:
      spec[f.raw_weights] = tf.io.VarLenFeature(tf.float32)
  if with_labels:
    for label in (F.RAW_LABELS if labels is None else labels):
      if label not in F.RAW_LABELS:
        raise ValueError(f"unknown raw label {label!r}; known: {F.RAW_LABELS}")
      spec[label] = tf.io.FixedLenFeature([], tf.int64)
  if with_sample_id:
    spec[F.SAMPLE_ID] = tf.io.FixedLenFeature([], _DTYPES[F.SAMPLE_ID_DTYPES[fmt]])
    for name in F.PASSTHROUGH_INT64[fmt]:
      spec[name] = tf.io.FixedLenFeature([], tf.int64)
  return spec


def raw_metadata(fmt: str, labels: Optional[Sequence[str]] = None,
                 layout: str = F.ROWS) -> dataset_metadata.DatasetMetadata:
  spec = raw_feature_spec(fmt, labels=labels)
  if layout == F.GROUPED:
    spec = grouped_spec(fmt, spec, raw=True)
  return dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))


def grouped_spec(fmt: str, row_spec: Mapping[str, object], raw: bool = False) -> Dict[str, object]:
  """The feature spec of grouped records (F.GROUPED) for the per-impression ``row_spec`` (raw
  or transformed): every feature a list per group; group-level fields as they are, the other
  fields' values concatenated over the group's impressions with their per-impression counts
  ``n_<field>``, the per-impression scalars (labels, sample id) one value per impression."""
  out = {}
  for name, s in row_spec.items():
    out[name] = s if isinstance(s, tf.io.VarLenFeature) else tf.io.VarLenFeature(s.dtype)
  for f in F.fields(fmt):
    ids = f.raw_ids if raw else f.ids
    if ids in row_spec and not f.group_level:
      out[f.lengths] = tf.io.VarLenFeature(tf.int64)
  return out


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


def _set_domain(ids: tf.Tensor, buckets: int) -> tf.Tensor:
  """Records ``[0, buckets)`` as the int domain of ``ids`` in the transformed schema."""
  schema_inference.set_tensor_schema_override(
      ids, tf.constant(0, tf.int64), tf.constant(buckets - 1, tf.int64))
  return ids


def hash_ids(ids: tf.Tensor, buckets: int) -> tf.Tensor:
  """Stateless hash of raw ids (any dtype) into ``[0, buckets)``."""
  strings = ids if ids.dtype == tf.string else tf.strings.as_string(ids)
  return _set_domain(tf.strings.to_hash_bucket_fast(strings, buckets), buckets)


def hour_of_day_ids(hours: tf.Tensor, buckets: int) -> tf.Tensor:
  """The hour of day (0-23) of raw ``YYMMDDHH`` hours, as ids in ``[0, buckets)``.

  With 24 or more buckets the id is the hour itself (no collisions); a smaller cap
  folds the hours modulo ``buckets``.
  """
  hour = tf.math.floormod(tf.cast(hours, tf.int64), 100)
  return _set_domain(tf.math.floormod(hour, buckets), buckets)


def cross_values(sides: Sequence[tf.SparseTensor]) -> tf.SparseTensor:
  """Every pair of values of the crossed fields, joined with F.CROSS_SEPARATOR (strings).

  Integer values are written in decimal; a row missing either side has no value.
  """
  return tf.sparse.cross(list(sides), separator=F.CROSS_SEPARATOR)


def make_preprocessing_fn(fmt: str, max_hash_buckets: Optional[int] = None,
                          crosses: Sequence[F.Field] = (), labels: Optional[Sequence[str]] = None):
  """Returns the TFT ``preprocessing_fn`` for input format ``fmt``.

  ``crosses``: cross fields (``F.parse_crosses``) hashed into ``id_<a>_x_<b>``.
  ``labels``: the raw labels of the input (default click and conversion); ``ctcvr`` is
  made only when both are there.
  """
  crosses = tuple(crosses)
  buckets = F.hash_buckets(fmt, max_hash_buckets, crosses)
  schema = F.fields(fmt)
  for cross in crosses:
    if F.cross_field(fmt, *cross.crossed).name != cross.name:
      raise ValueError(f"{cross.name} is not a cross of format {fmt!r}")
  raw_labels = F.RAW_LABELS if labels is None else tuple(labels)
  out_labels = F.transformed_labels(raw_labels)
  passthrough = (F.SAMPLE_ID,) + F.PASSTHROUGH_INT64[fmt]

  def preprocessing_fn(inputs: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    outputs = _hashed_fields(inputs, schema, buckets)
    for cross in crosses:
      pairs = cross_values([inputs[F.field(fmt, name).raw_ids] for name in cross.crossed])
      outputs[cross.ids] = tf.SparseTensor(
          pairs.indices, hash_ids(pairs.values, buckets[cross.name]), pairs.dense_shape)
    if all(label in inputs for label in raw_labels):
      outputs[F.CLICK] = inputs[F.CLICK]
      if F.CTCVR in out_labels:
        outputs[F.CONVERSION] = inputs[F.CONVERSION]
        outputs[F.CTCVR] = inputs[F.CLICK] * inputs[F.CONVERSION]
    for name in passthrough:
      if name in inputs:
        outputs[name] = tf.identity(inputs[name])
    return outputs

  return preprocessing_fn


def _hashed_fields(inputs: Mapping[str, tf.Tensor], schema: Sequence[F.Field],
                   buckets: Mapping[str, int]) -> Dict[str, tf.Tensor]:
  """Each field's hashed ids (and aligned weights): one id per raw value, in place."""
  outputs = {}
  for field in schema:
    ids = inputs[field.raw_ids]
    if field.transform == F.HOUR_OF_DAY:
      hashed = hour_of_day_ids(ids.values, buckets[field.name])
    else:
      hashed = hash_ids(ids.values, buckets[field.name])
    outputs[field.ids] = tf.SparseTensor(ids.indices, hashed, ids.dense_shape)
    if field.weighted:
      outputs[field.weights] = _aligned_weights(field, ids, inputs[field.raw_weights])
  return outputs


def _copy(sparse: tf.SparseTensor) -> tf.SparseTensor:
  return tf.SparseTensor(sparse.indices, tf.identity(sparse.values), sparse.dense_shape)


def make_grouped_preprocessing_fn(fmt: str, max_hash_buckets: Optional[int] = None,
                                  labels: Optional[Sequence[str]] = None):
  """The TFT ``preprocessing_fn`` of grouped records (raw_metadata(..., layout=F.GROUPED)).

  Every id is hashed as make_preprocessing_fn hashes it (the same function of the same value),
  so a grouped record holds the ids of its impressions' transformed rows; the per-impression
  counts ``n_<field>``, the labels and the sample ids pass through, and ``ctcvr`` is made per
  impression. Formats with analyzers or crosses are not grouped (pipeline.preprocess refuses).
  """
  buckets = F.hash_buckets(fmt, max_hash_buckets)
  schema = F.fields(fmt)
  raw_labels = F.RAW_LABELS if labels is None else tuple(labels)
  out_labels = F.transformed_labels(raw_labels)

  def preprocessing_fn(inputs: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    outputs = _hashed_fields(inputs, schema, buckets)
    for field in schema:
      if not field.group_level:
        outputs[field.lengths] = _copy(inputs[field.lengths])
    click = inputs[F.CLICK]
    outputs[F.CLICK] = _copy(click)
    if F.CTCVR in out_labels:
      conversion = inputs[F.CONVERSION]
      same = tf.debugging.assert_equal(tf.shape(click.values), tf.shape(conversion.values),
                                       message="a group must have one click and one conversion per impression")
      with tf.control_dependencies([same]):
        outputs[F.CONVERSION] = _copy(conversion)
        outputs[F.CTCVR] = tf.SparseTensor(click.indices, click.values * conversion.values, click.dense_shape)
    outputs[F.SAMPLE_ID] = _copy(inputs[F.SAMPLE_ID])
    return outputs

  return preprocessing_fn


def analyzed_columns(preprocessing_fn, specs) -> List[str]:
  """The raw columns that ``preprocessing_fn``'s TFT analyzers read, for raw input of ``specs``
  (feature specs or TypeSpecs by column); empty when nothing in it is computed from the data."""
  return sorted(tft.get_analyze_input_columns(preprocessing_fn, specs, force_tf_compat_v1=True))


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

  Empty fields are left out, as a client would; labels and passthrough keys only if
  present. String values (Avazu's hex ids, its sample id) become bytes.
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
    elif s.dtype == tf.string:
      feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]))
    else:
      feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
  return tf.train.Example(features=tf.train.Features(feature=feature))
