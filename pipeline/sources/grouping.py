"""A GroupByKey that moves a few large elements through the shuffle instead of one per row.

Beam's portable runners hand every element of a shuffle to the runner, which decodes it, files
it under its encoded key and encodes each group again for the next stage. On the DirectRunner
(FnApiRunner) that is Python code in the job's own process, once per element: with
``--direct_running_mode=multi_processing`` the workers wait for it between stages, and while
they run it takes CPU from them (benchmarks/preprocess_throughput.py).

GroupByKeyInBuckets groups (key, value) pairs as GroupByKey does, but the shuffle carries
buckets: each worker collects the pairs of a bundle by ``bucket_of(key)`` and sends a bucket's
pairs as one element, pickled to bytes, once it holds ``flush_rows`` of them (and what is left
at the end of the bundle); after the shuffle, each bucket's pairs are grouped by key again, in
the worker. The runner then moves bytes, which it encodes and decodes at memory speed, instead
of decoding and encoding every row. Every key lands in one bucket on every worker (the bucket is
a function of the key's value, not of Python's per-process ``hash``), so each key's values all
meet in one group, and the output is the (key, values) pairs a GroupByKey makes: each key once,
with all of its values, in no particular order. A worker holds at most ``buckets * flush_rows``
pairs while it collects, and the stage after the shuffle holds one bucket (about
1/``buckets`` of the data) at a time.

The input is one PCollection of pairs, or several (a tuple or list): each is collected into
buckets where it is made and only the buckets are flattened, so the rows do not pass through
the runner a second time (the FnApiRunner materializes a Flatten's output as a stage of its
own, and would send every row through it before the shuffle).

A DoFn may also fill the buckets itself (``Buckets``) and a step after a plain GroupByKey of
them may take a whole bucket (``regroup``): the Ali-CCP reader does both, so its rows are never
Beam elements (pipeline/sources/aliccp.py).

Keys are ints, bytes or str (the ones this project's readers group by), and keys and values
pickle; the job is batch, in the global window.
"""

import pickle
import zlib
from typing import Any, Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

DEFAULT_BUCKETS = 512
DEFAULT_FLUSH_ROWS = 256


def bucket_of(key, buckets: int) -> int:
  """The bucket of ``key``: the same in every process (unlike ``hash`` of bytes and str, which
  Python seeds per process)."""
  if isinstance(key, int):
    return key % buckets
  if isinstance(key, str):
    key = key.encode("utf-8")
  if isinstance(key, bytes):
    return zlib.crc32(key) % buckets
  raise TypeError(f"GroupByKeyInBuckets groups by int, bytes or str keys, not {type(key).__name__}: {key!r}")


def _pack(pairs: List[Tuple[Any, Any]]) -> bytes:
  return pickle.dumps(pairs, protocol=pickle.HIGHEST_PROTOCOL)


class Buckets:
  """(key, value) pairs collected by bucket_of(key): ``add`` returns a bucket's pairs as
  (bucket, pickled [(key, value), ...]) once it holds ``flush_rows`` of them, ``flush`` the rest.
  For a DoFn that sends what it makes into a bucketed shuffle itself."""

  def __init__(self, buckets: int = DEFAULT_BUCKETS, flush_rows: int = DEFAULT_FLUSH_ROWS):
    if buckets < 1 or flush_rows < 1:
      raise ValueError(f"buckets and flush_rows must be at least 1, got {buckets} and {flush_rows}")
    self._buckets = buckets
    self._flush_rows = flush_rows
    self._pending: Dict[int, List[Tuple[Any, Any]]] = {}

  def add(self, key, value) -> Optional[Tuple[int, bytes]]:
    bucket = bucket_of(key, self._buckets)
    pairs = self._pending.get(bucket)
    if pairs is None:
      pairs = self._pending[bucket] = []
    pairs.append((key, value))
    if len(pairs) >= self._flush_rows:
      del self._pending[bucket]
      return bucket, _pack(pairs)
    return None

  def flush(self) -> List[Tuple[int, bytes]]:
    out = [(bucket, _pack(pairs)) for bucket, pairs in self._pending.items()]
    self._pending = {}
    return out


@beam.typehints.with_output_types(Tuple[int, bytes])
class _CollectFn(beam.DoFn):
  """(key, value) pairs -> (bucket, pickled [(key, value), ...]) of up to ``flush_rows`` pairs."""

  def __init__(self, buckets: int, flush_rows: int):
    self._buckets = buckets
    self._flush_rows = flush_rows
    self._pending = Buckets(buckets, flush_rows)

  def start_bundle(self):
    self._pending = Buckets(self._buckets, self._flush_rows)

  def process(self, element):
    full = self._pending.add(*element)
    if full is not None:
      yield full

  def finish_bundle(self):
    for packed in self._pending.flush():
      yield GlobalWindows.windowed_value(packed)


def regroup(element: Tuple[int, Iterable[bytes]]):
  """One bucket's pickled lists of pairs -> (key, [values]) for each key in it."""
  groups: Dict[Any, list] = {}
  for packed in element[1]:
    for key, value in pickle.loads(packed):
      values = groups.get(key)
      if values is None:
        groups[key] = [value]
      else:
        values.append(value)
  return groups.items()


class GroupByKeyInBuckets(beam.PTransform):
  """(key, value) pairs -> (key, [values]), as GroupByKey, through a shuffle of ``buckets``
  buckets (see the module's docstring)."""

  def __init__(self, buckets: int = DEFAULT_BUCKETS, flush_rows: int = DEFAULT_FLUSH_ROWS,
               label: str = None):
    super().__init__(label)
    if buckets < 1 or flush_rows < 1:
      raise ValueError(f"buckets and flush_rows must be at least 1, got {buckets} and {flush_rows}")
    self._buckets, self._flush_rows = buckets, flush_rows

  def expand(self, pairs):
    collect = lambda: beam.ParDo(_CollectFn(self._buckets, self._flush_rows))  # noqa: E731
    if isinstance(pairs, (tuple, list)):
      buckets = ([p | f"Collect{i}" >> collect() for i, p in enumerate(pairs)]
                 | "FlattenBuckets" >> beam.Flatten())
    else:
      buckets = pairs | "Collect" >> collect()
    return (buckets
            | "GroupBuckets" >> beam.GroupByKey()
            | "Regroup" >> beam.FlatMap(regroup))
