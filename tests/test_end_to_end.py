"""A small end-to-end run: synthetic raw files -> Beam/TFT job -> ESMM -> SavedModel.

One module-scoped run (DirectRunner, a few thousand rows, small towers) feeds all tests.
"""

import json
import os
import random
import shutil

import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score
from tensorflow.core.protobuf import saved_model_pb2

from datagen import synthetic
from model_fn import calibration
from model_fn import estimator as E
from model_fn import evaluation
from model_fn import input_fn as I
from model_fn import hardware, layers, metrics
from model_fn.params import resolve_params
from pipeline import encode, preprocess
from pipeline.sources import aliccp
from preprocessing import features as F
from preprocessing import transform as T

KNOWN = frozenset(f.name for f in F.ALICCP_FIELDS)


def _corrupt(raw):
  """Adds bad rows of known reasons to the train split (and nothing else)."""
  skel = os.path.join(raw, "sample_skeleton_train.csv")
  with open(skel, "a") as f:
    f.write("900001,1,0,00000000deadbeef,1,205\x0211\x031.0\n")         # unknown common index
    f.write("900002,1,0,abc,2,205\x0211\x031.0\n")                      # feature_num mismatch
    f.write("900003,1\n")                                              # wrong column count
  with open(os.path.join(raw, "common_features_train.csv"), "a") as f:
    f.write("feedfacefeedface,1,101\x02nope\x031.0\n")                  # bad feature item
  return {"unknown_common_feature_index": 1, "feature_num_mismatch": 1, "wrong_column_count": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  raw = str(root / "raw")
  synthetic.generate(raw, num_train=4000, num_test=2000, num_users=500, num_items=800,
                     impressions_per_common=10, anomalies=3, seed=7)
  # Shuffle the common file so its order has nothing to do with the skeleton's.
  path = os.path.join(raw, "common_features_train.csv")
  lines = open(path).read().splitlines(keepends=True)
  random.Random(0).shuffle(lines)
  open(path, "w").writelines(lines)
  injected = _corrupt(raw)
  out = str(root / "preprocessed")
  patterns = preprocess._input_patterns(raw, {})
  rec = preprocess.run("aliccp", patterns, out, [], max_hash_buckets=1024)
  tft_output = I.load_transform_output(out)
  params = {"model": "esmm", "hash_buckets": T.transformed_hash_buckets(tft_output),
            "embedding_dim": 8, "ctr_hidden_units": [32, 16], "cvr_hidden_units": [32, 16]}
  model_dir = str(root / "model")
  result = E.train_and_evaluate(out, model_dir, params, batch_size=256, train_steps=60,
                                save_checkpoints_steps=30)
  return {"raw": raw, "out": out, "rec": rec, "injected": injected, "tft_output": tft_output,
          "params": params, "model_dir": model_dir, "result": result}


def test_every_row_is_written_or_set_aside_with_its_reason(run):
  rec = run["rec"]
  train = rec["train"]
  assert train["skeleton_balanced"] and train["common_balanced"]
  assert train["skeleton_rows_read"] == 4000 + 3
  dead = train["skeleton_rows_set_aside"]
  for reason, n in run["injected"].items():
    assert dead[reason] == n
  assert dead["conversion_without_click"] == 3
  assert train["rows_written"] == 4000 - 3 and sum(dead.values()) == 6
  assert train["common_rows_set_aside"] == {"bad_feature_item": 1}
  assert rec["eval"]["rows_written"] == 2000 - 3
  # Dead letters are on disk, one JSON line each, with their reasons.
  dead_files = tf.io.gfile.glob(os.path.join(run["out"], "dead_letter", "train*"))
  records = [json.loads(l) for p in dead_files for l in open(p) if l.strip()]
  reasons = sorted(r["reason"] for r in records)
  assert reasons.count("unknown_common_feature_index") == 1 and len(records) == 7
  assert any(r.get("sample_id") == 900001 for r in records)
  # The completion marker carries the same reconciliation.
  marker = json.load(open(os.path.join(run["out"], "reconciliation.json")))
  assert marker["splits"]["train"]["rows_written"] == train["rows_written"]


def _parsed(path, parse):
  """The rows of a raw file that parse, skipping the bad ones."""
  for line in open(path, "rb"):
    try:
      yield parse(line, KNOWN)[0]
    except aliccp.BadRecord:
      continue


def _raw_rows(raw, split):
  """The raw instances of a split, parsed and joined in memory, by sample_id."""
  common = {row["index"]: row["features"] for row in
            _parsed(os.path.join(raw, f"common_features_{split}.csv"), aliccp.parse_common_line)}
  rows = {}
  for row in _parsed(os.path.join(raw, f"sample_skeleton_{split}.csv"), aliccp.parse_skeleton_line):
    if row["index"] in common:
      rows[row["sample_id"]] = aliccp.to_raw_instance(row, common[row["index"]])
  return rows


def test_join_attaches_the_right_user_side_to_each_impression(run):
  rows = _raw_rows(run["raw"], "train")
  spec = run["tft_output"].transformed_feature_spec()
  ds = tf.data.TFRecordDataset(tf.io.gfile.glob(I.split_files(run["out"], "train")), "GZIP")
  checked = 0
  for record in ds.take(200):
    ex = tf.io.parse_single_example(record, spec)
    raw = rows[int(ex["sample_id"])]
    assert int(ex["click"]) == raw["click"] and int(ex["ctcvr"]) == raw["click"] * raw["conversion"]
    for field in ("101", "150_14", "205"):
      ids = tf.sparse.to_dense(ex[f"id_{field}"]).numpy().tolist()
      want = tf.strings.to_hash_bucket_fast(tf.strings.as_string(
          tf.constant(raw[f"f_{field}"], tf.int64)), 1024).numpy().tolist()
      assert ids == want, field
    np.testing.assert_allclose(tf.sparse.to_dense(ex["wt_150_14"]).numpy(), raw["w_150_14"], rtol=1e-6)
    checked += 1
  assert checked == 200


def test_label_counts_are_recorded_and_start_the_output_biases(run):
  """The reconciliation counts the positive labels each split wrote (checked against the raw
  rows), and training starts its output biases at the train split's rates from those counts."""
  for split, raw_split in (("train", "train"), ("eval", "test")):
    rows = _raw_rows(run["raw"], raw_split)
    rec = run["rec"][split]
    written = [r for sid, r in rows.items() if not (r["click"] == 0 and r["conversion"] == 1)]
    assert rec["rows_written"] == len(written)
    assert rec["label_positives"] == {"click": sum(r["click"] for r in written),
                                      "conversion": sum(r["conversion"] for r in written),
                                      "ctcvr": sum(r["click"] * r["conversion"] for r in written)}
  positives, rows = run["rec"]["train"]["label_positives"], run["rec"]["train"]["rows_written"]
  want = {"ctr": (positives["click"] + 0.5) / (rows + 1), "cvr": (positives["ctcvr"] + 0.5) / (positives["click"] + 1)}
  assert I.base_rates(run["out"]) == pytest.approx(want)
  assert E.load_params(run["model_dir"])["base_rates"] == pytest.approx(want)


def _rows_by_sample_id(features):
  """Per sample id, each feature's values of that row (a list; VarLen rows without padding)."""
  cols = {}
  for name, t in features.items():
    if isinstance(t, tf.SparseTensor):
      rt = tf.RaggedTensor.from_sparse(t)
      cols[name] = [r.tolist() for r in rt.numpy()] if rt.nrows() else []
    else:
      cols[name] = t.numpy().tolist()
  ids = cols["sample_id"]
  return {int(ids[i] if not isinstance(ids[i], list) else ids[i][0]): {k: v[i] for k, v in cols.items()}
          for i in range(len(ids))}


def test_train_blocks_hold_exactly_the_train_rows(run):
  """The column blocks training reads decode to the same rows, value for value, as the train
  tf.Examples; each row once; blocks of at most 128 rows, their rows drawn out of order."""
  rec = run["rec"]["train"]
  blocks = rec["blocks"]
  assert blocks["balanced"] and blocks["rows_written"] == rec["rows_written"] == 3997
  assert blocks["block_rows"] == F.DEFAULT_BLOCK_ROWS
  assert blocks["blocks_written"] >= 3997 // F.DEFAULT_BLOCK_ROWS
  pattern, block_rows = I.train_files(run["out"])
  assert F.BLOCKS_DIR in pattern and block_rows == F.DEFAULT_BLOCK_ROWS
  spec = run["tft_output"].transformed_feature_spec()
  records = list(tf.data.TFRecordDataset(tf.io.gfile.glob(pattern), "GZIP").as_numpy_iterator())
  assert len(records) == blocks["blocks_written"]
  parse = I.block_parser(spec)
  sizes = [int(tf.size(parse(tf.constant([r]))["click"])) for r in records]
  assert sum(sizes) == 3997 and max(sizes) <= F.DEFAULT_BLOCK_ROWS
  from_blocks = _rows_by_sample_id(parse(tf.constant(records)))
  examples = list(tf.data.TFRecordDataset(tf.io.gfile.glob(I.split_files(run["out"], "train")),
                                          "GZIP").as_numpy_iterator())
  from_examples = _rows_by_sample_id(tf.io.parse_example(tf.constant(examples), spec))
  assert len(from_blocks) == len(from_examples) == 3997
  assert from_blocks == from_examples
  # Rows are permuted within each of the job's batches before being cut into blocks: no block
  # is a run of consecutive rows of the tf.Example files.
  position = {sid: i for i, sid in enumerate(
      tf.io.parse_example(tf.constant(examples), {"sample_id": spec["sample_id"]})["sample_id"].numpy().ravel())}
  runs = 0
  for r in records:
    at = sorted(position[sid] for sid in parse(tf.constant([r]))["sample_id"].numpy().ravel())
    runs += len(at) >= 3 and at == list(range(at[0], at[0] + len(at)))
  assert runs == 0


def _written_order(tmp_path, items, shuffle: bool):
  """The order in which a one-shard text write receives ``items`` (after ShuffleBlocks)."""
  import apache_beam as beam
  out = tmp_path / f"order-{len(os.listdir(tmp_path))}"
  with beam.Pipeline() as p:
    pc = p | beam.Create(items, reshuffle=False)
    if shuffle:
      pc = pc | encode.ShuffleBlocks(seed=3, groups=16)
    _ = pc | beam.Map(lambda b: b.decode()) | beam.io.WriteToText(str(out), num_shards=1)
  return [line.encode() for line in open(tf.io.gfile.glob(str(out) + "*")[0]).read().split()]


def test_shuffle_blocks_is_a_seeded_permutation_of_the_whole_split(tmp_path):
  """ShuffleBlocks outputs every block once, in an order unrelated to the input's, and each
  group's blocks in key order whatever order they arrived in (so the runner cannot change it)."""
  items = [b"block-%05d" % i for i in range(3000)]
  position = {b: i for i, b in enumerate(items)}
  control = _written_order(tmp_path, items, shuffle=False)
  assert control == items      # the write keeps the order it is given, so the check below can fail
  out = _written_order(tmp_path, items, shuffle=True)
  backwards = _written_order(tmp_path, items[::-1], shuffle=True)
  assert sorted(out) == sorted(backwards) == items
  rho = np.corrcoef(np.arange(len(out)), [position[b] for b in out])[0, 1]
  assert abs(rho) < 0.1, rho
  # Every tenth of the output draws on every tenth of the input.
  for k in range(10):
    assert len({position[b] * 10 // len(items) for b in out[k * 300:(k + 1) * 300]}) == 10
  keys = {b: encode.shuffle_key(b, 3) for b in items}
  for g in range(16):
    in_group = [b for b in out if keys[b] % 16 == g]
    assert in_group == [b for b in backwards if keys[b] % 16 == g]
    assert in_group == sorted(in_group, key=keys.get)
  assert encode.shuffle_key(items[0], 3) != encode.shuffle_key(items[0], 4)


def _block_rows(out, spec):
  pattern, _ = I.train_files(out, "blocks")
  records = list(tf.data.TFRecordDataset(tf.io.gfile.glob(pattern), "GZIP").as_numpy_iterator())
  return _rows_by_sample_id(I.block_parser(spec)(tf.constant(records)))


def test_without_train_examples_the_blocks_are_the_train_split(run, tmp_path):
  """--notrain_examples: no train tf.Examples, the blocks hold the same rows as the full job's and
  count as the rows written, so the reconciliation still balances; the trainer reads the blocks
  and refuses to read train tf.Examples that were not written."""
  out = str(tmp_path / "blocks_only")
  rec = preprocess.run("aliccp", preprocess._input_patterns(run["raw"], {}), out, [], max_hash_buckets=1024,
                       train_examples=False)
  train = rec["train"]
  assert train["skeleton_balanced"] and train["rows_written"] == run["rec"]["train"]["rows_written"] == 3997
  assert train["blocks"]["balanced"] and train["blocks"]["rows_written"] == 3997
  assert train["skeleton_rows_set_aside"] == run["rec"]["train"]["skeleton_rows_set_aside"]
  assert rec["eval"]["rows_written"] == run["rec"]["eval"]["rows_written"]
  assert not tf.io.gfile.exists(os.path.join(out, "train"))
  assert tf.io.gfile.glob(I.split_files(out, "eval"))
  assert json.load(open(os.path.join(out, F.RECONCILIATION)))["train_examples"] is False
  spec = run["tft_output"].transformed_feature_spec()
  assert _block_rows(out, spec) == _block_rows(run["out"], spec)
  assert I.train_files(out) == I.train_files(out, "blocks")
  with pytest.raises(ValueError, match="no train tf.Examples"):
    I.train_files(out, "examples")
  with pytest.raises(preprocess.UsageError, match="the train split would not be written"):
    preprocess.run("aliccp", preprocess._input_patterns(run["raw"], {}), str(tmp_path / "none"), [],
                   train_examples=False, train_block_rows=0)
  assert not tf.io.gfile.exists(str(tmp_path / "none"))


def test_trainer_reads_blocks_or_examples_as_asked(run, tmp_path):
  assert I.train_files(run["out"], "examples") == (I.split_files(run["out"], "train"), 0)
  marker = json.load(open(os.path.join(run["out"], F.RECONCILIATION)))
  del marker["splits"]["train"]["blocks"]
  no_blocks = tmp_path / "no_blocks"
  no_blocks.mkdir()
  (no_blocks / F.RECONCILIATION).write_text(json.dumps(marker))
  assert I.train_files(str(no_blocks)) == (I.split_files(str(no_blocks), "train"), 0)
  with pytest.raises(ValueError, match="no train blocks"):
    I.train_files(str(no_blocks), "blocks")
  with pytest.raises(ValueError, match="train_input must be one of"):
    I.train_files(run["out"], "columns")
  # A training batch of 256 rows is two blocks of 128.
  pattern, block_rows = I.train_files(run["out"])
  features, labels = next(iter(I.make_input_fn(pattern, run["tft_output"], 256, training=True, seed=1,
                                               block_rows=block_rows)()))
  rows = labels["click"].shape[0]
  assert 0 < rows <= 256 and features["id_101"].dense_shape[0] == rows and features["sample_id"].shape[0] == rows
  assert set(labels) == set(F.LABELS)


def _sample_ids(run, limit=None, **kw):
  """The train split's sample ids in the order an input_fn yields them (the first ``limit``)."""
  pattern, block_rows = I.train_files(run["out"])
  fn = I.make_input_fn(pattern, run["tft_output"], 512, block_rows=block_rows, labels_as_features=True, **kw)
  ids = []
  for features, _ in fn():
    ids += [int(i) for i in features["sample_id"].numpy().ravel()]
    if limit and len(ids) >= limit:
      return ids[:limit]
  return ids


def test_the_held_out_slice_and_the_rest_partition_the_train_split(run):
  everything = _sample_ids(run, training=False)
  rest = _sample_ids(run, training=False, holdout="exclude", holdout_fraction=0.2)
  held_out = _sample_ids(run, training=False, holdout="only", holdout_fraction=0.2)
  assert len(everything) == run["rec"]["train"]["rows_written"] == len(set(everything))
  assert not set(rest) & set(held_out) and sorted(rest + held_out) == sorted(everything)
  assert 0.05 < len(held_out) / len(everything) < 0.4
  # The same slice whatever the order the records are read in (training shuffles files and blocks),
  # and training with the slice held out never reads it.
  shuffled = _sample_ids(run, training=True, num_epochs=1, seed=3, holdout="only", holdout_fraction=0.2)
  assert sorted(shuffled) == sorted(held_out)
  trained_on = _sample_ids(run, limit=3 * len(everything), training=True, seed=3, holdout="exclude",
                           holdout_fraction=0.2)
  assert set(trained_on) == set(rest)


def test_the_seed_picks_where_in_the_train_split_a_run_starts(run):
  records = I.train_records(run["out"], I.train_files(run["out"])[1])
  starts = {E.start_offset(seed, records) for seed in range(1, 6)}
  assert len(starts) > 1 and all(0 <= s < records for s in starts)
  first = lambda start_at: _sample_ids(run, limit=256, training=True, seed=1, start_at=start_at, shuffle_buffer=1)
  # With no shuffle buffer the stream is the records in order, from where it starts.
  assert first(0) != first(7)
  assert sorted(set(first(7)) | set(first(0))) != sorted(first(0))


def _tie_share(labels, logits) -> float:
  """The share of positive-negative pairs whose logits are less than a histogram_auc bin apart."""
  width = (metrics.AUC_RANGE[1] - metrics.AUC_RANGE[0]) / metrics.AUC_BINS
  pos, neg = logits[labels > 0], logits[labels == 0]
  return float((np.abs(pos[:, None] - neg[None, :]) < width + 1e-5).mean())     # 1e-5: float32 logits


def test_training_reports_the_protocol_metrics_and_they_match_sklearn(run):
  m = run["result"]["metrics"]
  for key in ("auc/ctr", "auc/ctcvr", "auc/cvr_clicked", "log_loss/ctr", "log_loss/ctcvr", "log_loss/cvr_clicked",
              "calibration/ctr", "calibration/cvr_clicked", "calibration/ctcvr"):
    assert key in m and np.isfinite(m[key]), key
  assert run["result"]["train_steps"] == 60
  # The arithmetic the default train_matmul_dtype ("auto") chose on this machine is on record.
  assert run["result"]["train_compute_dtype"] == ("bfloat16" if hardware.native_bfloat16() else "float32")
  p = evaluation.predict(run["model_dir"], run["out"])
  click, conv = p["label_click"], p["label_conversion"]
  clicked = click > 0
  # The streaming AUC counts two scores in one histogram bin as a tie: it may differ from the exact
  # AUC by at most half the share of positive-negative pairs closer than a bin (few here: the
  # towers barely spread their logits in 60 steps).
  for key, labels, head, keep in (("ctr", click, "ctr", slice(None)), ("ctcvr", click * conv, "ctcvr", slice(None)),
                                  ("cvr_clicked", conv, "cvr", clicked)):
    y, q = labels[keep], p[head + "_uncalibrated"][keep].astype(np.float64)
    logit = np.log(q) - np.log1p(-q)
    assert abs(m[f"auc/{key}"] - roc_auc_score(y, q)) <= _tie_share(y, logit) / 2 + 1e-9, key
  np.testing.assert_allclose(p["ctcvr"], p["ctr"] * p["cvr"], rtol=1e-5)
  np.testing.assert_array_equal(p["label_ctcvr"], click * conv)


def _signature_defs(saved_model_dir):
  sm = saved_model_pb2.SavedModel()
  with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
    sm.ParseFromString(f.read())
  return sm.meta_graphs[0].signature_def


def test_export_has_the_tf_serving_signatures(run):
  sigs = _signature_defs(run["result"]["saved_model"])
  assert sigs["regression"].method_name == "tensorflow/serving/regress"
  assert set(sigs["regression"].inputs) == {"inputs"} and set(sigs["regression"].outputs) == {"outputs"}
  assert sigs["serving_default"].method_name == "tensorflow/serving/regress"
  assert sigs["predict"].method_name == "tensorflow/serving/predict"
  assert set(sigs["predict"].outputs) == {"ctr", "cvr", "ctcvr"}
  assert sigs["regression"].inputs["inputs"].dtype == tf.string.as_datatype_enum


def test_regression_signature_on_raw_examples_equals_estimator_predict(run):
  rows = _raw_rows(run["raw"], "test")
  p = evaluation.predict(run["model_dir"], run["out"])
  ids = p["sample_id"][:300]
  serialized = [T.raw_example({k: v for k, v in rows[int(i)].items()
                               if k not in F.RAW_LABELS and k != F.SAMPLE_ID}, "aliccp")
                .SerializeToString() for i in ids]
  loaded = tf.saved_model.load(run["result"]["saved_model"])
  got = loaded.signatures["regression"](inputs=tf.constant(serialized))["outputs"].numpy().reshape(-1)
  np.testing.assert_allclose(got, p["cvr"][:300], rtol=1e-5, atol=1e-7)
  pred = loaded.signatures["predict"](examples=tf.constant(serialized))
  np.testing.assert_allclose(pred["cvr"].numpy().reshape(-1), got, rtol=1e-6)


def test_examples_with_missing_fields_still_score(run):
  loaded = tf.saved_model.load(run["result"]["saved_model"])
  empty = tf.train.Example().SerializeToString()
  only_item = T.raw_example({"f_205": [130000001], "f_301": [220000003]}, "aliccp").SerializeToString()
  out = loaded.signatures["regression"](inputs=tf.constant([empty, only_item]))["outputs"].numpy()
  assert out.shape[0] == 2 and np.all(np.isfinite(out)) and np.all((out > 0) & (out < 1))


def test_training_resumes_from_the_checkpoint(run, tmp_path):
  # Same model dir, larger budget: only the remaining steps run.
  result = E.train_and_evaluate(run["out"], run["model_dir"], run["params"], batch_size=256,
                                train_steps=80, save_checkpoints_steps=30, do_export=False)
  assert result["metrics"]["global_step"] == 80
  # Rerunning a finished run trains nothing and still reports the final metrics.
  again = E.train_and_evaluate(run["out"], run["model_dir"], run["params"], batch_size=256,
                               train_steps=80, save_checkpoints_steps=30, do_export=False)
  assert again["metrics"]["global_step"] == 80
  assert again["metrics"]["auc/ctr"] == pytest.approx(result["metrics"]["auc/ctr"], abs=1e-6)
  other = dict(run["params"], embedding_dim=4)
  with pytest.raises(E.ModelDirError, match="another model: embedding_dim 8 -> 4"):
    E.train_and_evaluate(run["out"], run["model_dir"], other, batch_size=256, train_steps=90)


def test_a_field_subset_with_folded_tables_trains_and_serves(run, tmp_path):
  # fields + table_rows: only the chosen fields get tables, each of table_rows rows (ids folded
  # modulo it); the serving signature applies the same folding to raw examples.
  params = dict(run["params"], fields=["101", "205", "206", "301"], table_rows=32)
  model_dir = str(tmp_path / "model")
  result = E.train_and_evaluate(run["out"], model_dir, params, batch_size=256, train_steps=20,
                                save_checkpoints_steps=20)
  shapes = dict(tf.train.list_variables(model_dir))
  # The tables themselves, not the optimizer's slots (TABLE/Adam, TABLE/Adam_1).
  tables = {k: v for k, v in shapes.items() if k.rsplit("/", 1)[-1].startswith("table_")}
  assert sorted(k.rsplit("table_", 1)[1] for k in tables) == ["101", "205", "206", "301"]
  # 301 has 256 buckets in the schema (capped at 1024 by the run): 32 rows after the fold.
  assert all(v == [32, 8] for v in tables.values())
  assert result["metrics"]["global_step"] == 20 and np.isfinite(result["metrics"]["loss"])
  loaded = tf.saved_model.load(result["saved_model"])
  # Fields outside the subset change nothing in the score.
  base = {"f_101": [1], "f_205": [130000001], "f_206": [140000002], "f_301": [220000003]}
  other = dict(base, f_127_14=[5], w_127_14=[1.0], f_210=[7])
  ex = [T.raw_example(e, "aliccp").SerializeToString() for e in (base, other)]
  out = loaded.signatures["regression"](inputs=tf.constant(ex))["outputs"].numpy().reshape(-1)
  assert np.all((out > 0) & (out < 1)) and out[0] == pytest.approx(out[1], rel=1e-6)
  with pytest.raises(ValueError, match="fields must be a non-empty subset"):
    E.train_and_evaluate(run["out"], str(tmp_path / "m2"), dict(params, fields=["nope"]),
                         batch_size=256, train_steps=1)


def test_a_model_dir_from_before_fields_and_table_rows_still_resumes(run, tmp_path):
  # params.json written before a param existed: the param's default is assumed.
  model_dir = str(tmp_path / "model")
  shutil.copytree(run["model_dir"], model_dir)
  path = os.path.join(model_dir, "params.json")
  recorded = json.load(open(path))
  assert recorded.pop("fields", "absent") is None and recorded.pop("table_rows") == 0
  json.dump(recorded, open(path, "w"))
  E.check_model_dir(model_dir, resolve_params(run["params"]))
  with pytest.raises(E.ModelDirError, match="table_rows 0 -> 64"):
    E.check_model_dir(model_dir, resolve_params(dict(run["params"], table_rows=64)))


def test_folded_ids_share_a_row():
  field = F.Field("f", "item", 100, True, False, "test field")
  with tf.Graph().as_default():
    ids = tf.sparse.from_dense(tf.constant([[3], [35], [67], [4]], tf.int64))
    pooled, tables = layers.embed_fields({field.ids: ids}, [field], {"f": 100}, 2, "t",
                                         table_rows={"f": 32})
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      out = sess.run(pooled)
  assert tables[0].shape.as_list() == [32, 2]
  np.testing.assert_array_equal(out[0], out[1])
  np.testing.assert_array_equal(out[0], out[2])
  assert not np.array_equal(out[0], out[3])


def test_trainer_refuses_an_unfinished_preprocessing_output(tmp_path):
  with pytest.raises(I.IncompleteTransformOutput):
    I.load_transform_output(str(tmp_path))


# Every model, small: (model, extra params, calibration method, share of the train split it is
# fitted on: held out, or 0 for the whole split after training).
ZOO = (("esmm", {}, "platt", 0.45), ("esmm_ns", {}, "none", None), ("base", {}, "bias", None),
       ("escm2_ips", {}, "none", None), ("escm2_dr", {}, "none", None), ("shared_bottom", {}, "none", None),
       ("mmoe", {"num_experts": 3}, "none", None), ("cgc", {}, "isotonic", 0.0),
       ("ple", {"num_task_experts": 1, "num_shared_experts": 1}, "none", None))


@pytest.fixture(scope="module")
def zoo(run, tmp_path_factory):
  """Every model trained a few steps and exported (two of them calibrated)."""
  root = tmp_path_factory.mktemp("zoo")
  out = {}
  for model, extra, method, holdout in ZOO:
    params = dict(run["params"], model=model, expert_hidden_units=[16], tower_hidden_units=[8], **extra)
    model_dir = str(root / model)
    result = E.train_and_evaluate(run["out"], model_dir, params, batch_size=256, train_steps=20,
                                  save_checkpoints_steps=20, calibration=method, calibration_holdout=holdout)
    out[model] = {"model_dir": model_dir, "result": result, "calibration": method}
  return out


def _serialized_test_rows(run, sample_ids):
  rows = _raw_rows(run["raw"], "test")
  return [T.raw_example({k: v for k, v in rows[int(i)].items() if k not in F.RAW_LABELS and k != F.SAMPLE_ID},
                        "aliccp").SerializeToString() for i in sample_ids]


@pytest.mark.parametrize("model", [m for m, _, _, _ in ZOO])
def test_every_model_serves_its_pcvr_as_the_regression_signature(run, zoo, model):
  saved = zoo[model]["result"]["saved_model"]
  sigs = _signature_defs(saved)
  assert sigs["regression"].method_name == "tensorflow/serving/regress"
  assert set(sigs["predict"].outputs) == {"ctr", "cvr", "ctcvr"}
  p = evaluation.predict(zoo[model]["model_dir"], run["out"])
  serialized = _serialized_test_rows(run, p["sample_id"][:200])
  loaded = tf.saved_model.load(saved)
  got = loaded.signatures["regression"](inputs=tf.constant(serialized))["outputs"].numpy().reshape(-1)
  # float32 sums over batches of other shapes (the reader's, these 200 examples) differ by up to
  # about 100 ulp through the towers (a cgc run: 1.28e-5 relative); the heads differ by far more.
  np.testing.assert_allclose(got, p["cvr"][:200], rtol=1e-4, atol=1e-7)
  assert not np.allclose(got, p["ctr"][:200], rtol=1e-4) and not np.allclose(got, p["ctcvr"][:200], rtol=1e-4)
  pred = loaded.signatures["predict"](examples=tf.constant(serialized))
  for head in ("ctr", "cvr", "ctcvr"):
    np.testing.assert_allclose(pred[head].numpy().reshape(-1), p[head][:200], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(p["ctcvr"], p["ctr"] * p["cvr"], rtol=1e-5)


@pytest.mark.parametrize("model", [m for m, _, c, _ in ZOO if c != "none"])
def test_a_calibration_round_trips_through_the_saved_model(run, zoo, model):
  """The SavedModel's heads are the calibration (fitted on the held-out slice and recorded in
  calibration.json) applied to the towers' own logits."""
  spec = calibration.load(zoo[model]["model_dir"])
  assert spec["method"] == zoo[model]["calibration"] and spec["impressions"] > 0
  holdout = spec["holdout"]
  train_rows = run["rec"]["train"]["rows_written"]
  if holdout:      # fitted on the held-out slice only (which training leaves out: tested above)
    assert holdout == E.load_params(zoo[model]["model_dir"])["train_holdout"] == 0.5
    assert spec["impressions"] == len(_sample_ids(run, training=False, holdout="only", holdout_fraction=0.5))
  else:
    assert spec["impressions"] == train_rows
  p = evaluation.predict(zoo[model]["model_dir"], run["out"])
  logit = lambda q: np.log(q) - np.log1p(-q)
  for head in ("ctr", "cvr"):
    raw = logit(p[head + "_uncalibrated"].astype(np.float64))
    want = 1 / (1 + np.exp(-calibration.apply_numpy(spec[head], raw)))
    np.testing.assert_allclose(p[head], want, rtol=2e-4, atol=1e-6)
  # Rankings are kept: the calibration is strictly increasing. (Towers' pCVRs that tie in float32
  # can come from different logits, so ties are ordered by the calibrated value.)
  order = np.lexsort((p["cvr"], p["cvr_uncalibrated"]))
  assert np.all(np.diff(p["cvr"][order]) >= -1e-7)
  loaded = tf.saved_model.load(zoo[model]["result"]["saved_model"])
  serialized = _serialized_test_rows(run, p["sample_id"][:100])
  got = loaded.signatures["regression"](inputs=tf.constant(serialized))["outputs"].numpy().reshape(-1)
  np.testing.assert_allclose(got, p["cvr"][:100], rtol=1e-5, atol=1e-7)
  # The evaluation scores the calibrated heads and, as a row of its own, the towers' own.
  report, _ = evaluation.evaluate([(model, zoo[model]["model_dir"])], run["out"])
  assert set(report) == {model, model + evaluation.UNCALIBRATED_ROW}
  assert report[model]["auc/cvr_clicked"] == pytest.approx(
      report[model + evaluation.UNCALIBRATED_ROW]["auc/cvr_clicked"], abs=1e-3)


def test_gated_models_report_gate_utilisation(zoo):
  for model, experts in (("mmoe", 3), ("cgc", 4), ("ple", 2)):
    m = zoo[model]["result"]["metrics"]
    for task in ("ctr", "cvr"):
      gate = [m[f"gate/{task}/expert_{e}"] for e in range(experts)]
      assert abs(sum(gate) - 1) < 1e-4, (model, gate)
    assert np.isfinite(m["auc/cvr_clicked"]) and np.isfinite(m["auc/ctcvr"])


def test_evaluation_reports_every_model_with_gates_and_the_oracle(run, zoo):
  truth = os.path.join(run["raw"], "ground_truth_test.csv")
  report, curves = evaluation.evaluate([("esmm", run["model_dir"]), ("mmoe", zoo["mmoe"]["model_dir"])],
                                       run["out"], truth)
  # The run's model is calibrated (the trainer's default), the zoo's mmoe is not.
  assert set(report) == {"esmm", "esmm:uncalibrated", "mmoe", "oracle"}
  assert report["esmm"]["examples"] == 2000 - 3
  assert abs(report["mmoe"]["auc/ctr"] - zoo["mmoe"]["result"]["metrics"]["auc/ctr"]) < 0.002
  assert 0.5 < report["oracle"]["auc/cvr_all_vs_truth"] <= 1
  gates = curves["mmoe"]["gates"]
  assert set(gates) == {"ctr", "cvr"} and "gates" not in curves["esmm"]
  np.testing.assert_allclose(gates["ctr"].sum(), 1.0, rtol=1e-5)
  assert report["mmoe"]["gate/cvr/expert_2"] == pytest.approx(gates["cvr"][2])
  assert "gate utilisation of mmoe" in evaluation.format_gates(report)
  p = curves["mmoe"]
  np.testing.assert_allclose(p["ctcvr"], p["ctr"] * p["cvr"], rtol=1e-5)


def test_a_conversion_scale_without_a_calibration_is_refused_before_any_work(tmp_path):
  model_dir = str(tmp_path / "model")
  with pytest.raises(ValueError, match="through the calibration"):
    E.train_and_evaluate(str(tmp_path / "nowhere"), model_dir, {"model": "esmm"}, 32,
                         calibration="none", conversion_scale=1.2)
  assert not (tmp_path / "model").exists()
