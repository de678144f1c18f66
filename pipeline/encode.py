"""The Beam side of the TFT job: raw rows into TFT's input RecordBatches, TFT's output into
tf.Example records and column blocks, the blocks shuffled (pipeline.preprocess runs these).
"""

import hashlib
import zlib
from typing import List, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow as tf
from tensorflow_transform.tf_metadata import dataset_metadata
from tfx_bsl.coders import example_coder
from tfx_bsl.tfxio import tf_example_record

from preprocessing import features as F


class EncodeRecordBatches(beam.DoFn):
  """(RecordBatch, passthrough) elements of TFT's output (``output_record_batches=True``) ->
  serialized tf.Examples, encoded a batch at a time in C++ and counted as ``rows_written``
  in ``namespace``. (A DoFn of an importable module: the job's launcher runs as __main__,
  whose globals the workers do not get.)"""

  def __init__(self, namespace: str):
    self._written = beam.metrics.Metrics.counter(namespace, "rows_written")
    self._positives = LabelPositives(namespace)
    self._encoder = None

  def setup(self):
    self._encoder = example_coder.RecordBatchToExamplesEncoder()

  def process(self, element):
    record_batch, _ = element
    examples = self._encoder.encode(record_batch)
    self._count(record_batch, examples)
    self._positives.count(record_batch)
    yield from examples

  def _count(self, record_batch, examples) -> None:
    self._written.inc(len(examples))


class EncodeGroups(EncodeRecordBatches):
  """(RecordBatch, passthrough) elements of TFT's grouped output (F.GROUPED: one row per group)
  -> serialized grouped records, one per group, encoded a batch at a time in C++. The group's
  impressions are counted as ``rows_written`` and the groups as ``groups_written`` in
  ``namespace``."""

  def __init__(self, namespace: str):
    super().__init__(namespace)
    self._groups = beam.metrics.Metrics.counter(namespace, "groups_written")

  def _count(self, record_batch, examples) -> None:
    self._written.inc(len(record_batch.column(record_batch.schema.get_field_index(F.CLICK)).flatten()))
    self._groups.inc(len(examples))


class LabelPositives:
  """Counts the positive labels of the rows a split writes, as counters
  ``<F.LABEL_POSITIVES_PREFIX><label>`` in ``namespace``: the base rates the trainer starts its
  output biases at (reconciliation.json, ``splits.<split>.label_positives``)."""

  def __init__(self, namespace: str):
    self._counters = {label: beam.metrics.Metrics.counter(namespace, F.LABEL_POSITIVES_PREFIX + label)
                      for label in F.LABELS}

  def count(self, record_batch: pa.RecordBatch) -> None:
    for label, counter in self._counters.items():
      index = record_batch.schema.get_field_index(label)
      if index >= 0:
        column = record_batch.column(index)
        values = column.flatten() if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) else column
        counter.inc(int(pc.sum(values).as_py() or 0))


class EncodeBlocks(beam.DoFn):
  """(RecordBatch, passthrough) elements of TFT's output -> serialized column blocks: one
  tf.Example per ``block_rows`` rows (the last block of a RecordBatch may be shorter).

  A block's feature ``<name>`` holds the values of column ``name`` of all its rows in row order,
  and ``<name>/lengths`` how many of them each row has (0 for a row without the feature). The
  rows of each RecordBatch are permuted (seeded) before they are cut into blocks, so a block is
  a random draw from the rows around it and not a run of one user's consecutive impressions.
  Training parses a few blocks per batch instead of a thousand small tf.Examples, each repeating
  every feature's name (model_fn.input_fn; benchmarks/train_step_profile.py has the figures).
  Counted as ``rows_written_in_blocks`` and ``blocks_written`` in ``namespace``, and also as
  ``rows_written`` when ``count_rows_written`` (the blocks are the split's only output, no
  tf.Example per row is written); blocks are encoded in C++ like the tf.Examples (a RecordBatch
  of one row per block).
  """

  def __init__(self, namespace: str, block_rows: int = F.DEFAULT_BLOCK_ROWS, seed: int = 0,
               count_rows_written: bool = False):
    if block_rows < 1:
      raise ValueError(f"block_rows must be at least 1, got {block_rows}")
    self._block_rows = block_rows
    self._seed = seed
    self._rows = beam.metrics.Metrics.counter(namespace, "rows_written_in_blocks")
    self._blocks = beam.metrics.Metrics.counter(namespace, "blocks_written")
    self._written = beam.metrics.Metrics.counter(namespace, "rows_written") if count_rows_written else None
    self._positives = LabelPositives(namespace) if count_rows_written else None
    self._encoder = None

  def setup(self):
    self._encoder = example_coder.RecordBatchToExamplesEncoder()

  def process(self, element):
    record_batch, _ = element
    n = record_batch.num_rows
    if n == 0:
      return
    # Seeded by the batch's size and first row's bytes: reruns cut the same blocks.
    first = record_batch.slice(0, 1).to_pydict()
    rng = np.random.default_rng([self._seed, n, zlib.crc32(repr(sorted(first.items())).encode())])
    record_batch = record_batch.take(pa.array(rng.permutation(n)))
    starts = np.arange(0, n, self._block_rows, dtype=np.int64)
    bounds = np.append(starts, n)
    names, columns = [], []
    for name, column in zip(record_batch.schema.names, record_batch.columns):
      lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
      offsets = np.concatenate([[0], np.cumsum(lengths)])[bounds]
      names += [name, name + F.BLOCK_LENGTHS_SUFFIX]
      columns += [pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), column.flatten()),
                  pa.LargeListArray.from_arrays(pa.array(bounds, pa.int64()), pa.array(lengths, pa.int64()))]
    blocks = self._encoder.encode(pa.RecordBatch.from_arrays(columns, names))
    self._rows.inc(n)
    if self._written is not None:
      self._written.inc(n)
      self._positives.count(record_batch)
    self._blocks.inc(len(blocks))
    yield from blocks


def shuffle_key(record: bytes, seed: int = 0) -> int:
  """A record's 64-bit position key in ShuffleBlocks: a hash of the seed and its bytes."""
  return int.from_bytes(hashlib.blake2b(record, digest_size=8, key=seed.to_bytes(8, "little")).digest(),
                        "little")


class ShuffleBlocks(beam.PTransform):
  """Serialized blocks -> the same blocks in a random order over the whole split (seeded).

  The rows reach EncodeBlocks in the order of the join, which groups them by user (a window of
  1,024 consecutive rows holds ~50 distinct users in the synthetic data, not ~1,000), and its
  permutation mixes only the ~1k rows of one RecordBatch. Training's shuffle buffer then spreads
  each user's rows over a few percent of the epoch instead of all of it: with the 50k-row buffer
  the CVR AUC after one epoch was 0.680 against 0.693 with a buffer as large as the split
  (benchmarks/peer_throughput.py, 100k rows per table). Shuffling here costs one GroupByKey of
  the blocks (a 128-row block is one element) and nothing at training time.

  Each block gets a key, shuffle_key(block, seed); blocks are grouped by ``key % groups`` and
  each group is emitted in key order. Every group is a random subset of the split and the order
  within it does not depend on the runner, so the output is a uniformly random permutation
  (whatever order the runner emits the groups in), the same on every run of the same blocks. A
  group holds about 1/``groups`` of the split in memory while it is sorted.
  """

  def __init__(self, seed: int = 0, groups: int = 256, label: Optional[str] = None):
    super().__init__(label)
    if groups < 1:
      raise ValueError(f"groups must be at least 1, got {groups}")
    self._seed, self._groups = seed, groups

  def expand(self, blocks):
    seed, groups = self._seed, self._groups

    def keyed(block):
      key = shuffle_key(block, seed)
      return key % groups, (key, block)

    return (blocks
            | "Key" >> beam.Map(keyed)
            | "Group" >> beam.GroupByKey()
            | "InKeyOrder" >> beam.FlatMap(lambda kv: [b for _, b in sorted(kv[1], key=lambda x: x[0])]))


# Raw rows per Arrow RecordBatch handed to TFT. TFT pays milliseconds per batch (the feed, a
# session run, the conversion back to Arrow) whatever its size: on the 1/100 Ali-CCP release
# (grouped), batches of 1,024 impressions cost the job 45 CPU s, 8,192 33 s, 32,768 32 s; in
# the rows layout, whose rows carry their user side each, 219 s and 216 s at 1,024 and 8,192
# (benchmarks/README.md). A grouped batch holds each group's user side once: larger batches
# for the same memory.
RECORD_BATCH_ROWS = 8192
GROUPED_BATCH_ROWS = 32768


def batch_rows(layout: str) -> int:
  """Impressions per RecordBatch handed to TFT in ``layout``."""
  return GROUPED_BATCH_ROWS if layout == F.GROUPED else RECORD_BATCH_ROWS


def raw_tfxio(raw_md: dataset_metadata.DatasetMetadata):
  """The TFXIO view of the raw schema: its Arrow schema (one large_list column per feature) and
  the TensorAdapterConfig that tells TFT how to read those columns as tensors."""
  return tf_example_record.TFExampleBeamRecord(physical_format="inmem", telemetry_descriptors=["esmm"],
                                               schema=raw_md.schema)


class InstancesToRecordBatch(beam.DoFn):
  """A list of raw instance dicts (as the readers produce them) -> one Arrow RecordBatch of
  ``arrow_schema`` (raw_tfxio(...).ArrowSchema()), built column by column.

  TFT's instance-dict input encodes every row as a tf.Example in Python and decodes them again
  in batches; building the columns directly skips both (benchmarks/preprocess_throughput.py).
  A scalar value becomes a one-element list, a missing key a null (no value). With
  ``namespace``, the rows are counted as ``<namespace>/rows_into_transform``."""

  def __init__(self, arrow_schema: pa.Schema, namespace: Optional[str] = None):
    self._schema = arrow_schema
    self._rows = beam.metrics.Metrics.counter(namespace, F.ROWS_INTO_TRANSFORM) if namespace else None

  def process(self, instances):
    if self._rows is not None:
      self._rows.inc(len(instances))
    columns = []
    for field in self._schema:
      name = field.name
      column = []
      for instance in instances:
        value = instance.get(name)
        if value is None:
          column.append(None)
        elif isinstance(value, (list, tuple)):
          column.append(value)
        else:
          column.append([value])
      columns.append(pa.array(column, type=field.type))
    yield pa.RecordBatch.from_arrays(columns, schema=self._schema)


def to_record_batches(rows, arrow_schema: pa.Schema, label: str, namespace: Optional[str] = None):
  """A PCollection of raw instance dicts -> a PCollection of RecordBatches for TFT (rows
  counted in ``namespace``, see InstancesToRecordBatch)."""
  return (rows
          | f"Batch{label}" >> beam.BatchElements(min_batch_size=RECORD_BATCH_ROWS,
                                                  max_batch_size=RECORD_BATCH_ROWS)
          | f"ToRecordBatch{label}" >> beam.ParDo(InstancesToRecordBatch(arrow_schema, namespace)))
