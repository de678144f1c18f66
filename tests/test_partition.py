"""A partitioned Ali-CCP job (--partitions, pipeline/partition.py) writes what the whole job writes.

The inputs are damaged (fuzz.py's mutations, duplicates and conflicts, files with CRLF ends and
cut last lines) and hold the case the partitions must not miss: copies of one sample id that name
different common-feature rows, so they fall into different partitions.
"""

import collections
import glob
import gzip
import io
import json
import os
import random
import signal

import pytest
import tensorflow as tf
from google.protobuf import json_format

from datagen import fuzz, synthetic
from pipeline import partition, preprocess
from pipeline.sources import aliccp as ALI

PARTS = 3


def _with(line: bytes, sample_id: int, index: bytes, click: bytes = None) -> bytes:
  cells = line.split(b",", 5)
  cells[0], cells[3] = str(sample_id).encode(), index
  if click is not None:
    cells[1] = click
  return b",".join(cells)


def _parses(parse, line) -> bool:
  try:
    parse(line, ALI.KNOWN_FIELDS)
    return True
  except ALI.BadRecord:
    return False


def _cross_partition_cases(skeleton, common):
  """Copies of sample ids whose indexes lie in different partitions, and what must happen to them.
  The indexes are of common rows that are valid and there once, so the kept copies are written."""
  counts = collections.Counter(c.split(b",", 1)[0] for c in common)
  indexes = [c.split(b",", 1)[0] for c in common
             if counts[c.split(b",", 1)[0]] == 1 and _parses(ALI.parse_common_line, c)]
  first = indexes[0]
  other = next(i for i in indexes if partition.partition_of(i, PARTS) != partition.partition_of(first, PARTS))
  base = next(line for line in skeleton if _parses(ALI.parse_skeleton_line, line))
  lines = [
      _with(base, 990001, first), _with(base, 990001, other),                      # both set aside
      _with(base, 990002, first), _with(base, 990002, other, click=b"7"),           # one bad: the other kept
      _with(base, 990003, first), _with(base, 990003, first), _with(base, 990003, other),   # all 3 aside
      _with(base, 990004, first), _with(base, 990004, first),                      # duplicate: one kept
  ]
  return lines, {990001: 2, 990003: 3}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("partition")
  src = root / "src"
  synthetic.generate(str(src), num_train=1500, num_test=300, num_users=200, num_items=400,
                     impressions_per_common=5, anomalies=3, seed=11)
  rng = random.Random(5)
  row = fuzz.Row(fuzz.ALICCP)
  out = root / "raw"
  os.makedirs(out)
  conflicts = {}
  for release in ("train", "test"):
    read = lambda name: open(src / f"{name}_{release}.csv", "rb").read().splitlines()
    skeleton, common = read("sample_skeleton"), read("common_features")
    skeleton = fuzz.mutate_lines(skeleton, rng, row, fraction=0.1, duplicate_fraction=0.03, conflict_fraction=0.02)
    common = fuzz.mutate_lines(common, rng, row, fraction=0.05, duplicate_fraction=0.02, conflict_fraction=0)
    if release == "train":
      extra, conflicts = _cross_partition_cases(skeleton, common)
      rng.shuffle(skeleton)
      skeleton = extra + skeleton   # first: file_bytes may cut a file's last line
    half = len(skeleton) // 2
    for name, chunk in ((f"sample_skeleton_{release}_0.csv", skeleton[:half]),
                        (f"sample_skeleton_{release}_1.csv", skeleton[half:]),
                        (f"common_features_{release}_0.csv", common)):
      (out / name).write_bytes(fuzz.file_bytes(chunk, rng))
  patterns = {s: {"skeleton": str(out / f"sample_skeleton_{r}_*.csv"),
                  "common": str(out / f"common_features_{r}_*.csv")} for s, r in preprocess.SPLITS}
  return {"root": root, "patterns": patterns, "conflicts": conflicts}


@pytest.fixture(scope="module")
def runs(raw):
  kw = dict(max_hash_buckets=512, max_dead_letter_fraction=1.0)
  whole = str(raw["root"] / "whole")
  parts = str(raw["root"] / "parts")
  return {"whole": (whole, preprocess.run("aliccp", raw["patterns"], whole, [], **kw)),
          "parts": (parts, preprocess.run("aliccp", raw["patterns"], parts, [], partitions=PARTS,
                                          parallel_partitions=2, **kw))}


def test_records_and_lines_round_trip_as_the_text_reader_reads_them():
  # What Beam 2.54's ReadFromText(coder=BytesCoder()) gave for these files, checked by hand.
  for data, beam_records in ((b"a\ntail\r", [b"a", b"tail\r"]),
                             (b"a\r\r\nb\r\n\n\rc", [b"a\r", b"b", b"", b"\rc"])):
    assert list(partition.records(io.BytesIO(data))) == fuzz.records(data) == beam_records
  rng = random.Random(3)
  lines = [b"a,b", b"", b"c\r", b"\rd", b"e\r\r", b"x" * 50]
  for _ in range(200):
    data = fuzz.file_bytes(rng.sample(lines, rng.randint(0, len(lines))), rng)
    if rng.random() < 0.2:
      data += b"tail\r"                       # a last line that ends with \r and no \n
    want = fuzz.records(data)
    got = list(partition.records(io.BytesIO(data)))
    assert got == want, data
    assert fuzz.records(b"".join(partition.record_line(r) for r in got)) == want


def test_a_record_that_starts_with_a_byte_order_mark_reads_back_from_its_partition(tmp_path):
  # A mark inside an input is data (its row is set aside); first in a partition file, the reader
  # would take it for the file's own mark, but for the one each partition file starts with.
  from pipeline.sources import lines
  bom = b"\xef\xbb\xbf"
  rows = [bom + b"7,1,0,u1,1,205\x0211\x031", b"8,1,0,u1,1,205\x0211\x031", bom + b"9,1,0,u1,1,205\x0211\x031\r"]
  for kind, data in (("skeleton", b"8,1,0,u1,1,205\x0211\x031\n" + b"\n".join(rows)), ("common", b"u1,1,205\x0211\x031")):
    (tmp_path / f"{kind}.csv").write_bytes(data)
  patterns = {"train": {kind: str(tmp_path / f"{kind}.csv") for kind in partition.KINDS}}
  parts = partition.split_inputs(patterns, 2, str(tmp_path / "parts"))
  (part,) = [q["train"]["skeleton"] for q in parts.patterns if open(q["train"]["skeleton"], "rb").read()]
  got = [r for b in lines.read_range(part, 0, -1) for r in b]
  assert got == [b"8,1,0,u1,1,205\x0211\x031"] + rows
  assert got == list(partition.records(io.BytesIO(open(part, "rb").read())))


def _block_sample_ids(out):
  ids = []
  for r in tf.data.TFRecordDataset(glob.glob(os.path.join(out, "train_blocks", "part-*.tfrecord.gz")), "GZIP"):
    ids += tf.io.parse_single_example(r, {"sample_id": tf.io.VarLenFeature(tf.int64)})["sample_id"].values.numpy().tolist()
  return sorted(ids)


def test_partitions_without_train_examples_write_the_whole_jobs_rows_as_blocks(raw, runs, tmp_path):
  """--notrain_examples with --partitions: every partition writes its train rows as blocks only,
  and together they hold the rows the whole job wrote, each once."""
  (whole, rec_whole) = runs["whole"]
  out = str(tmp_path / "blocks_only")
  rec = preprocess.run("aliccp", raw["patterns"], out, [], max_hash_buckets=512, max_dead_letter_fraction=1.0,
                       partitions=PARTS, parallel_partitions=2, train_examples=False)
  assert rec["train"]["partitions"]["balanced"] and rec["train"]["skeleton_balanced"]
  assert rec["train"]["rows_written"] == rec["train"]["blocks"]["rows_written"] == rec_whole["train"]["rows_written"]
  assert not os.path.exists(os.path.join(out, "train"))
  assert _block_sample_ids(out) == _block_sample_ids(whole) == fuzz.written_sample_ids(whole, "train")
  assert _examples(out, "eval") == _examples(whole, "eval")


def test_every_record_lands_in_one_partition_with_the_rows_it_joins(raw, tmp_path):
  parts = partition.split_inputs(raw["patterns"], PARTS, str(tmp_path))
  for split in ("train", "eval"):
    for kind in partition.KINDS:
      read = [r for p in glob.glob(raw["patterns"][split][kind]) for r in fuzz.records(open(p, "rb").read())]
      by_part = [list(partition.records(open(q[split][kind], "rb"))) for q in parts.patterns]
      assert collections.Counter(read) == collections.Counter(r for rs in by_part for r in rs)
      assert parts.records[split][kind] == len(read)
      for k, rs in enumerate(by_part):
        assert all(partition.partition_of(partition.join_key(r, kind), PARTS) == k for r in rs)
  assert parts.conflicts["train"] == raw["conflicts"]
  # The fuzzed conflicts change a label, not the index: they stay in one partition.
  assert parts.conflicts["eval"] == {}
  nodedup = partition.split_inputs(raw["patterns"], PARTS, str(tmp_path / "nodedup"), dedup_sample_ids=False)
  assert nodedup.conflicts == {"train": {}, "eval": {}}
  # Gzipped inputs, the splits written by two processes: the same partition files.
  zipped = {}
  for split, kinds in raw["patterns"].items():
    for kind, pattern in kinds.items():
      for k, path in enumerate(sorted(glob.glob(pattern))):
        with open(path, "rb") as f, gzip.open(str(tmp_path / f"{split}-{kind}-{k}.csv.gz"), "wb") as g:
          g.write(f.read())
      zipped.setdefault(split, {})[kind] = str(tmp_path / f"{split}-{kind}-*.csv.gz")
  again = partition.split_inputs(zipped, PARTS, str(tmp_path / "gz"), parallel=2)
  assert again.records == parts.records and again.conflicts == parts.conflicts
  for q, r in zip(parts.patterns, again.patterns):
    for split in q:
      for kind in partition.KINDS:
        assert open(q[split][kind], "rb").read() == open(r[split][kind], "rb").read()


def _examples(out, split):
  files = glob.glob(os.path.join(out, split, "part-*.tfrecord.gz"))
  return collections.Counter(
      json.dumps(json_format.MessageToDict(tf.train.Example.FromString(r.numpy())), sort_keys=True)
      for r in tf.data.TFRecordDataset(files, "GZIP"))


def _dead_letters(out, split):
  return collections.Counter(l for p in glob.glob(os.path.join(out, "dead_letter", f"{split}-*")) for l in open(p))


def test_the_partitions_write_what_the_whole_job_writes(raw, runs):
  (whole, rec_whole), (parts, rec_parts) = runs["whole"], runs["parts"]
  for split in ("train", "eval"):
    got = dict(rec_parts[split])
    info = got.pop("partitions")
    assert info["balanced"] and info["count"] == PARTS
    assert (info["skeleton_records"], info["common_records"]) == (got["skeleton_rows_read"], got["common_rows_read"])
    assert info["cross_partition_conflicting_sample_ids"] == len(raw["conflicts"] if split == "train" else {})
    want = dict(rec_whole[split])
    if split == "train":   # each partition ends with a part-filled block: the rows are the same, the blocks a few more
      blocks, want_blocks = got.pop("blocks"), want.pop("blocks")
      assert blocks["balanced"] and blocks["rows_written"] == want_blocks["rows_written"]
      assert want_blocks["blocks_written"] <= blocks["blocks_written"] <= want_blocks["blocks_written"] + PARTS
    assert got == want
    assert _examples(parts, split) == _examples(whole, split)
    assert _dead_letters(parts, split) == _dead_letters(whole, split)
    assert got["rows_unaccounted_by_hop"] == {}
  dead = rec_parts["train"]["skeleton_rows_set_aside"]
  assert dead["conflicting_sample_id"] >= 5 and dead["duplicate_sample_id"] >= 1 and dead["bad_label"] >= 1
  # The cross-partition cases, by sample id: what was kept and why the rest was set aside.
  letters = [json.loads(l) for l in _dead_letters(parts, "train").elements()]
  reasons = lambda sid: sorted(d["reason"] for d in letters if d.get("sample_id") == sid)
  assert reasons(990001) == ["conflicting_sample_id"] * 2
  assert reasons(990003) == ["conflicting_sample_id"] * 3
  assert reasons(990004) == ["duplicate_sample_id"]
  written = fuzz.written_sample_ids(parts, "train")
  assert written.count(990002) == written.count(990004) == 1 and 990001 not in written and 990003 not in written
  assert len(written) == len(set(written)) == rec_parts["train"]["rows_written"]
  # Partition files are named apart in one output; one transform_fn; the marker records the partitions.
  assert len(glob.glob(os.path.join(parts, "train", "part-p0000[0-2]-*"))) >= PARTS
  assert len(glob.glob(os.path.join(parts, "train_blocks", "part-p*"))) >= PARTS
  marker = json.load(open(os.path.join(parts, "reconciliation.json")))
  assert marker["partitions"] == PARTS and marker["splits"]["train"]["partitions"]["balanced"]
  assert sorted(os.listdir(parts)) == sorted(os.listdir(whole))


def test_a_partition_that_reads_fewer_rows_than_it_was_given_is_refused(raw, tmp_path, monkeypatch):
  real = preprocess._run_partitions

  def losing(*args):
    counters = real(*args)
    counters["aliccp/eval/common_rows_read"] -= 1   # as if a partition's reader missed a row
    counters["aliccp/eval/common_rows_used"] -= 1
    return counters

  monkeypatch.setattr(preprocess, "_run_partitions", losing)
  _assert_refused(raw, tmp_path, "MISMATCH with the rows read")


def _assert_refused(raw, tmp_path, match):
  """A job in 2 partitions fails with ``match`` and publishes nothing."""
  out = str(tmp_path / "out")
  with pytest.raises(RuntimeError, match=match):
    preprocess.run("aliccp", raw["patterns"], out, [], max_hash_buckets=512, max_dead_letter_fraction=1.0,
                   partitions=2)
  assert not os.path.exists(out)


def _killed(job):
  """A partition's process killed by the system, as the kernel's OOM killer does."""
  os.kill(os.getpid(), signal.SIGKILL)


def test_a_partition_process_killed_by_the_system_is_a_clear_error(raw, tmp_path, monkeypatch):
  monkeypatch.setattr(preprocess, "_run_job_kwargs", _killed)
  _assert_refused(raw, tmp_path, "died without an error of its own .*more --partitions")


def test_partitions_that_get_no_row_write_nothing_and_the_output_is_whole(tmp_path):
  """One common row per split: all rows join with it, so two of the three partitions are empty."""
  src = tmp_path / "raw"
  synthetic.generate(str(src), num_train=60, num_test=20, num_users=5, num_items=20,
                     impressions_per_common=1000, anomalies=0, seed=2)
  patterns = preprocess._input_patterns(str(src), {})
  split = partition.split_inputs(patterns, PARTS, str(tmp_path / "split"))
  sizes = [sum(len(list(partition.records(open(q["train"][kind], "rb")))) for kind in partition.KINDS)
           for q in split.patterns]
  assert sorted(sizes)[:2] == [0, 0] and sum(sizes) == 60 + 1
  kw = dict(max_hash_buckets=512)
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  rec_whole = preprocess.run("aliccp", patterns, whole, [], **kw)
  rec_parts = preprocess.run("aliccp", patterns, parts, [], partitions=PARTS, parallel_partitions=2, **kw)
  for s in ("train", "eval"):
    assert rec_parts[s]["rows_written"] == rec_whole[s]["rows_written"] == (60 if s == "train" else 20)
    assert rec_parts[s]["partitions"]["balanced"]
    assert _examples(parts, s) == _examples(whole, s)
  assert os.path.isdir(os.path.join(parts, "transform_fn"))


@pytest.mark.parametrize("kwargs,phrase", [
    (dict(fmt="avazu"), "not with --format=avazu"),
    (dict(beam_args=["--runner=DataflowRunner"]), "--runner=DataflowRunner shuffles through disk"),
    (dict(parallel_partitions=0), "--parallel_partitions must be 1 or more"),
])
def test_partitions_where_they_cannot_hold_are_usage_errors(raw, tmp_path, kwargs, phrase):
  args = {"fmt": "aliccp", "beam_args": [], "parallel_partitions": 1, **kwargs}
  patterns = raw["patterns"]
  if args["fmt"] == "avazu":
    patterns = {s: {"files": [p["skeleton"]]} for s, p in patterns.items()}
  with pytest.raises(preprocess.UsageError, match=phrase):
    preprocess.run(args["fmt"], patterns, str(tmp_path / "out"), args["beam_args"], partitions=2,
                   parallel_partitions=args["parallel_partitions"])
  assert not os.path.exists(tmp_path / "out")


def test_a_preprocessing_fn_with_an_analyzer_cannot_be_partitioned(monkeypatch):
  import tensorflow_transform as tft

  def make(*args, **kwargs):
    return lambda inputs: {"x": tft.scale_to_z_score(tf.cast(inputs["click"], tf.float32))}

  monkeypatch.setattr(preprocess.T, "make_preprocessing_fn", make)
  with pytest.raises(preprocess.UsageError, match="has analyzers .over click"):
    preprocess._check_partitionable("aliccp", [], 512, (), 1)


def test_a_preprocessing_fn_with_an_analyzer_is_analyzed_over_the_rows_and_writes_the_same(raw, runs, monkeypatch):
  # Without analyzers (this project's transform) the transform_fn is analyzed over no rows, so
  # the join, the transform and the writes run as one stage; with an analyzer it must still be
  # analyzed over the train rows. An analyzer that changes nothing (the smallest click, times
  # 0) takes the job down the second path, which must write what the first wrote.
  import tensorflow_transform as tft
  real_fn, real_analyze = preprocess.T.make_preprocessing_fn, preprocess.tft_beam.AnalyzeAndTransformDataset
  specs = preprocess.T.raw_feature_spec("aliccp")
  assert preprocess.T.analyzed_columns(real_fn("aliccp", 512), specs) == []

  def make(*args, **kwargs):
    fn = real_fn(*args, **kwargs)

    def with_analyzer(inputs):
      out = fn(inputs)
      out["click"] = out["click"] + tft.min(inputs["click"]) * 0
      return out
    return with_analyzer

  analyzed_over_rows = []
  monkeypatch.setattr(preprocess.T, "make_preprocessing_fn", make)
  monkeypatch.setattr(preprocess.tft_beam, "AnalyzeAndTransformDataset",
                      lambda *a, **k: analyzed_over_rows.append(1) or real_analyze(*a, **k))
  assert preprocess.T.analyzed_columns(make("aliccp", 512), specs) == ["click"]
  whole, rec_whole = runs["whole"]
  out = str(raw["root"] / "with_analyzer")
  rec = preprocess.run("aliccp", raw["patterns"], out, [], max_hash_buckets=512, max_dead_letter_fraction=1.0)
  assert analyzed_over_rows == [1]
  for split in ("train", "eval"):
    assert rec[split] == rec_whole[split]
    assert _examples(out, split) == _examples(whole, split)


_HANG = '''
import os, time
def hang(job):
  open(os.path.join(os.environ["PARTITION_PIDS"], str(os.getpid())), "w").close()
  time.sleep(600)
'''
_DRIVER = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import hang_job
from pipeline import preprocess
preprocess._run_job_kwargs = hang_job.hang
preprocess.run("aliccp", json.loads(sys.argv[2]), sys.argv[3], [], partitions=2, parallel_partitions=2,
               max_hash_buckets=64)
'''


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")
def test_a_killed_job_leaves_no_partition_running(raw, tmp_path):
  # Partition processes outlived a killed job: they went on computing, holding memory and
  # writing into the staging dir that the next run removes.
  import subprocess
  import sys
  import time
  (tmp_path / "hang_job.py").write_text(_HANG)
  pids_dir = tmp_path / "pids"
  pids_dir.mkdir()
  env = dict(os.environ, PARTITION_PIDS=str(pids_dir),
             PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         os.environ.get("PYTHONPATH", "")]))
  job = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path), json.dumps(raw["patterns"]),
                          str(tmp_path / "out")], env=env)
  pids = []
  try:
    deadline = time.monotonic() + 180
    while len(pids) < 2 and time.monotonic() < deadline and job.poll() is None:
      time.sleep(0.5)
      pids = [int(p) for p in os.listdir(pids_dir)]
    assert len(pids) == 2, "the partitions did not start"
    job.send_signal(signal.SIGKILL)
    job.wait()
    deadline = time.monotonic() + 30
    while any(map(_alive, pids)) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not any(map(_alive, pids))
  finally:
    job.kill()
    for pid in pids:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)
