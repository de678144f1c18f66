"""Embedding tables sized to the ids that occur: a field's table gets
min(hash buckets, next power of two >= distinct ids x ``table_rows_per_id``) rows, from the
distinct ids the preprocessing run counted in the train split (pipeline/distinct_ids.py), and
the share of those ids that then share a row with another (exact from the run's bitmaps, else
the expectation for uniform hashing)."""

import math
from typing import Dict, Optional

import numpy as np
import tensorflow as tf

from model_fn import params as P
from preprocessing import id_bitmaps as B


def sized_rows(buckets: int, distinct: int, per_id: float, cap: int = 0) -> int:
  """min(buckets, cap if given, next power of two >= distinct x per_id), at least 1."""
  want = max(1, math.ceil(distinct * per_id))
  rows = min(buckets, 1 << (want - 1).bit_length())
  return min(rows, cap) if cap else rows


def resolve_field_rows(p: Dict[str, any], distinct: Optional[Dict[str, int]]) -> Dict[str, int]:
  """The rows of each embedded field's table for resolved params ``p`` without ``field_rows``:
  sized to ``distinct`` when ``table_rows_per_id`` > 0, else the hash buckets capped by table_rows."""
  if not p["table_rows_per_id"]:
    return P.table_rows(p)
  if distinct is None:
    raise ValueError("table_rows_per_id needs the distinct ids of the train split, which this "
                     "preprocessing output does not record (preprocess again, or --table_rows_per_id=0)")
  names = p.get("fields") or list(p["hash_buckets"])
  return {n: sized_rows(p["hash_buckets"][n], int(distinct.get(n, 0)), p["table_rows_per_id"],
                        int(p["table_rows"] or 0)) for n in names}


def expected_collision_rate(distinct: int, rows: int) -> float:
  """The expected share of ``distinct`` uniformly hashed ids that share one of ``rows`` with another."""
  if distinct <= 1:
    return 0.0
  return 1.0 - (1.0 - 1.0 / rows) ** (distinct - 1)


def collision_rate(bitmap: np.ndarray, rows: int) -> float:
  """The share of the occupied ids of ``bitmap`` whose row (id mod ``rows``) holds another one."""
  ids = np.flatnonzero(bitmap)
  if len(ids) == 0:
    return 0.0
  per_row = np.bincount(ids % rows, minlength=rows)
  return float((per_row[ids % rows] > 1).mean())


def report(rows: Dict[str, int], distinct: Optional[Dict[str, int]], transform_dir: str) -> Dict[str, dict]:
  """{field: {rows, distinct_ids, collision_rate, exact}} of the tables (exact: from the bitmaps)."""
  path = B.train_path(transform_dir)
  bitmaps = B.load(path) if distinct is not None and tf.io.gfile.exists(path) else {}
  out = {}
  for field, n in rows.items():
    d = (distinct or {}).get(field)
    if field in bitmaps:
      rate, exact = collision_rate(bitmaps[field], n), True
    else:
      rate, exact = (expected_collision_rate(d, n) if d is not None else None), False
    out[field] = {"rows": n, "distinct_ids": d, "collision_rate": rate, "exact": exact}
  return out


def format_report(rep: Dict[str, dict]) -> str:
  lines = ["embedding tables: field rows distinct_ids collision_rate"]
  for field, r in rep.items():
    rate = ("unknown" if r["collision_rate"] is None
            else f"{r['collision_rate']:.4f}" + ("" if r["exact"] else " (expected)"))
    distinct = "?" if r["distinct_ids"] is None else format(r["distinct_ids"], ",")
    lines.append(f"  {field:>10s} {r['rows']:>10,d} {distinct:>10s} {rate}")
  total = sum(r["rows"] for r in rep.values())
  lines.append(f"  total rows {total:,}")
  return "\n".join(lines)
