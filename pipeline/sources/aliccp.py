"""Reader for the raw Ali-CCP release: skeleton + common-features CSV pairs.

Layout (docs/data-formats.md):
  skeleton: sample_id,click,conversion,common_feature_index,feature_num,feature_list
  common:   common_feature_index,feature_num,feature_list
  feature_list: items separated by \\x01; item = field_id \\x02 feature_id \\x03 value

The parse functions are pure and raise BadRecord with a stable reason; the Beam
transforms route those rows to a dead-letter output and count every row:
rows read = rows joined + rows set aside (per reason). Values are checked in the dtype they
are stored in (ids int64, weights float32), and a byte-order mark at the start of a file is
dropped (ReadLines).
"""

import functools
import re
from typing import Dict, List, Mapping, Optional, Tuple, Union

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io import textio
from apache_beam.transforms.window import GlobalWindows

from pipeline.sources import dedup, grouping, lines
from pipeline.sources.deadletter import (BAD_SAMPLE_ID, BOM, CONVERSION_WITHOUT_CLICK, DEAD, FLOAT32_OVERFLOW,
                                        INT64_MAX, NOT_UTF8, WRONG_COLUMN_COUNT, BadRecord, counter,
                                        dead_letter, decode_line, parse_int64, rows_by_stage,
                                        unaccounted_by_hop)
from preprocessing import features as F

FMT = "aliccp"
ITEM_SEP = "\x01"
FIELD_SEP = "\x02"
VALUE_SEP = "\x03"

# Reasons a row is set aside (stable identifiers, used in counters and dead letters), besides
# the ones every source has (deadletter.py).
BAD_LABEL = "bad_label"
BAD_COMMON_FEATURE_INDEX = "bad_common_feature_index"
BAD_FEATURE_NUM = "bad_feature_num"
FEATURE_NUM_MISMATCH = "feature_num_mismatch"
BAD_FEATURE_ITEM = "bad_feature_item"
BAD_WEIGHT = "bad_weight"
UNKNOWN_COMMON_FEATURE_INDEX = "unknown_common_feature_index"
DUPLICATE_COMMON_FEATURE_INDEX = "duplicate_common_feature_index"
# The grouped layout stores the user side once per common row: a skeleton row with values of a
# user-side field of its own has no place in it (preprocess such input with --layout=rows).
USER_FIELD_IN_SKELETON = "user_field_in_skeleton"
_PARSE_REASONS = (NOT_UTF8, WRONG_COLUMN_COUNT, BAD_COMMON_FEATURE_INDEX, BAD_FEATURE_NUM,
                  FEATURE_NUM_MISMATCH, BAD_FEATURE_ITEM, BAD_WEIGHT)
# Every reason a row of each file can be set aside for.
SKELETON_REASONS = _PARSE_REASONS + (BAD_SAMPLE_ID, BAD_LABEL, CONVERSION_WITHOUT_CLICK,
                                     UNKNOWN_COMMON_FEATURE_INDEX, DUPLICATE_COMMON_FEATURE_INDEX,
                                     USER_FIELD_IN_SKELETON) + dedup.REASONS
COMMON_REASONS = _PARSE_REASONS + (DUPLICATE_COMMON_FEATURE_INDEX,)

# Features of one row: field name -> (feature ids, weights).
Features = Dict[str, Tuple[List[int], List[float]]]


def _is_uint(text: Union[str, bytes]) -> bool:
  return text.isascii() and text.isdigit()


def is_sample_id(text: Union[str, bytes]) -> bool:
  """A sample id as the release writes it: a non-negative decimal that fits int64 (str, or
  bytes for pipeline/partition.py's pass over raw lines); as parse_int64 accepts it."""
  if not _is_uint(text):
    return False
  return len(text.lstrip(b"0" if isinstance(text, bytes) else "0")) <= 19 and int(text) <= INT64_MAX


def looks_like_aliccp(line) -> bool:
  """Whether a raw line has Ali-CCP's feature-list separators (to tell a wrong --format)."""
  raw = line if isinstance(line, bytes) else line.encode("utf-8", errors="replace")
  return FIELD_SEP.encode() in raw and VALUE_SEP.encode() in raw


def parse_feature_list(text: str, feature_num: int, known_fields) -> Tuple[Features, int]:
  """Parses a \\x01\\x02\\x03 feature list; returns (features, number of unknown-field items).

  Items of fields not in ``known_fields`` are counted and skipped; every value of a
  repeated field is kept in order with its weight.
  """
  items = text.split(ITEM_SEP) if text else []
  if len(items) != feature_num:
    raise BadRecord(FEATURE_NUM_MISMATCH, f"feature_num={feature_num} but the list has {len(items)} items")
  out: Features = {}
  unknown = 0
  for item in items:
    field, sep, rest = item.partition(FIELD_SEP)
    feature_id, sep2, value = rest.partition(VALUE_SEP)
    if not sep or not sep2 or not field:
      raise BadRecord(BAD_FEATURE_ITEM, f"item {item[:80]!r} is not field\\x02id\\x03value")
    if _is_uint(feature_id) and len(feature_id) <= 18:
      feature_id = int(feature_id)   # the common case, inline: this runs per item
    else:
      feature_id = parse_int64(feature_id, BAD_FEATURE_ITEM, f"field {field[:20]!r}: feature id")
    try:
      weight = float(value)
    except ValueError:
      raise BadRecord(BAD_FEATURE_ITEM, f"value {value[:40]!r} of field {field[:20]!r} is not a number") from None
    # Checked as the float32 it is stored in: 1e39 is finite as a float64, inf as a float32.
    if not 0 <= weight < FLOAT32_OVERFLOW:   # also false for NaN
      raise BadRecord(BAD_WEIGHT, f"weight {value[:40]!r} of field {field[:20]!r} is not a finite "
                                  "non-negative float32")
    if field not in known_fields:
      unknown += 1
      continue
    ids, weights = out.setdefault(field, ([], []))
    ids.append(feature_id)
    weights.append(weight)
  return out, unknown


# A feature list every item of which parse_feature_list accepts, written the way the release
# writes it: plain decimal ids of at most 18 digits, plain decimal weights below 1e38 (a float32).
_ITEM = "[^\x01\x02]+\x02[0-9]{1,18}\x03[0-9]{1,38}(?:\\.[0-9]*)?"
_PLAIN_LIST = re.compile(f"(?:{_ITEM}\x01)*{_ITEM}")


@functools.lru_cache(maxsize=8)
def _known_list(known_fields: frozenset) -> "re.Pattern":
  """A plain list every item of which has a field in ``known_fields`` (the common case: one
  pass, about 2.5x faster than _PLAIN_LIST and _unknown_items together)."""
  known = "|".join(re.escape(f) for f in sorted(known_fields, key=len, reverse=True))
  item = f"(?:{known})\x02[0-9]{{1,18}}\x03[0-9]{{1,38}}(?:\\.[0-9]*)?"
  return re.compile(f"(?:{item}\x01)*{item}")


@functools.lru_cache(maxsize=8)
def _unknown_items(known_fields: frozenset) -> "re.Pattern":
  """Matches the start of each item (of a plain list) whose field is not in ``known_fields``."""
  known = "|".join(re.escape(f) for f in sorted(known_fields, key=len, reverse=True))
  return re.compile(f"(?:^|\x01)(?!(?:{known})\x02)[^\x01\x02]+\x02")


def check_feature_list(text: str, feature_num: int, known_fields) -> int:
  """Validates a feature list as parse_feature_list does, without building it; returns the
  number of unknown-field items. A list in the release's plain form is checked by one regular
  expression; any other goes through parse_feature_list, which raises the reason it is bad."""
  if text and text.count(ITEM_SEP) + 1 == feature_num:
    known = known_fields if isinstance(known_fields, frozenset) else frozenset(known_fields)
    if _known_list(known).fullmatch(text):
      return 0
    if _PLAIN_LIST.fullmatch(text):
      return len(_unknown_items(known).findall(text))
  return parse_feature_list(text, feature_num, known_fields)[1]


def _parse_feature_num(text: str) -> int:
  return parse_int64(text, BAD_FEATURE_NUM, "feature_num")


def _parse_index(text: str) -> str:
  if not text or not text.isascii() or not text.isalnum():
    raise BadRecord(BAD_COMMON_FEATURE_INDEX, f"common_feature_index {text[:40]!r} is empty or not alphanumeric")
  return text


# ``features=RAW`` in the parse functions: the feature list as (feature_num, text), not parsed
# and not checked (for lines the job's first pass checked; see aliccp_groups.py).
RAW = "raw"


# ``features=CHECKED``: the feature list checked as ``features=False`` does, and given back as RAW
# gives it (what the job's first pass hands on).
CHECKED = "checked"


def _feature_list(text: str, feature_num: str, known_fields, features) -> Tuple[Optional[Features], int]:
  num = _parse_feature_num(feature_num)
  if features == RAW:
    return (num, text), 0
  if features == CHECKED:
    return (num, text), check_feature_list(text, num, known_fields)
  if features:
    return parse_feature_list(text, num, known_fields)
  return None, check_feature_list(text, num, known_fields)


def parse_skeleton_line(line, known_fields, features=True) -> Tuple[dict, int]:
  """One skeleton row -> ({sample_id, click, conversion, index, features}, unknown items).
  ``features`` False validates the feature list without building it (features None); RAW and
  CHECKED: above."""
  line = decode_line(line)
  parts = line.split(",", 5)
  if len(parts) != 6:
    raise BadRecord(WRONG_COLUMN_COUNT, f"expected 6 comma-separated columns, got {len(parts)}")
  sample_id, click, conversion, index, feature_num, feature_list = parts
  sample_id = parse_int64(sample_id, BAD_SAMPLE_ID, "sample_id")
  if click not in ("0", "1") or conversion not in ("0", "1"):
    raise BadRecord(BAD_LABEL, f"click={click[:10]!r} conversion={conversion[:10]!r}; both must be 0 or 1")
  index = _parse_index(index)
  parsed, unknown = _feature_list(feature_list, feature_num, known_fields, features)
  if click == "0" and conversion == "1":
    raise BadRecord(CONVERSION_WITHOUT_CLICK, "click=0 but conversion=1 is impossible in the funnel")
  row = {"sample_id": sample_id, "click": int(click), "conversion": int(conversion),
         "index": index, "features": parsed}
  return row, unknown


def parse_common_line(line, known_fields, features=True) -> Tuple[dict, int]:
  """One common-features row -> ({index, features}, unknown items); ``features``: as in
  parse_skeleton_line."""
  line = decode_line(line)
  parts = line.split(",", 2)
  if len(parts) != 3:
    raise BadRecord(WRONG_COLUMN_COUNT, f"expected 3 comma-separated columns, got {len(parts)}")
  index, feature_num, feature_list = parts
  index = _parse_index(index)
  parsed, unknown = _feature_list(feature_list, feature_num, known_fields, features)
  return {"index": index, "features": parsed}, unknown


JOINED_LABELS = (F.SAMPLE_ID, F.CLICK, F.CONVERSION)   # the skeleton's keys a joined row keeps


def to_raw_instance(skeleton: Mapping, common_features: Features, schema=None) -> dict:
  """A joined row as the raw instance dict that the TFT preprocessing_fn reads.

  User-side values from the common row come first, then the skeleton's own; a field
  missing from both becomes an empty list.
  """
  schema = schema or F.fields(FMT)
  instance = {name: skeleton[name] for name in JOINED_LABELS}
  own = skeleton["features"]
  for field in schema:
    ids: List[int] = []
    weights: List[float] = []
    for source in (common_features, own):
      got = source.get(field.name)
      if got:
        ids.extend(got[0])
        weights.extend(got[1])
    instance[field.raw_ids] = ids
    if field.weighted:
      instance[field.raw_weights] = weights
  return instance


class _TextSourceWithoutBom(textio._TextSource):
  """Beam's text source (raw bytes lines) less a byte-order mark at the start of a file. Only the
  reader of the range that starts at byte 0 reads the file's first record; a BOM anywhere else is
  data (and the row is set aside for it)."""

  def read_records(self, file_name, range_tracker):
    first = range_tracker.start_position() == 0
    for record in super().read_records(file_name, range_tracker):
      if first:
        first = False
        if record.startswith(BOM):
          record = record[len(BOM):]
      yield record


class ReadLines(beam.io.ReadFromText):
  """ReadFromText (with a BytesCoder) that drops the BOM a file may start with."""
  _source_class = _TextSourceWithoutBom


# Tags of the two sides of the join (the first item of a grouped value).
SKELETON, COMMON = 0, 1
KNOWN_FIELDS = frozenset(f.name for f in F.fields(FMT))


# A validated skeleton row between the job's stages: (sample_id, click, conversion,
# common_feature_index, feature_num, feature list text). The feature list travels as the text
# it was read as: cheaper to move through the shuffles than a parsed row, and the join parses
# a batch of them at once (aliccp_groups.py) or one at a time (RecordBatchBuilder's rows).
Skeleton = Tuple[int, int, int, str, int, str]


def skeleton_row(skeleton: Skeleton, features=True) -> dict:
  """A validated skeleton as parse_skeleton_line's row (``features``: True, or RAW)."""
  sample_id, click, conversion, index, num, text = skeleton
  parsed = (num, text) if features == RAW else parse_feature_list(text, num, KNOWN_FIELDS)[0]
  return {"sample_id": sample_id, "click": click, "conversion": conversion, "index": index,
          "features": parsed}


# A skeleton line in the release's plain form, every item of a known field (_known_list).
_PLAIN_SKELETON = re.compile("([0-9]{1,18}),([01]),([01]),([A-Za-z0-9]+),([0-9]{1,18}),(%s)"
                             % _known_list(KNOWN_FIELDS).pattern)


def checked_skeleton(line) -> Tuple[Skeleton, int]:
  """A skeleton line validated -> (its Skeleton, unknown items): parse_skeleton_line(...,
  features=CHECKED) as a tuple. A line in the plain form is checked by one regular expression;
  any other goes through parse_skeleton_line, which raises the reason it is bad."""
  text = decode_line(line)
  m = _PLAIN_SKELETON.fullmatch(text)
  if m is not None and (m[2], m[3]) != ("0", "1"):
    num, features = int(m[5]), m[6]
    if features.count(ITEM_SEP) + 1 == num:
      return (int(m[1]), int(m[2]), int(m[3]), m[4], num, features), 0
  row, unknown = parse_skeleton_line(text, KNOWN_FIELDS, features=CHECKED)
  return (row["sample_id"], row["click"], row["conversion"], row["index"], *row["features"]), unknown


@beam.typehints.with_output_types(Tuple[int, bytes])
class _ParseFn(beam.DoFn):
  """Validates batches of raw lines (lines.ReadLineBatches): bad rows to DEAD with their reason,
  good ones into the buckets of the join's shuffle (grouping.Buckets), so no row is an element of
  its own: skeleton rows as (SKELETON, Skeleton), common rows as (COMMON, line), both keyed by
  common_feature_index. The feature lists are checked (check_feature_list), not built. With
  ``sample_ids``, the skeletons' sample ids also go to SAMPLE_IDS (dedup.SampleIds), for the
  dedup's shuffle of ids."""

  def __init__(self, split: str, source: str, sample_ids: bool = False):
    self._split = split
    self._source = source
    self._sample_ids = sample_ids
    ns = f"{FMT}/{split}"
    self._read = counter(ns, f"{source}_rows_read")
    self._unknown = counter(ns, f"{source}_unknown_field_items_skipped")
    self._ns = ns
    self._buckets = self._ids = None

  def start_bundle(self):
    self._buckets = grouping.Buckets()
    self._ids = dedup.SampleIds() if self._sample_ids else None

  def process(self, lines):
    self._read.inc(len(lines))
    unknown = 0
    add = self._buckets.add
    skeleton = self._source == "skeleton"
    add_id = self._ids.add if self._ids is not None else None
    for line in lines:
      try:
        if skeleton:
          value, n = checked_skeleton(line)
        else:
          row, n = parse_common_line(line, KNOWN_FIELDS, features=CHECKED)
      except BadRecord as e:
        counter(self._ns, f"{self._source}_dead/{e.reason}").inc()
        yield beam.pvalue.TaggedOutput(DEAD, dead_letter(self._split, self._source, e.reason, e.detail, line=line))
        continue
      unknown += n
      if not skeleton:
        full = add(row["index"], (COMMON, line))
      else:
        full = add(value[3], (SKELETON, value))
        if add_id is not None:
          add_id(value[0])
      if full is not None:
        yield full
    if unknown:
      self._unknown.inc(unknown)
    if add_id is not None and len(self._ids) >= _IDS_PER_FLUSH:
      for ids in self._ids.flush():
        yield beam.pvalue.TaggedOutput(SAMPLE_IDS, ids)

  def finish_bundle(self):
    for full in self._buckets.flush():
      yield GlobalWindows.windowed_value(full)
    if self._ids is not None and len(self._ids):
      for ids in self._ids.flush():
        yield beam.pvalue.TaggedOutput(SAMPLE_IDS, GlobalWindows.windowed_value(ids))


SAMPLE_IDS = "sample_ids"   # _ParseFn's output of the skeletons' sample ids
_IDS_PER_FLUSH = 1 << 20


class RecordBatchBuilder:
  """Joined rows -> Arrow RecordBatches of TFT's raw input (``arrow_schema``: raw_tfxio's
  ArrowSchema), column by column: the columns of to_raw_instance's dicts, without a dict per row.
  User-side values from the common row come first, then the skeleton's own."""

  def __init__(self, arrow_schema: pa.Schema, schema=None):
    self._arrow = arrow_schema
    self._fields = [(f.name, f.raw_ids, f.raw_weights if f.weighted else None) for f in (schema or F.fields(FMT))]
    self.clear()

  def clear(self):
    self._ids = {name: [] for name, _, _ in self._fields}
    self._weights = {name: [] for name, _, w in self._fields if w}
    self._lengths = {name: [] for name, _, _ in self._fields}
    self._labels = {name: [] for name in JOINED_LABELS}

  def __len__(self) -> int:
    return len(self._labels[F.SAMPLE_ID])

  def add(self, skeleton: Mapping, common_features: Features):
    for name in self._labels:
      self._labels[name].append(skeleton[name])
    own = skeleton["features"]
    for name, _, weighted in self._fields:
      ids = self._ids[name]
      before = len(ids)
      for source in (common_features, own):   # to_raw_instance's order, inline: this runs per row and field
        got = source.get(name)
        if got:
          ids.extend(got[0])
          if weighted:
            self._weights[name].extend(got[1])
      self._lengths[name].append(len(ids) - before)

  def build(self) -> pa.RecordBatch:
    """The rows added since the last build (or clear) as one RecordBatch; starts a new one."""
    n = len(self)
    columns = {}
    one_each = pa.array(np.arange(n + 1, dtype=np.int64))
    for name, values in self._labels.items():
      columns[name] = pa.LargeListArray.from_arrays(one_each, pa.array(values, pa.int64()))
    for name, raw_ids, raw_weights in self._fields:
      offsets = pa.array(np.concatenate([[0], np.cumsum(self._lengths[name], dtype=np.int64)]))
      columns[raw_ids] = pa.LargeListArray.from_arrays(offsets, pa.array(self._ids[name], pa.int64()))
      if raw_weights:
        columns[raw_weights] = pa.LargeListArray.from_arrays(offsets, pa.array(self._weights[name], pa.float32()))
    self.clear()
    return pa.RecordBatch.from_arrays([columns[f.name] for f in self._arrow], schema=self._arrow)


def _sample_id(skeleton: Skeleton) -> int:
  return skeleton[0]


def user_fields_in(skeleton: Mapping) -> List[str]:
  """The user-side fields a parsed skeleton row has values of (the grouped layout refuses it)."""
  return sorted(name for name in skeleton["features"] if name in USER_FIELDS)


USER_FIELDS = frozenset(f.name for f in F.fields(FMT) if f.group_level)
# The start of an item of a user-side field, in a feature list with ITEM_SEP put in front (a
# pattern that starts with a literal is searched for that literal first: 40x faster than "^|").
_USER_ITEM = re.compile("\x01(?:{})\x02".format(
    "|".join(re.escape(f) for f in sorted(USER_FIELDS, key=len, reverse=True))))


def _has_user_field(feature_list: str) -> bool:
  return _USER_ITEM.search(ITEM_SEP + feature_list) is not None


class _JoinFn(beam.DoFn):
  """Buckets of both sides grouped by common_feature_index -> the skeletons of each index joined
  with its common line; the joined rows go out as RecordBatches of up to ``batch_rows`` rows (see
  RecordBatchBuilder). With ``resolve``, each index's skeletons are first resolved by sample id
  (dedup.resolve_group; ``repeated``: the side input of dedup.RepeatedSampleIds)."""

  def __init__(self, split: str, arrow_schema: pa.Schema, batch_rows: int, layout: str = F.ROWS,
               resolve: Optional[dedup.ResolveFn] = None):
    self._resolve = resolve
    self._split = split
    self._layout = layout
    self._ns = f"{FMT}/{split}"
    self._arrow = arrow_schema
    self._batch_rows = batch_rows
    self._joined = counter(self._ns, "skeleton_rows_joined")
    self._into_transform = counter(self._ns, F.ROWS_INTO_TRANSFORM)
    self._unused = counter(self._ns, "common_rows_unused")
    self._used = counter(self._ns, "common_rows_used")
    self._builder = None

  def setup(self):
    if self._layout == F.GROUPED:
      from pipeline.sources import aliccp_groups  # it builds on this module
      self._builder = aliccp_groups.GroupedRecordBatchBuilder(self._arrow)
    else:
      self._builder = RecordBatchBuilder(self._arrow)

  def start_bundle(self):
    self._builder.clear()

  def _batch(self) -> pa.RecordBatch:
    self._into_transform.inc(len(self._builder))
    return self._builder.build()

  def process(self, element, repeated=None):
    for index, grouped in grouping.regroup(element):
      yield from self._join(index, grouped, repeated)

  def _join(self, index, grouped, repeated):
    skeletons, commons = [], []
    for side, value in grouped:
      (skeletons if side == SKELETON else commons).append(value)
    if self._resolve is not None and skeletons:
      # Copies of a sample id under this index meet here; copies under another index differ.
      skeletons, dead = dedup.resolve_group(self._resolve, skeletons, _sample_id, repeated or {})
      yield from dead
    # The grouped layout's builder parses a batch of groups' feature lists at once (RAW: as text).
    features = RAW if self._layout == F.GROUPED else True
    common = None
    if len(commons) > 1:
      # An index names one user-side context. Copies that parse the same (a replayed log, a file
      # listed twice) are one row: one is kept, the others set aside, as dedup.py does with
      # sample ids. Copies that differ: there is no telling which is right, so none is kept,
      # and the impressions of the index are set aside with them.
      parsed = [parse_common_line(line, KNOWN_FIELDS)[0]["features"] for line in commons]
      reason = DUPLICATE_COMMON_FEATURE_INDEX
      if all(p == parsed[0] for p in parsed[1:]):
        extra, detail = commons[1:], f"{len(commons)} identical common-features rows share this index; one is kept"
      else:
        extra, detail = commons, f"{len(commons)} different common-features rows share this index; none is kept"
      for line in extra:
        counter(self._ns, f"common_dead/{reason}").inc()
        yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
            self._split, "common", reason, detail, line=line, common_feature_index=index))
      commons = commons[:1] if len(extra) < len(commons) else []
    elif not commons:
      reason, detail = UNKNOWN_COMMON_FEATURE_INDEX, "no common-features row has this index"
    if commons:
      common = parse_common_line(commons[0], KNOWN_FIELDS, features)[0]["features"]
    group = []
    for value in skeletons:
      skeleton = skeleton_row(value, features)
      why = None
      if common is None:
        why = reason, detail
      elif self._layout == F.GROUPED and _has_user_field(skeleton["features"][1]):
        names = user_fields_in(skeleton_row(value))
        why = USER_FIELD_IN_SKELETON, (f"the grouped layout stores user-side fields once per common row; this "
                                       f"row has its own {', '.join(names)}: preprocess with --layout=rows")
      if why is not None:
        counter(self._ns, f"skeleton_dead/{why[0]}").inc()
        yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
            self._split, "skeleton", why[0], why[1],
            sample_id=skeleton["sample_id"], common_feature_index=index))
        continue
      self._joined.inc()
      if self._layout == F.GROUPED:
        group.append((skeleton, *skeleton["features"]))
        continue
      self._builder.add(skeleton, common)
      if len(self._builder) >= self._batch_rows:
        yield self._batch()
    if group:
      self._builder.add(group, common)
      if len(self._builder) >= self._batch_rows:
        yield self._batch()
    if commons:
      (self._used if skeletons else self._unused).inc()

  def finish_bundle(self):
    if len(self._builder):
      yield GlobalWindows.windowed_value(self._batch())


class ReadAliCCP(beam.PTransform):
  """Reads, parses, validates and joins one Ali-CCP split.

  Returns a dict with ``record_batches`` (the joined rows as Arrow RecordBatches of up to
  ``batch_rows`` rows of ``arrow_schema``, TFT's raw input: raw_tfxio(...).ArrowSchema()) and
  ``dead_letter`` (JSON lines). The join is a GroupByKey on common_feature_index over both files' lines, so neither
  file has to fit in memory and their orders do not matter. With ``dedup_sample_ids`` (the
  default) skeleton rows sharing a sample id are resolved in the join, before it joins them
  (pipeline/sources/dedup.py);
  ``conflicts``: see dedup.ResolveFn (a partitioned job's sample ids whose copies in
  other partitions differ).
  """

  def __init__(self, split: str, skeleton_pattern: str, common_pattern: str, arrow_schema: pa.Schema,
               batch_rows: int, dedup_sample_ids: bool = True, conflicts: Optional[Mapping[int, int]] = None,
               layout: str = F.ROWS):
    super().__init__()
    self._layout = layout
    self._conflicts = conflicts
    self._split = split
    self._skeleton = skeleton_pattern
    self._common = common_pattern
    self._arrow = arrow_schema
    self._dedup = dedup_sample_ids
    self._batch_rows = batch_rows

  def expand(self, pbegin):
    # Lines are read and handed on in batches, and every shuffle carries buckets of rows
    # (grouping.Buckets): no row is a Beam element of its own, whose cost on the DirectRunner
    # was most of the job's (pipeline/sources/lines.py).
    read = lambda name, pattern: pbegin | f"Read{name}" >> lines.ReadLineBatches(pattern)
    skeleton = (read("Skeleton", self._skeleton)
                | "ParseSkeleton" >> beam.ParDo(_ParseFn(self._split, "skeleton", sample_ids=self._dedup))
                .with_outputs(DEAD, SAMPLE_IDS, main="buckets"))
    common = (read("Common", self._common)
              | "ParseCommon" >> beam.ParDo(_ParseFn(self._split, "common")).with_outputs(DEAD, main="buckets"))
    dead = [skeleton[DEAD], common[DEAD]]
    resolve, side = None, {}
    if self._dedup:
      # The skeletons move once, grouped by index for the join; only their sample ids go
      # through a shuffle of their own, which finds the repeated ones (dedup.RepeatedSampleIds).
      resolve = dedup.ResolveFn(self._split, "skeleton", f"{FMT}/{self._split}", "skeleton_dead/",
                                "skeleton_rows_after_dedup", canonical=skeleton_row, conflicts=self._conflicts)
      repeated = skeleton[SAMPLE_IDS] | "RepeatedSampleIds" >> dedup.RepeatedSampleIds()
      side = {"repeated": beam.pvalue.AsDict(repeated)}
    # A CoGroupByKey by hand: both sides tagged as they are keyed, one GroupByKey of their buckets.
    joined = ((skeleton.buckets, common.buckets)
              | "FlattenByIndex" >> beam.Flatten()
              | "GroupByIndex" >> beam.GroupByKey()
              | "Join" >> beam.ParDo(_JoinFn(self._split, self._arrow, self._batch_rows, self._layout, resolve),
                                     **side)
              .with_outputs(DEAD, main="record_batches"))
    dead = (dead + [joined[DEAD]]) | "FlattenDeadLetters" >> beam.Flatten()
    return {"record_batches": joined.record_batches, DEAD: dead}


def reconcile(counters: Mapping[str, int], split: str) -> dict:
  """Reconciliation of one split from the job's counters (names as set above).

  ``written`` is the number of TFRecord examples written for the split.
  """
  ns = f"{FMT}/{split}/"
  get = lambda name: int(counters.get(ns + name, 0))
  per_reason = lambda source: {k[len(ns + source + "_dead/"):]: int(v) for k, v in counters.items()
                               if k.startswith(ns + source + "_dead/")}
  skeleton_dead = per_reason("skeleton")
  common_dead = per_reason("common")
  out = {
      "skeleton_rows_read": get("skeleton_rows_read"),
      "rows_written": get("rows_written"),
      "skeleton_rows_set_aside": skeleton_dead,
      "common_rows_read": get("common_rows_read"),
      "common_rows_used": get("common_rows_used"),
      "common_rows_unused": get("common_rows_unused"),
      "common_rows_set_aside": common_dead,
      "unknown_field_items_skipped": get("skeleton_unknown_field_items_skipped")
                                     + get("common_unknown_field_items_skipped"),
      "rows_by_stage": rows_by_stage(counters, ns, (
          ("read", "skeleton_rows_read"), ("after_dedup", "skeleton_rows_after_dedup"),
          ("joined", "skeleton_rows_joined"), ("into_transform", F.ROWS_INTO_TRANSFORM),
          ("written", "rows_written"))),
  }
  out["rows_unaccounted_by_hop"] = unaccounted_by_hop(
      out["rows_by_stage"], skeleton_dead,
      {UNKNOWN_COMMON_FEATURE_INDEX: "joined", DUPLICATE_COMMON_FEATURE_INDEX: "joined",
       USER_FIELD_IN_SKELETON: "joined"})
  out["skeleton_balanced"] = out["skeleton_rows_read"] == out["rows_written"] + sum(skeleton_dead.values())
  out["common_balanced"] = out["common_rows_read"] == (
      out["common_rows_used"] + out["common_rows_unused"] + sum(common_dead.values()))
  return out
