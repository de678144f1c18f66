"""Distinct hashed ids per field over the train split's transformed rows, exactly: a bitmap of
occupied hash buckets per field (preprocessing/id_bitmaps.py), OR-merged across bundles.

Each pipeline (one per partition of a partitioned job) writes its bitmaps to
OUT/distinct_ids/train<infix>.npz; ``merge_outputs`` ORs every such file into
OUT/distinct_ids/train.npz and returns the counts. A partitioned job's counts are those of the
merged bitmaps, not a sum: an id seen in two partitions counts once."""

import os
from typing import Dict

import apache_beam as beam
import numpy as np
import pyarrow as pa
import tensorflow as tf

from preprocessing import features as F
from preprocessing import id_bitmaps as B


class DistinctIdsFn(beam.CombineFn):
  """(RecordBatch, passthrough) elements of TFT's output -> {field: bitmap of its ids}."""

  def create_accumulator(self):
    return {}

  def add_input(self, acc, element):
    record_batch, _ = element
    for name, column in zip(record_batch.schema.names, record_batch.columns):
      if not name.startswith(F.ID_PREFIX):
        continue
      values = column.flatten() if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) else column
      ids = np.asarray(values.to_numpy(zero_copy_only=False), np.int64)
      field = name[len(F.ID_PREFIX):]
      acc[field] = B.mark(acc.get(field), ids)
    return acc

  def merge_accumulators(self, accumulators):
    return B.merge(accumulators)

  def extract_output(self, acc):
    return acc


class _Write(beam.DoFn):
  def __init__(self, path: str):
    self._path = path

  def process(self, maps):
    B.save(self._path, maps)


class WriteDistinctIds(beam.PTransform):
  """Writes the bitmaps of a split's TFT output to OUTPUT_DIR/distinct_ids/train<infix>.npz."""

  def __init__(self, output_dir: str, infix: str = ""):
    super().__init__()
    self._path = os.path.join(output_dir, F.DISTINCT_IDS_DIR, f"train{infix}.npz")

  def expand(self, record_batches):
    return (record_batches
            | "Bitmaps" >> beam.CombineGlobally(DistinctIdsFn())
            | "Write" >> beam.ParDo(_Write(self._path)))


def merge_outputs(output_dir: str) -> Dict[str, int]:
  """ORs every pipeline's bitmaps (one per partition) into distinct_ids/train.npz; its counts."""
  paths = sorted(tf.io.gfile.glob(os.path.join(output_dir, F.DISTINCT_IDS_DIR, "train*.npz")))
  merged = B.merge(B.load(p) for p in paths)
  for p in paths:
    tf.io.gfile.remove(p)
  B.save(B.train_path(output_dir), merged)
  return B.counts(merged)
