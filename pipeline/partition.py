"""An Ali-CCP job split into partitions that each fit in memory (``--partitions``).

The DirectRunner holds each shuffle of the job (the sample-id dedup, the join) in memory, so
its peak memory grows with the input (benchmarks/preprocess_throughput.py): 85M impressions
would not fit in this machine's 24 GiB. Split by common_feature_index into K partitions, each
partition is a whole job on about 1/K of the rows, run one after another or a few at a time,
each in its own process. A skeleton row and the common-features row it joins with always land
in the same partition, so every join is the one the whole job would make.

The sample-id dedup is the one step that can span partitions. Copies of a sample id that name
the same common_feature_index (identical copies always do) are in one partition and resolved
there. Copies that name different indexes differ, so the whole job would set them all aside as
conflicting; when they are in different partitions no partition sees them together. Those ids
are found here, before any partition runs: a pass keeps every skeleton row's sample id (8 bytes
a row), ids seen in more than one partition are candidates, and a second pass parses only the
candidates' lines, since a copy that does not parse is set aside for its own reason and takes
no part in the dedup. The ids left are handed to every partition's dedup
(dedup.ResolveFn(conflicts=...)).

The partition files hold the records that Beam's text reader makes of the inputs (lines ended
by \\n or \\r\\n), written so that the reader gives back exactly those bytes; every record goes
to one partition, and the counts are kept so the job can check that the partitions' runs read
them all. The splits are written by processes of their own (``parallel`` at a time); the inputs
are read a few MiB of records at a time (lines.read_range; gzip through Python's gzip module,
which inflates in C) and each batch is written per partition in one write. Each partition file
starts with a byte-order mark, which the reader drops, so a record that starts with those bytes
(data, from inside an input) reads back as it was written.
"""

import array
import dataclasses
import multiprocessing
import os
import zlib
from concurrent import futures
from typing import BinaryIO, Dict, Iterator, List, Mapping

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline import processes
from pipeline.sources import aliccp, avazu, lines
from pipeline.sources.deadletter import BadRecord
from preprocessing import cli

KINDS = ("skeleton", "common")


@dataclasses.dataclass
class Partitions:
  count: int
  patterns: List[Dict[str, Dict[str, str]]]   # per partition: {split: {kind: file}}
  records: Dict[str, Dict[str, int]]          # {split: {kind: records written to the partitions}}
  conflicts: Dict[str, Dict[int, int]]        # {split: {sample id: its valid copies}}, see above


def records(f: BinaryIO) -> Iterator[bytes]:
  """The records the job's text readers (lines.ReadLineBatches, aliccp.ReadLines) make of a file:
  lines ended by \\n or \\r\\n, without the end, the file's byte-order mark dropped; a last line
  without an end is a record too."""
  for n, line in enumerate(iter(f.readline, b"")):
    if n == 0 and line.startswith(aliccp.BOM):
      line = line[len(aliccp.BOM):]
    if line.endswith(b"\n"):
      line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    yield line


def record_line(record: bytes) -> bytes:
  """A record as a line the text reader gives back unchanged (a record that ends with \\r
  needs the \\r\\n end, or the reader would take its \\r for part of the end)."""
  return record + (b"\r\n" if record.endswith(b"\r") else b"\n")


def join_key(record: bytes, kind: str) -> bytes:
  """The common_feature_index column as bytes (the 4th of a skeleton row, the 1st of a common
  row); b"" when the row is too short to have one (it is set aside wherever it goes)."""
  if kind == "common":
    return record.partition(b",")[0]
  parts = record.split(b",", 4)
  return parts[3] if len(parts) > 3 else b""


def partition_of(key: bytes, count: int) -> int:
  return zlib.crc32(key) % count


def _sample_id(record: bytes):
  """The sample id of a skeleton record when it is one (aliccp.is_sample_id), else None."""
  text = record.partition(b",")[0]
  return int(text) if aliccp.is_sample_id(text) else None


def _path(out_dir: str, split: str, kind: str, k: int) -> str:
  return FileSystems.join(out_dir, f"{split}-{kind}-{k:05d}.csv")


def _files(pattern: str) -> List[str]:
  return avazu.match_files(cli.absolute(pattern))


def _write_records(write, records: List[bytes]) -> None:
  """Writes records so that the text reader gives them back: joined by \\n, unless one ends with
  \\r (it needs its \\r\\n end, record_line), which the joined bytes show without a pass per record."""
  joined = b"\n".join(records) + b"\n"
  if b"\r\n" in joined:
    for record in records:
      write(record_line(record))
  else:
    write(joined)


def _write_split(split: str, patterns: Mapping[str, str], count: int, out_dir: str, track_ids: bool):
  """Writes one split's records to its partition files; returns (records per kind, sample ids
  per partition). The files are read a few MiB of records at a time (lines.read_range) and each
  batch's records are written per partition in one write."""
  counts = {}
  ids = [array.array("q") for _ in range(count)] if track_ids else None
  for kind in KINDS:
    outs = [FileSystems.create(_path(out_dir, split, kind, k)) for k in range(count)]
    started = [False] * count
    n = 0
    try:
      for path in _files(patterns[kind]):
        for batch in lines.read_range(path, 0, -1):
          parts: List[List[bytes]] = [[] for _ in range(count)]
          for record in batch:      # join_key, partition_of and _sample_id, inline: this runs per row
            if kind == "common":
              parts[zlib.crc32(record.partition(b",")[0]) % count].append(record)
              continue
            columns = record.split(b",", 4)
            k = zlib.crc32(columns[3] if len(columns) > 3 else b"") % count
            parts[k].append(record)
            if ids is not None:
              text = columns[0]
              # A plain id of at most 18 digits fits int64; any other is checked in full.
              sample_id = int(text) if text.isdigit() and len(text) <= 18 else _sample_id(record)
              if sample_id is not None:
                ids[k].append(sample_id)
          for k, records_k in enumerate(parts):
            if records_k:
              if not started[k]:
                # The reader drops a mark at the start of a file: with one of its own there, a
                # record that starts with the mark's bytes (data from inside an input) reads back
                # as it was. A partition without records stays empty (a mark alone is a record).
                outs[k].write(aliccp.BOM)
                started[k] = True
              _write_records(outs[k].write, records_k)
          n += len(batch)
    finally:
      for out in outs:
        out.close()
    counts[kind] = n
  return counts, ids


def _split_partitions(split: str, patterns: Mapping[str, str], count: int, out_dir: str,
                      dedup_sample_ids: bool):
  """One split's partition files; returns (records per kind, its cross-partition conflicts)."""
  written, ids = _write_split(split, patterns, count, out_dir, dedup_sample_ids)
  return written, _cross_partition_conflicts(patterns["skeleton"], ids, count) if dedup_sample_ids else {}


def _cross_partition_conflicts(pattern: str, ids: List[array.array], count: int) -> Dict[int, int]:
  """Sample ids whose valid copies are in more than one partition -> their number of valid copies."""
  seen = np.concatenate([np.unique(np.frombuffer(a, dtype=np.int64)) for a in ids] or [np.zeros(0, np.int64)])
  values, times = np.unique(seen, return_counts=True)
  candidates = set(values[times > 1].tolist())
  if not candidates:
    return {}
  copies: Dict[int, List[int]] = {}
  for path in _files(pattern):
    for batch in lines.read_range(path, 0, -1):
      for record in batch:
        sample_id = _sample_id(record)
        if sample_id not in candidates:
          continue
        try:
          aliccp.parse_skeleton_line(record, aliccp.KNOWN_FIELDS, features=False)
        except BadRecord:
          continue
        copies.setdefault(sample_id, []).append(partition_of(join_key(record, "skeleton"), count))
  return {sample_id: len(ks) for sample_id, ks in copies.items() if len(set(ks)) > 1}


def split_inputs(patterns: Mapping[str, Mapping[str, str]], count: int, out_dir: str,
                 dedup_sample_ids: bool = True, parallel: int = 1) -> Partitions:
  """Writes every split's skeleton and common records into ``count`` partitions under
  ``out_dir``; ``patterns`` as preprocess._input_patterns gives them. ``parallel`` > 1: the
  splits are written by that many processes at a time (spawned; each ends with this one)."""
  if count < 2:
    raise ValueError(f"partitions must be 2 or more, got {count}")
  splits = list(patterns)
  args = [(split, patterns[split], count, out_dir, dedup_sample_ids) for split in splits]
  workers = min(parallel, len(splits))
  if workers > 1:
    with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=processes.end_with_parent,
                                     initargs=(os.getpid(),)) as pool:
      done = list(pool.map(_split_partitions, *zip(*args)))
  else:
    done = [_split_partitions(*a) for a in args]
  written = {split: w for split, (w, _) in zip(splits, done)}
  conflicts = {split: c for split, (_, c) in zip(splits, done)}
  parts = [{split: {kind: _path(out_dir, split, kind, k) for kind in KINDS} for split in splits}
           for k in range(count)]
  return Partitions(count, parts, written, conflicts)
