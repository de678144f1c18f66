"""Distributed training on a real multi-process cluster on 127.0.0.1.

model_fn.launch_local_cluster starts 2 parameter servers, the chief, 1 worker and an
evaluator, each a `python -m model_fn.train` process with its own TF_CONFIG, and ESMM trains
a few hundred steps on small synthetic data. The tests read what the cluster left.
"""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from datagen import synthetic
from model_fn import estimator as E
from model_fn import input_fn as I
from model_fn import launch_local_cluster as L
from model_fn import train
from pipeline import preprocess
from preprocessing import cli
from preprocessing import transform as T

STEPS = 400
TRAIN_ARGS = ["--batch_size=32", f"--train_steps={STEPS}", "--embedding_dim=8", "--ctr_hidden_units=32,16",
              "--cvr_hidden_units=32,16", "--save_checkpoints_steps=150", "--eval_throttle_secs=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("cluster")
  raw, out = str(root / "raw"), str(root / "preprocessed")
  synthetic.generate(raw, num_train=4000, num_test=1000, num_users=500, num_items=800,
                     impressions_per_common=10, anomalies=0, seed=11)
  # 4096 buckets: the largest tables (128 KiB) are split over both parameter servers.
  preprocess.run("aliccp", preprocess._input_patterns(raw, {}), out, [], max_hash_buckets=4096)
  return {"root": root, "out": out}


@pytest.fixture(scope="module")
def cluster(data):
  model_dir = str(data["root"] / "model")
  args = [f"--transform_dir={data['out']}", f"--model_dir={model_dir}", *TRAIN_ARGS]
  with L.LocalCluster(args, str(data["root"] / "logs"), num_ps=2, num_workers=1, evaluator=True) as c:
    try:
      codes = c.wait(timeout_s=480)
    except RuntimeError as e:
      pytest.fail(f"{e}\n{c.tail()}")
  with open(os.path.join(model_dir, "train_result.json")) as f:
    result = json.load(f)
  return {"model_dir": model_dir, "codes": codes, "procs": c.procs, "result": result, "cluster": c.cluster}


def test_every_task_finished_and_no_process_is_left(cluster):
  assert cluster["codes"] == {"chief-0": 0, "worker-0": 0, "evaluator-0": 0}
  assert set(cluster["procs"]) == {"ps-0", "ps-1", "chief-0", "worker-0", "evaluator-0"}
  # The parameter servers serve until stopped: the launcher stopped them.
  assert all(p.poll() is not None for p in cluster["procs"].values())
  assert all(addr.startswith("127.0.0.1:") for hosts in cluster["cluster"].values() for addr in hosts)


def test_both_training_tasks_contributed_steps_to_the_global_step(cluster):
  steps = E.task_steps(cluster["model_dir"])
  assert set(steps) == {"chief-0", "worker-0"}
  assert steps["chief-0"] > 0 and steps["worker-0"] > 0, steps
  # Each step of either task increments the one global step on the parameter servers.
  final = tf.train.load_variable(cluster["model_dir"], "global_step")
  assert final >= STEPS and sum(steps.values()) >= final, (steps, final)


def test_the_chief_wrote_checkpoints_and_the_evaluator_evaluated_them(cluster):
  ckpt = tf.train.get_checkpoint_state(cluster["model_dir"])
  numbers = sorted(int(re.search(r"-(\d+)$", p).group(1)) for p in ckpt.all_model_checkpoint_paths)
  assert len(numbers) >= 2 and numbers[-1] >= STEPS
  eval_steps = []
  for path in tf.io.gfile.glob(os.path.join(cluster["model_dir"], "eval", "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      if any(v.tag == "auc/ctcvr" for v in event.summary.value):
        eval_steps.append(event.step)
  assert eval_steps and max(eval_steps) >= STEPS


def test_embedding_tables_were_partitioned_over_the_parameter_servers(cluster):
  graph = tf.compat.v1.GraphDef()
  with open(os.path.join(cluster["model_dir"], "graph.pbtxt")) as f:
    from google.protobuf import text_format
    text_format.Parse(f.read(), graph)
  devices = {}
  for node in graph.node:
    m = re.fullmatch(r"embeddings/(table_\w+?)/part_(\d+)", node.name)
    if m and node.op in ("VariableV2", "VarHandleOp"):
      devices.setdefault(m.group(1), {})[int(m.group(2))] = node.device
  split = {t: d for t, d in devices.items() if len(d) == 2}
  assert split, devices
  for parts in split.values():
    assert {parts[0], parts[1]} == {"/job:ps/task:0", "/job:ps/task:1"}


def test_the_export_is_servable_on_one_machine_and_matches_the_checkpoint(cluster, data):
  # This process has no TF_CONFIG: the checkpoint of partitioned tables loads into the
  # unpartitioned graph of a local Estimator, whose evaluation gives the chief's final metrics.
  assert "TF_CONFIG" not in os.environ
  tft_output = I.load_transform_output(data["out"])
  estimator = E.make_estimator(cluster["model_dir"], E.load_params(cluster["model_dir"]))
  local = estimator.evaluate(I.make_input_fn(I.split_files(data["out"], "eval"), tft_output, 32, training=False))
  chief = cluster["result"]["metrics"]
  assert local["global_step"] == chief["global_step"] >= STEPS
  for k in ("auc/ctr", "auc/ctcvr", "auc/cvr_clicked", "loss"):
    assert local[k] == pytest.approx(chief[k], abs=1e-6), k
  loaded = tf.saved_model.load(cluster["result"]["saved_model"])
  examples = [T.raw_example({"f_101": [u], "f_205": [130000000 + u], "f_301": [1]}, "aliccp").SerializeToString()
              for u in range(1, 33)] + [tf.train.Example().SerializeToString()]
  out = loaded.signatures["regression"](inputs=tf.constant(examples))["outputs"].numpy().reshape(-1)
  assert out.shape == (33,) and np.all((out > 0) & (out < 1)) and np.std(out) > 0


def test_a_failing_cluster_is_reported_and_every_process_stopped(data, tmp_path):
  # The parameter servers never exit on their own; a timeout (or any failed task) stops all.
  args = [f"--transform_dir={data['out']}", f"--model_dir={tmp_path / 'model'}", *TRAIN_ARGS]
  cluster = L.LocalCluster(args, str(tmp_path / "logs"), num_ps=1, num_workers=1, evaluator=False)
  with pytest.raises(RuntimeError, match="timed out"):
    with cluster:
      cluster.wait(timeout_s=2)
  assert len(cluster.procs) == 3 and all(p.poll() is not None for p in cluster.procs.values())
  bad = L.LocalCluster([f"--transform_dir={tmp_path / 'missing'}", f"--model_dir={tmp_path / 'm2'}"],
                       str(tmp_path / "logs2"), num_ps=1, num_workers=0, evaluator=False)
  with pytest.raises(RuntimeError, match="tasks failed") as failure:
    with bad:
      bad.wait(timeout_s=120)
  assert all(p.poll() is not None for p in bad.procs.values())
  # Both tasks read the missing directory; whichever exited first is reported with its reason
  # (the other may be stopped before it wrote its own), and its log holds the same line.
  reason = "missing does not exist (give the --output_dir of a pipeline.preprocess run)"
  failed = re.findall(r"^  (ps-0|chief-0): error: (.*)$", str(failure.value), re.M)
  assert failed and all(reason in line for _, line in failed), str(failure.value)
  for name, _ in failed:
    assert reason in open(bad.log_path(*name.split("-"))).read()


def test_the_kubernetes_example_runs_the_same_command_with_known_flags():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  text = open(os.path.join(root, "deploy", "kubernetes", "tfjob.yaml")).read()
  defined = set(cli.flag_values(train.define_flags))
  used = re.findall(r"- --(\w+)=", text)
  assert used and set(used) <= defined, set(used) - defined
  assert re.findall(r"^    (\w+):\n      replicas:", text, re.M) == ["PS", "Chief", "Worker", "Evaluator"]
  assert text.count("command: *train") == 3 and "- model_fn.train" in text
