"""The release-shaped Ali-CCP generator (datagen/release.py) at a tiny scale: counts, shape, rates,
signal, determinism, and the readers finding and parsing its .csv.gz files unchanged."""

import csv
import gzip
import os

import numpy as np
import pytest

from datagen import release
from model_fn import metrics as M
from pipeline import formats, preprocess
from pipeline.sources import aliccp
from pipeline.sources.deadletter import BadRecord

SCALE = 0.0002


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  raw = str(tmp_path_factory.mktemp("release"))
  return raw, {s["split"]: s for s in release.generate(raw, scale=SCALE, seed=7)}


def _lines(raw: str, name: str):
  with gzip.open(os.path.join(raw, name), "rb") as f:
    return f.read().splitlines(keepends=True)


def _truth(raw: str, split: str):
  with gzip.open(os.path.join(raw, f"ground_truth_{split}.csv.gz"), "rt") as f:
    rows = list(csv.DictReader(f))
  return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def test_counts_per_split_are_the_scaled_release(generated):
  raw, summaries = generated
  profile = release.scaled(SCALE)
  for split, (impressions, common_rows) in profile["splits"].items():
    assert (summaries[split]["impressions"], summaries[split]["common_rows"]) == (impressions, common_rows)
    assert len(_lines(raw, f"sample_skeleton_{split}.csv.gz")) == impressions
    assert len(_lines(raw, f"common_features_{split}.csv.gz")) == common_rows
    assert len(_lines(raw, f"ground_truth_{split}.csv.gz")) == impressions + 1
  assert profile["splits"]["train"] == (8460, 146) and profile["splits"]["test"] == (8603, 177)
  assert release.scaled(1.0)["splits"]["train"] == (42_300_135, 730_600)


def test_the_files_parse_and_every_skeleton_index_has_its_common_row(generated):
  raw, summaries = generated
  for split in ("train", "test"):
    common = [aliccp.parse_common_line(l, aliccp.KNOWN_FIELDS) for l in _lines(raw, f"common_features_{split}.csv.gz")]
    assert all(unknown == 0 for _, unknown in common)
    indices = [row["index"] for row, _ in common]
    assert len(set(indices)) == len(indices)
    skeleton_indices, anomalies = [], 0
    for line in _lines(raw, f"sample_skeleton_{split}.csv.gz"):
      try:
        row, unknown = aliccp.parse_skeleton_line(line, aliccp.KNOWN_FIELDS)
      except BadRecord as e:
        assert e.reason == aliccp.CONVERSION_WITHOUT_CLICK
        anomalies += 1
        continue
      assert unknown == 0 and {"205", "206", "207", "210", "216", "301"} <= set(row["features"])
      skeleton_indices.append(row["index"])
    assert anomalies == summaries[split]["anomalies"] >= 1
    assert set(skeleton_indices) <= set(indices)
    # Skeleton rows are grouped by common row; the common file is in another order.
    grouped = list(dict.fromkeys(skeleton_indices))
    assert len(grouped) == len(set(skeleton_indices)) and grouped != indices[:len(grouped)]


def test_user_side_values_per_common_row_are_the_profiles_long_tail(generated):
  world = release.ReleaseWorld(7, 20_000, 1_000)
  lists = world.behaviour(np.arange(20_000))
  per_row = sum(np.bincount(lists[f][0], minlength=20_000) for f in lists) + len(release.PROFILE_FIELDS)
  assert abs(per_row.mean() / release.USER_VALUES_MEAN - 1) < 0.05
  assert np.median(per_row) < 0.75 * per_row.mean() and np.percentile(per_row, 99) > 3 * per_row.mean()
  assert per_row.max() <= release.BEHAVIOUR_CAP + len(release.PROFILE_FIELDS)
  _, summaries = generated
  for s in summaries.values():     # a few hundred rows: the same shape, noisier
    assert abs(s["user_values_mean"] / release.USER_VALUES_MEAN - 1) < 0.3
    assert s["user_values_max"] > 2 * s["user_values_mean"]


def test_rates_are_the_release_and_labels_carry_signal(generated):
  raw, summaries = generated
  truth = {split: _truth(raw, split) for split in summaries}
  click = {split: np.array([int(l.split(b",", 2)[1]) for l in _lines(raw, f"sample_skeleton_{split}.csv.gz")])
           for split in summaries}
  for split, s in summaries.items():   # 80 users: the rates are the profile's, noisily
    assert abs(truth[split]["true_pctr"].mean() / release.PROFILE["ctr"] - 1) < 0.25
    assert abs(s["ctr"] / release.PROFILE["ctr"] - 1) < 0.3
    assert 0.5 < s["true_cvr_on_clicks"] / release.PROFILE["cvr_on_clicks"] < 2
  pctr = np.concatenate([truth[s]["true_pctr"] for s in summaries])
  pcvr = np.concatenate([truth[s]["true_pcvr"] for s in summaries])
  clicks = np.concatenate(list(click.values()))
  # The true pCTR ranks clicks well above chance, and users click what they would buy.
  assert M.exact_auc(clicks, pctr) > 0.65
  assert pcvr[clicks == 1].mean() > 1.3 * pcvr[clicks == 0].mean()


def test_the_calibration_hits_the_release_rates():
  world = release.ReleaseWorld(7, 3_000, 30_000)
  release.calibrate(world, release.PROFILE["ctr"], release.PROFILE["cvr_on_clicks"], 0.5)
  rng = np.random.default_rng(1)
  users = rng.integers(0, 3_000, 3_000)
  c = release.chunk(world, rng, 0, 0, users, 1 + rng.poisson(57, 3_000), 0.5)
  assert abs(c["p_ctr"].mean() / release.PROFILE["ctr"] - 1) < 0.1
  cvr_on_clicks = (c["p_ctr"] * c["p_cvr"]).sum() / c["p_ctr"].sum()
  assert abs(cvr_on_clicks / release.PROFILE["cvr_on_clicks"] - 1) < 0.15


def test_output_is_a_pure_function_of_the_seed(generated, tmp_path):
  raw, _ = generated
  again, other = str(tmp_path / "again"), str(tmp_path / "other")
  release.generate(again, scale=SCALE, seed=7, processes=1)
  release.generate(other, scale=SCALE, seed=8, processes=1)
  names = sorted(os.listdir(raw))
  assert names == sorted(os.listdir(again)) and len(names) == 7   # six data files and summary.json
  read = lambda d, n: open(os.path.join(d, n), "rb").read()
  assert all(read(raw, n) == read(again, n) for n in names)
  assert read(raw, names[0]) != read(other, names[0])


def test_the_job_finds_the_gz_files_and_reads_them(generated, tmp_path):
  raw, _ = generated
  patterns = formats.get("aliccp").patterns(raw, {})
  assert patterns["train"]["skeleton"] == os.path.join(raw, "sample_skeleton_train.csv.gz")
  assert patterns["eval"]["common"] == os.path.join(raw, "common_features_test.csv.gz")
  small = str(tmp_path / "small")
  summaries = {s["split"]: s for s in release.generate(small, scale=0.00005, seed=7, processes=1)}
  # A plain .csv beside the .gz is the one read.
  with gzip.open(os.path.join(small, "sample_skeleton_test.csv.gz"), "rb") as f, \
       open(os.path.join(small, "sample_skeleton_test.csv"), "wb") as out:
    out.write(f.read())
  patterns = preprocess._input_patterns(small, {})
  assert patterns["eval"]["skeleton"].endswith("sample_skeleton_test.csv")
  assert patterns["train"]["skeleton"].endswith("sample_skeleton_train.csv.gz")
  rec = preprocess.run("aliccp", patterns, str(tmp_path / "out"), [], max_hash_buckets=1024)
  for split, s in (("train", summaries["train"]), ("eval", summaries["test"])):
    assert rec[split]["skeleton_rows_read"] == s["impressions"]
    assert rec[split]["rows_written"] == s["impressions"] - s["anomalies"]
    assert rec[split]["common_rows_read"] == s["common_rows"]
