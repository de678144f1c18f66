"""Transformed TFRecords -> (features, labels) with tf.data: batched parsing, prefetch, shuffle."""

import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from preprocessing import features as F

# Records per shuffled unit in training (see make_input_fn).
SHUFFLE_BLOCK = 8
# Read buffer per TFRecord file (bytes): larger reads cut the gzip reader's per-call overhead.
READ_BUFFER = 8 << 20


class IncompleteTransformOutput(ValueError):
  """The directory is not the output of a finished preprocessing run."""


def load_transform_output(transform_dir: str) -> tft.TFTransformOutput:
  """The TFT output of a finished preprocessing run (refuses a partial one)."""
  marker = os.path.join(transform_dir, F.RECONCILIATION)
  if not tf.io.gfile.isdir(transform_dir):
    raise IncompleteTransformOutput(f"{transform_dir} does not exist (give the --output_dir of a "
                                    "pipeline.preprocess run)")
  if not tf.io.gfile.exists(marker):
    raise IncompleteTransformOutput(
        f"{transform_dir} has no {F.RECONCILIATION}: it is not the output of a finished "
        "pipeline.preprocess run (still running, killed, or the wrong directory)")
  return tft.TFTransformOutput(transform_dir)


class MissingLabelError(ValueError):
  """The transform output lacks a label the model trains on."""


def require_labels(tft_output: tft.TFTransformOutput, model: str, transform_dir: str = "") -> None:
  """Stops before any training when a label the model needs is not in the transform output.

  Every model of the project trains on click and conversion (on the CTCVR label click AND
  conversion over all impressions, on conversion over clicked impressions, or both).
  """
  spec = tft_output.transformed_feature_spec()
  missing = [name for name in F.LABELS if name not in spec]
  if missing:
    raise MissingLabelError(
        f"model {model!r} trains on the labels {list(F.LABELS)}, but the transform output "
        f"{transform_dir or ''} has no {' / '.join(repr(m) for m in missing)} "
        "(its raw input had no 'conversion' column, so it was preprocessed click-only); "
        "preprocess logs that carry a conversion column to train this model")


def _reconciliation(transform_dir: str) -> dict:
  with tf.io.gfile.GFile(os.path.join(transform_dir, F.RECONCILIATION)) as f:
    return json.load(f)


class EmptySplit(ValueError):
  """A split of the transform output has no rows: training or evaluating on it would report
  undefined (NaN) metrics, or none."""


def require_rows(transform_dir: str, splits=("train", "eval")) -> None:
  """Refuses a transform output whose ``splits`` wrote no rows, from the counts of its
  reconciliation.json, before anything is trained or written. A split with rows but no
  positive of a label is not refused (that label's AUC is then undefined, reported as null)."""
  load_transform_output(transform_dir)      # a missing or unfinished output: its own error
  recorded = _reconciliation(transform_dir).get("splits", {})
  for split in splits:
    rows = int((recorded.get(split) or {}).get("rows_written", 0))
    if rows == 0:
      raise EmptySplit(f"the {split} split of {transform_dir} has no rows (reconciliation.json: "
                       f"splits.{split}.rows_written = 0): there is nothing to "
                       f"{'train on' if split == 'train' else 'evaluate on'}, and its metrics would be "
                       "undefined; preprocess inputs with rows in both splits")


def transform_format(transform_dir: str) -> str:
  """The raw input format a preprocessing run read (recorded in its reconciliation.json)."""
  return _reconciliation(transform_dir)["format"]


def split_rows(transform_dir: str, split: str) -> int:
  """Rows written for ``split`` ('train' or 'eval') by the preprocessing run."""
  return int(_reconciliation(transform_dir)["splits"][split]["rows_written"])


def base_rates(transform_dir: str) -> Optional[Dict[str, float]]:
  """{"ctr": clicks / impressions, "cvr": conversions / clicks} of the train split, from the
  label counts the preprocessing run recorded (None for an output without them). A half
  pseudo-count keeps each rate strictly between 0 and 1."""
  train = _reconciliation(transform_dir)["splits"]["train"]
  positives = train.get("label_positives") or {}
  if F.CLICK not in positives or F.CTCVR not in positives:
    return None
  rows, clicks, conversions = int(train["rows_written"]), positives[F.CLICK], positives[F.CTCVR]
  return {"ctr": (clicks + 0.5) / (rows + 1.0), "cvr": (conversions + 0.5) / (clicks + 1.0)}


def layout(transform_dir: str) -> str:
  """The storage layout of a preprocessing run's output (F.LAYOUTS)."""
  return _reconciliation(transform_dir).get("layout", F.ROWS)


def rows_per_group(transform_dir: str, split: str = "train") -> int:
  """Impressions per grouped record of ``split``, on average (at least 1)."""
  r = _reconciliation(transform_dir)["splits"][split]
  return max(1, round(int(r["rows_written"]) / max(1, int(r.get("groups_written") or 0))))


def distinct_ids(transform_dir: str) -> Optional[Dict[str, int]]:
  """{field: distinct hashed ids in the train split} the preprocessing run counted (None for an
  output without them)."""
  return _reconciliation(transform_dir)["splits"]["train"].get("distinct_ids")


def train_records(transform_dir: str, block_rows: int) -> int:
  """Records of the training input: blocks when training reads blocks, groups when the output is
  grouped, else rows."""
  train = _reconciliation(transform_dir)["splits"]["train"]
  if layout(transform_dir) == F.GROUPED:
    return int(train.get("groups_written", 0))
  if block_rows:
    return int(train.get("blocks", {}).get("blocks_written", 0))
  return int(train["rows_written"])


def split_files(transform_dir: str, split: str) -> str:
  return os.path.join(transform_dir, split, "part-*.tfrecord.gz")


def split_input(transform_dir: str, split: str) -> Dict[str, object]:
  """make_input_fn's arguments that read ``split`` ('train' or 'eval') record by record:
  ``file_pattern``, and for a grouped output ``grouped`` with ``block_rows`` its impressions per
  group."""
  if layout(transform_dir) == F.GROUPED:
    return {"file_pattern": split_files(transform_dir, split), "grouped": True,
            "block_rows": rows_per_group(transform_dir, split)}
  return {"file_pattern": split_files(transform_dir, split)}


TRAIN_INPUTS = ("auto", "blocks", "examples")
HOLDOUTS = ("all", "exclude", "only")


def train_files(transform_dir: str, train_input: str = "auto") -> Tuple[str, int]:
  """(file pattern, rows per block) of the training input: the column blocks when the run wrote
  them (``auto``, ``blocks``), else the train tf.Examples (rows per block 0)."""
  if train_input not in TRAIN_INPUTS:
    raise ValueError(f"train_input must be one of {TRAIN_INPUTS}, got {train_input!r}")
  if layout(transform_dir) == F.GROUPED:
    if train_input != "auto":
      raise ValueError(f"{transform_dir} is grouped (--layout=grouped): its train split is grouped "
                       f"records; train_input must be 'auto', got {train_input!r}")
    return split_files(transform_dir, "train"), rows_per_group(transform_dir)
  rec = _reconciliation(transform_dir)
  blocks = rec["splits"]["train"].get("blocks")
  if train_input == "examples" and not rec.get("train_examples", True):
    raise ValueError(f"{transform_dir} has no train tf.Examples (preprocessed with "
                     "--notrain_examples): train on its blocks (train_input 'blocks' or 'auto') "
                     "or preprocess again")
  if train_input == "examples" or (train_input == "auto" and not blocks):
    return split_files(transform_dir, "train"), 0
  if not blocks:
    raise ValueError(f"{transform_dir} has no train blocks (preprocessed with --train_block_rows=0 "
                     "or before blocks existed): train on its tf.Examples (train_input 'examples' or "
                     "'auto') or preprocess again")
  return os.path.join(transform_dir, F.BLOCKS_DIR, "part-*.tfrecord.gz"), int(blocks["block_rows"])


def make_input_fn(file_pattern: str, tft_output: tft.TFTransformOutput, batch_size: int,
                  training: bool, num_epochs: Optional[int] = None, shuffle_buffer: int = 50_000,
                  seed: Optional[int] = None, labels_as_features: bool = False,
                  fields: Optional[Sequence[str]] = None, block_rows: int = 0,
                  holdout: str = "all", holdout_fraction: float = 0.05, start_at: int = 0,
                  grouped: bool = False):
  """An Estimator input_fn over gzip TFRecords of transformed tf.Examples, or (``block_rows`` > 0)
  of column blocks of up to ``block_rows`` rows each (train_files).

  Training: files shuffled, and examples in blocks of SHUFFLE_BLOCK consecutive records through a
  buffer of ``shuffle_buffer`` examples; repeated ``num_epochs`` times (None: forever). On a
  cluster (the Estimator passes its RunConfig) the chief and each worker train on their own
  shard: whole files when there are at least as many files as training tasks, else every
  N-th example.
  Evaluation/prediction: one deterministic pass. Examples are batched before parsing
  so that parsing is vectorised. With ``labels_as_features`` the labels also stay in
  the features dict (for prediction with passthrough of labels and sample ids). With
  ``fields`` (a model's ``params['fields']``) only those fields' ids and weights are parsed.

  Blocks: a block is the shuffled unit (its rows are a random draw from the ~1k rows around it,
  see EncodeBlocks, and the job writes the blocks in a random order over the whole split, see
  ShuffleBlocks, so the buffer need not hold the split to mix users), and a batch is ``max(1, round(batch_size / block_rows))`` blocks, so it has
  that many times ``block_rows`` rows, fewer where a block is short (the last of each of the
  job's RecordBatches). Reading and parsing a few blocks per batch costs about a quarter of the CPU of
  reading and parsing a thousand tf.Examples (benchmarks/train_step_profile.py).

  ``holdout``: ``all`` reads every record; ``exclude`` leaves out the held-out slice (the records,
  or blocks, whose hash falls in one of ``holdout_buckets(holdout_fraction)`` buckets) and ``only``
  reads just that slice: the same records on every run, whatever the order or the seed.
  ``start_at`` (training, ``num_epochs`` None): the stream of records starts that many records
  in and wraps around, so that the seed that picks it changes which data come early and which
  late in the run, not only the order within the shuffle buffer.

  ``grouped``: the records are grouped (F.GROUPED, one per common-features row; ``block_rows``
  then is the impressions per group on average, so a batch is about ``batch_size`` impressions
  of whole groups). The features are grouped_parser's: the user-side fields one row per group,
  the rest one row per impression, and F.GROUP_INDEX.
  """
  if holdout not in HOLDOUTS:
    raise ValueError(f"holdout must be one of {HOLDOUTS}, got {holdout!r}")
  spec = feature_spec(tft_output, fields)
  if grouped:
    parse = grouped_parser(spec, transform_format_of(tft_output))
    block_rows = max(1, block_rows)
  else:
    parse = block_parser(spec) if block_rows else (lambda serialized: tf.io.parse_example(serialized, spec))

  def features_and_labels(serialized):
    return _split(parse(serialized), labels_as_features)

  def input_fn(config=None):
    ds = _records(file_pattern, training, seed, config)
    if holdout != "all":
      ds = ds.filter(_holdout_filter(holdout_buckets(holdout_fraction), holdout == "only"))
    if training and start_at > 0 and num_epochs is None:
      ds = ds.repeat().skip(start_at)
    if block_rows:
      if training:
        ds = ds.shuffle(max(1, shuffle_buffer // block_rows), seed=seed, reshuffle_each_iteration=True)
        ds = ds.repeat(num_epochs)
      ds = ds.batch(max(1, round(batch_size / block_rows)))
    elif training:
      # Shuffled in blocks of SHUFFLE_BLOCK consecutive records: a per-record shuffle cost
      # about as much CPU as reading and parsing together (benchmarks/peer_throughput.py).
      ds = ds.batch(SHUFFLE_BLOCK)
      ds = ds.shuffle(max(1, shuffle_buffer // SHUFFLE_BLOCK), seed=seed, reshuffle_each_iteration=True)
      ds = ds.repeat(num_epochs)
      ds = ds.rebatch(batch_size)
    else:
      ds = ds.batch(batch_size)
    ds = ds.map(features_and_labels, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)

  return input_fn


def holdout_buckets(fraction: float) -> int:
  """The hash buckets of a held-out slice of about ``fraction``: the slice is one of them."""
  return max(2, round(1 / fraction))


def holdout_share(fraction: float) -> float:
  """The share of the records a held-out slice of about ``fraction`` holds (0 for none)."""
  return 1.0 / holdout_buckets(fraction) if fraction > 0 else 0.0


def _holdout_filter(buckets: int, in_holdout: bool):
  """A tf.data predicate: whether a record's hash bucket (of ``buckets``) is 0 equals ``in_holdout``."""

  def keep(record):
    return tf.equal(tf.equal(tf.strings.to_hash_bucket_fast(record, buckets), 0), in_holdout)

  return keep


def _records(file_pattern: str, training: bool, seed: Optional[int], config) -> tf.data.Dataset:
  """The records of the files (this task's shard of them on a cluster), files shuffled in training."""
  files = tf.io.gfile.glob(file_pattern)
  if not files:
    raise ValueError(f"no TFRecord file matches {file_pattern}")
  shards, index = training_shard(config) if training else (1, 0)
  by_file = len(files) >= shards
  ds = tf.data.Dataset.from_tensor_slices(sorted(files))
  if shards > 1 and by_file:
    ds = ds.shard(shards, index)
  if training:
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP", buffer_size=READ_BUFFER),
                     cycle_length=min(4, len(files)), block_length=16,
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if shards > 1 and not by_file:
    ds = ds.shard(shards, index)
  return ds


def block_parser(spec: Dict[str, object]):
  """serialized blocks [n] -> the features of all their rows, as tf.io.parse_example of the rows'
  tf.Examples with ``spec`` would give them (SparseTensors for VarLen features)."""
  block_spec = {}
  for name, s in spec.items():
    block_spec[name] = tf.io.VarLenFeature(s.dtype)
    if isinstance(s, tf.io.VarLenFeature):
      block_spec[name + F.BLOCK_LENGTHS_SUFFIX] = tf.io.VarLenFeature(tf.int64)
    elif not isinstance(s, tf.io.FixedLenFeature):
      raise ValueError(f"feature {name}: blocks hold VarLen and FixedLen features, not {type(s).__name__}")

  def parse(serialized):
    blocks = tf.io.parse_example(serialized, block_spec)
    out, rows = {}, None
    for name, s in spec.items():
      if isinstance(s, tf.io.VarLenFeature):
        lengths = blocks[name + F.BLOCK_LENGTHS_SUFFIX].values
        out[name] = tf.RaggedTensor.from_row_lengths(blocks[name].values, lengths).to_sparse()
        rows = tf.size(lengths, out_type=tf.int64)
    for name, s in spec.items():
      if isinstance(s, tf.io.FixedLenFeature):
        values = blocks[name].values
        width = int(np.prod(s.shape))
        checks = []
        if rows is not None:
          checks.append(tf.debugging.assert_equal(
              tf.size(values, out_type=tf.int64), rows * width,
              message=f"a block's {name} does not have {width} value(s) per row"))
        with tf.control_dependencies(checks):
          out[name] = tf.reshape(values, [-1] + list(s.shape))
    return out

  return parse


def transform_format_of(tft_output: tft.TFTransformOutput) -> str:
  """The raw format whose fields the transform output has."""
  spec = tft_output.transformed_feature_spec()
  for fmt in sorted(F.FORMATS):
    if all(f.ids in spec for f in F.fields(fmt)):
      return fmt
  raise ValueError(f"the transform output's features {sorted(spec)[:8]}... are no format's")


def grouped_parser(spec: Dict[str, object], fmt: str):
  """serialized grouped records [g] -> features as the model reads them (``spec``: the
  per-impression transformed spec): the group-level fields as SparseTensors of g rows, every
  other feature per impression (n rows), as tf.io.parse_example of the impressions' rows would
  give it, and F.GROUP_INDEX [n]: each impression's group."""
  group_level = {name for f in F.fields(fmt) if f.group_level for name in (f.ids, f.weights)}
  lengths_of = {}
  for f in F.fields(fmt):
    if not f.group_level:
      lengths_of[f.ids] = lengths_of[f.weights] = f.lengths
  record_spec = {name: s if isinstance(s, tf.io.VarLenFeature) else tf.io.VarLenFeature(s.dtype)
                 for name, s in spec.items()}
  for name in spec:
    if name in lengths_of:
      record_spec[lengths_of[name]] = tf.io.VarLenFeature(tf.int64)
  scalars = [name for name, s in spec.items() if isinstance(s, tf.io.FixedLenFeature)]
  if not scalars:
    raise ValueError("grouped records need a per-impression label or sample id to count impressions by")
  for name in scalars:
    if tuple(spec[name].shape) != ():
      raise ValueError(f"feature {name}: grouped records hold scalar per-impression features, "
                       f"not shape {spec[name].shape}")

  def parse(serialized):
    records = tf.io.parse_example(serialized, record_spec)
    first = records[scalars[0]]
    per_group = tf.math.bincount(tf.cast(first.indices[:, 0], tf.int32), minlength=tf.size(serialized),
                                 dtype=tf.int64)
    rows = tf.size(first.values, out_type=tf.int64)
    out = {F.GROUP_INDEX: tf.repeat(tf.range(tf.size(serialized, out_type=tf.int64)), per_group)}
    for name in scalars:
      with tf.control_dependencies([tf.debugging.assert_equal(
          tf.size(records[name].values, out_type=tf.int64), rows,
          message=f"a grouped record's {name} does not have one value per impression")]):
        out[name] = tf.identity(records[name].values)
    for name, s in spec.items():
      if name in scalars:
        continue
      if name in group_level or name not in lengths_of:
        out[name] = records[name]
        continue
      lengths = records[lengths_of[name]].values
      with tf.control_dependencies([tf.debugging.assert_equal(
          tf.size(lengths, out_type=tf.int64), rows,
          message=f"a grouped record's {lengths_of[name]} does not have one count per impression")]):
        out[name] = tf.RaggedTensor.from_row_lengths(records[name].values, tf.identity(lengths)).to_sparse()
    return out

  return parse


def feature_spec(tft_output: tft.TFTransformOutput, fields: Optional[Sequence[str]] = None):
  """The transformed feature spec; with ``fields``, without the other fields' ids and weights
  (parsing is a large share of a training step's cost, so unused features are not parsed)."""
  spec = tft_output.transformed_feature_spec()
  if fields is None:
    return spec
  keep = {p + f for f in fields for p in (F.ID_PREFIX, F.WEIGHT_PREFIX)}
  return {k: v for k, v in spec.items()
          if k in keep or not k.startswith((F.ID_PREFIX, F.WEIGHT_PREFIX))}


def training_shard(config) -> Tuple[int, int]:
  """(number of training tasks, this task's index) from an Estimator RunConfig; (1, 0) on one
  machine. The chief is index 0, worker i is index i + 1."""
  if config is None or not config.cluster_spec.as_dict() or config.task_type not in ("chief", "worker"):
    return 1, 0
  return config.num_worker_replicas, config.global_id_in_cluster


def _split(parsed: Dict[str, tf.Tensor], labels_as_features: bool):
  labels = {}
  features = dict(parsed)
  for name in F.LABELS:
    if name in parsed:
      labels[name] = tf.cast(parsed[name] if labels_as_features else features.pop(name), tf.float32)
  return features, labels
