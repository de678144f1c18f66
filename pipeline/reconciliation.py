"""The preprocessing job's row accounting: every input row written or set aside with a reason,
per split, from the job's counters; what makes an output unfit to publish; and how it prints.

The format's own counts come from its Format (pipeline/formats.py); the train blocks, the
partitions and the rows by stage are the same for every format.
"""

from typing import Dict, List, Mapping

from pipeline import formats
from preprocessing import cli
from preprocessing import features as F

RUNNER_LOST_ROWS_HINT = (
    "Rows vanished between two stages of the job without a set-aside reason, so the runner lost "
    "them. The multi-process DirectRunner (--direct_running_mode=multi_processing) has done this "
    "on inputs of several million rows; rerun with the default --direct_running_mode=in_memory, "
    "or on a distributed runner (docs/scaling.md: \"Beam on distributed runners\").")


class BadOutput(cli.UsageError):
  """The run finished but its output is not fit to train on; it was not published."""


def label_positives(counters: Mapping[str, int], ns: str, labels) -> Dict[str, int]:
  """Positive labels among a split's written rows, by label: its base rates with rows_written."""
  return {label: int(counters.get(ns + F.LABEL_POSITIVES_PREFIX + label, 0)) for label in labels}


def reconcile_blocks(counters: Mapping[str, int], ns: str, rows_written: int, block_rows: int) -> dict:
  """The train blocks' counts; balanced when they hold exactly the rows written as tf.Examples."""
  rows = int(counters.get(ns + "rows_written_in_blocks", 0))
  return {"block_rows": block_rows, "blocks_written": int(counters.get(ns + "blocks_written", 0)),
          "rows_written": rows, "balanced": rows == rows_written}


def reconcile_partitions(parts, split: str, rec: dict) -> dict:
  """A split's records put into the partitions (pipeline.partition.Partitions) against the rows
  its partitions' runs read."""
  into = parts.records[split]
  return {"count": parts.count, "skeleton_records": into["skeleton"], "common_records": into["common"],
          "cross_partition_conflicting_sample_ids": len(parts.conflicts[split]),
          "balanced": (into["skeleton"], into["common"]) == (rec["skeleton_rows_read"], rec["common_rows_read"])}


def balanced(rec: Mapping[str, dict], fmt: str) -> bool:
  """Every split's rows, blocks and partitions add up."""
  source = formats.get(fmt)
  return all(source.balanced(r) and r.get("blocks", {}).get("balanced", True)
             and r.get("partitions", {}).get("balanced", True) for r in rec.values())


def lost_rows_hint(rec: Mapping[str, dict]) -> str:
  """The runner-lost-rows hint when a hop between two stages lost rows, else ''."""
  return "\n" + RUNNER_LOST_ROWS_HINT if any(r.get("rows_unaccounted_by_hop") for r in rec.values()) else ""


def check_quality(rec: Mapping[str, dict], fmt: str, max_dead_fraction: float) -> None:
  """A run that set most rows aside read the wrong files or the wrong format: BadOutput."""
  source = formats.get(fmt)
  problems = []
  for split, r in rec.items():
    read, dead = source.rows_read(r), source.rows_set_aside(r)
    n_dead = sum(dead.values())
    if read and n_dead > max_dead_fraction * read:
      top = ", ".join(f"{k} {v:,}" for k, v in sorted(dead.items(), key=lambda kv: -kv[1])[:3])
      problems.append(f"{split}: {n_dead:,} of {read:,} rows set aside ({top}); more than "
                      f"--max_dead_letter_fraction={max_dead_fraction:g}")
  for split, r in rec.items():
    if r["rows_written"] == 0:
      problems.append(f"{split}: no row written, nothing to "
                      + ("train on" if split == "train" else "evaluate on (metrics would be undefined)"))
  if problems:
    raise BadOutput("; ".join(problems) + f". Is --format={fmt} the format of these files?")


def format_reconciliation(rec: Mapping[str, dict], fmt: str = "aliccp") -> str:
  source = formats.get(fmt)
  lines = ["reconciliation (every input row is written or set aside with a reason):"]
  for split, r in rec.items():
    lines += source.reconciliation_lines(split, r)
    lines.append(_stage_line(r))
    lines += _blocks_lines(r)
    if "partitions" in r:
      q = r["partitions"]
      lines.append(f"    partitions: {q['count']}, holding {q['skeleton_records']:,} skeleton and "
                   f"{q['common_records']:,} common rows  [{'OK' if q['balanced'] else 'MISMATCH with the rows read'}]"
                   f"; sample ids with differing copies in two partitions: {q['cross_partition_conflicting_sample_ids']:,}")
  return "\n".join(lines)


def _blocks_lines(r: dict) -> List[str]:
  if "blocks" not in r:
    return []
  b = r["blocks"]
  return [f"    train blocks: rows {b['rows_written']:,} in {b['blocks_written']:,} blocks of up to "
          f"{b['block_rows']} rows  [{'OK' if b['balanced'] else 'MISMATCH with the rows written'}]"]


def _stage_line(r: dict) -> str:
  """Rows out of each stage, and the hops that lost rows without a set-aside reason."""
  line = "    rows by stage: " + " -> ".join(f"{stage.replace('_', ' ')} {n:,}"
                                             for stage, n in r.get("rows_by_stage", {}).items())
  for hop, n in r.get("rows_unaccounted_by_hop", {}).items():
    before, after = (s.replace("_", " ") for s in hop.split("->"))
    line += f"\n    rows unaccounted for between {before} and {after}: {n:,}"
  return line
