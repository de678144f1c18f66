"""Mutations of raw rows and files, for fuzzing the readers (tests/test_fuzz_readers.py and
benchmarks/fuzz_readers.py).

A mutation takes one valid raw line (bytes, without its line break) and returns a damaged
version of it, the kinds of damage real logs show: truncation, wrong separators, bytes
that are not UTF-8, huge lines, NaN/inf/negative weights, labels that are not 0/1,
oversized ids, control characters, stray line breaks, duplicated and conflicting sample
ids. ``mutate_file`` applies them to a fraction of a file's lines and adds file-level
damage (empty lines, a cut last line, no final line break, a byte-order mark). Everything
is driven by a seeded ``random.Random``, so a run is reproducible from its seed.

``physical_lines`` counts the records a text reader makes of a file's bytes: Beam's text
source splits at ``\\n`` (a ``\\r`` before it belongs to the separator), and a last line
without a line break is still a record.
"""

import math
import random
import struct
from typing import Callable, Dict, List, Optional, Sequence

from pipeline.sources import aliccp, avazu, dedup
from pipeline.sources.deadletter import BadRecord, dead_letter
from preprocessing import features as F
from preprocessing import transform as T

ALICCP = "aliccp"
AVAZU = "avazu"

_BAD_NUMBERS = (b"nan", b"NaN", b"inf", b"-inf", b"-1", b"-0.5", b"1e999", b"", b" ", b"0x10", b"1,5",
                b"\xc2\xbd", b"1e-400", b"+3", b"1_000")
_BAD_LABELS = (b"2", b"-1", b"", b"1.0", b" 1", b"true", b"01", b"\xef\xbc\x91", b"0 ", b"nan")
_BAD_IDS = (b"-7", b"", b"9" * 19, b"9" * 41, b"1e5", b"12a", b"\xd9\xa1\xd9\xa2", b" 12", b"0x1f")
_NOT_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80")
_SEPARATORS = (b";", b"\t", b"|", b", ", b",,", b"\x01")


class Row:
  """Where the parts of a line are, for the format-aware mutations."""

  def __init__(self, fmt: str, columns: Optional[Sequence[str]] = None):
    self.fmt = fmt
    if fmt == ALICCP:
      self.id_col, self.label_cols = 0, (1, 2)
    else:
      cols = list(columns)
      self.id_col = cols.index("id")
      self.label_cols = tuple(cols.index(c) for c in ("click", "conversion") if c in cols)
      self.int_cols = tuple(i for i, c in enumerate(cols) if c in ("C1", "banner_pos", "device_type",
                                                                  "device_conn_type") or c[:1] == "C" and c[1:].isdigit())
      self.hour_col = cols.index("hour")


def _cells(line: bytes, fmt: str) -> List[bytes]:
  return line.split(b",", 5) if fmt == ALICCP else line.split(b",")


def _set_cell(line: bytes, row: Row, col: int, value: bytes) -> bytes:
  cells = _cells(line, row.fmt)
  if col < len(cells):
    cells[col] = value
  return b",".join(cells)


def truncate(line, rng, row):
  return line[:rng.randrange(0, max(1, len(line)))]


def wrong_separator(line, rng, row):
  sep = rng.choice(_SEPARATORS)
  if rng.random() < 0.5:
    return line.replace(b",", sep)
  i = line.find(b",", rng.randrange(0, max(1, len(line))))
  return line if i < 0 else line[:i] + sep + line[i + 1:]


def not_utf8(line, rng, row):
  i = rng.randrange(0, len(line) + 1)
  return line[:i] + rng.choice(_NOT_UTF8) + line[i:]


def huge_line(line, rng, row):
  """A line of 1-3 MB: a repeated tail (Ali-CCP: feature items) or padding in one value."""
  size = rng.randrange(1 << 20, 3 << 20)
  if row.fmt == ALICCP and b"\x01" in line:
    item = line.rsplit(b"\x01", 1)[-1]
    return line + (b"\x01" + item) * (size // (len(item) + 1))
  return line + b"x" * size


def bad_weight(line, rng, row):
  """Ali-CCP: one feature's weight; Avazu: one integer column."""
  if row.fmt == ALICCP:
    parts = line.split(b"\x03")
    if len(parts) < 2:
      return line
    k = rng.randrange(1, len(parts))
    rest = parts[k].split(b"\x01", 1)
    parts[k] = rng.choice(_BAD_NUMBERS) + (b"\x01" + rest[1] if len(rest) > 1 else b"")
    return b"\x03".join(parts)
  return _set_cell(line, row, rng.choice(row.int_cols), rng.choice(_BAD_NUMBERS + (b"9" * 25,)))


def bad_label(line, rng, row):
  return _set_cell(line, row, rng.choice(row.label_cols), rng.choice(_BAD_LABELS))


def bad_id(line, rng, row):
  return _set_cell(line, row, row.id_col, rng.choice(_BAD_IDS))


def bad_count_or_hour(line, rng, row):
  """Ali-CCP: feature_num off by one or not a number; Avazu: a malformed hour."""
  if row.fmt == ALICCP:
    cells = _cells(line, ALICCP)
    if len(cells) < 5:
      return line
    n = cells[4]
    cells[4] = rng.choice([str(int(n) + rng.choice((-1, 1))).encode() if n.isdigit() else b"1", b"x", b"", b"-1"])
    return b",".join(cells)
  return _set_cell(line, row, row.hour_col, rng.choice((b"14102100"[:rng.randrange(1, 8)], b"14133100",
                                                       b"14102124", b"1410210a", b"141021000")))


def control_chars(line, rng, row):
  i = rng.randrange(0, len(line) + 1)
  return line[:i] + bytes([rng.choice((0, 1, 2, 3, 0x1f, 0x7f, 0x0b, 0x0c))]) * rng.randint(1, 3) + line[i:]


def stray_line_break(line, rng, row):
  """A line break inside the row: one row becomes two physical lines."""
  i = rng.randrange(0, len(line) + 1)
  return line[:i] + rng.choice((b"\n", b"\r\n", b"\r")) + line[i:]


def byte_flips(line, rng, row):
  b = bytearray(line)
  for _ in range(rng.randint(1, 4)):
    if b:
      b[rng.randrange(len(b))] = rng.randrange(256)
  return bytes(b)


def drop_or_add_column(line, rng, row):
  cells = line.split(b",")
  if rng.random() < 0.5 and len(cells) > 1:
    del cells[rng.randrange(len(cells))]
  else:
    cells.insert(rng.randrange(len(cells) + 1), rng.choice((b"", b"x", b"1")))
  return b",".join(cells)


def empty_line(line, rng, row):
  return rng.choice((b"", b" ", b"\t", b"\r"))


MUTATIONS: Dict[str, Callable] = {f.__name__: f for f in (
    truncate, wrong_separator, not_utf8, huge_line, bad_weight, bad_label, bad_id, bad_count_or_hour,
    control_chars, stray_line_break, byte_flips, drop_or_add_column, empty_line)}
# Line-level mutations cheap enough to run in bulk (huge_line makes MBs per row).
SMALL_MUTATIONS = tuple(m for m in MUTATIONS if m != "huge_line")


def mutate(line: bytes, rng: random.Random, row: Row, names: Sequence[str]) -> bytes:
  for name in names:
    line = MUTATIONS[name](line, rng, row)
  return line


def conflicting_copy(line: bytes, rng: random.Random, row: Row) -> bytes:
  """The same sample id with other content (a label or a feature changed)."""
  cells = _cells(line, row.fmt)
  label = row.label_cols[0]
  if label < len(cells) and cells[label] in (b"0", b"1"):
    cells[label] = b"1" if cells[label] == b"0" else b"0"
    # Keep the funnel valid so the copy differs only in content.
    if row.fmt == ALICCP and cells[1] == b"0":
      cells[2] = b"0"
    if row.fmt == AVAZU and len(row.label_cols) > 1 and cells[label] == b"0":
      cells[row.label_cols[1]] = b"0"
  return b",".join(cells)


def mutate_lines(lines: Sequence[bytes], rng: random.Random, row: Row, fraction: float = 0.3,
                 huge_every: int = 0, duplicate_fraction: float = 0.02,
                 conflict_fraction: float = 0.01) -> List[bytes]:
  """Mutates about ``fraction`` of the lines (1-3 mutations each), duplicates and conflicts a
  few; every ``huge_every``-th mutated line (0: none) is made huge. Returns the new lines."""
  out: List[bytes] = []
  mutated = 0
  for line in lines:
    u = rng.random()
    if u < fraction:
      mutated += 1
      names = [rng.choice(SMALL_MUTATIONS) for _ in range(rng.randint(1, 3))]
      if huge_every and mutated % huge_every == 0:
        names = ["huge_line"] + names[:1]
      out.append(mutate(line, rng, row, names))
    elif u < fraction + duplicate_fraction:
      out.extend([line, line])
    elif u < fraction + duplicate_fraction + conflict_fraction:
      out.extend([line, conflicting_copy(line, rng, row)])
    else:
      out.append(line)
  return out


def file_bytes(lines: Sequence[bytes], rng: random.Random, header: bytes = b"",
               damage: bool = True) -> bytes:
  """Joins lines into a file; with ``damage``, file-level accidents: CRLF line ends, a
  byte-order mark, a repeated header inside the file, no final line break, a cut last line."""
  lines = list(lines)
  if damage and header and lines and rng.random() < 0.5:
    lines.insert(rng.randrange(len(lines) + 1), header)
  if header:
    lines.insert(0, (b"\xef\xbb\xbf" if damage and rng.random() < 0.3 else b"") + header)
  end = b"\r\n" if damage and rng.random() < 0.3 else b"\n"
  data = end.join(lines)
  if not damage or rng.random() < 0.5:
    data += end
  elif lines and rng.random() < 0.5:
    data = data[:len(data) - rng.randrange(1, max(2, len(lines[-1])))]
  return data


def physical_lines(data: bytes) -> int:
  """Records a text reader makes of ``data``: pieces between ``\\n``, the last one only if it
  is not empty."""
  if not data:
    return 0
  return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


def records(data: bytes) -> List[bytes]:
  """The records a text reader makes of ``data`` (``\\r\\n`` and ``\\n`` end a record; a last
  record without an end keeps a final ``\\r``, as Beam's ReadFromText does)."""
  pieces = data.split(b"\n")
  last = pieces.pop()
  return [p[:-1] if p.endswith(b"\r") else p for p in pieces] + ([last] if last else [])


# Expected outcomes, computed line by line with the pure parse functions and plain Python
# dicts: what the Beam job must write and set aside, reason by reason.

def _resolve(rows_by_id: Dict, dead: Dict[str, int]) -> list:
  """The dedup rule of pipeline/sources/dedup.py on {sample id: [rows]}."""
  kept = []
  for rows in rows_by_id.values():
    if len(rows) == 1 or all(r == rows[0] for r in rows[1:]):
      kept.append(rows[0])
      if len(rows) > 1:
        dead[dedup.DUPLICATE_SAMPLE_ID] = dead.get(dedup.DUPLICATE_SAMPLE_ID, 0) + len(rows) - 1
    else:
      dead[dedup.CONFLICTING_SAMPLE_ID] = dead.get(dedup.CONFLICTING_SAMPLE_ID, 0) + len(rows)
  return kept


def _count(d: Dict[str, int], reason: str, n: int = 1) -> None:
  d[reason] = d.get(reason, 0) + n


def expected_aliccp(skeleton_files: Sequence[bytes], common_files: Sequence[bytes]) -> dict:
  """{skeleton_rows_read, common_rows_read, skeleton_dead, common_dead, common_used,
  common_unused, written_ids (sorted)} for one split of raw Ali-CCP file contents."""
  known = frozenset(f.name for f in F.fields(ALICCP))
  out = {"skeleton_dead": {}, "common_dead": {}, "skeleton_rows_read": 0, "common_rows_read": 0}

  def parse_all(files, source, parse, key):
    grouped: Dict = {}
    for data in files:
      for line in records(data):
        out[f"{source}_rows_read"] += 1
        try:
          row, _ = parse(line, known)
        except aliccp.BadRecord as e:
          _count(out[f"{source}_dead"], e.reason)
          continue
        grouped.setdefault(row[key], []).append(row)
    return grouped

  commons = parse_all(common_files, "common", aliccp.parse_common_line, "index")
  by_id = parse_all(skeleton_files, "skeleton", aliccp.parse_skeleton_line, "sample_id")
  kept = _resolve(by_id, out["skeleton_dead"])
  by_index: Dict[str, list] = {}
  for row in kept:
    by_index.setdefault(row["index"], []).append(row)
  # Common rows sharing an index: of identical copies one is kept, copies that differ are all set aside.
  written, used, unused = [], 0, 0
  joinable = set()
  for index, rows in commons.items():
    same = all(r == rows[0] for r in rows[1:])
    if len(rows) > 1:
      _count(out["common_dead"], aliccp.DUPLICATE_COMMON_FEATURE_INDEX, len(rows) - 1 if same else len(rows))
    if same:
      joinable.add(index)
      used, unused = (used + 1, unused) if by_index.get(index) else (used, unused + 1)
  for index, rows in by_index.items():
    if index in joinable:
      written.extend(r["sample_id"] for r in rows)
    else:
      reason = aliccp.DUPLICATE_COMMON_FEATURE_INDEX if index in commons else aliccp.UNKNOWN_COMMON_FEATURE_INDEX
      _count(out["skeleton_dead"], reason, len(rows))
  out["common_used"] = used
  out["common_unused"] = unused
  out["written_ids"] = sorted(written)
  return out


def expected_avazu(files: Sequence[bytes]) -> dict:
  """{rows_read, header_lines, dead, written_ids (sorted)} for one split of Avazu-style
  file contents (each file read with its own header; empty files hold nothing)."""
  out = {"dead": {}, "rows_read": 0, "header_lines": 0}
  by_id: Dict[str, list] = {}
  for data in files:
    lines = records(data)
    if not lines:
      continue
    header = avazu.parse_header(lines[0])
    for line in lines:
      if avazu.is_header_line(line, header):
        out["header_lines"] += 1
        continue
      out["rows_read"] += 1
      try:
        inst = avazu.parse_line(line, header)
      except BadRecord as e:
        _count(out["dead"], e.reason)
        continue
      by_id.setdefault(inst[F.SAMPLE_ID], []).append(inst)
  out["written_ids"] = sorted(r[F.SAMPLE_ID] for r in _resolve(by_id, out["dead"]))
  return out


# What an accepted row must look like; the checks the fuzz test and benchmark apply to every row.

ACCEPTED = "accepted"
_INT64_MAX = (1 << 63) - 1


class InvalidRow(AssertionError):
  """A parser accepted a row it should have set aside, or set one aside for an unknown reason."""


def _require(ok: bool, what: str, line: bytes) -> None:
  if not ok:
    raise InvalidRow(f"{what}: {line[:200]!r}")


def raw_coder(fmt: str):
  """The encoder of raw instances in the TFT raw schema (what the Beam job feeds TFT)."""
  import tensorflow_transform as tft
  return tft.coders.ExampleProtoCoder(T.raw_metadata(fmt).schema)


def classify_aliccp(line: bytes, source: str, coder=None) -> str:
  """Parses one Ali-CCP line ('skeleton' or 'common'); returns ACCEPTED after checking the row,
  or the reason it was set aside. Raises InvalidRow; any other exception is a crash."""
  import json as _json
  known = frozenset(f.name for f in F.fields(ALICCP))
  parse = aliccp.parse_skeleton_line if source == "skeleton" else aliccp.parse_common_line
  try:
    row, _ = parse(line, known)
  except aliccp.BadRecord as e:
    _require(e.reason in (aliccp.SKELETON_REASONS if source == "skeleton" else aliccp.COMMON_REASONS),
             f"unknown reason {e.reason}", line)
    _json.loads(dead_letter("train", source, e.reason, e.detail, line=line))
    return e.reason
  _require(row["index"].isascii() and row["index"].isalnum(), "bad index accepted", line)
  for field, (ids, weights) in row["features"].items():
    _require(field in known and len(ids) == len(weights), "bad field accepted", line)
    _require(all(isinstance(i, int) and 0 <= i <= _INT64_MAX for i in ids), "bad id accepted", line)
    _require(all(w >= 0 and math.isfinite(struct.unpack("f", struct.pack("f", w))[0]) for w in weights),
             "bad weight accepted (not a finite non-negative float32)", line)
  if source == "skeleton":
    _require(0 <= row["sample_id"] <= _INT64_MAX, "bad sample id accepted", line)
    _require(row["click"] in (0, 1) and row["conversion"] in (0, 1), "bad label accepted", line)
    _require(not (row["conversion"] and not row["click"]), "conversion without click accepted", line)
    if coder is not None:
      coder.encode(aliccp.to_raw_instance(row, {}))
  return ACCEPTED


def classify_avazu(line: bytes, header, coder=None) -> str:
  """Parses one Avazu-style data line with its file's header; as classify_aliccp."""
  import json as _json
  try:
    inst = avazu.parse_line(line, header)
  except BadRecord as e:
    _require(e.reason in avazu.PARSE_REASONS, f"unknown reason {e.reason}", line)
    _json.loads(dead_letter("train", "csv", e.reason, e.detail, line=line))
    return e.reason
  sid = inst[F.SAMPLE_ID]
  _require(sid.isascii() and sid.isdigit() and len(sid) <= avazu.MAX_ID_DIGITS, "bad id accepted", line)
  _require(inst[F.CLICK] in (0, 1), "bad click accepted", line)
  if header.has_conversion:
    _require(inst[F.CONVERSION] in (0, 1) and not (inst[F.CONVERSION] and not inst[F.CLICK]),
             "bad conversion accepted", line)
  _require(20000101 <= inst[F.DAY] <= 20991231 and 0 <= inst[avazu.HOUR_RAW][0] % 100 <= 23,
           "bad hour accepted", line)
  for f in F.fields(AVAZU):
    values = inst.get(f.raw_ids, [])
    _require(len(values) <= 1, "multi-valued Avazu field", line)
    if f.transform == F.HASH and f.raw_dtype == F.INT64:
      _require(all(isinstance(v, int) and -_INT64_MAX - 1 <= v <= _INT64_MAX for v in values),
               "bad integer accepted", line)
    elif f.transform == F.HASH:
      _require(all(isinstance(v, str) and "," not in v for v in values), "bad string accepted", line)
  if coder is not None:
    coder.encode(inst)
  return ACCEPTED


# Reading back what a preprocessing run wrote.

def dead_letter_counts(output_dir: str, split: str) -> Dict:
  """{(source, reason): dead letters} in OUT/dead_letter/<split>-*.jsonl."""
  import collections
  import glob
  import json as _json
  import os
  counts = collections.Counter()
  for path in glob.glob(os.path.join(output_dir, "dead_letter", f"{split}-*")):
    with open(path, encoding="utf-8") as f:
      for line in f:
        rec = _json.loads(line)
        if rec["split"] != split or not rec["reason"]:
          raise InvalidRow(f"dead letter without split or reason: {line[:200]}")
        counts[(rec["source"], rec["reason"])] += 1
  return dict(counts)


def written_sample_ids(output_dir: str, split: str) -> list:
  """The sample ids of every transformed example written for ``split``, sorted."""
  import glob
  import os
  import tensorflow as tf
  files = glob.glob(os.path.join(output_dir, split, "part-*.tfrecord.gz"))
  spec = {F.SAMPLE_ID: tf.io.FixedLenFeature([], tf.string if _is_avazu(output_dir) else tf.int64)}
  ids = []
  for batch in tf.data.TFRecordDataset(files, "GZIP").batch(8192):
    for v in tf.io.parse_example(batch, spec)[F.SAMPLE_ID].numpy():
      ids.append(v.decode() if isinstance(v, bytes) else int(v))
  return sorted(ids)


def _is_avazu(output_dir: str) -> bool:
  import json as _json
  import os
  with open(os.path.join(output_dir, F.RECONCILIATION)) as f:
    return _json.load(f)["format"] == AVAZU
