"""Every entry point checks every flag before any work or write (preprocessing/cli.py).

  * a bad value (wrong type, out of bounds, not among an enum's values, a model param that
    model_fn.params refuses) is one ``error:`` line, exit 2, no traceback, nothing written;
  * a misspelled flag is refused, naming it and the closest known flag; the entry points that
    run Beam hand Beam only the options its own PipelineOptions parser knows;
  * a finished daily date rerun with other flags is refused, naming the flags that differ;
  * an empty split is refused before training, and an undefined metric is written as null,
    never NaN.

The property tests parse generated flags into a fresh FlagValues of each entry point, in
process; a sample runs the programs themselves.
"""

import contextlib
import difflib
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from absl import flags
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from datagen import synthetic
from model_fn import estimator as E
from model_fn import evaluate as evaluate_cli
from model_fn import evaluation
from model_fn import input_fn as I
from model_fn import metrics as M
from model_fn import params as P
from model_fn import launch_local_cluster, train
from orchestration import daily
from pipeline import preprocess, publish
from preprocessing import cli
from preprocessing import features as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = tempfile.mkdtemp(prefix="test_cli_model")     # what model_fn.evaluate's checks look for
open(os.path.join(MODEL_DIR, E.PARAMS_FILE), "w").write("{}")
FAST = settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Each entry point: (module, runs Beam, the flags that make an otherwise valid command line).
ENTRY_POINTS = {
    "pipeline.preprocess": (preprocess, True, ["--output_dir=/nonexistent/out"]),
    "orchestration.daily": (daily, True, ["--date=20240105", "--logs_dir=/nonexistent/logs",
                                     "--work_dir=/nonexistent/work", "--serving_root=/nonexistent/serving"]),
    "datagen.synthetic": (synthetic, False, ["--output_dir=/nonexistent/raw"]),
    "model_fn.launch_local_cluster": (launch_local_cluster, False, []),
    "model_fn.train": (train, False, ["--transform_dir=/nonexistent/pre", "--model_dir=/nonexistent/model"]),
    "model_fn.evaluate": (evaluate_cli, False, [f"--data={MODEL_DIR}", f"--model_dir={MODEL_DIR}"]),
}


def _parse(name, *argv):
  module, beam, base = ENTRY_POINTS[name]
  fv = cli.flag_values(module.define_flags)
  return cli.parse([name, *base, *argv], fv, beam=beam, validate=getattr(module, "validate_flags", None))


def test_every_entry_point_parses_its_valid_defaults():
  for name in ENTRY_POINTS:
    assert _parse(name)[0] == name
  assert _parse("pipeline.preprocess", "--runner=DirectRunner", "--direct_num_workers=2")[1:] == [
      "--runner=DirectRunner", "--direct_num_workers=2"]


# The flags with bounds or enums, and values that break them.

def _bounded_flags():
  """(entry point, flag, strategy of values it refuses) for every integer or float flag with a
  bound and every enum flag of every entry point."""
  out = []
  for name, (module, _, _) in ENTRY_POINTS.items():
    fv = cli.flag_values(module.define_flags)
    for flag_name, flag in sorted(fv._flags().items()):
      if flag_name != flag.name:
        continue      # an alias
      parser = flag.parser
      if isinstance(parser, flags.EnumParser):
        bad = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12).filter(
            lambda v, allowed=tuple(parser.enum_values): v not in allowed)
      elif isinstance(parser, (flags.IntegerParser, flags.FloatParser)):
        lo, hi = parser.lower_bound, parser.upper_bound
        if lo is None and hi is None:
          continue
        number = st.integers if isinstance(parser, flags.IntegerParser) else (
            lambda **kw: st.floats(allow_nan=False, allow_infinity=False, **kw))
        choices = [st.sampled_from(["abc", "1x", "", "--"])]      # not a number at all
        if lo is not None:
          choices.append(number(max_value=lo - 1) if isinstance(parser, flags.IntegerParser)
                         else number(max_value=lo, exclude_max=True))
        if hi is not None:
          choices.append(number(min_value=hi + 1) if isinstance(parser, flags.IntegerParser)
                         else number(min_value=hi, exclude_min=True))
        bad = st.one_of(*choices)
      else:
        continue
      out.append((name, flag_name, bad))
  return out


BOUNDED = _bounded_flags()


def test_the_flags_that_the_probe_found_unchecked_have_bounds_or_enums():
  have = {(name, flag) for name, flag, _ in BOUNDED}
  for want in [("pipeline.preprocess", "format"), ("pipeline.preprocess", "max_hash_buckets"),
               ("model_fn.train", "batch_size"), ("orchestration.daily", "model"), ("orchestration.daily", "window_days"),
               ("datagen.synthetic", "num_train"), ("orchestration.daily", "calibration")]:
    assert want in have, want


@FAST
@given(data=st.data())
def test_every_out_of_bounds_or_unknown_enum_value_is_a_usage_error(data):
  name, flag_name, bad = data.draw(st.sampled_from(BOUNDED), label="flag")
  value = data.draw(bad, label="value")
  with pytest.raises(cli.UsageError, match=f"--{flag_name}"):
    _parse(name, f"--{flag_name}={value}")
  # What app.run gets as its flags_parser (cli.run): one error line and exit 2, before main.
  module, beam, base = ENTRY_POINTS[name]
  parser = cli.flags_parser(beam, getattr(module, "validate_flags", None), cli.flag_values(module.define_flags))
  err = io.StringIO()
  with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
    parser([name, *base, f"--{flag_name}={value}"])
  assert e.value.code == 2
  line = err.getvalue()
  assert line.count("\n") == 1 and line.startswith("error: ") and f"--{flag_name}" in line, line


MODEL_PARAM_BREAKERS = st.sampled_from([
    ("--dropout=1.5", "dropout"), ("--dropout=-0.1", "dropout"), ("--learning_rate=0", "learning_rate"),
    ("--ctr_hidden_units=0,4", "ctr_hidden_units"), ("--tower_hidden_units=a", "tower_hidden_units"),
    ("--propensity_floor=0", "propensity_floor"), ("--dense_ema_decay=1", "dense_ema_decay"),
    ("--ctr_loss_weight=-1", "ctr_loss_weight"), ("--model=cgc --ple_levels=3", "cgc is one level"),
    ("--share_embeddings=maybe", "share_embeddings"), ("--num_epochs=0", "num_epochs"),
    ("--calibration_holdout=0.7", "calibration_holdout"), ("--embedding_learning_rate=-1", "embedding_learning_rate"),
])


@FAST
@given(case=MODEL_PARAM_BREAKERS)
def test_model_params_are_checked_by_one_function_for_train_and_daily(case, tmp_path_factory):
  """model_fn.train's flags and orchestration.daily's --params_file go through the same
  model_fn.params.check_params, before anything is read or written."""
  args, phrase = case
  with pytest.raises(cli.UsageError, match=phrase):
    _parse("model_fn.train", *args.split())
  # The same params, as orchestration.daily reads them from --params_file.
  params = {}
  for a in args.split():
    key, value = a[2:].split("=", 1)
    if key in ("share_embeddings", "num_epochs", "calibration_holdout"):
      continue        # train's own flags, not model params
    if key.endswith("_units"):
      value = [int(u) if u.isdigit() else u for u in value.split(",")]
    elif key != "model":
      value = float(value)
    params[key] = value
  assume(params)
  path = tmp_path_factory.mktemp("params") / "params.json"
  path.write_text(json.dumps(params))
  with pytest.raises(cli.UsageError, match=phrase):
    _parse("orchestration.daily", f"--params_file={path}", f"--model={params.get('model', 'esmm')}")
  with pytest.raises(ValueError, match=phrase):
    P.check_params(dict(params, model=params.get("model", "esmm")))


def test_train_and_daily_refuse_a_run_that_would_train_nothing():
  for argv, phrase in ((["--batch_size=0"], "batch_size"), (["--batch_size=-5"], "batch_size"),
                       (["--num_epochs=0"], "num_epochs"), (["--train_steps=-1"], "train_steps")):
    with pytest.raises(cli.UsageError, match=phrase):
      _parse("model_fn.train", *argv)
  _parse("model_fn.train", "--num_epochs=0", "--train_steps=10")     # a step budget instead
  for argv, phrase in ((["--batch_size=0"], "batch_size"), (["--num_epochs=0"], "num_epochs"),
                       (["--date=2024011"], "YYYYMMDD"), (["--gate_metrics=auc/nope"], "gate_metrics"),
                       (["--maturity_days=7", "--window_days=7"], "maturity_days"),
                       (["--holdout_percent=100"], "holdout_percent"),
                       (["--calibration_band=1.2,2"], "calibration_band"),
                       (["--calibration_band=low,high"], "calibration_band"),
                       (["--gate_confidence=1"], "gate_confidence"), (["--max_metric_drop=nan"], "max_metric_drop")):
    with pytest.raises(cli.UsageError, match=phrase):
      _parse("orchestration.daily", *argv)
  with pytest.raises(ValueError, match="batch_size"):
    P.check_run(0)


def test_evaluate_refuses_missing_paths_before_any_work(tmp_path):
  fv = cli.flag_values(evaluate_cli.define_flags)
  data = str(tmp_path)
  for argv, phrase in (([f"--data={tmp_path / 'nowhere'}", f"--model_dir={data}"], "does not exist"),
                       ([f"--data={data}", f"--model_dir={tmp_path / 'nomodel'}"], "--model_dir=.* does not exist"),
                       ([f"--data={data}", f"--model_dir={data}", f"--ground_truth={tmp_path / 'gt.csv'}"],
                        "--ground_truth=.* does not exist"),
                       ([f"--data={data}", f"--models=esmm:{tmp_path / 'm'}"], "does not exist"),
                       ([f"--data={data}", "--models=esmm"], "NAME:MODEL_DIR"),
                       ([f"--data={data}", f"--model_dir={data}", "--batch_size=0"], "batch_size")):
    fv = cli.flag_values(evaluate_cli.define_flags)
    with pytest.raises(cli.UsageError, match=phrase):
      cli.parse(["evaluate", *argv], fv, validate=evaluate_cli.validate_flags)
  assert sorted(os.listdir(tmp_path)) == []


# Misspelled flags.

def _misspellings(name):
  """Names one edit away from ``name``: a character dropped, inserted or two swapped."""
  k = st.integers(0, len(name) - 1)
  letter = st.sampled_from("abcdefghijklmnopqrstuvwxyz_")
  return st.one_of(
      k.map(lambda i: name[:i] + name[i + 1:]),
      st.tuples(st.integers(0, len(name)), letter).map(lambda t: name[:t[0]] + t[1] + name[t[0]:]),
      st.integers(0, len(name) - 2).map(lambda i: name[:i] + name[i + 1] + name[i] + name[i + 2:]),
  ).filter(lambda m: m != name and len(m) > 1)


def _known(name):
  module, beam, _ = ENTRY_POINTS[name]
  fv = cli.flag_values(module.define_flags)
  names = cli._flag_names(fv)
  return names + (cli.beam_option_names() if beam else []), beam


@FAST
@given(data=st.data())
def test_a_misspelled_flag_is_refused_naming_it_and_the_closest_known_flag(data):
  name = data.draw(st.sampled_from(sorted(ENTRY_POINTS)), label="entry point")
  known, beam = _known(name)
  fv = cli.flag_values(ENTRY_POINTS[name][0].define_flags)
  flag = data.draw(st.sampled_from(sorted(n for n in fv._flags() if len(n) > 2)), label="flag")
  wrong = data.draw(_misspellings(flag), label="misspelling")
  assume(wrong not in known)
  with pytest.raises(cli.UsageError) as e:
    _parse(name, f"--{wrong}=1")
  message = str(e.value)
  assert message.startswith(f"unknown flag --{wrong}:"), message
  assert "did you mean --" in message, message
  suggested = message.rsplit("did you mean --", 1)[1].rstrip("?")
  assert suggested in known
  ratio = lambda a: difflib.SequenceMatcher(None, a, wrong).ratio()     # as difflib.get_close_matches
  assert ratio(suggested) >= ratio(flag), (wrong, suggested, flag)


def test_the_probes_misspellings_name_the_flag_meant():
  with pytest.raises(cli.UsageError, match="unknown flag --max_hash_bucket: .*did you mean --max_hash_buckets"):
    _parse("pipeline.preprocess", "--max_hash_bucket=1024")
  with pytest.raises(cli.UsageError, match="unknown flag --window_day: .*did you mean --window_days"):
    _parse("orchestration.daily", "--window_day=3")
  with pytest.raises(cli.UsageError, match="did you mean --batch_size"):
    _parse("model_fn.train", "--batch_siz=3")
  with pytest.raises(cli.UsageError, match="Beam pipeline option: .*direct_num_workers"):
    _parse("pipeline.preprocess", "--direct_num_workers=many")
  with pytest.raises(cli.UsageError, match="unexpected argument 'stray'"):
    _parse("model_fn.train", "stray")
  # launch_local_cluster checks the model_fn.train flags it will hand every task.
  with pytest.raises(cli.UsageError, match="did you mean --batch_size"):
    launch_local_cluster.check_train_args(["--transform_dir=/t", "--model_dir=/m", "--batch_siz=3"])
  launch_local_cluster.check_train_args(["--transform_dir=/t", "--model_dir=/m", "--batch_size=3"])


# The programs themselves: one error line, exit 2, nothing written.

def _env():
  return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
              PYTHONHASHSEED="0")


def test_the_programs_refuse_bad_flags_with_one_line_and_write_nothing(tmp_path):
  out = tmp_path / "out"
  daily_base = ["--date=20240105", f"--logs_dir={tmp_path / 'logs'}", f"--work_dir={out}",
                f"--serving_root={tmp_path / 'serving'}"]
  cases = [
      (["pipeline.preprocess", "--format=csv", f"--output_dir={out}"], "--format"),
      (["pipeline.preprocess", "--max_hash_buckets=abc", f"--output_dir={out}"], "--max_hash_buckets"),
      (["pipeline.preprocess", f"--input_dir={tmp_path}", f"--output_dir={out}", "--max_hash_bucket=1024"],
       "did you mean --max_hash_buckets"),
      (["model_fn.evaluate", f"--data={tmp_path}", f"--model_dir={tmp_path / 'nomodel'}"], "does not exist"),
      (["model_fn.evaluate", f"--data={tmp_path}", f"--model_dir={tmp_path}",
        f"--ground_truth={tmp_path / 'gt.csv'}"], "--ground_truth"),
      (["model_fn.train", f"--transform_dir={tmp_path}", f"--model_dir={out}", "--batch_size=-5"], "--batch_size"),
      (["orchestration.daily", *daily_base, "--model=nosuchmodel"], "--model"),
      (["orchestration.daily", *daily_base, "--window_day=3"], "did you mean --window_days"),
      (["datagen.synthetic", f"--output_dir={out}", "--num_train=0"], "--num_train"),
  ]
  procs = [subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for args, _ in cases]
  for (args, phrase), p in zip(cases, procs):
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, (args, err[-2000:])
    assert "Traceback" not in err, (args, err[-2000:])
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and phrase in lines[0], (args, err[-2000:])
  assert not out.exists() and sorted(os.listdir(tmp_path)) == []


# A finished daily date rerun with other flags.

def _finished_run(work, date, **overrides):
  args = dict(model="esmm", model_name="esmm", model_params={}, calibration="bias", window_days=4,
              attribution_days=7, maturity_days=1, label_strategy="wait", holdout_percent=0,
              max_hash_buckets=4096, num_epochs=1.0, warm_epochs=0.0, warm_start=True, batch_size=256,
              seed=42, gate_metrics=["auc/ctr"], max_metric_drop=1.0)
  args.update(overrides)
  run_dir = os.path.join(work, "runs", date)
  os.makedirs(run_dir)
  result = {"date": date, "plan": {"date": date, "eval_day": "20240104", "strategy": "wait", "holdout_percent": 0,
                                   "window": ["20240102", "20240103", "20240104", "20240105"],
                                   "train_days": ["20240102", "20240103"]},
            "args": args, "published": True, "version": int(date)}
  with open(os.path.join(run_dir, daily.RESULT), "w") as f:
    json.dump(result, f)
  return result


SAME = dict(window_days=4, maturity_days=1, attribution_days=7, keep_versions=2, batch_size=256,
            max_hash_buckets=4096, num_epochs=1.0, max_metric_drop=1.0, gate_metrics=("auc/ctr",), holdout_percent=0)


def test_a_finished_date_rerun_with_other_flags_is_refused_naming_them(tmp_path):
  work = str(tmp_path / "work")
  _finished_run(work, "20240105")
  run = lambda **kw: daily.run("20240105", str(tmp_path / "logs"), work, str(tmp_path / "serving"),
                               **dict(SAME, **kw))
  again = run(keep_versions=5, partitions=2, ground_truth_dir="/elsewhere")   # how, not what: the same run
  assert again["rerun"]
  with pytest.raises(daily.UsageError, match=r"already done .*--window_days 4 -> 3.*remove .*runs/20240105"):
    run(window_days=3)
  with pytest.raises(daily.UsageError, match=r"--batch_size 256 -> 128; --seed 42 -> 7"):
    run(batch_size=128, seed=7)
  with pytest.raises(daily.UsageError, match=r"--params_file \{\} -> \{'dropout': 0.5\}"):
    run(model_params={"dropout": 0.5})
  # A result of the gate before intervals (no calibration_band recorded) meant another thing by
  # max_metric_drop: its gate flags are not compared; a result of today's gate compares them.
  assert run(max_metric_drop=0.0)["rerun"]
  banded = str(tmp_path / "banded")
  _finished_run(banded, "20240105", calibration_band=["0.8", "1.25"], min_gate_positives=100)
  rerun = lambda **kw: daily.run("20240105", str(tmp_path / "logs"), banded, str(tmp_path / "serving"),
                                 **dict(SAME, **kw))
  assert rerun(calibration_band=(0.8, 1.25))["rerun"]
  with pytest.raises(daily.UsageError, match=r"--calibration_band \['0.8', '1.25'\] -> \['0.5', '2'\]"):
    rerun(calibration_band=(0.5, 2.0))
  with pytest.raises(daily.UsageError, match=r"--max_metric_drop 1.0 -> 0.0"):
    rerun(max_metric_drop=0.0)
  # A result.json of an earlier version recorded no flags: what its plan shows is compared.
  old = str(tmp_path / "old")
  result = _finished_run(old, "20240105")
  del result["args"]
  with open(os.path.join(old, "runs", "20240105", daily.RESULT), "w") as f:
    json.dump(result, f)
  with pytest.raises(daily.UsageError, match=r"--window_days 4 -> 5"):
    daily.run("20240105", str(tmp_path / "logs"), old, str(tmp_path / "serving"), **dict(SAME, window_days=5))
  assert daily.run("20240105", str(tmp_path / "logs"), old, str(tmp_path / "serving"), **SAME)["rerun"]


def test_a_second_run_of_a_date_is_refused_while_the_first_one_runs(tmp_path):
  work = str(tmp_path / "work")
  _finished_run(work, "20240105")
  with publish.OutputLock(os.path.join(work, "runs", "20240105")):     # the first run, still going
    with pytest.raises(daily.UsageError, match=r"runs/20240105 is in use by another daily run of this date \(pid "):
      daily.run("20240105", str(tmp_path / "logs"), work, str(tmp_path / "serving"), **SAME)


@pytest.mark.parametrize("error, status", [
    (publish.OutputBusy("SERVING/.esmm.publish is in use by another publish of esmm (pid 7)"), cli.EXIT_USAGE),
    (publish.PublishError("version 20240105 is older than the newest published version 20240106"),
     daily.EXIT_REFUSED)])
def test_daily_reports_a_publish_it_cannot_make_in_one_line(monkeypatch, capsys, error, status):
  fv = cli.flag_values(daily.define_flags)
  cli.parse(["orchestration.daily", *ENTRY_POINTS["orchestration.daily"][2]], fv, beam=True)

  def run(*args):
    raise error
  monkeypatch.setattr(daily, "FLAGS", fv)
  monkeypatch.setattr(daily, "run", run)
  assert daily.main(["orchestration.daily"]) == status
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and str(error) in err[0], err


def test_daily_result_lines_print_an_undefined_metric_as_undefined():
  r = {"date": "20240105", "rerun": True, "plan": {"train_days": ["20240103"], "eval_day": "20240104",
                                                    "strategy": "wait"},
       "relabel": {"impressions_read": 1, "impressions_written": 1, "impressions_set_aside": {},
                   "conversions_read": 0, "conversions_attributed": 0, "conversions_set_aside": {}},
       "transform": "same as reference", "warm_start_from": None, "epochs": 1.0,
       "candidate": {"auc/ctr": 0.6, "auc/ctcvr": None}, "served": None, "publish": "published",
       "version": 20240105, "versions": [20240105]}
  assert "auc/ctcvr=undefined" in daily.format_result(r)


# Empty splits and undefined metrics.

def _transform_dir(tmp_path, train_rows, eval_rows):
  d = tmp_path / f"pre_{train_rows}_{eval_rows}"
  d.mkdir()
  splits = {"train": {"rows_written": train_rows, "label_positives": {F.CLICK: 10, F.CTCVR: 2}},
            "eval": {"rows_written": eval_rows, "label_positives": {F.CLICK: 0, F.CTCVR: 0}}}
  (d / F.RECONCILIATION).write_text(json.dumps({"format": "aliccp", "splits": splits}))
  return str(d)


def test_an_empty_split_is_refused_before_anything_is_trained_or_written(tmp_path):
  empty_eval = _transform_dir(tmp_path, 100, 0)
  model_dir = str(tmp_path / "model")
  with pytest.raises(I.EmptySplit, match=r"eval split .* has no rows .*splits.eval.rows_written = 0"):
    E.train_and_evaluate(empty_eval, model_dir, {"model": "esmm", "hash_buckets": {"101": 8}}, 32)
  assert not os.path.exists(model_dir)
  with pytest.raises(I.EmptySplit, match="train split"):
    I.require_rows(_transform_dir(tmp_path, 0, 50))
  with pytest.raises(I.EmptySplit, match="nothing to evaluate on"):
    evaluation.evaluate([("esmm", model_dir)], empty_eval)
  I.require_rows(_transform_dir(tmp_path, 100, 50))     # rows without positives: not refused
  # The train CLI reports it as one error line (its ValueError handler).
  assert issubclass(I.EmptySplit, ValueError)


def test_an_undefined_metric_is_written_as_null_with_a_warning_naming_it(monkeypatch):
  warned = []
  monkeypatch.setattr(M.logging, "warning", lambda fmt, *args: warned.append(fmt % args))
  out = M.finite_or_none({"auc/cvr": float("nan"), "loss": np.float32(0.5), "auc/ctr": float("inf"),
                          "model_dir": "/m", "steps": 3}, "eval metrics of /m")
  assert out == {"auc/cvr": None, "loss": 0.5, "auc/ctr": None, "model_dir": "/m", "steps": 3.0}
  assert json.loads(json.dumps(out, allow_nan=False)) == out
  assert len(warned) == 1 and "auc/ctr, auc/cvr" in warned[0] and "null" in warned[0]
  assert M.finite_or_none({"auc/ctr": 0.7}, "x") == {"auc/ctr": 0.7} and len(warned) == 1
