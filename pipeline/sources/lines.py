"""Text files read as batches of lines: one Beam element per few MiB of a file, not per line.

Beam's text reader hands every line to the runner as an element of its own, and each element
costs the DirectRunner about as much Python as parsing the line (benchmarks/README.md, "The
public release at its size"). ReadLineBatches makes the same records (ReadLines' records: lines
ended by \\n or \\r\\n, without the end; a last line without an end; the byte-order mark at the
start of a file dropped) and hands them over as lists. An uncompressed file is read in ranges
of ``range_bytes``, each a Beam element that any worker may take; a record belongs to the range
its first byte is in. A compressed file (by its extension) is one range.
"""

import gzip
from typing import BinaryIO, Iterator, List, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.sources.deadletter import BOM

DEFAULT_RANGE_BYTES = 64 << 20
DEFAULT_CHUNK_BYTES = 4 << 20    # read at a time, and about the bytes of lines in one element

Range = Tuple[str, int, int]     # (path, first byte, end byte; -1: to the end of the file)


def file_ranges(pattern: str, range_bytes: int = DEFAULT_RANGE_BYTES) -> List[Range]:
  """The ranges of every file ``pattern`` matches, in file order; an empty file has none."""
  if range_bytes < 1:
    raise ValueError(f"range_bytes must be at least 1, got {range_bytes}")
  out: List[Range] = []
  for match in FileSystems.match([pattern])[0].metadata_list:
    path, size = match.path, match.size_in_bytes
    if not size:
      continue
    if CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED:
      out.append((path, 0, -1))
    else:
      out += [(path, start, min(start + range_bytes, size)) for start in range(0, size, range_bytes)]
  return sorted(out)


def _open(path: str) -> BinaryIO:
  """A file as bytes, decompressed by its extension (gzip through Python's gzip module, which
  inflates in C without Beam's Python line buffering)."""
  if CompressionTypes.detect_compression_type(path) == CompressionTypes.GZIP:
    return gzip.GzipFile(fileobj=FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED),
                         mode="rb")
  return FileSystems.open(path)


def _without_end(line: bytes) -> bytes:
  return line[:-1] if line.endswith(b"\r") else line


def _without_bom(line: bytes) -> bytes:
  return line[len(BOM):] if line.startswith(BOM) else line


def read_range(path: str, start: int, end: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[List[bytes]]:
  """The records whose first byte is in [start, end) of the file (end -1: to its end), as lists
  of the records of about ``chunk_bytes`` each."""
  with _open(path) as f:
    if start > 0:
      # The record that starts before this range (if byte start-1 is not its end) is the previous
      # range's; the first record here starts after the first \n at or after start-1.
      f.seek(start - 1)
      start = start - 1 + len(f.readline())
    left = None if end < 0 else max(end - start, 0)    # bytes of the range not read yet

    def take(n: int) -> bytes:
      nonlocal left
      if left is not None:
        n = min(n, left)
      data = f.read(n) if n else b""
      if left is not None:
        left -= len(data)
      return data

    first = start == 0         # the file's first record is still to come: a mark it starts with is dropped
    carry = b""
    for chunk in iter(lambda: take(chunk_bytes), b""):
      lines = (carry + chunk).split(b"\n")
      carry = lines.pop()
      if lines:
        if first:
          lines[0], first = _without_bom(lines[0]), False
        yield [_without_end(line) for line in lines]
    if carry and left == 0:
      carry += f.readline()    # the last record starts in this range: it is read to its end
    if carry.endswith(b"\n"):
      carry = _without_end(carry[:-1])
    elif not carry:
      return
    yield [_without_bom(carry) if first else carry]   # without an end, a last line keeps a \r it ends with


class _ReadRangeFn(beam.DoFn):

  def __init__(self, chunk_bytes: int):
    self._chunk_bytes = chunk_bytes

  def process(self, element: Range):
    yield from read_range(*element, chunk_bytes=self._chunk_bytes)


class ReadLineBatches(beam.PTransform):
  """The records of the files ``pattern`` matches (see the module's docstring) as lists of bytes.
  The files are listed when the pipeline is built."""

  def __init__(self, pattern: str, range_bytes: int = DEFAULT_RANGE_BYTES,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, label: str = None):
    super().__init__(label)
    if chunk_bytes < 1:
      raise ValueError(f"chunk_bytes must be at least 1, got {chunk_bytes}")
    self._pattern, self._range_bytes, self._chunk_bytes = pattern, range_bytes, chunk_bytes

  def expand(self, pbegin):
    ranges = file_ranges(self._pattern, self._range_bytes)
    return (pbegin
            | "Ranges" >> beam.Create(ranges)
            | "Spread" >> beam.Reshuffle()
            | "ReadRanges" >> beam.ParDo(_ReadRangeFn(self._chunk_bytes)))
