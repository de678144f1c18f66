"""Rows that share a sample id: one impression logged twice, or two impressions under one id.

A sample id names one impression. Copies of a row with the same id are resolved so that
training and evaluation see every impression once, and nothing is dropped silently:

  all copies identical   one is kept; every other copy is set aside as duplicate_sample_id
                         (a replayed log, a file listed twice, an at-least-once exporter)
  copies differ          every copy is set aside as conflicting_sample_id (there is no way
                         to tell which one is the impression; the dead letters keep them all)

The grouping is a GroupByKey on the sample id (through buckets, pipeline/sources/grouping.py),
so it holds on any runner and any input order. A reader that groups its rows by another key that
is part of the row (Ali-CCP's common_feature_index, for its join) need not move the rows a second
time: a shuffle of the sample ids alone finds the ones that repeat (``RepeatedSampleIds``), and
each group resolves its copies of them, knowing how many copies there are in all
(``ResolveFn.resolve(..., copies=)``): copies under another key differ from the ones in the group.
A reader may group its raw lines instead of parsed rows (less to encode in the shuffle); it then
names how a line parses (``canonical``), and copies whose raw forms differ are compared, and
written to the dead letters, as parsed: the rule above is about rows, not bytes.

A job split into partitions (pipeline/partition.py) groups each partition on its own; the
sample ids whose valid copies sit in more than one partition are found before it runs, and
handed to every partition (``conflicts``) so that their copies are set aside as the one
grouping would have: such copies differ (they name different common-feature rows).
"""

import json
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import apache_beam as beam
import numpy as np

from pipeline.sources.deadletter import DEAD, counter, dead_letter
from pipeline.sources.grouping import GroupByKeyInBuckets

DUPLICATE_SAMPLE_ID = "duplicate_sample_id"
CONFLICTING_SAMPLE_ID = "conflicting_sample_id"
REASONS = (DUPLICATE_SAMPLE_ID, CONFLICTING_SAMPLE_ID)


class ResolveFn(beam.DoFn):

  def __init__(self, split: str, source: str, namespace: str, dead_prefix: str, kept_counter: str,
               canonical: Optional[Callable[[Any], dict]] = None, conflicts: Optional[Mapping[Any, int]] = None):
    self._canonical = canonical
    self._conflicts = dict(conflicts or {})
    self._split = split
    self._source = source
    self._ns = namespace
    self._dead_prefix = dead_prefix
    self._kept = counter(namespace, kept_counter)

  def _dead(self, reason: str, detail: str, sample_id, row):
    counter(self._ns, self._dead_prefix + reason).inc()
    return beam.pvalue.TaggedOutput(DEAD, dead_letter(
        self._split, self._source, reason, detail, sample_id=sample_id,
        row=json.dumps(row, sort_keys=True, default=str)))

  def _identical(self, rows) -> bool:
    first = rows[0]
    if all(r == first for r in rows[1:]):
      return True
    if self._canonical is None:
      return False
    first = self._canonical(first)
    return all(self._canonical(r) == first for r in rows[1:])

  def process(self, element):
    return self.resolve(*element)

  @property
  def conflicts(self) -> Mapping[Any, int]:
    return self._conflicts

  def count_kept(self, rows: int) -> None:
    """Counts ``rows`` rows passed on without resolve (their sample ids are not repeated)."""
    self._kept.inc(rows)

  def resolve(self, sample_id, rows, copies: Optional[int] = None):
    """One sample id's rows -> the row kept (if any) and TaggedOutputs of the ones set aside; for
    a DoFn that groups by sample id itself (a bucket of groups at a time). ``copies``: the id's
    copies in all, where some may not be in ``rows`` (grouped under another key: they differ)."""
    rows = list(rows)
    as_row = self._canonical or (lambda r: r)
    # Copies in other partitions or groups too (they differ from these): counted with them, all set aside.
    copies = self._conflicts.get(sample_id, copies if copies is not None and copies > len(rows) else None)
    if copies is None:
      if len(rows) == 1:
        self._kept.inc()
        yield rows[0]
        return
      if self._identical(rows):
        self._kept.inc()
        yield rows[0]
        for r in rows[1:]:
          yield self._dead(DUPLICATE_SAMPLE_ID, f"{len(rows)} identical rows; one is kept", sample_id, as_row(r))
        return
      copies = len(rows)
    for r in rows:
      yield self._dead(CONFLICTING_SAMPLE_ID, f"{copies} rows with this sample id differ; none is kept",
                       sample_id, as_row(r))


class ResolveSampleIds(beam.PTransform):
  """Rows -> the same rows with every sample id once; the rest to ``dead_letter``.

  ``key``: the sample id field of a row (rows are dicts), or a function that returns an
  element's sample id (elements of any form, e.g. raw lines with their keys). ``canonical``:
  for elements that are not parsed rows, the function that parses one (see the module's
  docstring). Counters ``<namespace>/<dead_prefix><reason>`` and ``<namespace>/<kept_counter>``
  (the rows passed on: one per sample id kept). ``conflicts``: sample id -> the number of
  its copies, for ids whose copies are known to differ from copies elsewhere (a partitioned
  job, see the module's docstring): every copy here is set aside as conflicting.
  Returns a DoOutputsTuple with ``rows`` and ``dead_letter``.
  """

  def __init__(self, split: str, source: str, namespace: str, dead_prefix: str,
               key: Union[str, Callable[[Any], Any]], kept_counter: str = "rows_after_dedup",
               canonical: Optional[Callable[[Any], dict]] = None, conflicts: Optional[Mapping[Any, int]] = None):
    super().__init__()
    self._fn = ResolveFn(split, source, namespace, dead_prefix, kept_counter, canonical, conflicts)
    self._key = key

  def expand(self, rows):
    key = self._key
    key_of = key if callable(key) else (lambda row: row[key])
    return (rows
            | "KeyBySampleId" >> beam.Map(lambda row: (key_of(row), row))
            | "GroupBySampleId" >> GroupByKeyInBuckets()
            | "Resolve" >> beam.ParDo(self._fn).with_outputs(DEAD, main="rows"))


ID_BUCKETS = 64   # buckets of the sample-id shuffle (RepeatedSampleIds)


class SampleIds:
  """Sample ids collected in a DoFn (``add``), handed to RepeatedSampleIds' shuffle by ``flush``
  as (bucket, int64 bytes) pairs, one per bucket: 8 bytes a row."""

  def __init__(self, buckets: int = ID_BUCKETS):
    self._buckets = buckets
    self._ids: List[int] = []
    self.add = self._ids.append

  def __len__(self) -> int:
    return len(self._ids)

  def flush(self) -> List[Tuple[int, bytes]]:
    ids = np.asarray(self._ids, dtype=np.int64)
    self._ids.clear()
    which = ids % self._buckets
    order = np.argsort(which, kind="stable")
    ids, which = ids[order], which[order]
    starts = np.flatnonzero(np.r_[True, which[1:] != which[:-1]]) if len(ids) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(ids)]
    return [(int(which[s]), ids[s:e].tobytes()) for s, e in zip(starts, ends)]


def repeated(element: Tuple[int, Iterable[bytes]]) -> Iterator[Tuple[int, int]]:
  """One bucket of sample ids -> (sample id, copies) for each id in it more than once."""
  chunks = [np.frombuffer(c, dtype=np.int64) for c in element[1]]
  values, counts = np.unique(np.concatenate(chunks), return_counts=True)
  many = counts > 1
  return zip(values[many].tolist(), counts[many].tolist())


class RepeatedSampleIds(beam.PTransform):
  """(bucket, int64 bytes) of SampleIds.flush -> (sample id, copies) for the ids that repeat:
  a side input (AsDict) for the step that resolves them. Holding it costs memory in proportion
  to the repeated ids, not to the rows."""

  def expand(self, id_buckets):
    return (id_buckets
            | "GroupIdBuckets" >> beam.GroupByKey()
            | "Repeated" >> beam.FlatMap(repeated))


def resolve_group(resolve: ResolveFn, rows: List[Any], sample_id_of: Callable[[Any], Any],
                  repeated_ids: Mapping[Any, int]) -> Tuple[List[Any], list]:
  """Rows that share a key other than the sample id -> (the rows kept, dead letters): each
  sample id in ``repeated_ids`` (its copies in all) or in ``resolve.conflicts`` resolved among
  the group's copies; rows of other ids kept as they are (and counted)."""
  conflicts = resolve.conflicts
  if not repeated_ids and not conflicts:
    resolve.count_kept(len(rows))
    return rows, []
  kept, copies_of = [], {}
  for row in rows:
    sample_id = sample_id_of(row)
    if sample_id in repeated_ids or sample_id in conflicts:
      copies_of.setdefault(sample_id, []).append(row)
    else:
      kept.append(row)
  resolve.count_kept(len(kept))
  dead = []
  for sample_id, copies in copies_of.items():
    for out in resolve.resolve(sample_id, copies, repeated_ids.get(sample_id)):
      (dead if isinstance(out, beam.pvalue.TaggedOutput) else kept).append(out)
  return kept, dead
