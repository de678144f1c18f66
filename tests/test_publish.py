"""Publishing to TF Serving: versions, atomicity, pruning, model config, warmup requests.

A tiny SavedModel with the project's serving signatures (serialized tf.Examples in; pCVR out
of ``regression``/``serving_default``; ctr, cvr, ctcvr out of ``predict``) stands in for a
trained ESMM, so these tests run in seconds; the daily-job test publishes real models.
"""

import os

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from pipeline import publish as P


class _Served(tf.Module):
  """Scores an example by its int64 feature ``f_205`` (any value of ``scale`` > 1 breaks it)."""

  def __init__(self, scale: float):
    super().__init__()
    self.scale = tf.Variable(scale)

  def _probability(self, serialized):
    parsed = tf.io.parse_example(serialized, {"f_205": tf.io.VarLenFeature(tf.int64)})
    x = tf.cast(tf.sparse.reduce_sum(parsed["f_205"], axis=1), tf.float32)
    return self.scale * tf.sigmoid(x / 1e9 - 0.5)[:, None]

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def regress(self, inputs):
    return {"outputs": self._probability(inputs)}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def predict(self, examples):
    p = self._probability(examples)
    return {"ctr": p, "cvr": p, "ctcvr": p * p}


def _export(path: str, scale: float = 1.0) -> str:
  m = _Served(scale)
  tf.saved_model.save(m, path, signatures={"regression": m.regress, "serving_default": m.regress,
                                           "predict": m.predict})
  return path


def _examples(n=4):
  return [tf.train.Example(features=tf.train.Features(feature={
      "f_205": tf.train.Feature(int64_list=tf.train.Int64List(value=[130000000 + i]))})).SerializeToString()
      for i in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return _export(str(tmp_path_factory.mktemp("export") / "m"))


def test_versions_increase_old_ones_are_pruned_and_rerunning_changes_nothing(model, tmp_path):
  root = str(tmp_path / "serving")
  for v in (20141021, 20141022, 20141023, 20141024):
    r = P.publish(model, root, "esmm", v, _examples(), keep=2)
    assert r["published"]
  assert P.versions(os.path.join(root, "esmm")) == [20141023, 20141024]
  before = sorted(os.listdir(os.path.join(root, "esmm")))
  again = P.publish(model, root, "esmm", 20141024, _examples(), keep=2)
  assert not again["published"] and "already published" in again["reason"]
  assert sorted(os.listdir(os.path.join(root, "esmm"))) == before == ["20141023", "20141024"]
  with pytest.raises(P.PublishError, match="older than the newest"):
    P.publish(model, root, "esmm", 20141022, _examples(), keep=2)
  assert P.newest(root, "esmm").endswith("20141024")


def test_the_warmup_file_parses_and_its_requests_run_against_the_signatures(model, tmp_path):
  root = str(tmp_path / "serving")
  r = P.publish(model, root, "esmm", 7, _examples(5))
  records = list(tf.data.TFRecordDataset(os.path.join(r["path"], P.WARMUP_FILE)))
  logs = [prediction_log_pb2.PredictionLog.FromString(x.numpy()) for x in records]
  kinds = [(log.WhichOneof("log_type"),
            getattr(log, log.WhichOneof("log_type")).request.model_spec.signature_name) for log in logs]
  assert kinds == [("regress_log", "regression"), ("regress_log", "serving_default"),
                   ("predict_log", "predict")]
  assert all(log.regress_log.request.model_spec.name == "esmm" for log in logs[:2])
  assert len(logs[0].regress_log.request.input.example_list.examples) == 5
  assert P.replay_warmup(r["path"]) == {"regression": 5, "serving_default": 5, "predict": 5}
  # The replayed regression output is the model's own answer on those examples.
  loaded = tf.saved_model.load(r["path"])
  want = loaded.signatures["regression"](inputs=tf.constant(_examples(5)))["outputs"].numpy()
  assert np.all((want > 0) & (want < 1))


def test_model_config_is_valid_text_proto_and_keeps_other_models(model, tmp_path):
  root = str(tmp_path / "serving")
  P.publish(model, root, "esmm", 1, _examples())
  P.publish(model, root, "mmoe", 1, _examples())
  P.publish(model, root, "esmm", 2, _examples())
  config = model_server_config_pb2.ModelServerConfig()
  with open(os.path.join(root, P.MODEL_CONFIG)) as f:
    text_format.Parse(f.read(), config)
  entries = {c.name: c for c in config.model_config_list.config}
  assert sorted(entries) == ["esmm", "mmoe"]
  assert entries["esmm"].base_path == os.path.abspath(os.path.join(root, "esmm"))
  assert entries["esmm"].model_platform == "tensorflow"
  assert entries["esmm"].model_version_policy.latest.num_versions == 1
  # A serving root on a remote file system keeps its URL (ram:// stands in for gs://).
  path = P.write_model_config("ram://serving", "esmm")
  with tf.io.gfile.GFile(path) as f:
    assert 'base_path: "ram://serving/esmm"' in f.read()


def test_a_model_that_fails_its_warmup_is_not_published(tmp_path):
  broken = _export(str(tmp_path / "broken"), scale=3.0)     # "probabilities" up to 3
  root = str(tmp_path / "serving")
  with pytest.raises(P.PublishError, match="warmup requests fail"):
    P.publish(broken, root, "esmm", 5, _examples())
  assert os.listdir(os.path.join(root, "esmm")) == []       # nothing visible, nothing staged


def test_a_killed_publish_leaves_nothing_visible_and_the_next_run_cleans_up(model, tmp_path):
  root = str(tmp_path / "serving")
  P.publish(model, root, "esmm", 1, _examples())
  # A run killed mid-copy leaves a staging dir: TF Serving only loads integer dirs.
  stale = os.path.join(root, "esmm", ".staging-2-deadbeef")
  os.makedirs(os.path.join(stale, "variables"))
  assert P.versions(os.path.join(root, "esmm")) == [1]
  P.publish(model, root, "esmm", 2, _examples())
  assert sorted(os.listdir(os.path.join(root, "esmm"))) == ["1", "2"]
