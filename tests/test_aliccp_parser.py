"""The raw Ali-CCP parser against hand-written lines."""

import json

import pytest

from pipeline import encode
from pipeline.sources import aliccp as A
from pipeline.sources.deadletter import BadRecord, unaccounted_by_hop
from preprocessing import features as F

KNOWN = frozenset(f.name for f in F.ALICCP_FIELDS)


def items(*triples):
  return "\x01".join(f"{f}\x02{i}\x03{v}" for f, i, v in triples)


def skeleton(sample_id="7", click="1", conversion="0", index="a1b2c3d4e5f60718", num=None, flist=None):
  if flist is None:
    flist = items(("205", 11, "1.0"), ("210", 21, "1.0"), ("210", 22, "1.0"), ("853", 31, "0.5"))
  if num is None:
    num = str(len(flist.split("\x01")) if flist else 0)
  return f"{sample_id},{click},{conversion},{index},{num},{flist}"


def test_skeleton_keeps_every_value_of_a_multi_valued_field_with_its_weight():
  row, unknown = A.parse_skeleton_line(skeleton().encode(), KNOWN)
  assert unknown == 0
  assert row["sample_id"] == 7 and row["click"] == 1 and row["conversion"] == 0
  assert row["index"] == "a1b2c3d4e5f60718"
  assert row["features"] == {"205": ([11], [1.0]), "210": ([21, 22], [1.0, 1.0]), "853": ([31], [0.5])}


def test_common_row_with_weighted_behaviour_fields():
  flist = items(("101", 5, "1.0"), ("150_14", 8, "2.5"), ("150_14", 9, "0.25"), ("109_14", 4, "3"))
  row, _ = A.parse_common_line(f"ffff000011112222,4,{flist}\r\n", KNOWN)
  assert row["index"] == "ffff000011112222"
  assert row["features"]["150_14"] == ([8, 9], [2.5, 0.25])
  assert row["features"]["109_14"] == ([4], [3.0])


def test_missing_fields_and_an_empty_list_are_fine():
  row, _ = A.parse_skeleton_line(skeleton(num="0", flist=""), KNOWN)
  assert row["features"] == {}
  instance = A.to_raw_instance(row, {"101": ([5], [1.0])})
  assert instance["f_101"] == [5]
  assert instance["f_205"] == [] and instance["f_853"] == [] and instance["w_853"] == []


def test_unknown_fields_are_counted_not_kept():
  row, unknown = A.parse_skeleton_line(skeleton(flist=items(("205", 1, "1.0"), ("999", 2, "1.0"))), KNOWN)
  assert unknown == 1 and set(row["features"]) == {"205"}


def test_join_puts_user_side_first_then_the_skeleton_values():
  row, _ = A.parse_skeleton_line(skeleton(), KNOWN)
  common = {"101": ([5], [1.0]), "150_14": ([8, 9], [2.5, 0.25])}
  inst = A.to_raw_instance(row, common)
  assert inst["f_101"] == [5] and inst["f_150_14"] == [8, 9] and inst["w_150_14"] == [2.5, 0.25]
  assert inst["f_210"] == [21, 22] and inst["click"] == 1 and inst["sample_id"] == 7


@pytest.mark.parametrize("line,reason", [
    (b"\xff\xfe,1,0,abc,0,", A.NOT_UTF8),
    ("1,0,0,abc,0".encode(), A.WRONG_COLUMN_COUNT),
    (skeleton(sample_id="x1").encode(), A.BAD_SAMPLE_ID),
    (skeleton(click="2").encode(), A.BAD_LABEL),
    (skeleton(conversion="").encode(), A.BAD_LABEL),
    (skeleton(index="").encode(), A.BAD_COMMON_FEATURE_INDEX),
    (skeleton(index="ab cd").encode(), A.BAD_COMMON_FEATURE_INDEX),
    (skeleton(num="-1").encode(), A.BAD_FEATURE_NUM),
    (skeleton(num="3").encode(), A.FEATURE_NUM_MISMATCH),
    (skeleton(flist="205\x0211", num="1").encode(), A.BAD_FEATURE_ITEM),
    (skeleton(flist="205\x02abc\x031.0", num="1").encode(), A.BAD_FEATURE_ITEM),
    (skeleton(flist="205\x0211\x03one", num="1").encode(), A.BAD_FEATURE_ITEM),
    (skeleton(flist="853\x0211\x03nan", num="1").encode(), A.BAD_WEIGHT),
    (skeleton(flist="853\x0211\x03-inf", num="1").encode(), A.BAD_WEIGHT),
    (skeleton(flist="853\x0211\x03-0.5", num="1").encode(), A.BAD_WEIGHT),
    (skeleton(click="0", conversion="1").encode(), A.CONVERSION_WITHOUT_CLICK),
])
def test_each_bad_row_reason(line, reason):
  with pytest.raises(BadRecord) as e:
    A.parse_skeleton_line(line, KNOWN)
  assert e.value.reason == reason


def test_bad_common_rows():
  with pytest.raises(BadRecord) as e:
    A.parse_common_line(b"abc,2", KNOWN)
  assert e.value.reason == A.WRONG_COLUMN_COUNT
  with pytest.raises(BadRecord) as e:
    A.parse_common_line(b"abc,2," + items(("101", 1, "1.0")).encode(), KNOWN)
  assert e.value.reason == A.FEATURE_NUM_MISMATCH


def test_record_batches_for_tft_hold_what_its_instance_dict_path_would():
  # The job builds TFT's input RecordBatches itself (pipeline.encode.InstancesToRecordBatch)
  # instead of TFT encoding every instance dict as a tf.Example and decoding it again; both must
  # give the same columns: multi-valued and weighted fields, empty fields, scalar labels.
  from tensorflow_transform.coders import example_proto_coder
  from tfx_bsl.coders import example_coder

  from preprocessing import transform as T

  common, _ = A.parse_common_line(f"u1,2,{items(('101', 5, '1.0'), ('150_14', 9, '0.25'))}".encode(), KNOWN)
  rows = [A.parse_skeleton_line(skeleton(sample_id=str(i), click=str(i % 2)).encode(), KNOWN)[0]
          for i in range(3)]
  rows.append(A.parse_skeleton_line(skeleton(sample_id="9", num="0", flist="").encode(), KNOWN)[0])
  instances = [A.to_raw_instance(r, common["features"]) for r in rows]
  md = T.raw_metadata("aliccp", F.RAW_LABELS)
  schema = encode.raw_tfxio(md).ArrowSchema()
  (built,) = list(encode.InstancesToRecordBatch(schema).process(instances))
  coder = example_proto_coder.ExampleProtoCoder(md.schema)
  decoded = example_coder.ExamplesToRecordBatchDecoder(md.schema.SerializeToString()).DecodeBatch(
      [coder.encode(i) for i in instances])
  assert built.num_rows == 4
  for name in schema.names:
    got = built.column(name).to_pylist()
    want = decoded.column(name).to_pylist()
    assert [v or [] for v in got] == [v or [] for v in want], name
  assert built.column("w_150_14").to_pylist()[0] == [0.25]
  assert built.column("f_210").to_pylist()[3] == []
  assert built.column("click").to_pylist() == [[0], [1], [0], [1]]


def test_the_join_builds_the_same_record_batches_as_the_instance_dicts_would():
  # The job's join builds TFT's input columns straight from the parsed rows (RecordBatchBuilder),
  # without a dict per row; the columns must be those of to_raw_instance + InstancesToRecordBatch,
  # including a field that both the common row and the skeleton fill (common values first).
  from preprocessing import transform as T

  schema = encode.raw_tfxio(T.raw_metadata("aliccp", F.RAW_LABELS)).ArrowSchema()
  common = A.parse_common_line(f"u1,3,{items(('101', 5, '1.0'), ('150_14', 9, '0.25'), ('150_14', 8, '2'))}",
                               KNOWN)[0]["features"]
  rows = [A.parse_skeleton_line(skeleton(sample_id=str(i), click=str(i % 2)), KNOWN)[0] for i in range(3)]
  rows.append(A.parse_skeleton_line(skeleton(sample_id="9", num="0", flist=""), KNOWN)[0])
  rows.append(A.parse_skeleton_line(skeleton(sample_id="10", flist=items(("150_14", 7, "0.5"), ("301", 2, "1"))),
                                    KNOWN)[0])
  builder = A.RecordBatchBuilder(schema)
  for batch in (rows[:2], rows[2:]):   # two builds: the second holds only its own rows
    for r in batch:
      builder.add(r, common)
    built = builder.build()
    (want,) = list(encode.InstancesToRecordBatch(schema).process([A.to_raw_instance(r, common) for r in batch]))
    assert built.schema == want.schema and built.num_rows == len(batch)
    assert built.to_pydict() == want.to_pydict()
  assert len(builder) == 0
  assert built.column("f_150_14").to_pylist()[-1] == [9, 8, 7]
  assert built.column("w_150_14").to_pylist()[-1] == [0.25, 2.0, 0.5]
  assert built.column("f_205").to_pylist()[1] == []


def test_copies_of_a_sample_id_are_compared_as_parsed_rows_not_as_bytes():
  # The job groups skeletons with their feature lists as text by sample id. Two lines that write
  # the same row differently (a weight as 1 or 1.0) are one impression logged twice; rows that
  # differ are a conflict.
  import apache_beam as beam
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that, equal_to

  from pipeline.sources import dedup

  def element(line):
    row = A.parse_skeleton_line(line, KNOWN, features=A.CHECKED)[0]
    return (row["sample_id"], row["click"], row["conversion"], row["index"], *row["features"])

  same = [skeleton(sample_id="1", flist=items(("205", 11, "1.0"))), skeleton(sample_id="1", flist=items(("205", 11, "1")))]
  differ = [skeleton(sample_id="2", flist=items(("205", 11, "1"))), skeleton(sample_id="2", flist=items(("205", 12, "1")))]
  single = [skeleton(sample_id="3")]
  with TestPipeline() as p:
    out = (p | beam.Create([element(l) for l in same + differ + single])
           | dedup.ResolveSampleIds("train", "skeleton", "t", "dead/", lambda e: e[0], "kept",
                                    canonical=A.skeleton_row))
    assert_that(out.rows | beam.Map(lambda e: e[0]), equal_to([1, 3]), label="kept")
    letters = out[dedup.DEAD] | beam.Map(lambda j: (json.loads(j)["reason"], json.loads(j)["sample_id"],
                                                      json.loads(json.loads(j)["row"])["features"]["205"][0]))
    assert_that(letters, equal_to([(dedup.DUPLICATE_SAMPLE_ID, 1, [11]), (dedup.CONFLICTING_SAMPLE_ID, 2, [11]),
                                   (dedup.CONFLICTING_SAMPLE_ID, 2, [12])]), label="dead")


def test_reconcile_names_the_hop_that_lost_rows_without_a_reason():
  # The counters of a 4.4M-impression benchmark run on the multi-process DirectRunner: rows
  # the dedup passed on never reached the join, and nothing set them aside.
  ns = "aliccp/train/"
  counters = {ns + "skeleton_rows_read": 4_000_000, ns + "skeleton_dead/conversion_without_click": 5,
              ns + "skeleton_rows_after_dedup": 3_999_995, ns + "skeleton_rows_joined": 3_723_277,
              ns + F.ROWS_INTO_TRANSFORM: 3_723_277, ns + "rows_written": 3_723_277}
  got = A.reconcile(counters, "train")
  assert not got["skeleton_balanced"]
  assert got["rows_unaccounted_by_hop"] == {"after_dedup->joined": 276_718}
  # The same job without the loss: the parse's and the join's reasons explain every drop.
  counters.update({ns + "skeleton_rows_joined": 3_999_990, ns + "skeleton_dead/unknown_common_feature_index": 5,
                   ns + F.ROWS_INTO_TRANSFORM: 3_999_990, ns + "rows_written": 3_999_990})
  got = A.reconcile(counters, "train")
  assert got["skeleton_balanced"] and got["rows_unaccounted_by_hop"] == {}
  # A loss after the join, and a stage that passed on nothing (its counter never moved).
  counters[ns + "rows_written"] = 3_999_000
  assert A.reconcile(counters, "train")["rows_unaccounted_by_hop"] == {"into_transform->written": 990}
  del counters[ns + F.ROWS_INTO_TRANSFORM], counters[ns + "rows_written"]
  got = A.reconcile(counters, "train")
  assert got["rows_by_stage"]["into_transform"] == got["rows_by_stage"]["written"] == 0
  assert got["rows_unaccounted_by_hop"] == {"joined->into_transform": 3_999_990}


def test_unaccounted_by_hop_without_the_dedup_stage():
  # --nodedup_sample_ids: parse and join reasons both fall on the read -> joined hop.
  stages = {"read": 100, "joined": 80, "into_transform": 80, "written": 80}
  dead = {"bad_label": 12, "unknown_common_feature_index": 8}
  assert unaccounted_by_hop(stages, dead, {"unknown_common_feature_index": "joined"}) == {}
  assert unaccounted_by_hop(dict(stages, joined=70, into_transform=70, written=70), dead,
                            {"unknown_common_feature_index": "joined"}) == {"read->joined": 10}


# Values checked in the dtype they are stored in; a byte-order mark; copies of a common row.

def _read_aliccp(tmp_path, skeleton_bytes: bytes, common_bytes: bytes, want_ids, want_dead):
  """Runs ReadAliCCP on one skeleton and one common file, checks the sample ids it writes and the
  (source, reason) of its dead letters; returns reconcile(...) of its counters."""
  import apache_beam as beam
  from apache_beam.metrics.metric import MetricsFilter
  from apache_beam.testing.util import assert_that, equal_to

  from preprocessing import transform as T

  (tmp_path / "s.csv").write_bytes(skeleton_bytes)
  (tmp_path / "c.csv").write_bytes(common_bytes)
  schema = encode.raw_tfxio(T.raw_metadata("aliccp", F.RAW_LABELS)).ArrowSchema()
  p = beam.Pipeline()
  out = p | A.ReadAliCCP("train", str(tmp_path / "s.csv"), str(tmp_path / "c.csv"), schema, 100)
  ids = out["record_batches"] | beam.FlatMap(lambda b: [v[0] for v in b.column("sample_id").to_pylist()])
  letters = out[A.DEAD] | beam.Map(lambda j: (json.loads(j)["source"], json.loads(j)["reason"]))
  assert_that(ids, equal_to(want_ids), label="ids")
  assert_that(letters, equal_to(want_dead), label="dead")
  result = p.run()
  result.wait_until_finish()
  counters = {f"{c.key.metric.namespace}/{c.key.metric.name}": c.committed
              for c in result.metrics().query(MetricsFilter())["counters"]}
  # The rows the job's writer would count: the rows joined (this test writes nothing).
  counters["aliccp/train/rows_written"] = counters.get("aliccp/train/skeleton_rows_joined", 0)
  return A.reconcile(counters, "train")


@pytest.mark.parametrize("weight", ["1e39", "3.4028236e38", "1e300"])
@pytest.mark.parametrize("source", ["skeleton", "common"])
def test_a_weight_that_overflows_float32_is_set_aside_not_written_as_inf(weight, source):
  # Parsed as a float64 these are finite; stored as the float32 of w_<field> they were inf,
  # passed preprocessing and made training's loss NaN.
  if source == "skeleton":
    line, parse = skeleton(flist=items(("853", 31, weight))).encode(), A.parse_skeleton_line
  else:
    line, parse = f"u1,1,{items(('150_14', 8, weight))}".encode(), A.parse_common_line
  with pytest.raises(BadRecord) as e:
    parse(line, KNOWN)
  assert e.value.reason == A.BAD_WEIGHT and "float32" in e.value.detail


def test_the_largest_float32_weight_is_kept_and_stored_finite():
  import numpy as np

  from preprocessing import transform as T

  biggest = float(np.finfo(np.float32).max)
  row, _ = A.parse_skeleton_line(skeleton(flist=items(("853", 31, repr(biggest)))), KNOWN)
  schema = encode.raw_tfxio(T.raw_metadata("aliccp", F.RAW_LABELS)).ArrowSchema()
  builder = A.RecordBatchBuilder(schema)
  builder.add(row, {})
  stored = builder.build().column("w_853").to_pylist()[0]
  assert stored == [biggest] and np.isfinite(np.float32(stored[0]))


@pytest.mark.parametrize("sample_id,feature_id", [
    ("1000000000000000000", 11), ("9223372036854775807", 9223372036854775807), ("0", 0),
    ("0009223372036854775807", 1)])
def test_every_non_negative_int64_id_is_kept(sample_id, feature_id):
  # 19-digit ids within int64 were set aside as "not a non-negative integer".
  row, _ = A.parse_skeleton_line(skeleton(sample_id=sample_id, flist=items(("205", feature_id, "1.0"))), KNOWN)
  assert row["sample_id"] == int(sample_id) and row["features"]["205"] == ([feature_id], [1.0])
  assert A.is_sample_id(sample_id) and A.is_sample_id(sample_id.encode())
  common, _ = A.parse_common_line(f"u1,1,{items(('101', feature_id, '1'))}", KNOWN)
  assert common["features"]["101"] == ([feature_id], [1.0])


@pytest.mark.parametrize("line,reason", [
    (skeleton(sample_id="9223372036854775808"), A.BAD_SAMPLE_ID),
    (skeleton(sample_id="9" * 30), A.BAD_SAMPLE_ID),
    (skeleton(flist=items(("205", 9223372036854775808, "1.0"))), A.BAD_FEATURE_ITEM),
    (skeleton(flist=items(("205", "1" * 5000, "1.0"))), A.BAD_FEATURE_ITEM),
    (skeleton(num="9" * 5000), A.BAD_FEATURE_NUM),
], ids=["sample_id_2**63", "sample_id_30_digits", "feature_id_2**63", "feature_id_5000_digits", "feature_num_5000_digits"])
def test_an_integer_beyond_int64_is_set_aside_as_out_of_range(line, reason):
  with pytest.raises(BadRecord) as e:
    A.parse_skeleton_line(line, KNOWN)
  assert e.value.reason == reason and "out of int64 range" in e.value.detail
  assert not A.is_sample_id("9223372036854775808") and not A.is_sample_id(b"9223372036854775808")


def test_a_byte_order_mark_at_the_start_of_both_files_costs_no_row(tmp_path):
  # The mark made the first skeleton row a bad_sample_id, the first common row a
  # bad_common_feature_index, and every impression of that common row unknown_common_feature_index.
  bom = b"\xef\xbb\xbf"
  skel = [skeleton(sample_id=str(i), index=f"u{i % 2}") for i in range(6)]
  common = [f"u{k},1,{items(('101', k, '1.0'))}" for k in range(2)]
  rec = _read_aliccp(tmp_path, bom + "\n".join(skel).encode() + b"\n",
                     bom + "\r\n".join(common).encode() + b"\r\n", list(range(6)), [])
  assert rec["skeleton_balanced"] and rec["common_balanced"] and rec["common_rows_used"] == 2


def test_only_the_first_record_of_a_file_loses_a_byte_order_mark_however_it_is_split(tmp_path):
  # Beam reads a file in ranges; only the range that starts at byte 0 holds the file's start,
  # and a mark inside the file (files joined with cat) is data, set aside with its row.
  import apache_beam as beam
  bom = b"\xef\xbb\xbf"
  lines = [skeleton(sample_id=str(i)).encode() for i in range(4)]
  lines = [bom + lines[0], bom + lines[1], lines[2], bom + lines[3]]
  path = tmp_path / "f.csv"
  path.write_bytes(b"\n".join(lines) + b"\n")
  source = A.ReadLines(str(path), coder=beam.coders.BytesCoder())._source
  want = [lines[0][len(bom):]] + lines[1:]
  for size in (1, 3, 7, 40, 1000):
    bundles = list(source.split(desired_bundle_size=size))
    assert len(bundles) > 1 or size == 1000
    got = [r for b in bundles for r in b.source.read(b.source.get_range_tracker(b.start_position, b.stop_position))]
    assert got == want, size
  with pytest.raises(BadRecord) as e:
    A.parse_skeleton_line(lines[1], KNOWN)
  assert e.value.reason == A.BAD_SAMPLE_ID


def test_partition_files_drop_the_byte_order_mark_as_the_reader_does(tmp_path):
  import io

  from pipeline import partition
  data = b"\xef\xbb\xbfu1,0,\r\n\xef\xbb\xbfu2,0,\nu3,0,"
  assert list(partition.records(io.BytesIO(data))) == [b"u1,0,", b"\xef\xbb\xbfu2,0,", b"u3,0,"]


def test_the_daily_jobs_probe_examples_drop_the_byte_order_mark_as_the_reader_does(tmp_path):
  from pipeline import relabel
  from orchestration import daily
  skel = [skeleton(sample_id=str(i), index=f"u{i % 2}") for i in range(4)]
  common = [f"u{k},1,{items(('101', k, '1.0'))}" for k in range(2)]
  probes = {}
  for name, mark in (("plain", b""), ("bom", b"\xef\xbb\xbf")):
    paths = relabel.log_paths(str(tmp_path / name), "20240105")
    (tmp_path / name / "impressions" / "date=20240105").mkdir(parents=True)
    with open(paths["skeleton"], "wb") as f:
      f.write(mark + "\n".join(skel).encode() + b"\n")
    with open(paths["common"], "wb") as f:
      f.write(mark + "\r\n".join(common).encode() + b"\r\n")
    probes[name] = daily.probe_examples(str(tmp_path / name), "20240105")
  assert len(probes["plain"]) == 4 and probes["bom"] == probes["plain"]


def test_copies_of_a_common_row_are_resolved_as_copies_of_a_skeleton_row_are(tmp_path):
  # Identical copies (here written differently: a weight as 1 or 1.0) are one row: one is kept
  # and its impressions are joined. Copies that differ: none is kept, nor their impressions.
  skel = [skeleton(sample_id="1", index="same"), skeleton(sample_id="2", index="same"),
          skeleton(sample_id="3", index="differ"), skeleton(sample_id="4", index="only"),
          skeleton(sample_id="5", index="only")]
  common = [f"same,1,{items(('101', 5, '1.0'))}", f"same,1,{items(('101', 5, '1'))}",
            f"same,1,{items(('101', 5, '1.0'))}",
            f"differ,1,{items(('101', 6, '1'))}", f"differ,1,{items(('101', 7, '1'))}",
            f"only,1,{items(('101', 8, '1'))}"]
  dup = A.DUPLICATE_COMMON_FEATURE_INDEX
  rec = _read_aliccp(tmp_path, "\n".join(skel).encode(), "\n".join(common).encode(),
                     [1, 2, 4, 5], [("common", dup)] * 4 + [("skeleton", dup)])
  assert rec["skeleton_balanced"] and rec["common_balanced"] and rec["rows_unaccounted_by_hop"] == {}
  assert rec["common_rows_set_aside"] == {dup: 4} and rec["common_rows_used"] == 2
  assert rec["skeleton_rows_set_aside"] == {dup: 1}


@pytest.mark.parametrize("flist,num", [
    (items(("205", 11, "1.0"), ("999", 2, "3"), ("210", 0, "0.")), 3),
    (items(("205", "0" * 18, "9" * 38), ("a\x03b", 1, "1.0")), 2),
    (items(("205", "1" * 19, "1.0")), 1), (items(("205", 11, "1e3")), 1), (items(("205", 11, ".5")), 1),
    (items(("205", 11, "9" * 39)), 1), (items(("205", 11, "1e39")), 1), (items(("205", 11, "nan")), 1),
    (items(("205", 11, "-1")), 1), (items(("205", "x", "1")), 1), (items(("205", "\u0663", "1")), 1),
    (items(("205", 11, "1.0")), 2), ("", 0), ("", 1), ("205\x0211", 1), ("\x0211\x031", 1),
    (items(("205", 11, "1.0")) + "\x01", 2), (items(("205", 11, "1.0"), ("109_14", 7, "0.5")), 2),
    (items(("205", 11, "1.0"), ("109_14", "1" * 19, "0.5")), 2), (items(("2050", 11, "1.0")), 1),
], ids=lambda v: repr(v)[:30])
def test_checking_a_feature_list_agrees_with_parsing_it(flist, num):
  # The job's first pass only checks lists (a regular expression over the release's plain form);
  # whatever the full parse accepts or sets aside, and why, the check must say the same.
  try:
    expected = A.parse_feature_list(flist, num, KNOWN)[1]
  except BadRecord as e:
    with pytest.raises(BadRecord) as got:
      A.check_feature_list(flist, num, KNOWN)
    assert got.value.reason == e.reason
  else:
    assert A.check_feature_list(flist, num, KNOWN) == expected
  line = skeleton(num=str(num), flist=flist)
  try:
    full = A.parse_skeleton_line(line, KNOWN)
  except BadRecord as e:
    with pytest.raises(BadRecord) as got:
      A.parse_skeleton_line(line, KNOWN, features=False)
    assert got.value.reason == e.reason
  else:
    checked = A.parse_skeleton_line(line, KNOWN, features=False)
    assert checked[1] == full[1] and checked[0]["features"] is None
    assert {k: v for k, v in checked[0].items() if k != "features"} == {
        k: v for k, v in full[0].items() if k != "features"}


def test_a_list_in_the_release_form_is_checked_without_the_full_parse(monkeypatch):
  def no_parse(*args):
    raise AssertionError("the full parse ran")
  monkeypatch.setattr(A, "parse_feature_list", no_parse)
  flist = items(("205", 11, "1.0"), ("999", 2, "3"), ("109_14", 123456789012345678, "0.693147"))
  assert A.check_feature_list(flist, 3, KNOWN) == 1
  assert A.check_feature_list(items(("205", 11, "1.0"), ("109_14", 5, "0.5")), 2, KNOWN) == 0
  monkeypatch.setattr(A, "parse_skeleton_line", no_parse)
  line = skeleton(sample_id="0042", flist=items(("205", 11, "1.0"), ("216", 5, "2")), num="2")
  assert A.checked_skeleton(line.encode() + b"\r") == ((42, 1, 0, "a1b2c3d4e5f60718", 2, line.rsplit(",", 1)[1]), 0)


def test_a_user_side_item_in_a_skeleton_list_is_found_wherever_it_stands():
  user = sorted(A.USER_FIELDS)
  item = lambda field, value="5": f"{field}{A.FIELD_SEP}{value}{A.VALUE_SEP}1.0"
  for items, want in [([item("205"), item("206")], False),
                      ([item(user[0]), item("205")], True),          # first
                      ([item("205"), item(user[-1])], True),         # last
                      ([item("205"), item("9" + user[0])], False),   # a name that only ends like one
                      ([item("205", user[0])], False),               # a value that reads like one
                      ([], False)]:
    text = A.ITEM_SEP.join(items)
    assert A._has_user_field(text) is want, text
    assert bool(A.user_fields_in({"features": A.parse_feature_list(text, len(items), A.KNOWN_FIELDS)[0]})) is want
