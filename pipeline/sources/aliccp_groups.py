"""The grouped layout's RecordBatches (F.GROUPED), built from joined groups' raw feature lists.

A group is one common row and the skeleton rows that join it. The builder keeps each group's
lines as text and parses a whole batch of them at once when it builds: Arrow's CSV reader reads
every item of the batch (field, id, weight) in C++, and numpy cuts the columns from the flat
items. Item by item in Python the parse cost about 1.2 µs an item, about five times this, and it
was most of the job's time at the release's shape (benchmarks/README.md, "The public release at
its size"). A batch Arrow does not read exactly as parse_feature_list would (an unusual but valid
number, a separator inside a field name) is parsed by parse_feature_list instead; the columns are
the same either way.
"""

import io
from typing import List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from pipeline.sources import aliccp as A
from preprocessing import features as F

# The items of newline-joined lists as CSV rows of (field, id, weight).
_AS_CSV = str.maketrans({A.ITEM_SEP: "\n", A.VALUE_SEP: A.FIELD_SEP})
_COLUMNS = ("field", "id", "weight")
_READ = pcsv.ReadOptions(column_names=list(_COLUMNS), use_threads=False, block_size=1 << 24)
_PARSE = pcsv.ParseOptions(delimiter=A.FIELD_SEP, quote_char=False, escape_char=False,
                           newlines_in_values=False, ignore_empty_lines=True)
_CONVERT = pcsv.ConvertOptions(column_types={"field": pa.string(), "id": pa.int64(), "weight": pa.float64()},
                               null_values=[], strings_can_be_null=False, quoted_strings_can_be_null=False)
# (field names, field code per item, ids int64, weights float64, list index per item)
Items = Tuple[List[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def parse_lists(texts: Sequence[str], nums: Sequence[int]) -> Items:
  """The items of feature lists that the job's first pass checked (``nums``: their item counts),
  flat and in order; unknown fields' items too. The lists are valid, so Arrow either reads a
  number as Python does or refuses it (" 1", "1_0" and non-ASCII digits are valid weights to
  Python only); a refusal, or a list that Arrow cuts into other items than it has (a line end,
  or \x03 in a field name), sends the batch to parse_feature_list."""
  nums = np.asarray(nums, np.int64)
  text = "\n".join(texts)
  if "\r" not in text and text.count("\n") == len(texts) - 1:
    try:
      table = pcsv.read_csv(io.BytesIO(text.translate(_AS_CSV).encode("utf-8")), read_options=_READ,
                            parse_options=_PARSE, convert_options=_CONVERT)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      table = None
    if table is not None and table.num_rows == int(nums.sum()):
      encoded = pc.dictionary_encode(table.column("field").combine_chunks())
      return (encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64),
              table.column("id").to_numpy(), table.column("weight").to_numpy(),
              np.repeat(np.arange(len(texts)), nums))
  return _parse_lists_python(texts, nums)


def _parse_lists_python(texts: Sequence[str], nums: np.ndarray) -> Items:
  names: List[str] = []
  code = {}
  codes, ids, weights, where = [], [], [], []
  for t, (text, num) in enumerate(zip(texts, nums)):
    features, _ = A.parse_feature_list(text, int(num), A.KNOWN_FIELDS)
    for name, (field_ids, field_weights) in features.items():
      c = code.setdefault(name, len(names))
      if c == len(names):
        names.append(name)
      codes += [c] * len(field_ids)
      ids += field_ids
      weights += field_weights
      where += [t] * len(field_ids)
  return (names, np.asarray(codes, np.int64), np.asarray(ids, np.int64), np.asarray(weights, np.float64),
          np.asarray(where, np.int64))


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
  """0..c-1 for each c of ``counts``, concatenated."""
  ends = np.cumsum(counts)
  return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)


def _list_array(lengths: np.ndarray, values: np.ndarray, dtype: pa.DataType) -> pa.LargeListArray:
  offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
  return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values.astype(dtype.to_pandas_dtype()), dtype))


class GroupedRecordBatchBuilder:
  """Joined groups -> RecordBatches of the grouped raw schema (``arrow_schema``: raw_tfxio of
  raw_metadata(..., layout=F.GROUPED)): one row per common row. Its user-side fields hold the
  common row's values once; every other field holds its impressions' values (the common row's,
  then the skeleton's own, as RecordBatchBuilder joins them) concatenated, with the count per
  impression in ``n_<field>``; labels and sample ids one per impression."""

  def __init__(self, arrow_schema: pa.Schema, schema=None):
    self._arrow = arrow_schema
    fields = schema or F.fields(A.FMT)
    self._group = [(f.name, f.raw_ids, f.raw_weights if f.weighted else None) for f in fields if f.group_level]
    self._rows = [(f.name, f.raw_ids, f.raw_weights if f.weighted else None, f.lengths)
                  for f in fields if not f.group_level]
    self.clear()

  def clear(self):
    self._texts: List[str] = []
    self._nums: List[int] = []
    self._text_impression: List[int] = []   # the impression a list is of; -1: a group's common row
    self._text_group: List[int] = []
    self._labels = {name: [] for name in A.JOINED_LABELS}
    self._group_sizes: List[int] = []

  def __len__(self) -> int:
    """Impressions added since the last build."""
    return len(self._labels[F.SAMPLE_ID])

  def add(self, skeletons: List[Tuple[dict, int, str]], common: Tuple[int, str]) -> None:
    """One group: its skeleton rows as (row, feature_num, feature list) with the row's labels and
    sample id (parse_skeleton_line(..., features=RAW)), none with a user-side field, and its
    common row's (feature_num, feature list)."""
    group = len(self._group_sizes)
    first = len(self)
    for i, (row, num, text) in enumerate(skeletons):
      for name in A.JOINED_LABELS:
        self._labels[name].append(row[name])
      self._texts.append(text)
      self._nums.append(num)
      self._text_impression.append(first + i)
      self._text_group.append(group)
    self._texts.append(common[1])
    self._nums.append(common[0])
    self._text_impression.append(-1)
    self._text_group.append(group)
    self._group_sizes.append(len(skeletons))

  def build(self) -> pa.RecordBatch:
    """The groups added since the last build as one RecordBatch; starts a new one."""
    names, codes, ids, weights, where = parse_lists(self._texts, self._nums)
    item_impression = np.asarray(self._text_impression, np.int64)[where]
    item_group = np.asarray(self._text_group, np.int64)[where]
    shared = item_impression < 0
    sizes = np.asarray(self._group_sizes, np.int64)
    groups, impressions = len(sizes), int(sizes.sum())
    impression_group = np.repeat(np.arange(groups), sizes)
    code = {name: c for c, name in enumerate(names)}
    columns = {name: (sizes, np.asarray(values)) for name, values in self._labels.items()}

    def items_of(name, of_common):
      c = code.get(name, -1)
      return (codes == c) & (shared if of_common else ~shared)

    for name, raw_ids, raw_weights in self._group:
      sel = items_of(name, True)
      lengths = np.bincount(item_group[sel], minlength=groups)
      columns[raw_ids] = (lengths, ids[sel])
      if raw_weights:
        columns[raw_weights] = (lengths, weights[sel])
    for name, raw_ids, raw_weights, lengths_column in self._rows:
      own = items_of(name, False)
      own_counts = np.bincount(item_impression[own], minlength=impressions)
      common = items_of(name, True)
      if not common.any():
        counts, row_ids, row_weights = own_counts, ids[own], weights[own]
      else:
        # The common row's values of this field come first in each of its impressions.
        common_per_group = np.bincount(item_group[common], minlength=groups)
        common_counts = common_per_group[impression_group]
        common_start = (np.cumsum(common_per_group) - common_per_group)[impression_group]
        counts = common_counts + own_counts
        offsets = np.cumsum(counts) - counts
        row_ids = np.empty(int(counts.sum()), np.int64)
        row_weights = np.empty(int(counts.sum()), np.float64)
        to = np.repeat(offsets, common_counts) + _ragged_arange(common_counts)
        source = np.repeat(common_start, common_counts) + _ragged_arange(common_counts)
        row_ids[to], row_weights[to] = ids[common][source], weights[common][source]
        to = np.repeat(offsets + common_counts, own_counts) + _ragged_arange(own_counts)
        row_ids[to], row_weights[to] = ids[own], weights[own]
      per_group = np.bincount(impression_group, weights=counts, minlength=groups).astype(np.int64)
      columns[raw_ids] = (per_group, row_ids)
      if raw_weights:
        columns[raw_weights] = (per_group, row_weights)
      columns[lengths_column] = (sizes, counts)
    arrays = [_list_array(*columns[field.name], field.type.value_type) for field in self._arrow]
    self.clear()
    return pa.RecordBatch.from_arrays(arrays, schema=self._arrow)
