"""Helpers of the benchmark scripts whose output benchmarks/README.md quotes."""

import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import preprocess_throughput as PT  # noqa: E402
import process_stats  # noqa: E402


def test_parse_run_reads_impressions_workers_and_an_optional_mode_and_partitions():
  assert PT.parse_run("1000000:2") == (1000000, 2, "multi_processing", 0)
  assert PT.parse_run("4000000:1:in_memory") == (4000000, 1, "in_memory", 0)
  assert PT.parse_run("4000000:2:in_memory:8") == (4000000, 2, "in_memory", 8)
  for bad in ("1000000", "1000:2:fast", "1:2:3:4", "1:2:in_memory:1", "1:2:in_memory:x", "1:2:in_memory:4:5"):
    with pytest.raises(ValueError, match="IMPRESSIONS:WORKERS"):
      PT.parse_run(bad)


def test_targets_compare_like_with_like():
  run = lambda n, w, mode, parts, seconds, mb: {
      "impressions": n, "workers": w, "mode": mode, "partitions": parts, "seconds": seconds,
      "impressions_per_second": round(n / seconds), "peak_rss_mb": mb}
  rows = [run(1_100_000, 1, "multi_processing", 0, 200, 4000), run(1_100_000, 2, "multi_processing", 0, 125, 5000),
          run(4_400_000, 2, "multi_processing", 0, 500, 15000), run(1_100_000, 1, "in_memory", 0, 150, 2000),
          run(1_100_000, 1, "in_memory", 2, 160, 1800), run(1_100_000, 2, "in_memory", 2, 90, 2600),
          run(4_400_000, 2, "in_memory", 8, 330, 2860)]
  got = {what: (measured, met) for what, _, measured, met in PT.compute_targets(rows)}
  assert got["2 workers / 1 worker at 1,100,000 impressions, multi_processing"] == (1.6, False)
  assert got["2 workers / 1 worker at 1,100,000 impressions, in_memory, 2 partitions"] == (1.78, True)
  assert got["peak memory 4,400,000 / 1,100,000 impressions, 2 worker(s), multi_processing"] == (3.0, False)
  assert got["peak memory 4,400,000 / 1,100,000 impressions, 2 worker(s), in_memory, 2 and 8 partitions"] == (1.1, True)
  assert got["impressions/s, best run (85M in 2 h)"] == (13333, True)
  assert len(got) == 5   # nothing compares a partitioned run with an unpartitioned one


def test_repeated_pairs_scale_within_their_repeat_and_the_target_is_their_median():
  run = lambda w, seconds, repeat, mb=1000: {
      "impressions": 1_100_000, "workers": w, "mode": "in_memory", "partitions": 2, "repeat": repeat,
      "seconds": seconds, "impressions_per_second": round(1_100_000 / seconds), "peak_rss_mb": mb}
  # The machine slows down over the repeats: across repeats the pairs would read 1.0 to 2.5.
  rows = [run(1, 100, 0), run(2, 55, 0), run(1, 150, 1), run(2, 100, 1), run(1, 200, 2), run(2, 110, 2, mb=1200)]
  pairs = PT.scaling_pairs(rows)
  assert [(one["seconds"], two["seconds"]) for _, _, one, two in pairs] == [(100, 55), (150, 100), (200, 110)]
  targets = {what: (measured, met) for what, _, measured, met in PT.compute_targets(rows)}
  assert targets["2 workers / 1 worker at 1,100,000 impressions, in_memory, 2 partitions "
                 "(median of 3 pairs: 1.82, 1.50, 1.82)"] == (1.82, True)
  assert [b["what"] for b in PT.scaling_bounds([dict(r, cpu_s_launcher=1.0, cpu_s_others=1.0) for r in rows])] == [
      f"1,100,000 impressions, in_memory, 2 partitions, repeat {i}" for i in (1, 2, 3)]


def test_tree_stats_reads_memory_and_cpu_of_a_process_and_its_descendants():
  import subprocess
  import time
  # A child that spends about 0.3 s of CPU, then waits to be read.
  child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                            "while time.process_time() - t < 0.3: pass\ntime.sleep(30)"])
  try:
    deadline = time.time() + 20
    while True:
      rss, cpu = process_stats.tree_stats(os.getpid())
      if cpu.get(child.pid, 0) >= 0.25 or time.time() > deadline:
        break
      time.sleep(0.1)
    assert os.getpid() in cpu and child.pid in cpu
    assert 0.25 <= cpu[child.pid] < 5
    assert rss >= process_stats.tree_stats(child.pid)[0] > 0     # the tree holds the child's memory too
    assert set(process_stats.tree_stats(child.pid)[1]) == {child.pid}   # a child's tree is only itself
  finally:
    child.kill()
    child.wait()


def test_scaling_bounds_spread_the_two_worker_run_s_cpu_over_the_cores(monkeypatch):
  monkeypatch.setattr(PT.os, "cpu_count", lambda: 2)
  run = lambda w, seconds, launcher, others: {
      "impressions": 1_100_000, "workers": w, "mode": "multi_processing", "partitions": 0,
      "seconds": seconds, "impressions_per_second": round(1_100_000 / seconds), "peak_rss_mb": 1,
      "cpu_s_launcher": launcher, "cpu_s_others": others}
  rows = [run(1, 200.0, 20.0, 180.0), run(2, 125.0, 20.0, 210.0)]
  (b,) = PT.scaling_bounds(rows)
  # 230 CPU s over 2 cores: 115 s at best, so 200 / 115 = 1.74x at most; measured 200 / 125.
  assert (b["cpu_s"], b["ideal_seconds"], b["bound"], b["measured"]) == (230.0, 115.0, 1.74, 1.6)
  assert (b["cpu_s_one_worker"], b["cpu_ratio"]) == (200.0, 1.15)
  assert PT._busy_cores(rows[1]) == 230.0 / 125.0
  # Runs without CPU readings (older results) or without a 1-worker partner give no bound.
  assert PT.scaling_bounds([{k: v for k, v in r.items() if not k.startswith("cpu")} for r in rows]) == []
  assert PT.scaling_bounds(rows[1:]) == []


def test_the_machine_control_sets_each_pair_beside_the_machine_s_own_scaling_around_its_repeat():
  run = lambda w, seconds, repeat: {
      "impressions": 1_100_000, "workers": w, "mode": "multi_processing", "partitions": 0, "repeat": repeat,
      "seconds": seconds, "impressions_per_second": round(1_100_000 / seconds), "peak_rss_mb": 1,
      "cpu_s_launcher": 10.0, "cpu_s_others": seconds}
  rows = [run(1, 160.0, 0), run(2, 100.0, 0), run(1, 150.0, 1), run(2, 100.0, 1)]
  controls = [{"repeat": 0, "when": "before", "scaling": 1.7}, {"repeat": 0, "when": "after", "scaling": 1.9},
              {"repeat": 1, "when": "before", "scaling": 1.5}]
  first, second = PT.scaling_bounds(rows, controls)
  assert (first["measured"], first["machine"], first["of_machine"]) == (1.6, 1.8, 0.89)
  assert (second["measured"], second["machine"], second["of_machine"]) == (1.5, 1.5, 1.0)
  assert "machine" not in PT.scaling_bounds(rows)[0]     # no control: nothing to compare with
  assert PT.machine_scaling_of(controls, 2) is None


def test_the_machine_control_times_the_same_loop_in_one_process_and_in_two(monkeypatch):
  # The loop itself is replaced by one that takes as long in every process, one or two at
  # once (it reports its own time): a machine whose two cores each give what one gives alone.
  def steady(loops):
    return loops / 1000
  steady.__module__, steady.__qualname__ = PT.__name__, "_spin"   # pickled by name to the pool
  monkeypatch.setattr(PT, "_spin", steady)
  assert PT.machine_scaling(5_000) == {"one_process_s": 5.0, "two_processes_s": 5.0, "scaling": 2.0}


def test_code_version_names_the_commit_and_says_when_tracked_files_changed(tmp_path):
  import subprocess
  git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True, text=True)
  assert PT.code_version(str(tmp_path)) == "unknown"
  git("init", "-q")
  (tmp_path / "a.py").write_text("x = 1\n")
  git("add", "a.py")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
  head = git("rev-parse", "--short", "HEAD").stdout.strip()
  assert PT.code_version(str(tmp_path)) == head
  (tmp_path / "a.py").write_text("x = 2\n")
  assert PT.code_version(str(tmp_path)) == head + "+changes"


def test_missing_stretches_tells_a_contiguous_loss_from_every_other_row():
  raw = list(range(100, 200))
  # Lines 10-29 lost entirely; every other line of 50-69 lost (one worker's half of a shuffle).
  lost = set(raw[10:30]) | set(raw[50:70:2])
  got = PT.missing_stretches(raw, [s for s in raw if s not in lost])
  assert got["missing"] == 30 and got["stretches"] == 2
  first, second = got["largest"]
  assert (first["first_line"], first["last_line"], first["rows"], first["density"]) == (10, 29, 20, 1.0)
  assert (second["first_line"], second["last_line"], second["rows"], second["density"]) == (50, 68, 10, 0.526)
  assert PT.missing_stretches(raw, raw) == {"missing": 0, "stretches": 0, "largest": []}


def _write_examples(path, sample_ids):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tf.io.TFRecordWriter(path, options="GZIP") as w:
    for sid in sample_ids:
      w.write(tf.train.Example(features=tf.train.Features(feature={
          "sample_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[sid])),
          "click": tf.train.Feature(int64_list=tf.train.Int64List(value=[0]))})).SerializeToString())


def test_locate_missing_counts_written_and_dead_lettered_rows_as_kept(tmp_path):
  raw, staging = tmp_path / "raw", tmp_path / "out.staging-x"
  raw.mkdir()
  for suffix, ids in (("train", range(1, 41)), ("test", range(1000, 1010))):
    with open(raw / f"sample_skeleton_{suffix}.csv", "w") as f:
      f.writelines(f"{i},0,0,u{i % 3},0,\n" for i in ids)
  # train: 1-20 written, 21 set aside by the parser (its line kept), 22 set aside by the join
  # (its sample id kept), 23-40 lost; eval: everything written.
  _write_examples(str(staging / "train" / "part-00000-of-00001.tfrecord.gz"), range(1, 21))
  _write_examples(str(staging / "eval" / "part-00000-of-00001.tfrecord.gz"), range(1000, 1010))
  os.makedirs(staging / "dead_letter")
  with open(staging / "dead_letter" / "train-00000-of-00001.jsonl", "w") as f:
    f.write(json.dumps({"source": "skeleton", "reason": "bad_label", "line": "21,2,0,u0,0,"}) + "\n")
    f.write(json.dumps({"source": "skeleton", "reason": "unknown_common_feature_index", "sample_id": 22}) + "\n")
    f.write(json.dumps({"source": "common", "reason": "bad_feature_num", "line": "u9,x,"}) + "\n")
  got = PT.locate_missing(str(raw), str(staging))
  assert got["eval"]["missing"] == 0
  assert got["train"]["missing"] == 18
  assert got["train"]["largest"] == [{"first_line": 22, "last_line": 39, "rows": 18, "density": 1.0}]


@pytest.mark.parametrize("model,embedding_optimizer", [("esmm", "adagrad"), ("esmm", "lazy_adam"),
                                                       ("base", "lazy_adam")])
def test_train_step_profile_sorts_every_op_of_a_train_graph_into_its_part(model, embedding_optimizer):
  """The profile's parts come from op names; on a real train graph each matmul lands in a tower
  part, each table read in the pooling, each table update in the embedding optimizer, whether the
  towers share one table set (esmm) or each has its own (base: ctr_embeddings, cvr_embeddings)."""
  import re
  import train_step_profile as TSP
  from model_fn import esmm
  from model_fn.params import resolve_params
  from preprocessing import features as F
  fields = ["101", "205"]
  with tf.Graph().as_default() as graph:
    features = {F.ID_PREFIX + f: tf.compat.v1.sparse_placeholder(tf.int64, name=f"ids_{f}") for f in fields}
    labels = {k: tf.compat.v1.placeholder(tf.float32, [None], name=k) for k in F.LABELS}
    params = resolve_params({"model": model, "format": "aliccp", "hash_buckets": {f: 100 for f in fields},
                             "fields": fields, "embedding_dim": 4, "ctr_hidden_units": [8, 4],
                             "cvr_hidden_units": [8, 4], "embedding_optimizer": embedding_optimizer})
    esmm.esmm_model_fn(features, labels, tf.estimator.ModeKeys.TRAIN, params)
  parts = {}
  for op in graph.get_operations():
    parts.setdefault(TSP.part_of(op.name), []).append(op)
  matmuls = [op for op in graph.get_operations() if op.type == "MatMul"]
  assert matmuls and all(TSP.part_of(op.name).startswith("towers, ") for op in matmuls)
  assert any(op.type == "MatMul" for op in parts["towers, backward"])
  reads = [op for op in graph.get_operations()
           if op.type == "ResourceGather" and re.match(r"(\w+_)?embeddings/", op.name)]
  assert reads and all(TSP.part_of(op.name) == "embedding lookup and pooling, forward" for op in reads)
  assert len({op.name.split("/")[0] for op in reads}) == (2 if model == "base" else 1)
  updates = [op.type for op in parts["embedding optimizer"]]
  dense_updates = [op.type for op in parts["dense optimizer"]]
  table_update = "ResourceScatterSub" if embedding_optimizer == "lazy_adam" else "ResourceSparseApplyAdagrad"
  assert updates.count(table_update) == len(fields) * (2 if model == "base" else 1), updates
  assert table_update not in dense_updates and "ResourceApplyAdam" in dense_updates
  assert "ResourceApplyAdam" not in updates


def test_onednn_checks_tells_bfloat16_arithmetic_from_float32_by_its_error():
  """The yardstick onednn_checks.py reads an fpmath setting against: in one process, the explicit
  bfloat16 matmul's error against float64 is orders of magnitude above the float32 forms'."""
  import onednn_checks
  errors = onednn_checks.matmul_errors(64, 32)
  assert set(errors) == {"float32 MatMul", "float32 MatMul + BiasAdd + ReLU", "bfloat16 MatMul (explicit casts)"}
  assert errors["float32 MatMul"] < 1e-5 and errors["float32 MatMul + BiasAdd + ReLU"] < 1e-5
  assert errors["bfloat16 MatMul (explicit casts)"] > 100 * errors["float32 MatMul"]


def test_model_comparison_pairs_each_model_with_the_reference_seed_by_seed():
  """compare_models.py: mean ± std per model, and each model's paired difference to the
  reference with a 95% t-interval (the t quantile of 4 degrees of freedom is 2.776)."""
  import numpy as np
  import compare_models as CM
  base = [0.60, 0.61, 0.62, 0.63, 0.64]
  gain = [0.010, 0.012, 0.008, 0.011, 0.009]
  metrics = lambda v: {k: v for _, k, _ in CM.METRICS}
  runs = ([{"model": "base", "seed": s, "metrics": metrics(v)} for s, v in enumerate(base, 1)]
          + [{"model": "esmm", "seed": s, "metrics": metrics(v + g)} for s, (v, g) in enumerate(zip(base, gain), 1)]
          + [{"model": "oracle", "seed": 0, "metrics": metrics(0.9)}])
  summary = CM._summary(runs, "base")
  key = "auc/cvr_all_vs_truth"
  assert summary["base"][key]["mean"] == pytest.approx(0.62) and "paired_difference" not in summary["base"][key]
  d = summary["esmm"][key]["paired_difference"]
  half = 2.7764451 * np.std(gain, ddof=1) / np.sqrt(5)
  assert d["mean"] == pytest.approx(0.01) and d["n"] == 5
  assert (d["low"], d["high"]) == (pytest.approx(0.01 - half), pytest.approx(0.01 + half))
  # Unpaired, the spread of the seeds would hide the gain; paired, the interval is above 0.
  assert summary["esmm"][key]["std"] > 0.015 and d["low"] > 0
  assert "paired_difference" not in summary["oracle"][key]
  meta = {"command": "c", "machine": "m", "data": "d", "seconds": 1.0, "embedding": "e", "calibration": "bias",
          "seeds": ["1", "2", "3", "4", "5"]}
  text = CM._markdown(summary, meta, "base")
  assert "| ESMM | +1.00 [+0." in text and "Paired differences against BASE" in text


def test_run_measured_sees_the_disk_a_process_fills_and_frees(tmp_path):
  # A child that writes 64 MB, holds it a second, and removes it: the peak growth sees it.
  path = tmp_path / "fill"
  code = (f"import os, time\nwith open({str(path)!r}, 'wb') as f:\n  f.write(os.urandom(64 << 20))\n"
          f"  f.flush(); os.fsync(f.fileno())\ntime.sleep(1.5)\nos.remove({str(path)!r})")
  run = process_stats.run_measured([sys.executable, "-c", code], str(tmp_path / "log"), str(tmp_path),
                                   dict(os.environ), sample_seconds=0.1, disk_path=str(tmp_path))
  assert run.returncode == 0 and not path.exists()
  assert run.peak_disk_growth >= 32 << 20


def test_full_scale_s_peak_disk_is_the_earlier_outputs_plus_a_stage_s_fullest_moment():
  import full_scale
  stages = {"generate": {"output_bytes": 10, "peak_disk_growth_bytes": 10},
            "preprocess": {"output_bytes": 3, "peak_disk_growth_bytes": 40},     # partition files, removed
            "train_esmm": {"output_bytes": 5, "peak_disk_growth_bytes": 8}}
  assert full_scale.peak_disk(stages) == 50
  stages["train_esmm"]["peak_disk_growth_bytes"] = 45
  assert full_scale.peak_disk(stages) == 58


def test_full_scale_s_models_take_train_flags_of_their_own():
  import full_scale
  assert full_scale.model_args("esmm") == ("esmm", [])
  assert full_scale.model_args("base:--table_rows_per_id=2;--seed=3") == ("base", ["--table_rows_per_id=2", "--seed=3"])


def test_full_scale_s_results_name_a_head_that_predicts_a_constant():
  import full_scale
  n = {"generated": {}, "scale": 1, "command": "c", "machine": "m", "stages": {}, "targets": [],
       "metrics": {"esmm": {"auc/cvr_clicked": 0.5, "spread/ctr": 0.4, "spread/cvr": 0.0, "spread/ctcvr": 0.4},
                   "base": {"auc/cvr_clicked": 0.6, "spread/ctr": 0.4, "spread/cvr": 0.3, "spread/ctcvr": 0.4}}}
  assert "(a dead tower): esmm: cvr." in full_scale.markdown(n)
  n["metrics"]["esmm"]["spread/cvr"] = 0.2
  assert "dead tower" not in full_scale.markdown(n)


def test_tower_activations_counts_units_that_are_zero_on_every_impression():
  import tower_activations as TA
  relu = np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]])
  assert TA.layer_stats(relu) == {"kind": "relu", "units": 3, "dead": 1, "active_share": 0.5, "max": 3.0}
  logit = TA.layer_stats(np.full(4, -5.0))
  assert logit["std"] == 0.0 and logit["mean"] == -5.0


def test_compare_models_params_apply_to_every_model_under_an_entry_s_own():
  import compare_models as CM
  assert CM.parse_models(["base", "esmm_mean=esmm:pooling=mean;embedding_dim=8"], "pooling=sum") == [
      ("base", "base", {"pooling": "sum"}), ("esmm_mean", "esmm", {"pooling": "mean", "embedding_dim": 8})]
  with pytest.raises(ValueError, match="--params: 'pooling' is not KEY=VALUE"):
    CM.parse_models(["base"], "pooling")
