"""Properties of the raw readers' parse functions over generated values (hypothesis).

Every value is checked in the dtype it is stored in: a row whose values all fit (int64 ids,
finite non-negative float32 weights) is kept and stores exactly them; a value that does not
fit (an int beyond int64, a weight that float32 makes inf, NaN, a negative one) sets its row
aside with the reason that names it. A byte-order mark at the start of a file changes no row,
and RFC 4180 quoting changes no Avazu value. Pure functions only (no pipeline), so these run
in seconds; derandomized, so CI is deterministic.
"""

import csv
import io

import apache_beam as beam
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import encode, partition
from pipeline.sources import aliccp as ALI
from pipeline.sources import avazu as AVA
from pipeline.sources.deadletter import FLOAT32_OVERFLOW, INT64_MAX, INT64_MIN, BadRecord
from preprocessing import features as F
from preprocessing import transform as T

PROPERTY = settings(max_examples=200,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
KNOWN = ALI.KNOWN_FIELDS
WEIGHTED = sorted(f.name for f in F.fields("aliccp") if f.weighted)
SCHEMA = encode.raw_tfxio(T.raw_metadata("aliccp", F.RAW_LABELS)).ArrowSchema()
BOM = b"\xef\xbb\xbf"

int64s = st.integers(0, INT64_MAX)
beyond_int64 = st.integers(INT64_MAX + 1, 10 ** 40)
# Weights whose float32 is finite: any float64 in [0, FLOAT32_OVERFLOW), the edge included.
float32_weights = st.one_of(st.floats(0, FLOAT32_OVERFLOW, exclude_max=True),
                            st.just(float(np.nextafter(FLOAT32_OVERFLOW, 0))))
# Weights that are not finite non-negative float32s: beyond its range, inf, NaN, negative.
bad_weights = st.one_of(st.floats(FLOAT32_OVERFLOW, allow_infinity=True), st.just(FLOAT32_OVERFLOW),
                        st.just(float("nan")), st.floats(max_value=-1e-300, allow_infinity=True))


def _int_text(value: int, zeros: int) -> str:
  return "0" * zeros + str(value)


def _weight_text(value: float, style: int) -> str:
  return (repr(value), f"{value:.17e}", f"{value:.17g}")[style]   # each reads back as value


def _float32(value: float) -> float:
  with np.errstate(over="ignore"):
    return float(np.float32(value))


@st.composite
def skeleton_rows(draw):
  """(line, sample id, [(field, feature id, weight as written)]) of a valid skeleton row."""
  items = draw(st.lists(st.tuples(st.sampled_from(WEIGHTED), int64s, float32_weights,
                                  st.integers(0, 2), st.integers(0, 2)), max_size=6))
  sample_id = draw(int64s)
  texts = [(f, _int_text(i, z), _weight_text(w, s)) for f, i, w, z, s in items]
  flist = "\x01".join(f"{f}\x02{i}\x03{w}" for f, i, w in texts)
  line = f"{_int_text(sample_id, draw(st.integers(0, 2)))},1,0,u1,{len(texts)},{flist}"
  return line, sample_id, [(f, int(i), float(w)) for f, i, w in texts]


@PROPERTY
@given(skeleton_rows())
def test_a_row_whose_values_fit_their_dtypes_is_kept_and_stores_them(case):
  line, sample_id, items = case
  row, _ = ALI.parse_skeleton_line(line.encode(), KNOWN)
  assert row["sample_id"] == sample_id
  builder = ALI.RecordBatchBuilder(SCHEMA)
  builder.add(row, {})
  batch = builder.build()
  assert batch.column(F.SAMPLE_ID).to_pylist() == [[sample_id]]
  for field in WEIGHTED:
    want = [(i, w) for f, i, w in items if f == field]
    assert batch.column(F.RAW_ID_PREFIX + field).to_pylist()[0] == [i for i, _ in want]
    stored = batch.column("w_" + field).to_pylist()[0]
    assert stored == [_float32(w) for _, w in want]
    assert np.isfinite(np.array(stored, np.float32)).all()


@st.composite
def skeleton_lines(draw):
  """Skeleton lines near and in the release's plain form: any labels, indexes, counts, known and
  unknown fields, ids and weights of any size and spelling, a line end left on."""
  items = draw(st.lists(st.tuples(st.sampled_from(sorted(KNOWN) + ["999", "2050", "a\x03b"]),
                                  st.one_of(int64s, beyond_int64), st.one_of(float32_weights, bad_weights),
                                  st.integers(0, 2), st.integers(0, 2)), max_size=5))
  flist = "\x01".join(f"{f}\x02{_int_text(i, z)}\x03{_weight_text(w, s)}" for f, i, w, z, s in items)
  num = str(len(items) + draw(st.sampled_from([0, 0, 0, 1, -1])))
  sample_id = _int_text(draw(st.one_of(int64s, beyond_int64)), draw(st.integers(0, 2)))
  labels = draw(st.sampled_from(["1,0", "1,1", "0,0", "0,1", "2,0"]))
  index = draw(st.sampled_from(["u1", "AbC09", "", "u-1", "\u00e9"]))
  return f"{sample_id},{labels},{index},{num},{flist}" + draw(st.sampled_from(["", "\r", "\r\n"]))


@PROPERTY
@given(skeleton_lines())
def test_the_plain_form_s_fast_check_agrees_with_the_full_parse(line):
  # The job checks a skeleton line in one regular expression when it can
  # (aliccp.checked_skeleton); what it keeps, counts and sets aside must be what the parse says.
  try:
    row, unknown = ALI.parse_skeleton_line(line.encode(), KNOWN, features=ALI.CHECKED)
  except BadRecord as e:
    with pytest.raises(BadRecord) as got:
      ALI.checked_skeleton(line.encode())
    assert got.value.reason == e.reason
    return
  want = (row["sample_id"], row["click"], row["conversion"], row["index"], *row["features"])
  assert ALI.checked_skeleton(line.encode()) == (want, unknown)


@PROPERTY
@given(weight=st.floats(allow_nan=True, allow_infinity=True), style=st.integers(0, 2),
       source=st.sampled_from(["skeleton", "common"]))
def test_a_weight_is_kept_exactly_when_its_float32_is_finite_and_non_negative(weight, style, source):
  text = _weight_text(weight, style)
  item = f"{WEIGHTED[0]}\x0211\x03{text}"
  line = f"7,1,0,u1,1,{item}" if source == "skeleton" else f"u1,1,{item}"
  parse = ALI.parse_skeleton_line if source == "skeleton" else ALI.parse_common_line
  parsed = float(text)
  fits = parsed >= 0 and np.isfinite(_float32(parsed))
  try:
    row, _ = parse(line, KNOWN)
  except BadRecord as e:
    assert not fits and e.reason == ALI.BAD_WEIGHT and "float32" in e.detail
    return
  assert fits and row["features"][WEIGHTED[0]] == ([11], [parsed])


@PROPERTY
@given(weight=bad_weights, position=st.integers(0, 3))
def test_a_weight_outside_float32_sets_its_row_aside_wherever_it_is(weight, position):
  items = [(WEIGHTED[k % len(WEIGHTED)], k, "1.5") for k in range(4)]
  items[position] = (items[position][0], position, repr(weight))
  flist = "\x01".join(f"{f}\x02{i}\x03{w}" for f, i, w in items)
  for line, parse in ((f"7,1,0,u1,4,{flist}", ALI.parse_skeleton_line), (f"u1,4,{flist}", ALI.parse_common_line)):
    with pytest.raises(BadRecord) as e:
      parse(line, KNOWN)
    assert e.value.reason == ALI.BAD_WEIGHT


@PROPERTY
@given(value=st.one_of(int64s, beyond_int64), zeros=st.integers(0, 3), where=st.sampled_from(["sample", "feature"]))
def test_an_integer_is_kept_exactly_when_it_fits_int64(value, zeros, where):
  text = _int_text(value, zeros)
  if where == "sample":
    line, reason = f"{text},1,0,u1,1,205\x0211\x031", ALI.BAD_SAMPLE_ID
  else:
    line, reason = f"7,1,0,u1,1,205\x02{text}\x031", ALI.BAD_FEATURE_ITEM
  assert ALI.is_sample_id(text) == ALI.is_sample_id(text.encode()) == (value <= INT64_MAX)
  try:
    row, _ = ALI.parse_skeleton_line(line, KNOWN)
  except BadRecord as e:
    assert value > INT64_MAX and e.reason == reason and "out of int64 range" in e.detail
    return
  assert value <= INT64_MAX
  assert (row["sample_id"] if where == "sample" else row["features"]["205"][0][0]) == value


@settings(PROPERTY, max_examples=40)
@given(rows=st.lists(skeleton_rows(), min_size=1, max_size=6), crlf=st.booleans(), bundle=st.integers(1, 200))
def test_a_byte_order_mark_at_the_start_of_a_file_changes_no_row(tmp_path, rows, crlf, bundle):
  end = b"\r\n" if crlf else b"\n"
  data = end.join(line.encode() for line, _, _ in rows) + end
  read = {}
  for name, content in (("plain", data), ("bom", BOM + data)):
    path = tmp_path / f"{name}.csv"
    path.write_bytes(content)
    source = ALI.ReadLines(str(path), coder=beam.coders.BytesCoder())._source
    read[name] = [r for b in source.split(desired_bundle_size=bundle)
                  for r in b.source.read(b.source.get_range_tracker(b.start_position, b.stop_position))]
    assert list(partition.records(io.BytesIO(content))) == read[name]
  assert read["bom"] == read["plain"]
  assert [ALI.parse_skeleton_line(r, KNOWN)[0]["sample_id"] for r in read["bom"]] == [s for _, s, _ in rows]


# Records of a text file: any line ends, marks and lone \r, read whole or in ranges and chunks.
records_text = st.lists(st.tuples(st.sampled_from([b"", b"a", b"7,1,0,u1", BOM, b"\r", b"x\ry", b"\xff"]),
                                  st.sampled_from([b"\n", b"\r\n"])), max_size=8).map(
    lambda parts: b"".join(p + e for p, e in parts))
tails = st.sampled_from([b"", b"tail", b"t\r", BOM, b"\r"])


@settings(PROPERTY, max_examples=150)
@given(body=records_text, tail=tails, bom=st.booleans(), range_bytes=st.integers(1, 40),
       chunk_bytes=st.integers(1, 16), gz=st.booleans())
def test_batched_lines_are_the_records_the_text_reader_makes_however_the_file_is_cut(
    tmp_path, body, tail, bom, range_bytes, chunk_bytes, gz):
  import gzip

  from pipeline.sources import lines
  data = (BOM if bom else b"") + body + tail
  path = tmp_path / ("f.csv.gz" if gz else "f.csv")
  path.write_bytes(gzip.compress(data) if gz else data)
  want = list(partition.records(io.BytesIO(data)))
  ranges = lines.file_ranges(str(path), range_bytes)
  assert len(ranges) == (1 if gz else -(-len(data) // range_bytes))   # none for an empty file
  got = [r for rng in ranges for batch in lines.read_range(*rng, chunk_bytes=chunk_bytes) for r in batch]
  assert got == want
  if not gz:
    source = ALI.ReadLines(str(path), coder=beam.coders.BytesCoder())._source
    assert [r for b in source.split(desired_bundle_size=range_bytes)
            for r in b.source.read(b.source.get_range_tracker(b.start_position, b.stop_position))] == want


# Avazu: RFC 4180 quoting and int64 columns.

HEADER = AVA.parse_header(",".join(F.AVAZU_COLUMNS))
INT_COLUMNS = [c for c in F.AVAZU_COLUMNS if F.RAW_ID_PREFIX + c in {raw for raw, _, is_int in HEADER.fields if is_int}]
TEXT_COLUMNS = [c for c in F.AVAZU_COLUMNS if c not in INT_COLUMNS + [F.AVAZU_ID, F.CLICK, F.AVAZU_HOUR]]
# Text values without line breaks (a line is a row), with the characters quoting is for.
texts = st.lists(st.sampled_from('0123456789abcdef ,"\';xyz\u00e9'), max_size=12).map("".join)


@st.composite
def avazu_rows(draw):
  values = {F.AVAZU_ID: str(draw(st.integers(0, 10 ** 30))), F.CLICK: draw(st.sampled_from("01")),
            F.AVAZU_HOUR: "14102100"}
  values.update({c: str(draw(st.integers(INT64_MIN, INT64_MAX))) for c in INT_COLUMNS})
  values.update({c: draw(texts) for c in TEXT_COLUMNS})
  return [values[c] for c in F.AVAZU_COLUMNS]


def _csv(values, quoting) -> str:
  out = io.StringIO()
  csv.writer(out, quoting=quoting, lineterminator="").writerow(values)
  return out.getvalue()


@PROPERTY
@given(values=avazu_rows(), quoting=st.sampled_from([csv.QUOTE_ALL, csv.QUOTE_MINIMAL]))
def test_an_rfc4180_quoted_avazu_row_parses_to_its_values(values, quoting):
  text = _csv(values, quoting)
  assert AVA.split_values(text) == values
  inst = AVA.parse_line(text.encode(), HEADER)
  for c, v in zip(F.AVAZU_COLUMNS, values):
    if c in TEXT_COLUMNS:
      assert inst[F.RAW_ID_PREFIX + c] == ([v] if v else [])
    elif c in INT_COLUMNS:
      assert inst[F.RAW_ID_PREFIX + c] == [int(v)]
  # Values that need no quotes: the quoted row and the plain one are the same row.
  plain = [v.replace('"', "").replace(",", "") for v in values]
  assert AVA.parse_line(_csv(plain, csv.QUOTE_ALL).encode(), HEADER) == AVA.parse_line(",".join(plain).encode(), HEADER)


@PROPERTY
@given(values=avazu_rows(), column=st.sampled_from(INT_COLUMNS),
       value=st.one_of(st.integers(INT64_MIN, INT64_MAX), st.integers(INT64_MAX + 1, 10 ** 30),
                       st.integers(-10 ** 30, INT64_MIN - 1)))
def test_an_avazu_integer_is_kept_exactly_when_it_fits_int64(values, column, value):
  values[F.AVAZU_COLUMNS.index(column)] = str(value)
  line = _csv(values, csv.QUOTE_MINIMAL).encode()
  try:
    inst = AVA.parse_line(line, HEADER)
  except BadRecord as e:
    assert not INT64_MIN <= value <= INT64_MAX
    assert e.reason == AVA.BAD_INTEGER and "out of int64 range" in e.detail
    return
  assert inst[F.RAW_ID_PREFIX + column] == [value]
