"""Reader for Avazu-style CSV logs: a header row, then one impression per row.

Layout (docs/data-formats.md): the 24 columns of the public Avazu release
(``preprocessing.features.AVAZU_COLUMNS``), read by the header's names in any order,
plus an optional ``conversion`` column (0/1, post-click conversion). Other columns are
ignored. Values may be quoted as in RFC 4180 (the public release quotes none): a quoted
value is read without its quotes (``split_values``), so quoting does not change a row.
``id`` is a decimal that can exceed int64 and stays a string; ``hour`` is ``YYMMDDHH`` and
gives the day partition (``day`` = ``YYYYMMDD``) and the hour of day; an empty categorical
value is a missing field. Files may be plain or compressed (``.gz``, ``.bz2``, by extension).

Every file is read with its own header: the launcher reads the first line of each
matched file (``scan_inputs``) before the pipeline is built, so that all files of a run
must agree on whether ``conversion`` is there; each line then reaches the parser with
its file name. Header lines are recognised and counted apart from rows.

The parse functions are pure and raise BadRecord with a stable reason; the Beam
transform routes those rows to a dead-letter output and counts every row:
rows read = rows written + rows set aside (per reason).
"""

import dataclasses
import datetime
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipeline.sources import dedup
from pipeline.sources.deadletter import (BAD_SAMPLE_ID, BOM, CONVERSION_WITHOUT_CLICK, DEAD, NOT_UTF8,
                                        WRONG_COLUMN_COUNT, BadRecord, counter, dead_letter, decode_line,
                                        parse_int64, rows_by_stage, unaccounted_by_hop)
from preprocessing import cli
from preprocessing import features as F

FMT = "avazu"
SOURCE = "csv"
MAX_ID_DIGITS = 40
_BOM = BOM.decode("utf-8")   # headers are checked as text
HOUR_RAW = next(f.raw_ids for f in F.fields(FMT) if f.transform == F.HOUR_OF_DAY)   # f_hour

# Reasons a row is set aside (stable identifiers, used in counters and dead letters), besides
# the ones every source has (deadletter.py).
BAD_CLICK = "bad_click"
BAD_CONVERSION = "bad_conversion"
BAD_HOUR = "bad_hour"
BAD_INTEGER = "bad_integer"
BAD_QUOTING = "bad_quoting"
PARSE_REASONS = (NOT_UTF8, WRONG_COLUMN_COUNT, BAD_QUOTING, BAD_SAMPLE_ID, BAD_CLICK, BAD_CONVERSION, BAD_HOUR,
                 BAD_INTEGER, CONVERSION_WITHOUT_CLICK)
REASONS = PARSE_REASONS + dedup.REASONS


class BadInput(ValueError):
  """Input files that cannot make one run: no or a bad header, mixed label sets, overlaps."""


@dataclasses.dataclass(frozen=True)
class Header:
  """The columns of one file, and where each value of a row is found."""
  line: bytes                   # the header line as in the file (without the line break)
  columns: Tuple[str, ...]
  has_conversion: bool
  ignored: Tuple[str, ...]      # columns the format does not use
  id_index: int
  click_index: int
  hour_index: int
  conversion_index: int         # -1 without a conversion column
  fields: Tuple[Tuple[str, int, bool], ...]   # (raw feature name, column index, int64?)

  @property
  def labels(self) -> Tuple[str, ...]:
    return F.RAW_LABELS if self.has_conversion else (F.CLICK,)


def split_values(line: str) -> List[str]:
  """The values of one CSV line, RFC 4180 quotes removed: a quoted value may hold commas and
  doubled quotes (``"a ""b"", c"`` is ``a "b", c``). Raises BadRecord(bad_quoting) for a quote that
  does not open or close a whole value. The reader takes one line as one row (Beam's text source
  splits files at line breaks, between any two bytes of a file), so a quoted value with a line
  break in it cannot be read: it leaves a quote open at the end of its first line, and a quote
  in an unquoted value on the next; both lines are set aside for it."""
  if '"' not in line:
    return line.split(",")   # the common case: nothing quoted
  values, i, n = [], 0, len(line)
  while True:
    if line.startswith('"', i):
      pieces, i = [], i + 1
      while True:
        end = line.find('"', i)
        if end < 0:
          raise BadRecord(BAD_QUOTING, f"value {len(values) + 1} opens a quote that its line does not close "
                                       "(a line break inside quotes cannot be read)")
        pieces.append(line[i:end])
        i = end + 1
        if not line.startswith('"', i):
          break
        pieces.append('"')   # a doubled quote inside quotes
        i += 1
      value = "".join(pieces)
      if i < n and line[i] != ",":
        raise BadRecord(BAD_QUOTING, f"value {len(values) + 1}: a quoted value followed by "
                                     f"{line[i:i + 20]!r}, not a comma")
    else:
      end = line.find(",", i)
      end = n if end < 0 else end
      value = line[i:end]
      if '"' in value:
        raise BadRecord(BAD_QUOTING, f"value {len(values) + 1} {value[:40]!r} has a quote but is not quoted")
      i = end
    values.append(value)
    if i == n:
      return values
    i += 1   # past the comma: another value follows, perhaps empty


def parse_header(line) -> Header:
  """The header row of a file -> Header; raises BadInput if a required column is missing."""
  raw = line if isinstance(line, bytes) else line.encode("utf-8")
  raw = raw.rstrip(b"\r\n")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    raise BadInput(f"header line {raw[:80]!r} is not UTF-8") from None
  if text.startswith(_BOM):
    text = text[len(_BOM):]
  try:
    columns = tuple(c.strip() for c in split_values(text))
  except BadRecord as e:
    raise BadInput(f"header line {raw[:80]!r}: {e.detail}") from None
  duplicates = sorted({c for c in columns if columns.count(c) > 1})
  if duplicates:
    raise BadInput(f"header has duplicate columns {duplicates}")
  missing = [c for c in F.AVAZU_COLUMNS if c not in columns]
  if missing:
    raise BadInput(f"header lacks the column(s) {missing} (it has {list(columns)[:30]})")
  index = {c: i for i, c in enumerate(columns)}
  used = set(F.AVAZU_COLUMNS) | {F.CONVERSION}
  plan = tuple((f.raw_ids, index[f.name], f.raw_dtype == F.INT64)
               for f in F.fields(FMT) if f.transform == F.HASH)
  return Header(line=raw, columns=columns, has_conversion=F.CONVERSION in index,
                ignored=tuple(c for c in columns if c not in used),
                id_index=index[F.AVAZU_ID], click_index=index[F.CLICK],
                hour_index=index[F.AVAZU_HOUR], conversion_index=index.get(F.CONVERSION, -1),
                fields=plan)


def looks_like_header(line) -> bool:
  """Whether ``line`` is an Avazu-style header (to tell a wrong --format)."""
  try:
    parse_header(line)
  except BadInput:
    return False
  return True


def is_header_line(line, header: Header) -> bool:
  """Whether ``line`` (bytes or str, as read) is the header line of its file."""
  raw = line if isinstance(line, bytes) else line.encode("utf-8")
  return raw.rstrip(b"\r\n") == header.line


def parse_hour(text: str) -> Tuple[int, int]:
  """``YYMMDDHH`` -> (day ``YYYYMMDD``, hour of day); raises BadRecord(bad_hour)."""
  if len(text) != 8 or not text.isascii() or not text.isdigit():
    raise BadRecord(BAD_HOUR, f"hour {text[:40]!r} is not YYMMDDHH (8 digits)")
  year, month, day, hour = 2000 + int(text[:2]), int(text[2:4]), int(text[4:6]), int(text[6:])
  try:
    datetime.date(year, month, day)
  except ValueError:
    raise BadRecord(BAD_HOUR, f"hour {text!r}: {year:04d}-{month:02d}-{day:02d} is not a date") from None
  if hour > 23:
    raise BadRecord(BAD_HOUR, f"hour {text!r}: hour of day {hour} is not 0-23")
  return year * 10000 + month * 100 + day, hour


def _label(text: str, reason: str, name: str) -> int:
  if text not in ("0", "1"):
    raise BadRecord(reason, f"{name}={text[:10]!r}; must be 0 or 1")
  return int(text)


def parse_line(line, header: Header) -> dict:
  """One data row of a file with ``header`` -> the raw instance dict the TFT preprocessing_fn reads.

  ``sample_id`` is the ``id`` string as written; ``day`` is ``YYYYMMDD``; ``f_hour`` holds
  the raw ``YYMMDDHH`` (the preprocessing_fn derives the hour of day from it, so serving
  does the same); categorical fields are one-value lists, empty when the value is empty.
  """
  line = decode_line(line)
  parts = split_values(line)
  if len(parts) != len(header.columns):
    raise BadRecord(WRONG_COLUMN_COUNT, f"expected {len(header.columns)} comma-separated columns "
                                        f"as in the header, got {len(parts)}")
  sample_id = parts[header.id_index]
  if (not sample_id or not sample_id.isascii() or not sample_id.isdigit()
      or len(sample_id) > MAX_ID_DIGITS):
    raise BadRecord(BAD_SAMPLE_ID, f"id {sample_id[:60]!r} is empty or not a decimal of at most "
                                   f"{MAX_ID_DIGITS} digits")
  click = _label(parts[header.click_index], BAD_CLICK, F.CLICK)
  conversion = None
  if header.has_conversion:
    conversion = _label(parts[header.conversion_index], BAD_CONVERSION, F.CONVERSION)
  hour_text = parts[header.hour_index]
  day, _ = parse_hour(hour_text)
  instance = {F.SAMPLE_ID: sample_id, F.CLICK: click, F.DAY: day, HOUR_RAW: [int(hour_text)]}
  for raw_ids, i, is_int in header.fields:
    value = parts[i]
    if not value:
      instance[raw_ids] = []
    elif is_int:
      instance[raw_ids] = [parse_int64(value, BAD_INTEGER, raw_ids[len(F.RAW_ID_PREFIX):], signed=True)]
    else:
      instance[raw_ids] = [value]
  if conversion is not None:
    if conversion and not click:
      raise BadRecord(CONVERSION_WITHOUT_CLICK, "click=0 but conversion=1 is impossible in the funnel")
    instance[F.CONVERSION] = conversion
  return instance


# Launcher side: the files of a run and their headers, before the pipeline is built.

def match_files(pattern: str) -> List[str]:
  """The files ``pattern`` matches, named as Beam's text source will name them."""
  try:
    results = FileSystems.match([pattern])
  except Exception as e:  # a filesystem may raise instead of returning no match
    raise BadInput(f"cannot match {pattern}: {e}") from None
  return sorted(m.path for r in results for m in r.metadata_list)


def read_header(path: str) -> Optional[Header]:
  """The header of one file (its first line), compressed or not, local or remote; None for
  an empty file (no bytes: no rows either, as the empty part files some exporters write)."""
  with FileSystems.open(path) as f:
    first = f.readline()
  if not first:
    return None
  if not first.strip():
    raise BadInput(f"{path} has no header line (its first line is empty)")
  try:
    return parse_header(first)
  except BadInput as e:
    raise BadInput(f"{path}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The files of one run, read by split, with their headers and the run's label set."""
  patterns: Dict[str, Tuple[str, ...]]   # split -> patterns (absolute)
  files: Dict[str, Tuple[str, ...]]      # split -> matched files with a header (read by the job)
  headers: Dict[str, Header]             # file -> header
  labels: Tuple[str, ...]
  ignored_columns: Tuple[str, ...]
  empty_files: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)  # split -> 0-byte files


def scan_inputs(patterns: Mapping[str, Sequence[str]]) -> Inputs:
  """Matches every split's patterns and reads each file's header.

  Raises BadInput when a pattern matches nothing, a file is matched twice (by two
  patterns or in two splits), a header is missing or lacks a required column, the files
  disagree on whether they have a ``conversion`` column, or no file of a split has a
  header. Empty (0-byte) files hold no rows: they are listed apart, not read.
  """
  norm, files, headers, owner, empty = {}, {}, {}, {}, {}
  for split, split_patterns in patterns.items():
    norm[split] = tuple(cli.absolute(p) for p in split_patterns)  # Beam matches absolute globs only
    if not norm[split]:
      raise BadInput(f"no file pattern for the {split} split")
    found, empty[split] = [], []
    for pattern in norm[split]:
      matched = match_files(pattern)
      if not matched:
        raise BadInput(f"no file matches {pattern} ({split} split)")
      for path in matched:
        key = os.path.normpath(path) if "://" not in path else path
        if key in owner:
          raise BadInput(f"{path} is matched twice ({owner[key]} and {split} / {pattern}); "
                         "each file must be read once")
        owner[key] = f"{split} / {pattern}"
        header = read_header(path)
        if header is None:
          empty[split].append(path)
          continue
        headers[path] = header
        found.append(path)
    if not found:
      raise BadInput(f"every file of the {split} split is empty: {', '.join(empty[split][:5])}")
    files[split] = tuple(found)
    empty[split] = tuple(empty[split])
  with_conv = sorted(p for p, h in headers.items() if h.has_conversion)
  without = sorted(p for p, h in headers.items() if not h.has_conversion)
  if with_conv and without:
    raise BadInput(
        f"the files of one run must agree on the '{F.CONVERSION}' column: "
        f"{len(with_conv)} have it (e.g. {with_conv[0]}) and {len(without)} do not "
        f"(e.g. {without[0]}); preprocess them in separate runs")
  labels = F.RAW_LABELS if with_conv else (F.CLICK,)
  ignored = tuple(sorted({c for h in headers.values() for c in h.ignored}))
  return Inputs(norm, files, headers, labels, ignored, empty)


# Beam side.

class _ParseFn(beam.DoFn):
  """Parses (file name, line) pairs with that file's header; bad rows to DEAD."""

  def __init__(self, split: str, headers: Mapping[str, Header]):
    self._split = split
    self._headers = dict(headers)
    self._ns = f"{FMT}/{split}"
    self._read = counter(self._ns, "rows_read")
    self._header_lines = counter(self._ns, "header_lines")

  def process(self, element):
    path, line = element
    header = self._headers.get(path)
    if header is None:
      raise RuntimeError(f"{path} was not matched when the job was launched, so its header is "
                         "unknown; do not add files to the input while a job runs")
    if is_header_line(line, header):
      self._header_lines.inc()
      return
    self._read.inc()
    try:
      instance = parse_line(line, header)
    except BadRecord as e:
      counter(self._ns, f"dead/{e.reason}").inc()
      yield beam.pvalue.TaggedOutput(DEAD, dead_letter(self._split, SOURCE, e.reason, e.detail,
                                                       line=line, file=path))
      return
    yield instance


class ReadAvazu(beam.PTransform):
  """Reads, parses and validates the files of one Avazu-style split.

  ``patterns`` and ``headers`` come from ``scan_inputs`` (the same matching as Beam's
  text source, so the file names agree). Returns a dict with ``rows`` (raw instance
  dicts) and ``dead_letter`` (JSON lines). With ``dedup_sample_ids`` (the default) rows
  sharing an ``id`` are resolved (pipeline/sources/dedup.py).
  """

  def __init__(self, split: str, patterns: Sequence[str], headers: Mapping[str, Header],
               dedup_sample_ids: bool = True):
    super().__init__()
    self._split = split
    self._patterns = tuple(patterns)
    self._headers = dict(headers)
    self._dedup = dedup_sample_ids

  def expand(self, pbegin):
    lines = [pbegin | f"Read{i}" >> beam.io.ReadFromTextWithFilename(
                 pattern, coder=beam.coders.BytesCoder())
             for i, pattern in enumerate(self._patterns)]
    parsed = (lines
              | "FlattenFiles" >> beam.Flatten()
              | "Parse" >> beam.ParDo(_ParseFn(self._split, self._headers)).with_outputs(DEAD, main="rows"))
    if not self._dedup:
      return {"rows": parsed.rows, DEAD: parsed[DEAD]}
    resolved = parsed.rows | "ResolveSampleIds" >> dedup.ResolveSampleIds(
        self._split, SOURCE, f"{FMT}/{self._split}", "dead/", F.SAMPLE_ID)
    dead = (parsed[DEAD], resolved[DEAD]) | "FlattenDeadLetters" >> beam.Flatten()
    return {"rows": resolved.rows, DEAD: dead}


def reconcile(counters: Mapping[str, int], split: str, files: Optional[int] = None) -> dict:
  """Reconciliation of one split from the job's counters (names as set above).

  Balanced when every row read was written or set aside, and every one of the ``files``
  matched at launch had its header line read (so none was skipped).
  """
  ns = f"{FMT}/{split}/"
  get = lambda name: int(counters.get(ns + name, 0))
  dead = {k[len(ns + "dead/"):]: int(v) for k, v in counters.items() if k.startswith(ns + "dead/")}
  out = {
      "files": files,
      "header_lines": get("header_lines"),
      "rows_read": get("rows_read"),
      "rows_written": get("rows_written"),
      "rows_set_aside": dead,
      "rows_by_stage": rows_by_stage(counters, ns, (
          ("read", "rows_read"), ("after_dedup", "rows_after_dedup"),
          ("into_transform", F.ROWS_INTO_TRANSFORM), ("written", "rows_written"))),
  }
  out["rows_unaccounted_by_hop"] = unaccounted_by_hop(out["rows_by_stage"], dead)
  out["balanced"] = (out["rows_read"] == out["rows_written"] + sum(dead.values())
                     and (files is None or out["header_lines"] >= files))
  return out
