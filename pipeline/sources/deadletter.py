"""Dead-letter records: every row that is set aside carries its reason and where it came from."""

import json
from typing import Dict, Mapping

import apache_beam as beam

DEAD = "dead_letter"
MAX_LINE_CHARS = 1 << 20


class BadRecord(ValueError):
  """A raw row that cannot be used; ``reason`` is a short stable identifier."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


def decode_line(line) -> str:
  """Raw bytes from a text source to str; raises BadRecord('not_utf8')."""
  if isinstance(line, bytes):
    try:
      line = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord("not_utf8", str(e)) from None
  return line.rstrip("\r\n")


def dead_letter(split: str, source: str, reason: str, detail: str = "",
                line=None, **keys) -> str:
  """One dead-letter record as a JSON line."""
  record = {"split": split, "source": source, "reason": reason, "detail": detail}
  record.update(keys)
  if line is not None:
    if isinstance(line, bytes):
      line = line.decode("utf-8", errors="backslashreplace")
    if len(line) > MAX_LINE_CHARS:
      record["line_truncated_from"] = len(line)
      line = line[:MAX_LINE_CHARS]
    record["line"] = line
  return json.dumps(record, sort_keys=True)


def counter(namespace: str, name: str):
  return beam.metrics.Metrics.counter(namespace, name)


def rows_by_stage(counters: Mapping[str, int], ns: str, stages) -> Dict[str, int]:
  """Rows that left each stage of the job, in order, from its counters (``stages``: (name,
  counter) pairs; a stage that did not run, such as the dedup with --nodedup_sample_ids, is
  left out). When rows do not reconcile, the first drop that set-aside rows do not explain
  shows where they went missing."""
  return {stage: int(counters[ns + name]) for stage, name in stages if ns + name in counters}
