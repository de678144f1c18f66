"""The Avazu-style CSV path: parser, schema, and small Beam/TFT runs (DirectRunner).

Two module-scoped runs feed the Beam tests: synthetic rows with a conversion column and
injected bad rows, and the real 100-row Avazu sample (click only).
"""

import gzip
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from datagen import synthetic
from pipeline import preprocess
from pipeline.sources import avazu as A
from pipeline.sources.deadletter import BadRecord
from preprocessing import features as F
from preprocessing import transform as T

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "avazu_sample.txt")
PUBLIC_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,"
                 "app_category,device_id,device_ip,device_model,device_type,device_conn_type,"
                 "C14,C15,C16,C17,C18,C19,C20,C21")
BUCKETS = 64
SEP = F.CROSS_SEPARATOR


def row(**values):
  """One public-order row (the sample's first row) with some values replaced."""
  base = dict(zip(PUBLIC_HEADER.split(","), (
      "1000009418151094273,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,"
      "07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79").split(",")))
  base.update(values)
  return base


def line(values, columns):
  return ",".join(values[c] for c in columns).encode()


HEADER = A.parse_header(PUBLIC_HEADER)
CONV_COLUMNS = ["C21", "hour", "device_ip", "conversion", "extra", "id"] + [
    c for c in PUBLIC_HEADER.split(",") if c not in ("C21", "hour", "device_ip", "id")]
CONV_HEADER = A.parse_header(",".join(CONV_COLUMNS))


def parse(values, header=HEADER, columns=None):
  return A.parse_line(line(values, columns or header.columns), header)


# Parser.

def test_public_columns_come_from_the_schema():
  assert ",".join(F.AVAZU_COLUMNS) == PUBLIC_HEADER
  assert HEADER.labels == (F.CLICK,) and HEADER.ignored == ()


def test_id_overflowing_int64_is_kept_exactly_as_written():
  for sample_id in ("10000169349117863715", "18446744073709551615", "99999999999999999999999",
                    "0000042"):
    inst = parse(row(id=sample_id))
    assert inst[F.SAMPLE_ID] == sample_id and isinstance(inst[F.SAMPLE_ID], str)


def test_hour_gives_the_day_and_keeps_the_raw_hour_for_the_hour_of_day():
  inst = parse(row(hour="14103023"))
  assert inst[F.DAY] == 20141030 and inst["f_hour"] == [14103023]
  assert A.parse_hour("14102107") == (20141021, 7)
  assert A.parse_hour("16022900") == (20160229, 0)      # leap day
  assert A.parse_hour("00010100") == (20000101, 0)


def test_values_by_type_and_empty_values_are_missing_fields():
  inst = parse(row(C20="-1", site_category="", C14="", device_model="0"))
  assert inst["f_C20"] == [-1] and inst["f_C1"] == [1005] and inst["f_banner_pos"] == [0]
  assert inst["f_site_id"] == ["1fbe01fe"] and inst["f_device_model"] == ["0"]
  assert inst["f_site_category"] == [] and inst["f_C14"] == []
  assert inst[F.CLICK] == 0 and F.CONVERSION not in inst
  fields = [f for f in F.AVAZU_FIELDS if f.transform == F.HASH]
  assert set(inst) == {f.raw_ids for f in fields} | {F.SAMPLE_ID, F.CLICK, F.DAY, "f_hour"}


def test_header_in_another_order_with_an_extra_column():
  assert CONV_HEADER.has_conversion and CONV_HEADER.labels == F.RAW_LABELS
  assert CONV_HEADER.ignored == ("extra",)
  values = row(id="18446744073709551615", click="1", conversion="1", extra="x;y",
               C21="157", device_ip="96809ac8", hour="14102813")
  inst = parse(values, CONV_HEADER)
  assert inst[F.SAMPLE_ID] == "18446744073709551615" and inst[F.CLICK] == 1
  assert inst[F.CONVERSION] == 1 and inst["f_C21"] == [157] and inst["f_device_ip"] == ["96809ac8"]
  assert inst[F.DAY] == 20141028 and inst["f_hour"] == [14102813]
  # The same row in the public order gives the same instance (apart from the label it lacks).
  public = parse(values)
  assert {k: v for k, v in inst.items() if k != F.CONVERSION} == public


def test_header_line_is_recognised_not_parsed():
  raw = (",".join(CONV_COLUMNS) + "\r\n").encode()
  assert A.is_header_line(raw, CONV_HEADER) and not A.is_header_line(raw, HEADER)
  assert not A.is_header_line(line(row(conversion="0", extra=""), CONV_COLUMNS), CONV_HEADER)
  with pytest.raises(BadRecord) as e:
    A.parse_line(raw, CONV_HEADER)
  assert e.value.reason == A.BAD_SAMPLE_ID


@pytest.mark.parametrize("header,columns", [(PUBLIC_HEADER.replace(",click", ""), "['click']"),
                                            ("id,hour,click", "'C1'"),
                                            (PUBLIC_HEADER + ",C1", "duplicate")])
def test_bad_headers(header, columns):
  with pytest.raises(A.BadInput, match=columns):
    A.parse_header(header)


@pytest.mark.parametrize("values,reason", [
    (line(row(), PUBLIC_HEADER.split(",")).replace(b"f3845767", b"\xff\xfe"), A.NOT_UTF8),
    (line(row(), PUBLIC_HEADER.split(",")[:-1]), A.WRONG_COLUMN_COUNT),
    (line(row(), PUBLIC_HEADER.split(",")) + b",1", A.WRONG_COLUMN_COUNT),
    (b"", A.WRONG_COLUMN_COUNT),
    (row(id=""), A.BAD_SAMPLE_ID),
    (row(id="12a4"), A.BAD_SAMPLE_ID),
    (row(id="-12"), A.BAD_SAMPLE_ID),
    (row(id="1" * 41), A.BAD_SAMPLE_ID),
    (row(click="2"), A.BAD_CLICK),
    (row(click=""), A.BAD_CLICK),
    (row(click=" 1"), A.BAD_CLICK),
    (row(hour="1410210"), A.BAD_HOUR),
    (row(hour=""), A.BAD_HOUR),
    (row(hour="14132100"), A.BAD_HOUR),
    (row(hour="14103200"), A.BAD_HOUR),
    (row(hour="15022900"), A.BAD_HOUR),
    (row(hour="14102124"), A.BAD_HOUR),
    (row(hour="1410210a"), A.BAD_HOUR),
    (row(C14="15x06"), A.BAD_INTEGER),
    (row(C20="1.0"), A.BAD_INTEGER),
    (row(C1="+5"), A.BAD_INTEGER),
    (row(banner_pos="-"), A.BAD_INTEGER),
    (row(C21="9223372036854775808"), A.BAD_INTEGER),
])
def test_each_bad_row_reason(values, reason):
  with pytest.raises(BadRecord) as e:
    A.parse_line(values if isinstance(values, bytes) else line(values, PUBLIC_HEADER.split(",")), HEADER)
  assert e.value.reason == reason


@pytest.mark.parametrize("conversion,click,reason", [
    ("2", "1", A.BAD_CONVERSION), ("", "0", A.BAD_CONVERSION), ("1", "0", A.CONVERSION_WITHOUT_CLICK)])
def test_bad_conversion_rows(conversion, click, reason):
  with pytest.raises(BadRecord) as e:
    parse(row(conversion=conversion, click=click, extra=""), CONV_HEADER)
  assert e.value.reason == reason


def test_the_real_avazu_sample_parses_without_a_dead_row():
  lines = open(SAMPLE, "rb").read().splitlines()
  header = A.parse_header(lines[0])
  assert header.columns == F.AVAZU_COLUMNS and not header.has_conversion
  rows = [A.parse_line(l, header) for l in lines[1:]]
  assert len(rows) == 100 and {r[F.DAY] for r in rows} == {20141021}
  assert rows[1][F.SAMPLE_ID] == "10000169349117863715" and int(rows[1][F.SAMPLE_ID]) > 2 ** 63
  assert rows[0]["f_site_id"] == ["1fbe01fe"] and rows[0]["f_C20"] == [-1] and rows[1]["f_C20"] == [100084]


def _quoted(values, columns):
  """The row as an RFC 4180 writer that quotes every value writes it."""
  return ",".join('"' + values[c].replace('"', '""') + '"' for c in columns).encode()


def test_a_quoted_row_gives_the_same_instance_as_the_unquoted_one():
  # "1b552645" was hashed with its quotes, so training and serving (which sends 1b552645) disagreed.
  values = row(device_model="1b552645", C20="-1", site_category="")
  inst = A.parse_line(_quoted(values, HEADER.columns), HEADER)
  assert inst == parse(values) and inst["f_device_model"] == ["1b552645"] and inst["f_site_category"] == []
  mixed = line(values, HEADER.columns).replace(b",1b552645,", b',"1b552645",')
  assert A.parse_line(mixed, HEADER) == inst


def test_a_quoted_value_may_hold_commas_and_doubled_quotes_and_a_quoted_header_is_read():
  values = row(device_model='a,"b"', site_id="x,y,z")
  header = A.parse_header(",".join(f'"{c}"' for c in PUBLIC_HEADER.split(",")))
  assert header.columns == HEADER.columns
  inst = A.parse_line(_quoted(values, HEADER.columns), header)
  assert inst["f_device_model"] == ['a,"b"'] and inst["f_site_id"] == ["x,y,z"]
  assert A.split_values('a,"b,c","d""e",,""') == ["a", "b,c", 'd"e', "", ""]


@pytest.mark.parametrize("text", ['1,"ab', '"a"b,c', 'a"b,c', '"a" ,b', 'cd",x'])
def test_a_quote_that_does_not_open_or_close_a_whole_value_is_bad_quoting(text):
  with pytest.raises(BadRecord) as e:
    A.split_values(text)
  assert e.value.reason == A.BAD_QUOTING


def test_a_quoted_value_cut_by_a_line_break_sets_both_lines_aside_as_bad_quoting():
  # The text source makes one row of each line, so the row cannot be put back together.
  data = _quoted(row(device_model="two\nlines"), HEADER.columns)
  first, second = data.split(b"\n")
  for half in (first, second):
    with pytest.raises(BadRecord) as e:
      A.parse_line(half, HEADER)
    assert e.value.reason == A.BAD_QUOTING and e.value.detail


@pytest.mark.parametrize("value,want", [("9223372036854775807", 9223372036854775807),
                                        ("-9223372036854775808", -(1 << 63)), ("0000000000000000000000079", 79)])
def test_every_int64_value_of_an_integer_column_is_kept(value, want):
  assert parse(row(C21=value))["f_C21"] == [want]


@pytest.mark.parametrize("value", ["9223372036854775808", "-9223372036854775809", "9" * 25, "1" * 5000],
                         ids=["2**63", "-2**63-1", "25_digits", "5000_digits"])
def test_an_integer_beyond_int64_is_set_aside_as_out_of_range_not_as_not_an_integer(value):
  with pytest.raises(BadRecord) as e:
    parse(row(C21=value))
  assert e.value.reason == A.BAD_INTEGER and "out of int64 range" in e.value.detail


# Schema: fields, crosses, raw specs.

def test_crosses_and_fields_for_buckets():
  crosses = F.parse_crosses("avazu")
  assert [c.name for c in crosses] == ["app_id_x_device_id", "site_id_x_device_id"]
  assert all(c.side == "cross" and c.crossed == tuple(c.name.split("_x_")) for c in crosses)
  assert F.parse_crosses("avazu", []) == () and F.parse_crosses("aliccp") == ()
  for bad in (["app_id"], ["app_id:nope"], ["hour_of_day:app_id"], ["app_id:app_id"],
              ["C1:C14", "C1:C14"]):
    with pytest.raises(ValueError):
      F.parse_crosses("avazu", bad)
  with pytest.raises(ValueError, match="weighted"):
    F.parse_crosses("aliccp", ["150_14:205"])
  buckets = F.hash_buckets("avazu", BUCKETS, crosses)
  assert buckets["device_ip"] == BUCKETS and buckets["hour_of_day"] == 24
  assert F.hash_buckets("avazu", None, crosses)["app_id_x_device_id"] == F.DEFAULT_CROSS_BUCKETS
  names = list(reversed(list(buckets)))          # order of the names does not matter
  got = F.fields_for_buckets("avazu", names)
  assert [f.name for f in got] == [f.name for f in F.AVAZU_FIELDS] + sorted(c.name for c in crosses)
  assert got[-1] == crosses[1] and got[0].transform == F.HOUR_OF_DAY
  assert F.fields_for_buckets("aliccp", {"205": 8, "101": 8}) == (F.field("aliccp", "101"),
                                                                 F.field("aliccp", "205"))
  with pytest.raises(ValueError):
    F.fields_for_buckets("avazu", ["site_id", "bogus"])


def test_raw_specs():
  spec = T.raw_feature_spec("avazu", labels=[F.CLICK])
  assert spec["f_site_id"].dtype == tf.string and spec["f_C20"].dtype == tf.int64
  assert spec["f_hour"].dtype == tf.int64 and spec[F.SAMPLE_ID].dtype == tf.string
  assert spec[F.DAY].dtype == tf.int64 and F.CONVERSION not in spec and F.CLICK in spec
  serving = T.raw_feature_spec("avazu", with_labels=False, with_sample_id=False)
  assert all(isinstance(s, tf.io.VarLenFeature) for s in serving.values())
  assert set(serving) == {f.raw_ids for f in F.AVAZU_FIELDS}
  ali = T.raw_feature_spec("aliccp")
  assert ali[F.SAMPLE_ID].dtype == tf.int64 and F.DAY not in ali and ali["f_205"].dtype == tf.int64
  ex = T.raw_example({"f_site_id": ["1fbe01fe"], "f_C1": [1005], "f_app_id": [],
                      F.SAMPLE_ID: "18446744073709551615"}, "avazu")
  assert ex.features.feature["f_site_id"].bytes_list.value == [b"1fbe01fe"]
  assert ex.features.feature[F.SAMPLE_ID].bytes_list.value == [b"18446744073709551615"]
  assert ex.features.feature["f_C1"].int64_list.value == [1005] and "f_app_id" not in ex.features.feature


def test_preprocessing_fn_crosses_every_pair_of_values():
  # A cross of two multi-valued Ali-CCP fields: every pair; a missing side: nothing.
  crosses = F.parse_crosses("aliccp", "210:205")
  base = {F.CLICK: 1, F.CONVERSION: 0, F.SAMPLE_ID: 7}
  examples = [T.raw_example(dict(base, f_205=[11], f_210=[21, 22]), "aliccp").SerializeToString(),
              T.raw_example(dict(base, f_210=[21]), "aliccp").SerializeToString()]
  with tf.Graph().as_default():
    raw = tf.io.parse_example(examples, T.raw_feature_spec("aliccp"))
    out = T.make_preprocessing_fn("aliccp", 1024, crosses)(raw)
    with tf.compat.v1.Session() as sess:
      got = sess.run(out["id_210_x_205"])
  want = tf.strings.to_hash_bucket_fast(["21" + SEP + "11", "22" + SEP + "11"], 1024).numpy()
  np.testing.assert_array_equal(got.indices[:, 0], [0, 0])
  np.testing.assert_array_equal(got.values, want)


# Input selection (launcher side, no pipeline).

def _write(path, header, rows):
  with open(path, "w") as f:
    f.write(header + "\n")
    for r in rows:
      f.write(",".join(r[c] for c in header.split(",")) + "\n")


def test_input_dir_release_names_and_explicit_patterns(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  with pytest.raises(preprocess.UsageError, match="no train file"):
    preprocess._input_patterns(str(raw), {}, "avazu")
  for name in ("train_20141021.csv", "train_20141022.csv", "test.csv", "ground_truth_train.csv"):
    _write(raw / name, PUBLIC_HEADER, [row()])
  pats = preprocess._input_patterns(str(raw), {}, "avazu")
  assert pats["train"]["files"] == [str(raw / "train*.csv")]
  inputs = A.scan_inputs({s: p["files"] for s, p in pats.items()})
  assert [os.path.basename(f) for f in inputs.files["train"]] == ["train_20141021.csv", "train_20141022.csv"]
  assert [os.path.basename(f) for f in inputs.files["eval"]] == ["test.csv"]
  with gzip.open(raw / "test_20141023.csv.gz", "wt") as f:          # compressed, by extension
    f.write(",".join(reversed(PUBLIC_HEADER.split(","))) + "\n")
  pats = preprocess._input_patterns(str(raw), {}, "avazu")
  assert pats["eval"]["files"] == [str(raw / "test*.csv"), str(raw / "test*.csv.gz")]
  inputs = A.scan_inputs({"eval": pats["eval"]["files"]})
  assert [inputs.headers[f].columns[0] for f in inputs.files["eval"]] == ["id", "C21"]
  pats = preprocess._input_patterns(None, {"train_files": str(raw / "train_20141022.csv"),
                                           "eval_files": [str(raw / "test.csv")]}, "avazu")
  assert pats == {"train": {"files": [str(raw / "train_20141022.csv")]},
                  "eval": {"files": [str(raw / "test.csv")]}}
  with pytest.raises(A.BadInput, match="matched twice"):
    A.scan_inputs({"train": [str(raw / "train*.csv")], "eval": [str(raw / "train_20141021.csv")]})
  with pytest.raises(preprocess.UsageError, match="no file matches"):
    preprocess._input_patterns(None, {"train_files": str(raw / "nope*.csv"), "eval_files": "x"}, "avazu")


def test_files_disagreeing_on_conversion_fail_before_anything_is_written(tmp_path):
  _write(tmp_path / "train.csv", ",".join(CONV_COLUMNS), [row(conversion="0", extra="")])
  out = tmp_path / "out"
  patterns = {"train": {"files": [str(tmp_path / "train.csv")]}, "eval": {"files": [SAMPLE]}}
  with pytest.raises(preprocess.UsageError, match="agree on the 'conversion' column") as e:
    preprocess.run("avazu", patterns, str(out), [], max_hash_buckets=BUCKETS)
  assert "train.csv" in str(e.value) and "avazu_sample.txt" in str(e.value)
  assert not out.exists()
  with pytest.raises(preprocess.UsageError, match="crosses"):
    preprocess.run("avazu", {"train": {"files": [SAMPLE]}, "eval": {"files": [SAMPLE]}}, str(out), [],
                   crosses=["app_id:bogus"])


# Beam/TFT runs.

def _split_with_another_column_order(path, second, seed):
  """Moves the second half of a CSV into ``second``, its columns in another order."""
  lines = open(path, "rb").read().splitlines()
  header = lines[0].split(b",")
  order = np.random.default_rng(seed).permutation(len(header))
  half = 1 + (len(lines) - 1) // 2
  with open(path, "wb") as f:
    f.write(b"\n".join(lines[:half]) + b"\n")
  with open(second, "wb") as f:
    for l in [lines[0]] + lines[half:]:
      cells = l.split(b",")
      if len(cells) == len(header):
        cells = [cells[i] for i in order]
      f.write(b",".join(cells) + b"\n")


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("avazu")
  raw = str(root / "raw")
  summary = synthetic.generate_avazu(raw, num_train=3000, num_test=1000, num_days=3, num_devices=400,
                                     bad_rows=16, seed=11)
  _split_with_another_column_order(os.path.join(raw, "train.csv"), os.path.join(raw, "train_2.csv"), 5)
  out = str(root / "out")
  rec = preprocess.run("avazu", preprocess._input_patterns(raw, {}, "avazu"), out, [],
                       max_hash_buckets=BUCKETS)
  return {"raw": raw, "out": out, "rec": rec, "summary": summary,
          "tft_output": tft.TFTransformOutput(out)}


def _records(out, split, spec):
  """The transformed examples of a split as Python values: id lists, ints, bytes."""
  files = tf.io.gfile.glob(os.path.join(out, split, "part-*.tfrecord.gz"))
  serialized = [r.numpy() for r in tf.data.TFRecordDataset(files, "GZIP")]
  parsed = tf.io.parse_example(serialized, spec)
  records = [{} for _ in serialized]
  for name, t in parsed.items():
    if isinstance(t, tf.SparseTensor):
      for r in records:
        r[name] = []
      for i, v in zip(t.indices.numpy()[:, 0], t.values.numpy().tolist()):
        records[i][name].append(v)
    else:
      for r, v in zip(records, t.numpy().tolist()):
        r[name] = v
  return records


def _csv_rows(raw, names):
  """The good rows of the raw files, parsed in memory, by sample id."""
  rows = {}
  for name in names:
    lines = open(os.path.join(raw, name), "rb").read().splitlines()
    header = A.parse_header(lines[0])
    for l in lines[1:]:
      try:
        inst = A.parse_line(l, header)
      except BadRecord:
        continue
      rows[inst[F.SAMPLE_ID]] = inst
  return rows


def _want_ids(field, insts, buckets):
  """The ids the transform must give ``field`` of raw instances, computed independently."""
  def text(inst, name):
    return [str(v) for v in inst["f_" + name]]
  if field.transform == F.HOUR_OF_DAY:
    return [[inst["f_hour"][0] % 100] for inst in insts]
  values = [[a + SEP + b for a in text(i, field.crossed[0]) for b in text(i, field.crossed[1])]
            if field.is_cross else text(i, field.name) for i in insts]
  flat = [v for vs in values for v in vs]
  hashed = tf.strings.to_hash_bucket_fast(flat, buckets).numpy().tolist() if flat else []
  out, k = [], 0
  for vs in values:
    out.append(hashed[k:k + len(vs)])
    k += len(vs)
  return out


def test_every_row_is_written_or_set_aside_with_its_reason(conv_run):
  rec, train_summary = conv_run["rec"], conv_run["summary"][0]
  train = rec["train"]
  injected = train_summary["bad_rows"]
  assert len(injected) == 8 and all(n == 2 for n in injected.values())
  assert train["balanced"] and rec["eval"]["balanced"]
  assert train["files"] == 2 and train["header_lines"] == 2
  assert train["rows_read"] == 3000 + 16 and train["rows_written"] == 3000
  assert train["rows_set_aside"] == injected and train["rows_unaccounted_by_hop"] == {}
  # The positive labels written, counted from the raw test file (the trainer's base rates).
  with open(os.path.join(conv_run["raw"], "test.csv")) as f:
    header = f.readline().rstrip("\n").split(",")
    rows = [dict(zip(header, line.rstrip("\n").split(","))) for line in f]
  clicks, conversions = sum(int(r["click"]) for r in rows), sum(int(r["conversion"]) for r in rows)
  assert rec["eval"]["label_positives"] == {"click": clicks, "conversion": conversions, "ctcvr": conversions}
  assert {k: v for k, v in rec["eval"].items() if k != "label_positives"} == {
                         "files": 1, "header_lines": 1, "rows_read": 1000, "rows_written": 1000,
                         "rows_set_aside": {}, "balanced": True,
                         "rows_by_stage": {"read": 1000, "after_dedup": 1000, "into_transform": 1000,
                                           "written": 1000},
                         "rows_unaccounted_by_hop": {}}
  dead = [json.loads(l) for p in tf.io.gfile.glob(os.path.join(conv_run["out"], "dead_letter", "train*"))
          for l in open(p) if l.strip()]
  assert sorted(d["reason"] for d in dead) == sorted(r for r, n in injected.items() for _ in range(n))
  assert {os.path.basename(d["file"]) for d in dead} <= {"train.csv", "train_2.csv"}
  marker = json.load(open(os.path.join(conv_run["out"], "reconciliation.json")))
  assert marker["format"] == "avazu" and marker["labels"] == ["click", "conversion"]
  assert marker["crosses"] == ["app_id_x_device_id", "site_id_x_device_id"]
  assert marker["ignored_columns"] == [synthetic.AVAZU_EXTRA_COLUMN]
  assert marker["splits"]["train"] == train


def test_transformed_schema_has_every_field_with_its_int_domain(conv_run):
  tft_output = conv_run["tft_output"]
  buckets = T.transformed_hash_buckets(tft_output)
  crosses = F.parse_crosses("avazu")
  assert buckets == F.hash_buckets("avazu", BUCKETS, crosses)
  assert buckets["hour_of_day"] == 24 and buckets["app_id_x_device_id"] == BUCKETS
  assert F.fields_for_buckets("avazu", buckets) == F.AVAZU_FIELDS + crosses
  spec = tft_output.transformed_feature_spec()
  assert spec[F.SAMPLE_ID].dtype == tf.string and spec[F.DAY].dtype == tf.int64
  assert {F.CLICK, F.CONVERSION, F.CTCVR} <= set(spec)
  assert not any(k.startswith(F.RAW_ID_PREFIX) for k in spec)


def test_records_hold_the_hashed_values_of_their_own_rows(conv_run):
  out, raw = conv_run["out"], conv_run["raw"]
  spec = conv_run["tft_output"].transformed_feature_spec()
  buckets = T.transformed_hash_buckets(conv_run["tft_output"])
  schema = F.fields_for_buckets("avazu", buckets)
  rows = _csv_rows(raw, ["train.csv", "train_2.csv"])
  records = _records(out, "train", spec)
  assert len(records) == 3000
  ids = [r[F.SAMPLE_ID].decode() for r in records]
  assert sorted(ids) == sorted(rows) and any(int(i) > 2 ** 63 for i in ids)
  assert {r[F.DAY] for r in records} == {20141021, 20141022, 20141023}
  truth = {l.split(",")[0] for l in open(os.path.join(raw, "ground_truth_train.csv")).readlines()[1:]}
  assert truth == set(ids)
  insts = [rows[i] for i in ids]
  for rec, inst in zip(records, insts):
    assert (rec[F.CLICK], rec[F.CONVERSION]) == (inst[F.CLICK], inst[F.CONVERSION])
    assert rec[F.CTCVR] == inst[F.CLICK] * inst[F.CONVERSION] and rec[F.DAY] == inst[F.DAY]
  assert sum(r[F.CTCVR] for r in records) > 0
  for field in schema:
    want = _want_ids(field, insts, buckets[field.name])
    assert [r[field.ids] for r in records] == want, field.name
    assert sum(map(len, want)) > 0.9 * len(records), field.name
  eval_days = {r[F.DAY] for r in _records(out, "eval", spec)}
  assert eval_days == {20141024}


def _serve(tft_output, serialized):
  """The serving receiver's path: raw tf.Examples -> parse -> TFT graph (in a v1 graph)."""
  with tf.Graph().as_default():
    examples = tf.compat.v1.placeholder(tf.string, [None])
    raw = tf.io.parse_example(examples, T.raw_feature_spec("avazu", with_labels=False,
                                                           with_sample_id=False))
    transformed = tft_output.transform_raw_features(raw, drop_unused_features=True)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.tables_initializer())
      got = sess.run(transformed, {examples: serialized})
  out = []
  for i in range(len(serialized)):
    out.append({k: v.values[v.indices[:, 0] == i].tolist() for k, v in got.items()
                if hasattr(v, "indices")})
  return out


def test_serving_graph_transforms_raw_examples_like_the_job(conv_run):
  tft_output = conv_run["tft_output"]
  buckets = T.transformed_hash_buckets(tft_output)
  schema = F.fields_for_buckets("avazu", buckets)
  rows = _csv_rows(conv_run["raw"], ["test.csv"])
  spec = tft_output.transformed_feature_spec()
  records = _records(conv_run["out"], "eval", spec)[:40]
  insts = [rows[r[F.SAMPLE_ID].decode()] for r in records]
  client = lambda inst: {k: v for k, v in inst.items() if k.startswith(F.RAW_ID_PREFIX)}
  partial = {"f_app_id": ["ecad2386"], "f_hour": [14102917]}          # no device_id, no site_id
  serialized = [T.raw_example(client(i), "avazu").SerializeToString() for i in insts] + [
      tf.train.Example().SerializeToString(),
      T.raw_example(partial, "avazu").SerializeToString()]
  served = _serve(tft_output, serialized)
  for rec, got in zip(records, served):
    for field in schema:
      assert got[field.ids] == rec[field.ids], field.name
  empty, part = served[-2], served[-1]
  assert set(empty) == {f.ids for f in schema} and all(v == [] for v in empty.values())
  assert part["id_hour_of_day"] == [17]
  assert [part["id_app_id"]] == _want_ids(F.field("avazu", "app_id"), [partial], buckets["app_id"])
  assert part["id_app_id_x_device_id"] == [] and part["id_site_id_x_device_id"] == []


def test_click_only_run_on_the_real_sample(tmp_path):
  # The eval split: the same rows with the columns in reverse order (read by name).
  lines = open(SAMPLE).read().splitlines()
  eval_file = tmp_path / "test_reversed.csv"
  eval_file.write_text("\n".join(",".join(reversed(l.split(","))) for l in lines) + "\n")
  train_file = tmp_path / "train.csv"
  shutil.copyfile(SAMPLE, train_file)
  out = str(tmp_path / "out")
  rec = preprocess.run("avazu", preprocess._input_patterns(str(tmp_path), {}, "avazu"), out, [],
                       max_hash_buckets=BUCKETS, crosses=["site_id:device_ip"])
  for split in ("train", "eval"):
    assert rec[split]["rows_read"] == 100 and rec[split]["rows_written"] == 100
    assert rec[split]["rows_set_aside"] == {} and rec[split]["balanced"]
  marker = json.load(open(os.path.join(out, "reconciliation.json")))
  assert marker["labels"] == ["click"] and marker["crosses"] == ["site_id_x_device_ip"]
  tft_output = tft.TFTransformOutput(out)
  spec = tft_output.transformed_feature_spec()
  assert F.CLICK in spec and F.CONVERSION not in spec and F.CTCVR not in spec
  assert "id_site_id_x_device_ip" in spec and "id_app_id_x_device_id" not in spec
  train = {r[F.SAMPLE_ID]: r for r in _records(out, "train", spec)}
  evals = {r[F.SAMPLE_ID]: r for r in _records(out, "eval", spec)}
  assert set(train) == set(evals) and b"10000169349117863715" in train
  assert sum(r[F.CLICK] for r in train.values()) == sum(l.split(",")[1] == "1" for l in lines[1:])
  for sid, r in train.items():
    for name in ("id_site_id", "id_C20", "id_hour_of_day", "id_site_id_x_device_ip"):
      assert r[name] == evals[sid][name], name


# The model side on Avazu-style output: crosses and hour of day are embedded, string
# sample ids align with the ground truth, and a click-only output is refused up front.

def test_esmm_trains_on_avazu_output_and_serves_raw_examples(conv_run, tmp_path):
  from model_fn import estimator as E
  from model_fn import evaluation
  out = conv_run["out"]
  buckets = T.transformed_hash_buckets(conv_run["tft_output"])
  assert {"hour_of_day", "app_id_x_device_id", "site_id_x_device_id"} <= set(buckets)
  params = {"model": "ple", "format": "avazu", "hash_buckets": buckets, "embedding_dim": 4,
            "num_task_experts": 1, "num_shared_experts": 1, "expert_hidden_units": [8],
            "tower_hidden_units": [4]}
  model_dir = str(tmp_path / "model")
  result = E.train_and_evaluate(out, model_dir, params, batch_size=128, train_steps=20,
                                save_checkpoints_steps=20)
  assert np.isfinite(result["metrics"]["auc/ctr"])
  report, curves = evaluation.evaluate([("ple", model_dir)], out,
                                       os.path.join(conv_run["raw"], "ground_truth_test.csv"))
  assert report["ple"]["examples"] == conv_run["rec"]["eval"]["rows_written"]
  assert 0.5 < report["oracle"]["auc/cvr_all_vs_truth"] <= 1
  p = evaluation.predict(model_dir, out)
  rows = _csv_rows(conv_run["raw"], ["test.csv"])
  ids = [i.decode() for i in p["sample_id"][:50]]
  assert any(int(i) >= 2 ** 63 for i in rows)       # ids past int64 exist and are served
  client = lambda inst: {k: v for k, v in inst.items() if k.startswith(F.RAW_ID_PREFIX)}
  serialized = [T.raw_example(client(rows[i]), "avazu").SerializeToString() for i in ids]
  loaded = tf.saved_model.load(result["saved_model"])
  got = loaded.signatures["regression"](inputs=tf.constant(serialized))["outputs"].numpy().reshape(-1)
  np.testing.assert_allclose(got, p["cvr"][:50], rtol=1e-5, atol=1e-7)


def test_training_on_a_click_only_output_stops_naming_the_missing_label(tmp_path):
  import subprocess
  import sys
  from model_fn import estimator as E
  from model_fn import input_fn as I
  shutil.copyfile(SAMPLE, tmp_path / "train.csv")
  shutil.copyfile(SAMPLE, tmp_path / "test.csv")
  out = str(tmp_path / "out")
  preprocess.run("avazu", preprocess._input_patterns(str(tmp_path), {}, "avazu"), out, [],
                 max_hash_buckets=BUCKETS)
  buckets = T.transformed_hash_buckets(tft.TFTransformOutput(out))
  for model in ("esmm", "mmoe"):
    model_dir = tmp_path / model
    with pytest.raises(I.MissingLabelError, match="'conversion'"):
      E.train_and_evaluate(out, str(model_dir), {"model": model, "format": "avazu", "hash_buckets": buckets},
                           batch_size=32, train_steps=5)
    assert not model_dir.exists()        # stopped before anything was written
  cli = subprocess.run([sys.executable, "-m", "model_fn.train", f"--transform_dir={out}",
                        f"--model_dir={tmp_path / 'cli'}", "--model=mmoe"],
                       capture_output=True, text=True, timeout=120)
  assert cli.returncode == 2
  assert "no 'conversion' / 'ctcvr'" in cli.stderr and "click-only" in cli.stderr
  assert not (tmp_path / "cli").exists()
