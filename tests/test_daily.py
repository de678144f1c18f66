"""The daily rolling retrain, simulated over consecutive days of small synthetic logs.

One module-scoped simulation: six days of impressions and the conversion logs they cause
(log-normal delays, duplicates, malformed rows); daily runs for four consecutive dates with a
4-day window, 1 day to maturity, keeping 2 versions. The tests read what the runs left.
"""

import collections
import datetime
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import prediction_log_pb2

from datagen import synthetic
from model_fn import calibration
from model_fn import input_fn as I
from orchestration import daily, daily_report, delay
from pipeline import publish, relabel
from preprocessing import features as F

DAYS = [(synthetic.DAILY_START + datetime.timedelta(days=k)).strftime("%Y%m%d") for k in range(6)]
RUN_DATES = DAYS[2:]                     # 4 consecutive runs
# Models trained on a few thousand rows have noise-level AUCs and an eval day may have no
# conversion: the simulation gates on CTR AUC only with a tolerance of 1.0 and no calibration
# band, so it publishes every day; the gate is tested on its own (test_gate.py). Holdout 0: the whole eval day evaluates,
# so an impression is seen by consecutive runs (the holdout routing is tested in test_relabel).
SETTINGS = dict(window_days=4, maturity_days=1, attribution_days=7, keep_versions=2, batch_size=256,
                max_hash_buckets=4096, num_epochs=1.0, max_metric_drop=1.0, gate_metrics=("auc/ctr",),
                holdout_percent=0, calibration_band=(0.0, float("inf")))


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
  root = tmp_path_factory.mktemp("daily")
  logs, work, serving = str(root / "logs"), str(root / "work"), str(root / "serving")
  synthetic.generate_daily(logs, num_days=6, impressions_per_day=2500, num_users=400, num_items=600,
                           bad_rows=1, duplicate_rate=0.3)
  results = {d: daily.run(d, logs, work, serving, ground_truth_dir=os.path.join(logs, "ground_truth"),
                          **SETTINGS) for d in RUN_DATES}
  return {"logs": logs, "work": work, "serving": serving, "results": results}


def _relabeled(sim, run_date):
  """{sample_id: conversion} of every impression line a run wrote."""
  out = {}
  for path in glob.glob(os.path.join(sim["work"], "runs", run_date, "relabeled", "*", "sample_skeleton*.csv")):
    with open(path) as f:
      for line in f:
        sid, _, conv, _ = line.split(",", 3)
        out[int(sid)] = int(conv)
  return out


def _conversions(sim):
  """[(sample_id, conversion date)] over every conversion log, parseable rows only."""
  rows = []
  for path in sorted(glob.glob(os.path.join(sim["logs"], "conversions", "date=*", "conversions.csv"))):
    with open(path) as f:
      next(f)
      for line in f:
        try:
          sid, ts = relabel.parse_conversion(line)
        except relabel.BadRecord:
          continue
        rows.append((sid, relabel.conversion_date(ts)))
  return rows


def test_a_late_conversion_flips_the_label_in_the_run_that_first_sees_it(sim):
  clicked = {}
  for d in DAYS:
    with open(relabel.log_paths(sim["logs"], d)["skeleton"]) as f:
      for line in f:
        sid, click, _ = line.split(",", 2)
        clicked[int(sid)] = click == "1"
  first_conversion = {}
  for sid, c_date in _conversions(sim):
    first_conversion[sid] = min(c_date, first_conversion.get(sid, c_date))
  runs = {d: _relabeled(sim, d) for d in RUN_DATES}
  flips = 0
  for before, after in zip(RUN_DATES, RUN_DATES[1:]):
    for sid, c_date in first_conversion.items():
      if c_date == after and clicked.get(sid) and sid in runs[before] and sid in runs[after]:
        # Negative in the run before its conversion arrived, positive in the run of that day.
        assert (runs[before][sid], runs[after][sid]) == (0, 1), (sid, before, after)
        flips += 1
  assert flips >= 2


def test_a_warm_start_keeps_the_served_model_s_pooling_and_hidden_layers_unless_the_params_name_them(tmp_path):
  """A model served before mean pooling (or leaky ReLUs) became the default retrains with sum (and
  ReLUs): its weights were fitted to that function, and a warm start with another is refused."""
  (tmp_path / "params.json").write_text(json.dumps({"model": "esmm", "pooling": "sum", "hidden_norm": "layer",
                                                    "hidden_activation": "leaky_relu"}))
  kept = daily.warm_start_params({"model": "esmm"}, str(tmp_path))
  assert (kept["pooling"], kept["hidden_activation"], kept["hidden_norm"]) == ("sum", "leaky_relu", "layer")
  assert daily.warm_start_params({"model": "esmm", "pooling": "mean"}, str(tmp_path))["pooling"] == "mean"
  assert "pooling" not in daily.warm_start_params({"model": "esmm"}, None)
  (tmp_path / "params.json").write_text(json.dumps({"model": "esmm"}))     # written before the params
  kept = daily.warm_start_params({"model": "esmm"}, str(tmp_path))
  assert (kept["pooling"], kept["hidden_activation"], kept["hidden_norm"]) == ("sum", "relu", "none")


def test_every_impression_and_conversion_is_accounted_for(sim):
  for d, r in sim["results"].items():
    rel = r["relabel"]
    assert rel["impressions_balanced"] and rel["conversions_balanced"], d
    assert rel["conversions_set_aside"]["malformed_conversion"] >= 1
    assert rel["conversions_set_aside"]["conversion_without_click"] >= 1
    days = r["plan"]["train_days"] + [r["plan"]["eval_day"]]
    assert rel["impressions_read"] == 2500 * len(days)
    # Dead letters carry the reasons: one JSON line per conversion set aside.
    lines = [line for p in glob.glob(os.path.join(sim["work"], "runs", d, "relabeled", "dead_letter", "*"))
             for line in open(p)]
    assert len(lines) == sum(rel["conversions_set_aside"].values()) + sum(rel["impressions_set_aside"].values())
  aside = [r["relabel"]["conversions_set_aside"] for r in sim["results"].values()]
  assert sum(a["duplicate_conversion"] for a in aside) >= 1
  assert sum(a["no_impression_in_window"] for a in aside) >= 1


def test_labels_grow_more_complete_as_days_pass_and_are_never_double_counted(sim):
  history = {}
  for d in RUN_DATES:
    for day, c in sim["results"][d]["label_completeness"].items():
      history.setdefault(day, []).append(c)
      assert 0 <= c["known"] <= c["eventual"]   # duplicates (30% of conversions here) not counted twice
  seen_twice = [day for day, cs in history.items() if len(cs) > 1]
  assert len(seen_twice) >= 2
  for day in seen_twice:
    known = [c["known"] for c in history[day]]
    assert known == sorted(known) and len({c["eventual"] for c in history[day]}) == 1


def test_wait_strategy_trains_only_on_mature_days_before_the_eval_day(sim):
  for d, r in sim["results"].items():
    p = r["plan"]
    assert p["eval_day"] == (datetime.datetime.strptime(d, "%Y%m%d") - datetime.timedelta(days=1)).strftime("%Y%m%d")
    assert all(t < p["eval_day"] for t in p["train_days"])
  naive = daily.plan(RUN_DATES[-1], sim["logs"], 4, 1, "naive")
  assert naive["train_days"][-1] == RUN_DATES[-1] and naive["eval_day"] not in naive["train_days"]


def test_versions_increase_warm_start_and_old_versions_are_pruned(sim):
  results = [sim["results"][d] for d in RUN_DATES]
  published = [r["version"] for r in results if r["published"]]
  assert published == sorted(published) and len(published) >= 3
  assert publish.versions(os.path.join(sim["serving"], "esmm")) == published[-2:]
  assert results[0]["warm_start_from"] is None
  assert all(r["warm_start_from"] for r in results[1:])
  # A warm run continues the served model: epochs split over the days a row stays in training.
  assert results[0]["epochs"] == 1.0
  assert all(r["epochs"] == pytest.approx(1.0 / len(r["plan"]["train_days"])) for r in results[1:])
  assert daily.epochs_for_run(3.0, 0.0, True, 2) == 1.5 and daily.epochs_for_run(3.0, 0.5, True, 2) == 0.5
  assert daily.epochs_for_run(3.0, 0.5, False, 2) == 3.0
  assert all(r["transform"] == "same as reference" for r in results[1:])


def test_warmup_file_parses_and_runs_against_the_published_signatures(sim):
  path = publish.newest(sim["serving"], "esmm")
  records = list(tf.data.TFRecordDataset(os.path.join(path, publish.WARMUP_FILE)))
  logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in records]
  assert {log.WhichOneof("log_type") for log in logs} == {"regress_log", "predict_log"}
  scored = publish.replay_warmup(path)
  assert scored == {"regression": 32, "serving_default": 32, "predict": 32}


def test_rerunning_a_day_changes_nothing(sim):
  serving = sorted(os.path.relpath(p, sim["serving"]) for p in glob.glob(sim["serving"] + "/**", recursive=True))
  mtimes = {p: os.path.getmtime(p) for p in glob.glob(sim["serving"] + "/**", recursive=True)}
  again = daily.run(RUN_DATES[-1], sim["logs"], sim["work"], sim["serving"], **SETTINGS)
  assert again["rerun"] and again["version"] == sim["results"][RUN_DATES[-1]]["version"]
  assert sorted(os.path.relpath(p, sim["serving"])
                for p in glob.glob(sim["serving"] + "/**", recursive=True)) == serving
  assert {p: os.path.getmtime(p) for p in mtimes} == mtimes


def test_the_report_shows_every_run_its_decision_figures_and_calibration(sim):
  with open(os.path.join(sim["work"], daily_report.REPORT)) as f:
    report = f.read()
  sections = report.split("## ")
  decisions = next(s for s in sections if s.startswith("Decisions"))
  holdout = next(s for s in sections if s.startswith("Holdout figures"))
  calibration = next(s for s in sections if s.startswith("Calibration of the served model"))
  for date in RUN_DATES:
    r = sim["results"][date]
    row = next(l for l in decisions.splitlines() if l.startswith(f"| {date} |"))
    assert r["gate"]["decision"] in row and f"v{r['version']}" in row
    assert f"| {date} | v{r['version']} |" in calibration
    cal = r["gate"]["calibration"]["candidate"]["ctr"]
    assert f"{cal['ratio']:.4f} [{cal['low']:.4f}, {cal['high']:.4f}]" in calibration
  # Every run after the first compared with the model served before it, on the same rows.
  for date in RUN_DATES[1:]:
    c = sim["results"][date]["gate"]["comparisons"]["auc/ctr"]
    assert c["low"] <= c["diff"] <= c["high"]
    assert f"| {date} | auc/ctr | {c['auc_a']:.4f} [{c['low_a']:.4f}, {c['high_a']:.4f}]" in holdout
  assert f"| {RUN_DATES[0]} | auc/ctr |" not in holdout        # nothing served before the first run


def test_the_corrected_strategy_trains_on_fresh_days_and_calibrates_to_the_conversions_to_come(sim, tmp_path):
  date = RUN_DATES[-1]
  r = daily.run(date, sim["logs"], str(tmp_path / "work"), str(tmp_path / "serving"),
                **dict(SETTINGS, label_strategy="corrected"))
  wait = sim["results"][date]
  assert r["plan"]["immature_days"] and set(r["plan"]["train_days"]) == (
      set(wait["plan"]["train_days"]) | set(r["plan"]["immature_days"]))
  d = r["delay"]
  # The day of age 0 has only part of its conversions: the train days' eventual ones are more.
  assert d["conversion_scale"] == d["train_conversion_scale"] > 1.0
  assert d["cdf"][-1] == pytest.approx(1.0) and np.all(np.diff(d["cdf"]) >= 0)
  assert d["eval_day_completeness"] == pytest.approx(d["cdf"][min(SETTINGS["maturity_days"], d["max_lag"])])
  assert calibration.load(r["model_dir"])["conversion_scale"] == d["conversion_scale"]
  # The other strategies report the estimate and do not apply it.
  assert wait["delay"]["conversion_scale"] == 1.0
  assert wait["delay"]["train_conversion_scale"] == pytest.approx(delay.conversion_scale(
      wait["delay"], wait["relabel"]["days"], wait["plan"]["train_days"], date))
  assert "pCVR calibrated to them" in daily.format_result(r)
  with pytest.raises(daily.UsageError, match="corrected"):
    daily.run(date, sim["logs"], str(tmp_path / "w2"), str(tmp_path / "s2"),
              **dict(SETTINGS, label_strategy="corrected", calibration="none"))


def test_a_regressing_model_is_not_published_and_the_cli_exits_3(sim, tmp_path):
  # The gate's decisions on constructed models are in test_gate.py. A whole run whose candidate
  # cannot pass (it would have to beat the served model by a full AUC point beyond the noise):
  # refused with the interval it fails on, exit 3, the served version stays. It is
  # a cold start (--nowarm_start): the gate compares with the served model all the same.
  serving = str(tmp_path / "serving")
  publish.copy_tree(sim["serving"], serving)
  work = str(tmp_path / "work")
  publish.copy_tree(os.path.join(sim["work"], "transform_reference"), os.path.join(work, "transform_reference"))
  before = publish.versions(os.path.join(serving, "esmm"))
  cmd = [sys.executable, "-m", "orchestration.daily", f"--date={DAYS[-1]}", f"--logs_dir={sim['logs']}",
         f"--work_dir={work}", f"--serving_root={serving}", "--max_metric_drop=-1",
         "--gate_metrics=auc/ctr", "--holdout_percent=0", "--min_gate_positives=1", "--calibration_band=0,inf",
         "--window_days=4", "--maturity_days=1", "--max_hash_buckets=4096", "--batch_size=256",
         "--keep_versions=2", "--nowarm_start",
         # Beam options, passed through to both Beam jobs. In worker processes, a DoFn of the
         # module run as __main__ would not unpickle.
         "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(daily.__file__)))
  assert proc.returncode == daily.EXIT_REFUSED, proc.stderr[-3000:]
  assert "NOT PUBLISHED, the served model stays: auc/ctr" in proc.stdout
  assert "beyond the noise" in proc.stdout and "difference" in proc.stdout
  assert "warm start: none (cold start); epochs 1" in proc.stdout and f"served v{before[-1]}:" in proc.stdout
  assert publish.versions(os.path.join(serving, "esmm")) == before


def test_a_run_killed_midway_completes_when_rerun(sim, tmp_path):
  work = str(tmp_path / "work")
  serving = str(tmp_path / "serving")
  date = DAYS[3]
  p = daily.plan(date, sim["logs"], 4, 1, "wait")
  run_dir = os.path.join(work, "runs", date)
  daily.run_relabel(p, sim["logs"], os.path.join(run_dir, "relabeled"), 7, [], holdout_percent=0)
  # Killed during the transform: a partial output without its marker.
  os.makedirs(os.path.join(run_dir, "transformed", "train"))
  open(os.path.join(run_dir, "transformed", "train", "part-00000-of-00002.tfrecord.gz"), "wb").close()
  r = daily.run(date, sim["logs"], work, serving, **SETTINGS)
  assert r["published"] and publish.versions(os.path.join(serving, "esmm")) == [int(date)]
  assert r["relabel"] == sim["results"][date]["relabel"]


def test_the_days_transform_may_run_in_partitions(sim, tmp_path):
  """--partitions goes through to the preprocessing job and gives the whole job's output."""
  date = RUN_DATES[-1]
  relabeled = os.path.join(sim["work"], "runs", date, "relabeled")
  whole = os.path.join(sim["work"], "runs", date, "transformed")
  parts = str(tmp_path / "transformed")
  daily.run_transform(relabeled, parts, SETTINGS["max_hash_buckets"], [], partitions=2, parallel_partitions=2)
  rec = {d: json.load(open(os.path.join(d, F.RECONCILIATION))) for d in (whole, parts)}
  assert (rec[parts]["partitions"], rec[whole]["partitions"]) == (2, 0)
  for split in ("train", "eval"):
    assert rec[parts]["splits"][split]["rows_written"] == rec[whole]["splits"][split]["rows_written"] > 0
    examples = lambda d: collections.Counter(
        json.dumps(json_format.MessageToDict(tf.train.Example.FromString(r.numpy())), sort_keys=True)
        for r in tf.data.TFRecordDataset(glob.glob(os.path.join(d, split, "part-*.tfrecord.gz")), "GZIP"))
    assert examples(parts) == examples(whole)


def test_the_days_transform_may_write_train_blocks_only(sim, tmp_path):
  """--notrain_examples goes through to the preprocessing job: no train tf.Examples, the same rows
  in the blocks, and training on that output reads them."""
  date = RUN_DATES[-1]
  relabeled = os.path.join(sim["work"], "runs", date, "relabeled")
  whole = os.path.join(sim["work"], "runs", date, "transformed")
  blocks_only = str(tmp_path / "transformed")
  daily.run_transform(relabeled, blocks_only, SETTINGS["max_hash_buckets"], [], train_examples=False)
  rec = {d: json.load(open(os.path.join(d, F.RECONCILIATION))) for d in (whole, blocks_only)}
  assert (rec[blocks_only]["train_examples"], rec[whole]["train_examples"]) == (False, True)
  train = {d: rec[d]["splits"]["train"] for d in rec}
  assert train[blocks_only]["rows_written"] == train[whole]["rows_written"] == train[blocks_only]["blocks"]["rows_written"] > 0
  assert not os.path.exists(os.path.join(blocks_only, "train")) and os.path.isdir(os.path.join(whole, "train"))
  assert I.train_files(blocks_only)[0] == os.path.join(blocks_only, F.BLOCKS_DIR, "part-*.tfrecord.gz")


def test_a_changed_transform_stops_the_run(sim, tmp_path):
  date = RUN_DATES[-1]
  relabeled = os.path.join(sim["work"], "runs", date, "relabeled")
  other = str(tmp_path / "transformed")
  daily.run_transform(relabeled, other, 2048, [])        # other hash bucket counts
  probes = daily.probe_examples(sim["logs"], date)
  with pytest.raises(daily.TransformDrift, match="hash bucket counts"):
    daily.check_transform(os.path.join(sim["work"], "transform_reference"), other, probes)
  assert len(probes) == 32 and all(isinstance(p, bytes) for p in probes)
  same = daily._transform(os.path.join(sim["work"], "runs", date, "transformed"), probes)
  assert all(np.asarray(v).shape[0] == 32 for v in same.values())


def test_a_day_retrains_any_model_with_its_params(sim, tmp_path):
  """orchestration.daily trains the model and params it is given (e.g. a tuned model's params.json),
  calibrated as asked (here not at all; by default the output biases are refitted), and serves
  it under the model's name."""
  work, serving = str(tmp_path / "work"), str(tmp_path / "serving")
  # Leaky ReLUs (the default; named so that the test does not rest on it): a tower this small of
  # plain ReLUs can die in a few steps, and the gate refuses a candidate with a constant head.
  params = {"num_task_experts": 1, "num_shared_experts": 1, "expert_hidden_units": [8], "tower_hidden_units": [4],
            "hidden_activation": "leaky_relu", "embedding_dim": 4, "hash_buckets": {"ignored": 1}}
  r = daily.run(DAYS[3], sim["logs"], work, serving, model="ple", model_params=params, calibration="none",
                **SETTINGS)
  assert r["published"], r.get("refused")
  assert publish.versions(os.path.join(serving, "ple")) == [int(DAYS[3])]
  trained = json.load(open(os.path.join(r["model_dir"], "params.json")))
  assert trained["model"] == "ple" and trained["expert_hidden_units"] == [8] and trained["num_task_experts"] == 1
  assert trained["hidden_activation"] == "leaky_relu"
  assert trained["hash_buckets"] != {"ignored": 1}
  assert not os.path.exists(os.path.join(r["model_dir"], "calibration.json"))
  default_run = sim["results"][RUN_DATES[-1]]["model_dir"]
  assert json.load(open(os.path.join(default_run, "calibration.json")))["method"] == "bias"


def test_an_unknown_model_or_param_stops_the_day_before_any_work(sim, tmp_path):
  work = str(tmp_path / "work")
  for model, params, message in (("mmoe_esmm", {}, "model must be one of"),
                                 ("esmm", {"experts": 3}, "unknown params"),
                                 ("cgc", {"ple_levels": 3}, "cgc is one level"),
                                 ("mmoe", {"model": "esmm", "ctcvr_loss_weight": 1.0}, "params of model 'esmm'")):
    with pytest.raises(daily.UsageError, match=message):
      daily.run(DAYS[3], sim["logs"], work, str(tmp_path / "serving"), model=model, model_params=params,
                **SETTINGS)
  with pytest.raises(daily.UsageError, match="--calibration must be one of"):
    daily.run(DAYS[3], sim["logs"], work, str(tmp_path / "serving"), calibration="spline", **SETTINGS)
  assert not os.path.exists(work)
