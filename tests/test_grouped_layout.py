"""The grouped layout (pipeline.preprocess --layout=grouped): the user side stored once per
common-features row, pooled and multiplied once per group.

One raw data set is preprocessed in both layouts; the grouped output must account for every
row, hold the rows layout's ids impression by impression, and give the same predictions.
"""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from datagen import synthetic
from model_fn import estimator as E
from model_fn import evaluation
from model_fn import input_fn as I
from pipeline import preprocess
from pipeline.sources import aliccp
from preprocessing import cli
from preprocessing import features as F
from preprocessing import transform as T

BUCKETS = 2048
SMALL = {"embedding_dim": 6, "ctr_hidden_units": [16, 8], "cvr_hidden_units": [16, 8],
         "expert_hidden_units": [16], "tower_hidden_units": [8], "num_experts": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("grouped")
  raw = str(root / "raw")
  synthetic.generate(raw, num_train=2500, num_test=1200, num_users=300, num_items=400,
                     impressions_per_common=12, anomalies=2, seed=11)
  # A skeleton row with a user-side field of its own has no place in a grouped record.
  with open(os.path.join(raw, "sample_skeleton_train.csv")) as f:
    index = f.readline().split(",")[3]
  with open(os.path.join(raw, "sample_skeleton_train.csv"), "a") as f:
    f.write(f"990001,1,0,{index},2,205\x0211\x031.0\x01101\x025\x031.0\n")
  patterns = preprocess._input_patterns(raw, {})
  out = {layout: str(root / layout) for layout in F.LAYOUTS}
  rec = {layout: preprocess.run("aliccp", patterns, out[layout], [], max_hash_buckets=BUCKETS, layout=layout)
         for layout in F.LAYOUTS}
  return {"raw": raw, "out": out, "rec": rec, "root": root}


def _by_sample_id(features):
  """{sample id: {feature: sorted values}} of parsed per-impression features."""
  ids = np.asarray(features[F.SAMPLE_ID]).reshape(-1)
  rows = {int(s): {} for s in ids}
  for name, t in features.items():
    if name in (F.SAMPLE_ID, F.GROUP_INDEX):
      continue
    if isinstance(t, tf.SparseTensor):
      values, row = t.values.numpy(), t.indices.numpy()[:, 0]
      for i, s in enumerate(ids):
        rows[int(s)][name] = sorted(values[row == i].tolist())
    else:
      for i, s in enumerate(ids):
        rows[int(s)][name] = np.asarray(t)[i].tolist()
  return rows


def _impressions(out: str, grouped: bool):
  """Every eval impression's transformed features, the grouped records' expanded to impressions."""
  tft_output = I.load_transform_output(out)
  spec = tft_output.transformed_feature_spec()
  serialized = tf.constant([r.numpy() for r in tf.data.TFRecordDataset(
      sorted(glob.glob(I.split_files(out, "eval"))), compression_type="GZIP")])
  if not grouped:
    return _by_sample_id(tf.io.parse_example(serialized, spec))
  features = I.grouped_parser(spec, "aliccp")(serialized)
  index = features[F.GROUP_INDEX].numpy()
  expanded = {}
  for name, t in features.items():
    f = next((f for f in F.ALICCP_FIELDS if name in (f.ids, f.weights)), None)
    if f is not None and f.group_level:      # one row per group: to the impressions, as pooling does
      dense = tf.RaggedTensor.from_sparse(t)
      t = tf.gather(dense, index).to_sparse()
    expanded[name] = t
  return _by_sample_id(expanded)


def test_every_row_is_written_or_set_aside_and_groups_are_the_common_rows(data):
  rows, grouped = data["rec"]["rows"], data["rec"]["grouped"]
  for split in ("train", "eval"):
    assert grouped[split]["skeleton_balanced"] and grouped[split]["common_balanced"]
    assert grouped[split]["groups_written"] == grouped[split]["common_rows_used"] > 0
  assert grouped["eval"]["label_positives"] == rows["eval"]["label_positives"]
  clicks = lambda r: r["train"]["label_positives"]["click"]
  assert clicks(grouped) == clicks(rows) - 1        # the row set aside below was a click
  dead = grouped["train"]["skeleton_rows_set_aside"]
  assert dead[aliccp.USER_FIELD_IN_SKELETON] == 1
  assert grouped["train"]["rows_written"] == rows["train"]["rows_written"] - 1
  assert grouped["eval"]["rows_written"] == rows["eval"]["rows_written"]
  with open(os.path.join(data["out"]["grouped"], F.RECONCILIATION)) as f:
    assert json.load(f)["layout"] == F.GROUPED
  letters = [json.loads(line) for p in glob.glob(os.path.join(data["out"]["grouped"], "dead_letter", "train*"))
             for line in open(p)]
  assert [d["sample_id"] for d in letters if d["reason"] == aliccp.USER_FIELD_IN_SKELETON] == [990001]
  # Both layouts serve the same per-impression transform.
  assert (T.transformed_hash_buckets(I.load_transform_output(data["out"]["grouped"]))
          == T.transformed_hash_buckets(I.load_transform_output(data["out"]["rows"])))


def test_grouped_records_hold_each_impression_s_ids_weights_and_labels(data):
  rows = _impressions(data["out"]["rows"], grouped=False)
  grouped = _impressions(data["out"]["grouped"], grouped=True)
  assert rows.keys() == grouped.keys() and len(rows) > 1000
  for sample_id, features in rows.items():
    assert grouped[sample_id] == features, sample_id


@pytest.mark.parametrize("model", ["esmm", "base", "mmoe"])
def test_grouped_and_row_inputs_give_the_same_predictions(data, model):
  """Trained on the grouped records; scored on both layouts' eval split, impression by impression."""
  model_dir = str(data["root"] / f"model_{model}")
  E.train_and_evaluate(data["out"]["grouped"], model_dir, {"model": model, **SMALL}, batch_size=128,
                       train_steps=25, save_checkpoints_steps=25, calibration="none", do_export=False)
  by_layout = {}
  for layout, out in data["out"].items():
    p = evaluation.predict(model_dir, out)
    order = np.argsort(p[F.SAMPLE_ID])
    by_layout[layout] = {k: v[order] for k, v in p.items() if not k.startswith(evaluation.GATE_PREFIX)}
  rows, grouped = by_layout["rows"], by_layout["grouped"]
  np.testing.assert_array_equal(rows[F.SAMPLE_ID], grouped[F.SAMPLE_ID])
  for head in ("ctr", "cvr", "ctcvr"):
    np.testing.assert_allclose(grouped[head], rows[head], rtol=2e-5, atol=1e-7)
  assert np.std(rows["cvr"]) > 0


def test_the_grouped_layout_is_refused_where_it_cannot_hold_the_data(data, tmp_path):
  patterns = preprocess._input_patterns(data["raw"], {})
  with pytest.raises(cli.UsageError, match="--layout=grouped: --format=avazu"):
    preprocess._check_job("avazu", None, 128, True, 0, F.GROUPED)
  with pytest.raises(cli.UsageError, match="--notrain_examples"):
    preprocess._check_job("aliccp", None, 128, False, 0, F.GROUPED)
  with pytest.raises(cli.UsageError, match="crosses"):
    preprocess.run("aliccp", patterns, str(tmp_path / "x"), [], max_hash_buckets=BUCKETS,
                   crosses=["205:206"], layout=F.GROUPED)
