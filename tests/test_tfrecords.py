"""The project's gzip TFRecord sink: files TensorFlow reads back record for record."""

import glob
import io
import os
import random

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.io.tfrecordio import _TFRecordUtil

from pipeline import tfrecords


def _read(pattern):
  return [r.numpy() for r in tf.data.TFRecordDataset(sorted(glob.glob(pattern)), "GZIP")]


def test_a_frame_is_the_tfrecord_format_beam_writes():
  rng = random.Random(3)
  for size in (0, 1, 7, 1000, 70_000):
    record = bytes(rng.getrandbits(8) for _ in range(size))
    out = io.BytesIO()
    _TFRecordUtil.write_record(out, record)
    assert tfrecords.frame(record) == out.getvalue()


@pytest.mark.parametrize("level,shards", [(1, 3), (9, 0)])
def test_records_read_back_as_written_whatever_the_level_and_shards(tmp_path, level, shards):
  rng = random.Random(level)
  # Past the writer's 1 MiB buffer several times over, with an empty and a 2 MiB record.
  records = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(3000)] + [b"", rng.randbytes(2 << 20)]
  prefix = str(tmp_path / "out" / "part")
  with beam.Pipeline() as p:
    _ = p | beam.Create(records) | tfrecords.WriteGzipTFRecords(prefix, num_shards=shards, level=level)
  files = glob.glob(prefix + "-*" + tfrecords.SUFFIX)
  if shards:
    assert len(files) == shards
  assert sorted(_read(prefix + "-*" + tfrecords.SUFFIX)) == sorted(records)
  assert not glob.glob(str(tmp_path / "out" / ".temp*"))


def test_no_records_write_a_file_that_reads_as_none(tmp_path):
  prefix = str(tmp_path / "part")
  with beam.Pipeline() as p:
    _ = p | beam.Create([], reshuffle=False).with_output_types(bytes) | tfrecords.WriteGzipTFRecords(prefix, 1)
  files = glob.glob(prefix + "-*" + tfrecords.SUFFIX)
  assert len(files) == 1 and os.path.getsize(files[0]) > 0 and _read(files[0]) == []


def test_the_level_is_a_zlib_level():
  with pytest.raises(ValueError, match="0 to 9"):
    tfrecords.WriteGzipTFRecords("/tmp/x", level=10)
