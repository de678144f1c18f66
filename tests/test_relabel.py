"""Relabeling impression logs from conversion logs: every reason, on hand-written rows."""

import calendar
import datetime
import glob
import json
import os

import pytest

from orchestration import daily
from pipeline import relabel

D1, D2 = "20141021", "20141022"


def _ts(date: str, hour: int = 12) -> int:
  d = datetime.datetime.strptime(date, "%Y%m%d") + datetime.timedelta(hours=hour)
  return calendar.timegm(d.timetuple())


def _line(sid, click, conv=0):
  return f"{sid},{click},{conv},abc{sid % 3},1,205\x02{130000000 + sid % 7}\x031.0"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
  logs = str(tmp_path_factory.mktemp("logs"))
  skeleton = {
      D1: [_line(1, 1), _line(2, 1), _line(3, 0), _line(4, 1), _line(5, 1), "garbage line", _line(8, 1)],
      D2: [_line(6, 1), _line(7, 1), _line(8, 1)],     # 8 is logged on both days
  }
  for date, lines in skeleton.items():
    os.makedirs(relabel.log_paths(logs, date)["impressions"])
    with open(relabel.log_paths(logs, date)["skeleton"], "w") as f:
      f.write("\n".join(lines) + "\n")
    with open(relabel.log_paths(logs, date)["common"], "w") as f:
      f.write("abc0,0,\nabc1,0,\nabc2,0,\n")
  later = (datetime.datetime.strptime(D1, "%Y%m%d") + datetime.timedelta(days=5)).strftime("%Y%m%d")
  conversions = {
      D1: [f"1,{_ts(D1, 20)}", f"3,{_ts(D1, 21)}", "x,1", f"7,{_ts(D1)}"],   # 7's impression is on D2
      D2: [f"1,{_ts(D2)}", f"2,{_ts(D2)}", f"99,{_ts(D2)}", "1,2,3"],
      later: [f"5,{_ts(later)}", f"6,{_ts(later)}"],        # 5: 5 days after D1; 6: 4 days after D2
  }
  paths = {}
  for date, lines in conversions.items():
    paths[date] = relabel.log_paths(logs, date)["conversions"]
    os.makedirs(os.path.dirname(paths[date]))
    with open(paths[date], "w") as f:
      f.write("sample_id,conversion_timestamp\n" + "\n".join(lines) + "\n")
  plan = {"train_days": [D1], "eval_day": D2, "conversion_logs": paths}
  work = str(tmp_path_factory.mktemp("relabeled"))
  rec = daily.run_relabel(plan, logs, work, attribution_days=4, beam_args=[])
  lines = {}
  for split in ("train", "eval"):
    for p in glob.glob(os.path.join(work, split, "sample_skeleton*.csv")):
      lines.setdefault(split, []).extend(open(p).read().splitlines())
  dead = [json.loads(x) for p in glob.glob(os.path.join(work, "dead_letter", "*")) for x in open(p)]
  return {"rec": rec, "lines": lines, "dead": dead, "work": work, "logs": logs}


def _labels(lines):
  return {int(x.split(",")[0]): int(x.split(",")[2]) for x in lines if x[0].isdigit()}


def test_conversions_flip_the_right_impressions(out):
  train, ev = _labels(out["lines"]["train"]), _labels(out["lines"]["eval"])
  assert train == {1: 1, 2: 1, 3: 0, 4: 0, 5: 0, 8: 0}
  assert ev == {6: 1, 7: 0}     # 7's only conversion is dated before its impression
  assert out["rec"]["days"][D1]["conversions_attributed"] == 2
  assert out["rec"]["days"][D2]["conversions_attributed"] == 1


def test_clicks_and_conversions_by_lag_per_day(out):
  days = out["rec"]["days"]
  # D1 writes 1, 2, 4, 5, 8 clicked (3 is not, the garbage line has no click); D2 writes 6, 7
  # (its 8 is a duplicate). 1 converts on D1 (lag 0; its D2 row is a duplicate), 2 on D2 (lag 1),
  # 6 four days after D2.
  assert days[D1]["clicks"] == 5 and days[D2]["clicks"] == 2
  assert days[D1]["conversions_by_lag"] == {"0": 1, "1": 1}
  assert days[D2]["conversions_by_lag"] == {"4": 1}
  for day in days.values():
    assert sum(day["conversions_by_lag"].values()) == day["conversions_attributed"]
  assert json.loads(json.dumps(days)) == days

def test_every_conversion_row_is_attributed_or_set_aside_with_its_reason(out):
  rec = out["rec"]
  assert rec["conversions_read"] == 10 and rec["conversions_attributed"] == 3
  assert rec["conversions_set_aside"] == {
      "duplicate_conversion": 1, "no_impression_in_window": 1, "conversion_without_click": 1,
      "outside_attribution_window": 1, "conversion_before_impression": 1, "malformed_conversion": 2}
  assert rec["conversions_balanced"]
  reasons = sorted(d["reason"] for d in out["dead"] if d["source"] == "conversions")
  assert reasons == sorted(["duplicate_conversion", "no_impression_in_window", "conversion_without_click",
                            "outside_attribution_window", "conversion_before_impression",
                            "malformed_conversion", "malformed_conversion"])


def test_impression_lines_are_written_once_or_set_aside(out):
  rec = out["rec"]
  assert rec["impressions_read"] == 10
  assert rec["impressions_set_aside"] == {"duplicate_impression": 1}
  assert rec["impressions_passed_through_unreadable"] == 1
  assert rec["impressions_balanced"]
  # The unreadable line goes on unchanged, for the preprocessing job to set aside with its reason.
  assert "garbage line" in out["lines"]["train"]
  # The rest of a line is untouched: only the conversion column changes.
  assert f"1,1,1,{_line(1, 1).split(',', 3)[3]}" in out["lines"]["train"]
  dup = [d for d in out["dead"] if d["reason"] == "duplicate_impression"]
  assert len(dup) == 1 and dup[0]["sample_id"] == 8


def test_a_finished_relabel_is_not_redone(out):
  marker = os.path.join(out["work"], daily.RELABEL_MARKER)
  mtime = os.path.getmtime(marker)
  again = daily.run_relabel({"train_days": [], "eval_day": "x", "conversion_logs": {}}, "/nonexistent",
                            out["work"], 4, [])
  assert again == out["rec"] and os.path.getmtime(marker) == mtime


def test_parse_conversion_rejects_what_is_not_an_id_and_a_timestamp():
  assert relabel.parse_conversion(b"12,1413936000") == (12, 1413936000)
  # Every int64 sample id (19 digits too), and none beyond.
  assert relabel.parse_conversion(b"9223372036854775807,1") == (9223372036854775807, 1)
  for bad in (b"12", b"a,1", b"12,1.5", b"12,1,2", b"\xff,1", b"9223372036854775808,1"):
    with pytest.raises(relabel.BadRecord):
      relabel.parse_conversion(bad)


def test_the_holdout_slice_is_never_trained_on_and_is_the_eval_split(out, tmp_path):
  logs = out["logs"]
  plan = {"train_days": [D1], "eval_day": D2, "conversion_logs": {}}
  work = str(tmp_path / "relabeled")
  rec = daily.run_relabel(plan, logs, work, attribution_days=4, beam_args=[], holdout_percent=50)
  got = {split: _labels(line for p in glob.glob(os.path.join(work, split, "sample_skeleton*.csv"))
                        for line in open(p).read().splitlines())
         for split in ("train", "eval")}
  d1, d2 = [1, 2, 3, 4, 5, 8], [6, 7]
  assert sorted(got["train"]) == [s for s in d1 if not relabel.held_out(s, 50)]
  assert sorted(got["eval"]) == [s for s in d2 if relabel.held_out(s, 50)]
  # Every written line is routed to a split or counted as not used in this run.
  assert sum(rec["routed"].values()) + sum(rec["not_used_this_run"].values()) == rec["impressions_written"]
  assert rec["not_used_this_run"].get("holdout_of_train_day", 0) == sum(relabel.held_out(s, 50) for s in d1)
