"""Tables sized to the ids that occur, and the memory estimate that refuses a run too large:
the preprocessing job's distinct-id counts, the sized tables, warm starts, the estimate, the refusal."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from datagen import synthetic
from model_fn import estimator as E
from model_fn import input_fn as I
from model_fn import memory, table_sizing
from model_fn.params import resolve_params, table_rows
from pipeline import preprocess
from preprocessing import features as F
from preprocessing import id_bitmaps as B
from preprocessing import transform as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"embedding_dim": 4, "ctr_hidden_units": [16], "cvr_hidden_units": [16]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("memory")
  raw = str(root / "raw")
  synthetic.generate(raw, num_train=3000, num_test=1000, num_users=300, num_items=500,
                     impressions_per_common=10, anomalies=0, seed=3)
  out = str(root / "preprocessed")
  rec = preprocess.run("aliccp", preprocess._input_patterns(raw, {}), out, [], max_hash_buckets=4096)
  buckets = T.transformed_hash_buckets(I.load_transform_output(out))
  return {"raw": raw, "out": out, "rec": rec, "params": dict(SMALL, model="esmm", hash_buckets=buckets)}


def _written_ids(out: str):
  """{field: the distinct ids} over the train split's written tf.Examples."""
  seen = {}
  for path in glob.glob(os.path.join(out, "train", "part-*.tfrecord.gz")):
    for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
      ex = tf.train.Example.FromString(record.numpy())
      for name, feature in ex.features.feature.items():
        if name.startswith(F.ID_PREFIX):
          seen.setdefault(name[len(F.ID_PREFIX):], set()).update(feature.int64_list.value)
  return seen


def test_distinct_ids_are_the_occupied_buckets_of_the_written_train_rows(data):
  ids = _written_ids(data["out"])
  counted = data["rec"]["train"]["distinct_ids"]
  assert counted == {f: len(v) for f, v in sorted(ids.items())} and I.distinct_ids(data["out"]) == counted
  bitmaps = B.load(B.train_path(data["out"]))
  for field, values in ids.items():
    np.testing.assert_array_equal(np.flatnonzero(bitmaps[field]), sorted(values))
  assert glob.glob(os.path.join(data["out"], F.DISTINCT_IDS_DIR, "*")) == [B.train_path(data["out"])]


def test_bitmaps_of_partitions_merge_by_union_not_sum(tmp_path):
  # Two partitions that saw the id 5 both: it counts once.
  a, b = {"f": np.zeros(8, bool)}, {"f": np.zeros(12, bool)}
  a["f"][[1, 5]] = True
  b["f"][[5, 11]] = True
  assert B.counts(B.merge([a, b])) == {"f": 3}
  B.save(str(tmp_path / "x.npz"), a)
  np.testing.assert_array_equal(B.load(str(tmp_path / "x.npz"))["f"], a["f"])


def test_sized_rows_and_collision_rates():
  assert table_sizing.sized_rows(1 << 20, 1000, 2.0) == 2048
  assert table_sizing.sized_rows(1024, 1000, 2.0) == 1024        # never more than the buckets
  assert table_sizing.sized_rows(1 << 20, 0, 2.0) == 1
  assert table_sizing.sized_rows(1 << 20, 1000, 2.0, cap=512) == 512
  bits = np.zeros(16, bool)
  bits[[0, 4, 8, 3]] = True        # mod 4: 0, 0, 0, 3 -> three of four share a row
  assert table_sizing.collision_rate(bits, 4) == 0.75 and table_sizing.collision_rate(bits, 16) == 0.0
  assert table_sizing.expected_collision_rate(1, 8) == 0.0
  assert table_sizing.expected_collision_rate(1000, 1 << 20) == pytest.approx(1000 / (1 << 20), rel=0.01)


def _table_shapes(model_dir):
  return {k.rsplit("table_", 1)[1]: v for k, v in tf.train.list_variables(model_dir)
          if k.rsplit("/", 1)[-1].startswith("table_")}


@pytest.fixture(scope="module")
def sized(data, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("sized") / "model")
  params = dict(data["params"], table_rows_per_id=2.0)
  result = E.train_and_evaluate(data["out"], model_dir, params, batch_size=256, train_steps=10,
                                save_checkpoints_steps=10, calibration="none")
  return {"model_dir": model_dir, "params": params, "result": result}


def test_sized_tables_have_the_computed_rows_and_train_and_export(data, sized):
  distinct = data["rec"]["train"]["distinct_ids"]
  buckets = data["params"]["hash_buckets"]
  want = {f: table_sizing.sized_rows(buckets[f], distinct.get(f, 0), 2.0) for f in buckets}
  assert {f: v[0] for f, v in _table_shapes(sized["model_dir"]).items()} == want
  assert any(want[f] < buckets[f] for f in buckets)
  recorded = json.load(open(os.path.join(sized["model_dir"], "params.json")))
  assert recorded["field_rows"] == want and recorded["table_rows_per_id"] == 2.0
  assert {f: r["rows"] for f, r in sized["result"]["tables"].items()} == want
  assert all(r["exact"] and 0 <= r["collision_rate"] <= 1 for r in sized["result"]["tables"].values())
  assert np.isfinite(sized["result"]["metrics"]["loss"]) and os.path.isdir(sized["result"]["saved_model"])


def test_a_warm_start_keeps_the_source_models_rows(data, sized, tmp_path):
  # Another factor today: the warm-started model still has the source's tables.
  params = dict(data["params"], table_rows_per_id=8.0)
  model_dir = str(tmp_path / "warm")
  E.train_and_evaluate(data["out"], model_dir, params, batch_size=256, train_steps=5, calibration="none",
                       do_export=False, warm_start_from=sized["model_dir"])
  assert _table_shapes(model_dir) == _table_shapes(sized["model_dir"])
  # A resumed model dir keeps its own rows too.
  again = E.train_and_evaluate(data["out"], model_dir, params, batch_size=256, train_steps=8,
                               calibration="none", do_export=False)
  assert again["metrics"]["global_step"] == 8 and _table_shapes(model_dir) == _table_shapes(sized["model_dir"])


@pytest.mark.parametrize("model", ["esmm", "base"])
def test_the_estimates_tables_and_slots_are_the_checkpoints_table_variables(data, sized, model, tmp_path):
  if model == "esmm":
    model_dir, params = sized["model_dir"], sized["params"]
  else:
    model_dir, params = str(tmp_path / "base"), dict(data["params"], model="base", table_rows=256)
    E.train_and_evaluate(data["out"], model_dir, params, batch_size=256, train_steps=2, calibration="none",
                         do_export=False)
  p = resolve_params(E.load_params(model_dir))
  in_checkpoint = sum(int(np.prod(shape)) * 4 for name, shape in tf.train.list_variables(model_dir)
                      if "/table_" in name)
  assert memory.table_state_bytes(p) == in_checkpoint
  assert memory.table_sets(p) == (2 if model == "base" else 1)
  est = memory.estimate(p)
  assert est["peak"] > est["tables"] + est["table_slots"] + est["dense"]


def test_a_run_that_cannot_fit_is_refused_before_anything_is_written(data, tmp_path):
  model_dir = tmp_path / "model"
  with pytest.raises(memory.DoesNotFit, match="--table_rows_per_id"):
    E.train_and_evaluate(data["out"], str(model_dir), data["params"], batch_size=256, train_steps=1,
                         memory_limit_gb=0.01)
  assert not model_dir.exists()
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0")
  p = subprocess.run([sys.executable, "-m", "model_fn.train", f"--transform_dir={data['out']}",
                      f"--model_dir={model_dir}", "--model=base", "--memory_limit_gb=0.5"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  lines = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
  assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
  for phrase in ("GiB", "0.5 GiB are --memory_limit_gb", "--table_rows_per_id", "--table_rows", "--embedding_dim"):
    assert phrase in lines[0]
  assert not model_dir.exists()


def test_the_estimate_counts_the_calibration_pass_and_names_its_flag(data, sized, tmp_path):
  """The calibration pass after training keeps the labels and logits of the impressions it is
  fitted on: counted in the estimate, and a run it would push over the limit is told to fit it
  on a slice."""
  p = resolve_params(E.load_params(sized["model_dir"]))
  rows = 50_000_000
  plain = memory.estimate(p)
  limit_gb = (plain["peak"] + (1 << 20)) / memory.GIB
  assert memory.check_fits(p, limit_gb)["calibration"] == 0
  with pytest.raises(memory.DoesNotFit, match="calibration pass over 50,000,000 impressions.*"
                                              "--calibration_holdout or not at all with --calibration=none"):
    memory.check_fits(p, limit_gb, calibration_rows=rows)
  # Tables too large on their own: the message is about them, not the pass.
  with pytest.raises(memory.DoesNotFit) as e:
    memory.check_fits(p, limit_gb / 2, calibration_rows=rows)
  assert "--table_rows_per_id" in str(e.value) and "calibration" not in str(e.value)
  # A trained run counts the impressions its calibration is fitted on: the whole train split
  # for the default bias refit.
  result = E.train_and_evaluate(data["out"], str(tmp_path / "bias"), data["params"], batch_size=256,
                                train_steps=2, do_export=False)
  want = I.split_rows(data["out"], "train") * memory.CALIBRATION_ROW_BYTES
  assert want > 0 and result["memory_estimate"]["calibration"] == want


def test_the_disk_estimate_is_a_checkpoint_s_bytes_and_a_run_keeps_what_it_is_told(data, sized, tmp_path):
  p = resolve_params(E.load_params(sized["model_dir"]))
  latest = tf.train.latest_checkpoint(sized["model_dir"])
  on_disk = sum(os.path.getsize(f) for f in glob.glob(latest + ".data-*"))
  est = memory.disk_estimate(p, keep_checkpoints=1)
  assert est["checkpoint"] == pytest.approx(on_disk, rel=0.1)
  assert est["peak"] == 2 * est["checkpoint"] + est["saved_model"]
  # One checkpoint kept: the step-0 save and the earlier ones are gone.
  model_dir = str(tmp_path / "one")
  E.train_and_evaluate(data["out"], model_dir, data["params"], batch_size=256, train_steps=6,
                       save_checkpoints_steps=2, calibration="none", do_export=False, keep_checkpoints=1)
  kept = tf.train.get_checkpoint_state(model_dir).all_model_checkpoint_paths
  assert [os.path.basename(k) for k in kept] == ["model.ckpt-6"]
  assert len(glob.glob(os.path.join(model_dir, "model.ckpt-*.index"))) == 1


def test_a_run_whose_checkpoints_cannot_fit_the_disk_is_refused(data, tmp_path, monkeypatch):
  monkeypatch.setattr(memory.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1 << 20})())
  model_dir = tmp_path / "model"
  with pytest.raises(memory.DoesNotFit, match="--keep_checkpoints") as e:
    E.train_and_evaluate(data["out"], str(model_dir), data["params"], batch_size=256, train_steps=1)
  assert "of disk" in str(e.value) and "--table_rows_per_id" in str(e.value)
  assert not model_dir.exists()
