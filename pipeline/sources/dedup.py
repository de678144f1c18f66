"""Rows that share a sample id: one impression logged twice, or two impressions under one id.

A sample id names one impression. Copies of a row with the same id are resolved so that
training and evaluation see every impression once, and nothing is dropped silently:

  all copies identical   one is kept; every other copy is set aside as duplicate_sample_id
                         (a replayed log, a file listed twice, an at-least-once exporter)
  copies differ          every copy is set aside as conflicting_sample_id (there is no way
                         to tell which one is the impression; the dead letters keep them all)

The grouping is a GroupByKey on the sample id (through buckets, pipeline/sources/grouping.py),
so it holds on any runner and any input order.
A reader may group its raw lines instead of parsed rows (less to encode in the shuffle); it then
names how a line parses (``canonical``), and copies whose raw forms differ are compared, and
written to the dead letters, as parsed: the rule above is about rows, not bytes.

A job split into partitions (pipeline/partition.py) groups each partition on its own; the
sample ids whose valid copies sit in more than one partition are found before it runs, and
handed to every partition (``conflicts``) so that their copies are set aside as the one
grouping would have: such copies differ (they name different common-feature rows).
"""

import json
from typing import Any, Callable, Mapping, Optional, Union

import apache_beam as beam

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

  def resolve(self, sample_id, rows):
    """One sample id's rows -> the row kept (if any) and TaggedOutputs of the ones set aside; for
    a DoFn that groups by sample id itself (a bucket of groups at a time)."""
    rows = list(rows)
    as_row = self._canonical or (lambda r: r)
    # Copies in other partitions too (they differ from these): counted with them, all set aside.
    copies = self._conflicts.get(sample_id)
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
