"""The raw Ali-CCP parser against hand-written lines."""

import json

import pytest

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
  # The job builds TFT's input RecordBatches itself (preprocessing.transform.InstancesToRecordBatch)
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
  schema = T.raw_tfxio(md).ArrowSchema()
  (built,) = list(T.InstancesToRecordBatch(schema).process(instances))
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

  schema = T.raw_tfxio(T.raw_metadata("aliccp", F.RAW_LABELS)).ArrowSchema()
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
    (want,) = list(T.InstancesToRecordBatch(schema).process([A.to_raw_instance(r, common) for r in batch]))
    assert built.schema == want.schema and built.num_rows == len(batch)
    assert built.to_pydict() == want.to_pydict()
  assert len(builder) == 0
  assert built.column("f_150_14").to_pylist()[-1] == [9, 8, 7]
  assert built.column("w_150_14").to_pylist()[-1] == [0.25, 2.0, 0.5]
  assert built.column("f_205").to_pylist()[1] == []


def test_copies_of_a_sample_id_are_compared_as_parsed_rows_not_as_bytes():
  # The job groups raw lines by sample id. Two lines that write the same row differently (a
  # weight as 1 or 1.0) are one impression logged twice; rows that differ are a conflict.
  import apache_beam as beam
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that, equal_to

  from pipeline.sources import dedup

  def element(line):
    row = A.parse_skeleton_line(line, KNOWN)[0]
    return row["sample_id"], row["index"], line.encode()

  same = [skeleton(sample_id="1", flist=items(("205", 11, "1.0"))), skeleton(sample_id="1", flist=items(("205", 11, "1")))]
  differ = [skeleton(sample_id="2", flist=items(("205", 11, "1"))), skeleton(sample_id="2", flist=items(("205", 12, "1")))]
  single = [skeleton(sample_id="3")]
  with TestPipeline() as p:
    out = (p | beam.Create([element(l) for l in same + differ + single])
           | dedup.ResolveSampleIds("train", "skeleton", "t", "dead/", lambda e: e[0], "kept",
                                    canonical=A.parsed_skeleton))
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
