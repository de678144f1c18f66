"""The grouped layout's batch builder (pipeline/sources/aliccp_groups.py) against the per-row join:
every impression's values, whichever way its batch was parsed."""

import random

import numpy as np
import pytest

from pipeline import encode
from pipeline.sources import aliccp as A
from pipeline.sources import aliccp_groups as G
from preprocessing import features as F
from preprocessing import transform as T

KNOWN = A.KNOWN_FIELDS
USER = sorted(A.USER_FIELDS)
OTHER = sorted(KNOWN - A.USER_FIELDS)


def _schema(layout):
  return encode.raw_tfxio(T.raw_metadata("aliccp", F.RAW_LABELS, layout=layout)).ArrowSchema()


def _flist(rng, fields, weight=lambda rng: f"{rng.random() * 3:.6f}"):
  items = [(f, rng.randrange(10 ** rng.randint(1, 18)), weight(rng))
           for f in fields for _ in range(rng.choice([1, 1, 2, 5]))]
  rng.shuffle(items)
  return "\x01".join(f"{f}\x02{i}\x03{w}" for f, i, w in items)


def _groups(seed, weight=None, common_item_fields=False, unknown=False, empty=False):
  """(skeleton lines, common line) per group, as the join gets them."""
  rng = random.Random(seed)
  kw = {"weight": weight} if weight else {}
  groups, sample_id = [], 0
  for g in range(12):
    common_fields = rng.sample(USER, 6) + (rng.sample(OTHER, 2) if common_item_fields else [])
    common = _flist(rng, common_fields + (["999"] if unknown else []), **kw)
    lines = []
    for _ in range(rng.randint(1, 9)):
      sample_id += 1
      own = [] if empty and rng.random() < 0.3 else rng.sample(OTHER, rng.randint(1, 5))
      text = _flist(rng, own + (["998"] if unknown and own else []), **kw)
      click = rng.randint(0, 1)
      n = len(text.split("\x01")) if text else 0
      lines.append(f"{sample_id},{click},{click * rng.randint(0, 1)},c{g},{n},{text}")
    n = len(common.split("\x01"))
    groups.append((lines, f"c{g},{n},{common}"))
  return groups


def _grouped_batch(groups):
  builder = G.GroupedRecordBatchBuilder(_schema(F.GROUPED))
  for lines, common in groups:
    skeletons = [A.parse_skeleton_line(line, KNOWN, A.RAW)[0] for line in lines]
    builder.add([(row, *row["features"]) for row in skeletons], A.parse_common_line(common, KNOWN, A.RAW)[0]["features"])
  return builder.build()


def _per_impression(batch):
  """{sample id: {column: values}} of a grouped batch (group-level columns under each impression)."""
  out = {}
  cols = batch.to_pydict()
  for g, sample_ids in enumerate(cols[F.SAMPLE_ID]):
    offsets = {}
    for i, sample_id in enumerate(sample_ids):
      row = {}
      for f in F.fields("aliccp"):
        names = [f.raw_ids] + ([f.raw_weights] if f.weighted else [])
        for name in names:
          if f.group_level:
            row[name] = cols[name][g]
          else:
            n = cols[f.lengths][g][i]
            at = offsets.get(name, 0)
            row[name] = cols[name][g][at:at + n]
            offsets[name] = at + n
      row[F.CLICK] = cols[F.CLICK][g][i]
      row[F.CONVERSION] = cols[F.CONVERSION][g][i]
      out[sample_id] = row
  return out


def _rows_reference(groups):
  """The same impressions through the per-row join's builder (the rows layout)."""
  builder = A.RecordBatchBuilder(_schema(F.ROWS))
  for lines, common in groups:
    features = A.parse_common_line(common, KNOWN)[0]["features"]
    for line in lines:
      builder.add(A.parse_skeleton_line(line, KNOWN)[0], features)
  cols = builder.build().to_pydict()
  names = [n for f in F.fields("aliccp") for n in [f.raw_ids] + ([f.raw_weights] if f.weighted else [])]
  return {sid: {**{n: cols[n][i] for n in names}, F.CLICK: cols[F.CLICK][i], F.CONVERSION: cols[F.CONVERSION][i]}
          for i, (sid,) in enumerate(cols[F.SAMPLE_ID])}


def _values(per_impression):
  """Values as stored: ids, and weights rounded to float32 (lists of one-value rows unwrapped)."""
  def norm(v):
    v = v if isinstance(v, list) else [v]
    return [float(np.float32(x)) if isinstance(x, float) else x for x in v]
  return {sid: {k: norm(v) for k, v in row.items()} for sid, row in per_impression.items()}


@pytest.mark.parametrize("case", ["release", "common_rows_with_item_fields", "unknown_and_empty",
                                  "weights_arrow_refuses"])
def test_each_impression_holds_what_the_per_row_join_gives_it(case, monkeypatch):
  kw = {"release": {}, "common_rows_with_item_fields": {"common_item_fields": True},
        "unknown_and_empty": {"unknown": True, "empty": True},
        "weights_arrow_refuses": {"weight": lambda rng: rng.choice(["1_0", " 2.5", "0.25"])}}[case]
  groups = _groups(7, **kw)
  used = []
  python = G._parse_lists_python
  monkeypatch.setattr(G, "_parse_lists_python", lambda *a: used.append(1) or python(*a))
  got = _values(_per_impression(_grouped_batch(groups)))
  assert bool(used) == (case == "weights_arrow_refuses")   # Arrow reads all but the last case
  assert got == _values(_rows_reference(groups))


def test_arrow_and_the_python_parse_give_the_same_items_for_many_digit_weights():
  rng = random.Random(3)
  texts = [_flist(rng, rng.sample(sorted(KNOWN), 4) + ["997"],
                  weight=lambda r: r.choice([f"{r.random() * 10 ** r.randint(-3, 30):.{r.randint(0, 25)}f}",
                                             f"{r.randint(0, 9)}.", f"{r.random():.17g}"]))
           for _ in range(300)]
  nums = [len(t.split("\x01")) for t in texts]
  arrow = G.parse_lists(texts, nums)
  python = G._parse_lists_python(texts, np.asarray(nums))

  def by_list_and_field(items):
    names, codes, ids, weights, where = items
    out = {}
    for c, i, w, t in zip(codes, ids, weights, where):
      if names[c] in KNOWN:
        out.setdefault((int(t), names[c]), []).append((int(i), float(w)))
    return out
  assert by_list_and_field(arrow) == by_list_and_field(python)


def test_a_field_name_with_a_value_separator_goes_to_the_python_parse():
  texts = ["205\x0211\x031.0\x01a\x03b\x0212\x032.0", "206\x027\x030.5"]
  names, codes, ids, weights, where = G.parse_lists(texts, [2, 1])
  assert [(names[c], int(i), float(w), int(t)) for c, i, w, t in zip(codes, ids, weights, where)] == [
      ("205", 11, 1.0, 0), ("206", 7, 0.5, 1)]
