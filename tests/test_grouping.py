"""GroupByKeyInBuckets groups exactly as GroupByKey does (pipeline/sources/grouping.py)."""

import random
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.sources import grouping as G


def _pairs(seed: int, n: int):
  """n (key, value) pairs over int, bytes and str keys, many keys repeated, values unique."""
  rng = random.Random(seed)
  keys = ([rng.randrange(10 ** 12) for _ in range(40)] + [b"idx%d" % rng.randrange(10 ** 6) for _ in range(40)]
          + ["s%d" % rng.randrange(10 ** 6) for _ in range(40)])
  return [(rng.choice(keys), (i, b"line %d" % i)) for i in range(n)]


def _expected(pairs):
  groups = {}
  for k, v in pairs:
    groups.setdefault(k, []).append(v)
  return sorted((repr(k), sorted(vs, key=repr)) for k, vs in groups.items())


def _normalized(kv):
  return repr(kv[0]), sorted(kv[1], key=repr)


@pytest.mark.parametrize("buckets,flush_rows", [(1, 1), (7, 3), (512, 256)])
def test_groups_as_group_by_key_does_for_any_bucket_count_and_flush_size(buckets, flush_rows):
  pairs = _pairs(seed=buckets, n=2_000)
  with TestPipeline() as p:
    grouped = p | beam.Create(pairs) | G.GroupByKeyInBuckets(buckets, flush_rows)
    assert_that(grouped | beam.Map(_normalized), equal_to(_expected(pairs)))


def test_several_inputs_group_together_as_a_flatten_then_group_by_key_would():
  left, right = _pairs(seed=1, n=600), [(k, ("right", v)) for k, v in _pairs(seed=1, n=300)]
  with TestPipeline() as p:
    grouped = ((p | "L" >> beam.Create(left), p | "R" >> beam.Create(right))
               | G.GroupByKeyInBuckets(buckets=5, flush_rows=4))
    assert_that(grouped | beam.Map(_normalized), equal_to(_expected(left + right)))


def test_a_key_s_bucket_is_the_same_in_every_process():
  # Python seeds hash() of bytes and str per process; a bucket must not depend on it, or two
  # workers would send one key's values to different groups.
  code = ("import sys; sys.path.insert(0, '.'); from pipeline.sources.grouping import bucket_of; "
          "print([bucket_of(k, 512) for k in (b'a1b2c3', 'user 7', 12345678901234567890)])")
  seen = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, capture_output=True,
                         text=True, check=True).stdout for seed in ("1", "2", "3")}
  assert len(seen) == 1
  assert seen.pop().strip() == str([G.bucket_of(k, 512) for k in (b"a1b2c3", "user 7", 12345678901234567890)])


def test_keys_it_cannot_bucket_are_refused_by_name():
  with pytest.raises(TypeError, match="float"):
    G.bucket_of(1.5, 8)
  with pytest.raises(ValueError, match="at least 1"):
    G.GroupByKeyInBuckets(buckets=0)


def test_a_full_bucket_goes_out_before_the_bundle_ends_and_the_rest_at_its_end():
  fn = G._CollectFn(buckets=2, flush_rows=3)
  fn.start_bundle()
  out = [e for k in (0, 2, 4, 1, 6) for e in fn.process((k, k))]   # bucket 0 fills on the third
  assert [(b, G.pickle.loads(v)) for b, v in out] == [(0, [(0, 0), (2, 2), (4, 4)])]
  rest = sorted((w.value[0], G.pickle.loads(w.value[1])) for w in fn.finish_bundle())
  assert rest == [(0, [(6, 6)]), (1, [(1, 1)])]
