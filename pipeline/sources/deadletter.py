"""Dead-letter records: every row that is set aside carries its reason and where it came from."""

import json
from typing import Dict, Mapping

import apache_beam as beam

DEAD = "dead_letter"
MAX_LINE_CHARS = 1 << 20
BOM = b"\xef\xbb\xbf"   # a UTF-8 byte-order mark, which some exporters write at the start of a file
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# The least float64 that float32 rounds to inf (float32's max is 2**128 - 2**104; the half-way
# point above it rounds up): a weight is finite in float32 exactly when it is below this.
FLOAT32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103

# Reasons a row of any source is set aside for (stable identifiers, used in counters and dead
# letters); each source adds its own.
NOT_UTF8 = "not_utf8"
WRONG_COLUMN_COUNT = "wrong_column_count"
BAD_SAMPLE_ID = "bad_sample_id"
CONVERSION_WITHOUT_CLICK = "conversion_without_click"


class BadRecord(ValueError):
  """A raw row that cannot be used; ``reason`` is a short stable identifier."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


def decode_line(line) -> str:
  """Raw bytes from a text source to str; raises BadRecord(NOT_UTF8)."""
  if isinstance(line, bytes):
    try:
      line = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord(NOT_UTF8, str(e)) from None
  return line.rstrip("\r\n")


def parse_int64(text: str, reason: str, what: str, signed: bool = False) -> int:
  """A decimal integer (non-negative unless ``signed``) as the int64 it is stored in; raises
  BadRecord(reason) saying whether ``text`` is no such integer or is out of int64 range."""
  digits = text[1:] if signed and text.startswith("-") else text
  if not digits or not digits.isascii() or not digits.isdigit():
    kind = "an integer" if signed else "a non-negative integer"
    raise BadRecord(reason, f"{what} {text[:40]!r} is not {kind}")
  # Leading zeros are allowed; more than 19 significant digits never fit (and int() of a huge
  # digit string is slow or raises).
  if len(digits.lstrip("0")) > 19 or not INT64_MIN <= int(text) <= INT64_MAX:
    raise BadRecord(reason, f"{what} {text[:40]!r} is out of int64 range")
  return int(text)


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


def rows_by_stage(counters: Mapping[str, int], ns: str, stages,
                  optional=("after_dedup",)) -> Dict[str, int]:
  """Rows that left each stage of the job, in order, from its counters (``stages``: (name,
  counter) pairs). A stage whose counter never moved passed on 0 rows, except an ``optional``
  one, which is left out: it may not have run (the dedup with --nodedup_sample_ids). When
  rows do not reconcile, ``unaccounted_by_hop`` names the hop that lost them."""
  return {stage: int(counters.get(ns + name, 0)) for stage, name in stages
          if ns + name in counters or stage not in optional}


def unaccounted_by_hop(stages: Mapping[str, int], set_aside: Mapping[str, int],
                       reason_stage: Mapping[str, str] = ()) -> Dict[str, int]:
  """Rows that vanished between two stages without a set-aside reason, as
  ``{"<stage>-><next stage>": rows}`` (hops that lost none are left out).

  ``stages`` is ``rows_by_stage``'s output. A set-aside reason counts against the hop into
  the stage named for it in ``reason_stage`` (the join's reasons: the ``joined`` stage); any
  other reason against the hop out of the first stage (parsing and the dedup). A runner that
  drops rows between two of the job's stages shows up here as the hop that lost them.
  """
  names = list(stages)
  if len(names) < 2:
    return {}
  reason_stage = dict(reason_stage)
  explained = {name: 0 for name in names[1:]}
  for reason, n in set_aside.items():
    stage = reason_stage.get(reason)
    explained[stage if stage in explained else names[1]] += n
  out = {}
  for before, after in zip(names, names[1:]):
    lost = stages[before] - stages[after] - explained[after]
    if lost:
      out[f"{before}->{after}"] = lost
  return out
