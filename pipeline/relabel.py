"""Late conversions: re-label a window of impression logs from the conversion logs (Beam).

Inputs, per day D (see ``datagen.synthetic.generate_daily`` for the layout):
  impressions/date=D/sample_skeleton.csv   Ali-CCP skeleton rows; the conversion column as
                                           logged (0: unknown at impression time)
  conversions/date=C/conversions.csv       header ``sample_id,conversion_timestamp`` (UTC
                                           seconds); the conversions that happened on day C

An impression of day D becomes positive when a conversion for its sample id, within the
attribution window (0 <= C - D <= attribution_days), is in a log read by this run. Every
conversion row is attributed exactly once or set aside with its reason:

  duplicate_conversion          another row for the same impression was attributed
  no_impression_in_window       its impression is not in the window read (older, or unknown)
  conversion_without_click      its impression was not clicked
  outside_attribution_window    more than attribution_days after the impression day
  conversion_before_impression  dated before the impression day
  malformed_conversion          not ``<sample id>,<timestamp>``

Impression lines are written relabeled (only the conversion column changes; a line
without a readable sample id or click is written unchanged, so the preprocessing job sets
it aside with its own reason) or, for a sample id seen twice in the window, set aside as
duplicate_impression. The counts must reconcile, as in pipeline.preprocess.
"""

import datetime
import os
import zlib
from typing import Dict, Iterable, Mapping

import apache_beam as beam

from pipeline.sources.aliccp import ReadLines, is_sample_id
from pipeline.sources.deadletter import DEAD, BadRecord, counter, dead_letter, decode_line

NS = "relabel"
CONVERSION_REASONS = ("duplicate_conversion", "no_impression_in_window", "conversion_without_click",
                      "outside_attribution_window", "conversion_before_impression", "malformed_conversion")
DUPLICATE_IMPRESSION = "duplicate_impression"
_EPOCH = datetime.datetime(1970, 1, 1)
CONVERSION_LOG_HEADER = "sample_id,conversion_timestamp"


def log_paths(logs_dir: str, date: str) -> Dict[str, str]:
  """The daily log layout for ``date`` (YYYYMMDD): the impression dir and its skeleton and
  common files, the conversion log, and (synthetic logs) the ground truth."""
  day = os.path.join(logs_dir, "impressions", f"date={date}")
  return {"impressions": day, "skeleton": os.path.join(day, "sample_skeleton.csv"),
          "common": os.path.join(day, "common_features.csv"),
          "conversions": os.path.join(logs_dir, "conversions", f"date={date}", "conversions.csv"),
          "truth": os.path.join(logs_dir, "ground_truth", f"date={date}.csv")}


def _date(yyyymmdd: str) -> datetime.date:
  return datetime.datetime.strptime(yyyymmdd, "%Y%m%d").date()


def conversion_date(timestamp: int) -> str:
  return (_EPOCH + datetime.timedelta(seconds=int(timestamp))).strftime("%Y%m%d")


def held_out(sample_id: int, percent: int) -> bool:
  """Whether an impression belongs to the evaluation holdout: a fixed slice of every day
  (by a hash of its sample id) that no run ever trains on, so a model warm-started from
  yesterday's has never seen the rows it is evaluated on."""
  return zlib.crc32(str(sample_id).encode()) % 100 < percent


def parse_conversion(line) -> tuple:
  """``sample_id,conversion_timestamp`` -> (sample_id, timestamp); raises BadRecord."""
  text = decode_line(line)
  parts = text.split(",")
  if len(parts) != 2 or not is_sample_id(parts[0]) or not parts[1].isdigit():
    raise BadRecord("malformed_conversion", f"expected '<sample id>,<unix seconds>', got {text[:80]!r}")
  return int(parts[0]), int(parts[1])


def impression_key(line):
  """(sample_id, click) of a skeleton line, or None when they are unreadable."""
  try:
    text = decode_line(line)
  except BadRecord:
    return None
  parts = text.split(",", 3)
  if len(parts) < 4 or not is_sample_id(parts[0]) or parts[1] not in ("0", "1"):
    return None
  return int(parts[0]), int(parts[1])


def with_conversion(line, converted: bool) -> bytes:
  """The skeleton line with its conversion column (the third) set."""
  text = decode_line(line)
  sample_id, click, _, rest = text.split(",", 3)
  return f"{sample_id},{click},{int(converted)},{rest}".encode("utf-8")


class _KeyImpressions(beam.DoFn):
  def __init__(self, date: str):
    self._date = date
    self._read = counter(NS, f"impressions_read/{date}")

  def process(self, line):
    self._read.inc()
    key = impression_key(line)
    if key is None:
      yield beam.pvalue.TaggedOutput("unreadable", (self._date, line))
      return
    yield key[0], (self._date, key[1], line)


class _KeyConversions(beam.DoFn):
  def __init__(self, date: str):
    self._date = date
    self._read = counter(NS, "conversions_read")

  def process(self, line):
    self._read.inc()
    try:
      sample_id, ts = parse_conversion(line)
    except BadRecord as e:
      counter(NS, f"conversions_set_aside/{e.reason}").inc()
      yield beam.pvalue.TaggedOutput(DEAD, dead_letter("relabel", "conversions", e.reason, e.detail,
                                                       line=line, log_date=self._date))
      return
    yield sample_id, ts


class _Relabel(beam.DoFn):
  """One sample id: its impression(s) and conversion rows -> a relabeled line + set-asides."""

  def __init__(self, attribution_days: int):
    self._days = attribution_days
    self._attributed = counter(NS, "conversions_attributed")

  def _aside(self, reason: str, sample_id: int, detail: str = "", **keys):
    counter(NS, f"conversions_set_aside/{reason}").inc()
    return beam.pvalue.TaggedOutput(DEAD, dead_letter("relabel", "conversions", reason, detail,
                                                      sample_id=sample_id, **keys))

  def process(self, element):
    sample_id, grouped = element
    impressions = sorted(grouped["impressions"], key=lambda x: x[0])
    timestamps = sorted(grouped["conversions"])
    if len(impressions) > 1:
      for date, _, line in impressions[1:]:
        counter(NS, f"impressions_set_aside/{DUPLICATE_IMPRESSION}").inc()
        yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
            "relabel", "impressions", DUPLICATE_IMPRESSION, f"sample id also logged on {impressions[0][0]}",
            line=line, sample_id=sample_id, date=date))
    if not impressions:
      for ts in timestamps:
        yield self._aside("no_impression_in_window", sample_id, conversion_date=conversion_date(ts))
      return
    date, click, line = impressions[0]
    attributed = False
    for ts in timestamps:
      lag = (_date(conversion_date(ts)) - _date(date)).days
      if lag < 0:
        yield self._aside("conversion_before_impression", sample_id, f"impression {date}",
                          conversion_date=conversion_date(ts))
      elif lag > self._days:
        yield self._aside("outside_attribution_window", sample_id,
                          f"{lag} days after the impression, window {self._days}",
                          conversion_date=conversion_date(ts))
      elif not click:
        yield self._aside("conversion_without_click", sample_id, f"impression {date} was not clicked",
                          conversion_date=conversion_date(ts))
      elif attributed:
        yield self._aside("duplicate_conversion", sample_id, conversion_date=conversion_date(ts))
      else:
        attributed = True
        self._attributed.inc()
        counter(NS, f"attributed/{date}").inc()
        counter(NS, f"attributed_lag/{date}/{lag}").inc()
    counter(NS, f"impressions_written/{date}").inc()
    if click:
      counter(NS, f"clicks/{date}").inc()
    yield date, sample_id, with_conversion(line, attributed)


class Relabel(beam.PTransform):
  """{date: skeleton pattern} + {log date: conversion log pattern} -> relabeled lines per date.

  Returns {"lines": PCollection of (impression date, sample id or None if unreadable, line
  bytes), DEAD: JSON lines}.
  """

  def __init__(self, impressions: Mapping[str, str], conversions: Mapping[str, str], attribution_days: int):
    super().__init__()
    self._impressions = dict(impressions)
    self._conversions = dict(conversions)
    self._days = attribution_days

  def expand(self, pbegin):
    keyed, unreadable = [], []
    for date, pattern in sorted(self._impressions.items()):
      out = (pbegin
             | f"ReadImpressions_{date}" >> ReadLines(pattern, coder=beam.coders.BytesCoder())   # less a BOM
             | f"KeyImpressions_{date}" >> beam.ParDo(_KeyImpressions(date)).with_outputs("unreadable", main="rows"))
      keyed.append(out.rows)
      unreadable.append(out.unreadable)
    convs, bad = [], []
    for date, pattern in sorted(self._conversions.items()):
      out = (pbegin
             | f"ReadConversions_{date}" >> beam.io.ReadFromText(pattern, skip_header_lines=1,
                                                                 coder=beam.coders.BytesCoder())
             | f"KeyConversions_{date}" >> beam.ParDo(_KeyConversions(date)).with_outputs(DEAD, main="rows"))
      convs.append(out.rows)
      bad.append(out[DEAD])
    impressions = keyed | "FlattenImpressions" >> beam.Flatten()
    conversions = (convs or [pbegin | "NoConversions" >> beam.Create([])]) | "FlattenConversions" >> beam.Flatten()
    joined = ({"impressions": impressions, "conversions": conversions}
              | "GroupBySampleId" >> beam.CoGroupByKey()
              | "Relabel" >> beam.ParDo(_Relabel(self._days)).with_outputs(DEAD, main="lines"))
    passthrough = ((unreadable or [pbegin | "NoUnreadable" >> beam.Create([])])
                   | "FlattenUnreadable" >> beam.Flatten()
                   | "CountUnreadable" >> beam.Map(_count_passthrough))
    lines = (joined.lines, passthrough) | "FlattenLines" >> beam.Flatten()
    dead = ([joined[DEAD]] + bad) | "FlattenDead" >> beam.Flatten()
    return {"lines": lines, DEAD: dead}


def _count_passthrough(element):
  counter(NS, f"impressions_written/{element[0]}").inc()
  counter(NS, "impressions_passed_through_unreadable").inc()
  return element[0], None, element[1]


def reconcile(counters: Mapping[str, int], dates: Iterable[str]) -> Dict[str, object]:
  """Row accounting of a relabel run from its counters ('relabel/...' keys).

  Per day also its written clicked impressions and its attributed conversions by lag (whole
  days from the impression day to the conversion's; keys are strings, for JSON), the input of
  orchestration.delay."""
  c = {k[len(NS) + 1:]: v for k, v in counters.items() if k.startswith(NS + "/")}
  days = {}
  for date in dates:
    prefix = f"attributed_lag/{date}/"
    by_lag = {k[len(prefix):]: int(v) for k, v in c.items() if k.startswith(prefix) and v}
    days[date] = {"impressions_read": c.get(f"impressions_read/{date}", 0),
                  "impressions_written": c.get(f"impressions_written/{date}", 0),
                  "conversions_attributed": c.get(f"attributed/{date}", 0),
                  "clicks": int(c.get(f"clicks/{date}", 0)),
                  "conversions_by_lag": dict(sorted(by_lag.items(), key=lambda kv: int(kv[0])))}
  read = sum(d["impressions_read"] for d in days.values())
  written = sum(d["impressions_written"] for d in days.values())
  dup = c.get(f"impressions_set_aside/{DUPLICATE_IMPRESSION}", 0)
  aside = {r: c.get(f"conversions_set_aside/{r}", 0) for r in CONVERSION_REASONS}
  conv_read = c.get("conversions_read", 0)
  attributed = c.get("conversions_attributed", 0)
  return {"days": days, "impressions_read": read, "impressions_written": written,
          "impressions_set_aside": {DUPLICATE_IMPRESSION: dup},
          "impressions_passed_through_unreadable": c.get("impressions_passed_through_unreadable", 0),
          "impressions_balanced": read == written + dup,
          "conversions_read": conv_read, "conversions_attributed": attributed,
          "conversions_set_aside": aside, "conversions_balanced": conv_read == attributed + sum(aside.values())}


class RouteToSplits(beam.DoFn):
  """Relabeled lines to their split: the eval split is the holdout slice of the eval day,
  the train split the rest of the train days. With holdout 0 the whole eval day evaluates.

  (Here and not in orchestration.daily: a DoFn of a module run as __main__ does not unpickle on
  the workers of a multi-process or remote runner.)"""

  def __init__(self, train_days, eval_day: str, holdout_percent: int):
    self._train = frozenset(train_days)
    self._eval = eval_day
    self._pct = holdout_percent

  def process(self, element):
    date, sample_id, line = element
    held = sample_id is not None and held_out(sample_id, self._pct)
    if date == self._eval:
      split = "eval" if held or not self._pct or sample_id is None else None
    else:
      split = None if held else "train"
    if split is None:
      reason = "holdout_of_train_day" if held else "eval_day_outside_holdout"
      beam.metrics.Metrics.counter(NS, f"not_used_this_run/{reason}").inc()
      return
    beam.metrics.Metrics.counter(NS, f"routed/{split}").inc()
    yield beam.pvalue.TaggedOutput(split, line)
