"""Fuzzing both raw readers with damaged rows and files (datagen/fuzz.py).

Properties, for every generated input:
  * parsing never raises anything but BadRecord (with a known reason), and a row it accepts
    is valid: labels 0/1 and in the funnel, ids and weights in range, encodable in the raw
    TFT schema;
  * the Beam job on damaged files does not crash, and every physical line is a header, a
    written row or a dead letter: rows read = rows written + rows set aside, reason by
    reason, equal to what the pure parse functions say line by line.

The parser-level tests run over more than 10k mutated rows per reader; hypothesis explores
the mutation space (derandomized, so CI is deterministic) and a seeded bulk run gives the
volume. benchmarks/fuzz_readers.py runs the same checks on more rows.
"""

import collections
import glob
import json
import os
import random

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datagen import fuzz, synthetic
from pipeline import preprocess
from pipeline.sources import aliccp as ALI
from pipeline.sources import avazu as AVA
from pipeline.sources import dedup as DEDUP
from preprocessing import features as F
from preprocessing import transform as T

BULK_ROWS = 12_000
HYPOTHESIS = settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
  """Valid raw lines of both formats (the mutations start from these)."""
  root = tmp_path_factory.mktemp("pools")
  synthetic.generate(str(root / "ali"), num_train=1500, num_test=10, num_users=300, num_items=500,
                     impressions_per_common=5, anomalies=0, seed=3)
  synthetic.generate_avazu(str(root / "ava"), num_train=1500, num_test=10, num_days=2,
                           num_devices=200, bad_rows=0, seed=4)
  read = lambda p: open(p, "rb").read().splitlines()
  avazu_lines = read(root / "ava" / "train.csv")
  return {"skeleton": read(root / "ali" / "sample_skeleton_train.csv"),
          "common": read(root / "ali" / "common_features_train.csv"),
          "avazu_header": avazu_lines[0], "avazu": avazu_lines[1:]}


def _ali_coder():
  return fuzz.raw_coder("aliccp")


def _avazu_coder():
  return fuzz.raw_coder("avazu")


def _check_aliccp(line, source, coder):
  """The reason the line was set aside, or None after checking the accepted row."""
  reason = fuzz.classify_aliccp(line, source, coder)
  return None if reason == fuzz.ACCEPTED else reason


def _check_avazu(line, header, coder):
  reason = fuzz.classify_avazu(line, header, coder)
  return None if reason == fuzz.ACCEPTED else reason


# Hypothesis: the mutation space, shrunk to a minimal failing line on a failure.

def _mutated(pool):
  return st.tuples(st.sampled_from(pool),
                   st.lists(st.sampled_from(fuzz.SMALL_MUTATIONS), min_size=1, max_size=4),
                   st.randoms(use_true_random=False))


@HYPOTHESIS
@given(data=st.data())
def test_aliccp_parsers_accept_only_valid_rows_and_name_every_rejection(pools, data):
  coder = _ali_coder()
  row = fuzz.Row(fuzz.ALICCP)
  for source in ("skeleton", "common"):
    batch = data.draw(st.lists(_mutated(pools[source]), min_size=30, max_size=50))
    for line, names, rng in batch:
      _check_aliccp(fuzz.mutate(line, rng, row, names), source, coder)


@HYPOTHESIS
@given(data=st.data())
def test_avazu_parser_accepts_only_valid_rows_and_names_every_rejection(pools, data):
  coder = _avazu_coder()
  header = AVA.parse_header(pools["avazu_header"])
  row = fuzz.Row(fuzz.AVAZU, header.columns)
  for line, names, rng in data.draw(st.lists(_mutated(pools["avazu"]), min_size=30, max_size=50)):
    _check_avazu(fuzz.mutate(line, rng, row, names), header, coder)


@HYPOTHESIS
@given(raw=st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_either_reader(pools, raw):
  header = AVA.parse_header(pools["avazu_header"])
  coder_ali, coder_ava = _ali_coder(), _avazu_coder()
  for line in (raw, raw.replace(b"\n", b"")):
    _check_aliccp(line, "skeleton", coder_ali)
    _check_aliccp(line, "common", coder_ali)
    _check_avazu(line, header, coder_ava)


@HYPOTHESIS
@given(data=st.data())
def test_a_damaged_avazu_header_is_a_clear_error_or_a_valid_header(pools, data):
  header = pools["avazu_header"]
  names = data.draw(st.lists(st.sampled_from(fuzz.SMALL_MUTATIONS), min_size=1, max_size=3))
  rng = data.draw(st.randoms(use_true_random=False))
  damaged = fuzz.mutate(header, rng, fuzz.Row(fuzz.AVAZU, AVA.parse_header(header).columns), names)
  try:
    parsed = AVA.parse_header(damaged)
  except AVA.BadInput as e:
    assert str(e)
    return
  assert set(F.AVAZU_COLUMNS) <= set(parsed.columns)


# Bulk: the volume, seeded.

def test_bulk_mutated_rows_of_both_readers(pools):
  """>= 10k mutated rows per reader (and huge lines): every row accepted valid or set aside
  with a known reason; the tally shows every kind of damage was met."""
  rng = random.Random(20181)
  coder_ali, coder_ava = _ali_coder(), _avazu_coder()
  header = AVA.parse_header(pools["avazu_header"])
  tally = collections.Counter()
  cases = (("skeleton", fuzz.Row(fuzz.ALICCP), lambda l: _check_aliccp(l, "skeleton", coder_ali)),
           ("common", fuzz.Row(fuzz.ALICCP), lambda l: _check_aliccp(l, "common", coder_ali)),
           ("avazu", fuzz.Row(fuzz.AVAZU, header.columns), lambda l: _check_avazu(l, header, coder_ava)))
  for source, row, check in cases:
    pool = pools[source]
    n = 0
    while n < BULK_ROWS:
      base = [pool[rng.randrange(len(pool))] for _ in range(500)]
      lines = fuzz.mutate_lines(base, rng, row, fraction=0.9, huge_every=400 if n == 0 else 0)
      for line in lines:
        for rec in fuzz.records(line + b"\n"):
          tally[(source, check(rec) or "accepted")] += 1
          n += 1
    assert n >= BULK_ROWS
  for source in ("skeleton", "common", "avazu"):
    reasons = {r for (s, r) in tally if s == source}
    assert "accepted" in reasons and len(reasons) >= 6, (source, sorted(reasons))
  assert {r for (s, r) in tally if s == "skeleton"} >= {"bad_label", "bad_weight", "not_utf8", "bad_sample_id",
                                                          "wrong_column_count", "feature_num_mismatch"}
  assert {r for (s, r) in tally if s == "avazu"} >= {"bad_click", "bad_integer", "not_utf8", "bad_sample_id",
                                                       "wrong_column_count", "bad_hour"}


# The Beam job on damaged files: nothing crashes, nothing is lost.

def _dead_letters(out, split):
  return fuzz.dead_letter_counts(out, split)


def _written(out, split, tft_output):
  files = glob.glob(os.path.join(out, split, "part-*.tfrecord.gz"))
  spec = tft_output.transformed_feature_spec()
  buckets = T.transformed_hash_buckets(tft_output)
  ids = []
  for batch in tf.data.TFRecordDataset(files, "GZIP").batch(4096):
    parsed = tf.io.parse_example(batch, spec)
    click, conv = parsed[F.CLICK].numpy(), parsed[F.CONVERSION].numpy()
    assert set(np.unique(click)) <= {0, 1} and set(np.unique(conv)) <= {0, 1}
    np.testing.assert_array_equal(parsed[F.CTCVR].numpy(), click * conv)
    for name, n in buckets.items():
      values = parsed[F.ID_PREFIX + name].values.numpy()
      assert ((values >= 0) & (values < n)).all(), name
      if F.WEIGHT_PREFIX + name in parsed:
        w = parsed[F.WEIGHT_PREFIX + name].values.numpy()
        assert np.isfinite(w).all() and (w >= 0).all()
    ids.extend(v.decode() if isinstance(v, bytes) else int(v) for v in parsed[F.SAMPLE_ID].numpy().reshape(-1))
  return sorted(ids)


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return data


def test_beam_job_on_damaged_aliccp_files_accounts_for_every_line(pools, tmp_path):
  rng = random.Random(7)
  row = fuzz.Row(fuzz.ALICCP)
  raw = str(tmp_path / "raw")
  contents = {"skeleton": [], "common": []}
  for split in ("train", "test"):
    skel = fuzz.mutate_lines(pools["skeleton"], rng, row, fraction=0.25, huge_every=150)
    # Missing common-feature rows (their impressions cannot be joined), and a duplicated one.
    common = [l for l in pools["common"] if rng.random() > 0.05]
    common = fuzz.mutate_lines(common, rng, row, fraction=0.2, duplicate_fraction=0.02, conflict_fraction=0)
    half = len(skel) // 2
    parts = {"skeleton": [skel[:half], skel[half:], []], "common": [common]}
    for kind, chunks in parts.items():
      for i, chunk in enumerate(chunks):   # the third skeleton part is an empty file
        data = fuzz.file_bytes(chunk, rng) if chunk else b""
        name = f"{'sample_skeleton' if kind == 'skeleton' else 'common_features'}_{split}_{i}.csv"
        contents[kind].append((split, _write(os.path.join(raw, name), data)))
  patterns = {s: {"skeleton": os.path.join(raw, f"sample_skeleton_{r}_*.csv"),
                  "common": os.path.join(raw, f"common_features_{r}_*.csv")} for s, r in preprocess.SPLITS}
  out = str(tmp_path / "out")
  # A damaged common row takes its ~5 impressions with it: about half the rows are set aside,
  # so the dead-letter gate is opened for this test (test_errors.py checks the gate).
  rec = preprocess.run("aliccp", patterns, out, [], max_hash_buckets=512, max_dead_letter_fraction=1.0)
  tft_output = tft.TFTransformOutput(out)
  rows_seen = 0
  for split, release in preprocess.SPLITS:
    want = fuzz.expected_aliccp([d for s, d in contents["skeleton"] if s == release],
                                [d for s, d in contents["common"] if s == release])
    got = rec[split]
    assert got["skeleton_balanced"] and got["common_balanced"]
    assert got["skeleton_rows_read"] == want["skeleton_rows_read"] == sum(
        fuzz.physical_lines(d) for s, d in contents["skeleton"] if s == release)
    assert got["common_rows_read"] == want["common_rows_read"]
    assert got["skeleton_rows_set_aside"] == want["skeleton_dead"]
    assert got["common_rows_set_aside"] == want["common_dead"]
    assert (got["common_rows_used"], got["common_rows_unused"]) == (want["common_used"], want["common_unused"])
    written = _written(out, split, tft_output)
    assert written == want["written_ids"] and got["rows_written"] == len(written)
    letters = _dead_letters(out, split)
    assert {r: n for (s, r), n in letters.items() if s == "skeleton"} == want["skeleton_dead"]
    assert {r: n for (s, r), n in letters.items() if s == "common"} == want["common_dead"]
    for reason in ("duplicate_sample_id", "conflicting_sample_id", "unknown_common_feature_index",
                   "not_utf8", "bad_weight", "bad_label"):
      assert want["skeleton_dead"].get(reason), reason
    assert want["common_dead"].get("duplicate_common_feature_index")
    # Rows out of each stage: the dedup sets aside only its own reasons, the join only its own,
    # and every joined row reaches TFT and the writer.
    dead = got["skeleton_rows_set_aside"]
    join_dead = sum(dead.get(r, 0) for r in (ALI.UNKNOWN_COMMON_FEATURE_INDEX, ALI.DUPLICATE_COMMON_FEATURE_INDEX))
    dedup_dead = sum(dead.get(r, 0) for r in DEDUP.REASONS)
    stages = got["rows_by_stage"]
    assert list(stages) == ["read", "after_dedup", "joined", "into_transform", "written"]
    assert stages["read"] - stages["after_dedup"] == sum(dead.values()) - join_dead
    assert stages["after_dedup"] - stages["joined"] == join_dead and dedup_dead > 0
    assert stages["joined"] == stages["into_transform"] == stages["written"] == len(written)
    assert got["rows_unaccounted_by_hop"] == {}
    rows_seen += got["skeleton_rows_read"] + got["common_rows_read"]
  assert rows_seen > 3500


def test_beam_job_on_damaged_avazu_files_accounts_for_every_line(pools, tmp_path):
  rng = random.Random(8)
  header = AVA.parse_header(pools["avazu_header"])
  row = fuzz.Row(fuzz.AVAZU, header.columns)
  raw = str(tmp_path / "raw")
  contents = []
  for split, release in preprocess.SPLITS:
    lines = fuzz.mutate_lines(pools["avazu"], rng, row, fraction=0.25, huge_every=150)
    third = len(lines) // 3
    chunks = [lines[:third], lines[third:2 * third], lines[2 * third:]]
    for i, chunk in enumerate(chunks):
      contents.append((release, _write(os.path.join(raw, f"{release}_{i}.csv"),
                                       fuzz.file_bytes(chunk, rng, header=pools["avazu_header"]))))
    contents.append((release, _write(os.path.join(raw, f"{release}_empty.csv"), b"")))
    contents.append((release, _write(os.path.join(raw, f"{release}_header_only.csv"),
                                     pools["avazu_header"] + b"\n")))
  patterns = {s: {"files": [os.path.join(raw, f"{r}_*.csv")]} for s, r in preprocess.SPLITS}
  out = str(tmp_path / "out")
  rec = preprocess.run("avazu", patterns, out, [], max_hash_buckets=512)
  marker = json.load(open(os.path.join(out, F.RECONCILIATION)))
  tft_output = tft.TFTransformOutput(out)
  for split, release in preprocess.SPLITS:
    data = [d for s, d in contents if s == release]
    want = fuzz.expected_avazu(data)
    got = rec[split]
    assert got["balanced"]
    assert got["rows_read"] + got["header_lines"] == sum(fuzz.physical_lines(d) for d in data)
    assert (got["rows_read"], got["header_lines"]) == (want["rows_read"], want["header_lines"])
    assert got["rows_set_aside"] == want["dead"]
    written = _written(out, split, tft_output)
    assert written == want["written_ids"] and got["rows_written"] == len(written)
    assert {r: n for (s, r), n in _dead_letters(out, split).items()} == want["dead"]
    # Rows out of each stage: the dedup is the last to set rows aside; all it keeps are written.
    assert got["rows_by_stage"] == {"read": want["rows_read"], "after_dedup": len(written),
                                    "into_transform": len(written), "written": len(written)}
    assert [os.path.basename(p) for p in marker["empty_files"][split]] == [f"{release}_empty.csv"]
    for reason in ("duplicate_sample_id", "conflicting_sample_id", "not_utf8", "bad_integer", "bad_click"):
      assert want["dead"].get(reason), reason
