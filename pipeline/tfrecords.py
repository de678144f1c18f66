"""Writes serialized records as gzip TFRecord files (what model_fn.input_fn reads).

Beam's WriteToTFRecord compresses at zlib's default level (6), one compress call per record,
and its fallback checksum (crcmod) runs at a few hundred MB/s. This sink frames the records in
batches (checksums by google-crc32c) and compresses about 1 MiB at a time at ``level`` (1 by
default): on this project's records, level 1 compresses twice as fast as level 6 for files about
8% larger (benchmarks/README.md). The files are ordinary gzip streams of TFRecords, written
through Beam's FileBasedSink (temporary files, then renamed on finalize), so they behave on any
runner as WriteToTFRecord's do.
"""

import struct
import zlib

import apache_beam as beam
import google_crc32c
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes

SUFFIX = ".tfrecord.gz"
DEFAULT_LEVEL = 1
_BUFFER_BYTES = 1 << 20
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def masked_crc32c(data: bytes) -> int:
  """The TFRecord format's masked CRC-32C of ``data``."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
  """One record as the TFRecord format stores it: length, its CRC, the data, its CRC."""
  length = _LENGTH.pack(len(record))
  return b"".join((length, _CRC.pack(masked_crc32c(length)), record, _CRC.pack(masked_crc32c(record))))


class _GzipRecordWriter:
  """Frames records into a buffer and compresses it into ``raw`` (a gzip stream) when full."""

  def __init__(self, raw, level: int):
    self._raw = raw
    self._compress = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    self._pending, self._size = [], 0

  def write(self, record: bytes) -> None:
    framed = frame(record)
    self._pending.append(framed)
    self._size += len(framed)
    if self._size >= _BUFFER_BYTES:
      self._drain()

  def _drain(self) -> None:
    self._raw.write(self._compress.compress(b"".join(self._pending)))
    self._pending, self._size = [], 0

  def close(self) -> None:
    self._drain()
    self._raw.write(self._compress.flush())
    self._raw.close()


class _GzipTFRecordSink(filebasedsink.FileBasedSink):

  def __init__(self, file_path_prefix: str, num_shards: int, level: int):
    super().__init__(file_path_prefix, coder=beam.coders.BytesCoder(), file_name_suffix=SUFFIX,
                     num_shards=num_shards, mime_type="application/octet-stream",
                     compression_type=CompressionTypes.UNCOMPRESSED)
    self._level = level

  def open(self, temp_path):
    return _GzipRecordWriter(super().open(temp_path), self._level)

  def write_encoded_record(self, file_handle, encoded_value):
    file_handle.write(encoded_value)


class WriteGzipTFRecords(beam.PTransform):
  """Serialized records -> ``<file_path_prefix>-SSSSS-of-NNNNN.tfrecord.gz`` (``num_shards`` 0:
  the runner decides), gzip at zlib ``level``."""

  def __init__(self, file_path_prefix: str, num_shards: int = 0, level: int = DEFAULT_LEVEL):
    super().__init__()
    if not 0 <= level <= 9:
      raise ValueError(f"zlib levels are 0 to 9, got {level}")
    self._sink = _GzipTFRecordSink(file_path_prefix, num_shards, level)

  def expand(self, records):
    return records | beam.io.Write(self._sink)
