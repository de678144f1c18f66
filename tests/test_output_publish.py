"""Publishing a job's output directory: one owner, a manifest, and recovery after a kill.

pipeline/publish.py (OutputLock, recover, publish_dir) on temp dirs, and pipeline.preprocess.run
with its Beam job replaced by a stand-in that writes a small output, so these run in seconds:

  * a run owns its output: a second run is refused while the first holds the lock (naming its
    pid), and recovery removes only dead runs' staging dirs and replaced copies;
  * publishing refuses a staged output that lacks an entry of its manifest;
  * a run killed at any point of the publish sequence leaves the old or the new output at the
    published path, or the old one beside it where the next run's recovery puts it back first;
    a complete copy is deleted only while a complete output is published;
  * a split without rows is an error in every format, and nothing is published.

The Beam runs and the processes that race for one output are in tests/test_reliability.py.
"""

import os
import subprocess
import sys

import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import preprocess, reconciliation
from pipeline import publish as P
from preprocessing import features as F

MARKER = F.RECONCILIATION
MANIFEST = ["train", "eval", "transform_fn", "dead_letter"]
PROPERTY = settings(max_examples=60)


class _Killed(BaseException):
  """Stands in for SIGKILL: nothing after it runs (a BaseException, so no handler catches it)."""


def _write_output(path: str, token: str) -> None:
  """A complete output whose every file holds ``token``; the marker last."""
  for entry in MANIFEST:
    os.makedirs(os.path.join(path, entry), exist_ok=True)
    with open(os.path.join(path, entry, "part-0"), "w") as f:
      f.write(token)
  with open(os.path.join(path, MARKER), "w") as f:
    f.write(token)


def _token(path: str):
  """The token of a complete output at ``path`` (every entry written by one run), else None."""
  try:
    tokens = {open(os.path.join(path, MARKER)).read()}
    tokens |= {open(os.path.join(path, e, "part-0")).read() for e in MANIFEST}
  except OSError:
    return None
  assert len(tokens) == 1, f"{path} mixes the outputs of two runs: {tokens}"
  return tokens.pop()


def _siblings(out: str):
  return sorted(p for p in tf.io.gfile.glob(out + ".*") if not p.endswith(P.LOCK_SUFFIX))


# Every case starts from a fresh dir (hypothesis runs many cases in one test).
_CASES = [0]


def _fresh(tmp_path) -> str:
  _CASES[0] += 1
  root = tmp_path / f"case{_CASES[0]}"
  root.mkdir()
  P._IN_PROGRESS.clear()
  return str(root / "out")


def _holder(lock_path: str):
  """Another process holding ``lock_path`` as OutputLock does (its pid written in it)."""
  code = ("import fcntl, os, sys\n"
          "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
          "fcntl.flock(fd, fcntl.LOCK_EX)\n"
          "os.write(fd, b'%d on otherhost since then' % os.getpid())\n"
          "print('ready', flush=True)\n"
          "sys.stdin.read()\n")
  proc = subprocess.Popen([sys.executable, "-c", code, lock_path], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "ready"
  return proc


def _release(proc) -> None:
  proc.stdin.close()
  proc.wait(timeout=30)


# Defect: two runs of one output destroyed each other.

def test_a_second_owner_of_an_output_is_refused_naming_the_first_ones_pid(tmp_path):
  out = str(tmp_path / "out")
  holder = _holder(out + P.LOCK_SUFFIX)
  try:
    with pytest.raises(P.OutputBusy, match=rf"{out} is in use by another preprocessing run \(pid {holder.pid} "):
      P.OutputLock(out, "preprocessing run").acquire()
  finally:
    _release(holder)
  with P.OutputLock(out) as lock:        # the holder is gone: its lock went with it
    assert lock.held
    with pytest.raises(P.OutputBusy):   # a second open file in this process is a second owner too
      P.OutputLock(out).acquire()
  with P.OutputLock(out).acquire() as lock:    # acquired, then entered: still one owner
    assert lock.held
  with P.OutputLock("gs://bucket/out") as lock:   # no flock on object stores (see publish.py)
    assert not lock.held


def test_a_publish_to_tf_serving_leaves_a_live_publishers_staging_alone(tmp_path):
  # The probe's defect in the serving publisher: a second publish removed the first one's
  # staging copy mid-write. Now the second is refused while the first holds the lock.
  root, base = str(tmp_path / "serving"), str(tmp_path / "serving" / "esmm")
  live = os.path.join(base, ".staging-2-4242@otherhost-deadbeef")
  os.makedirs(os.path.join(live, "variables"))
  holder = _holder(os.path.join(root, ".esmm.publish" + P.LOCK_SUFFIX))
  try:
    with pytest.raises(P.OutputBusy, match=f"pid {holder.pid}"):
      P.publish(str(tmp_path / "nowhere"), root, "esmm", 2, [b""])
    assert os.path.isdir(os.path.join(live, "variables"))
  finally:
    _release(holder)


def test_a_staged_output_missing_entries_is_not_published(tmp_path):
  out = _fresh(tmp_path)
  staging = P.start_staging(out)
  _write_output(staging, "new")
  tf.io.gfile.rmtree(os.path.join(staging, "train"))
  os.makedirs(os.path.join(staging, "eval2"))
  with pytest.raises(P.IncompleteOutput, match=r"lacks train; not published"):
    P.publish_dir(staging, out, MANIFEST, MARKER)
  with pytest.raises(P.IncompleteOutput, match=r"lacks train, eval2/ \(empty\); not published"):
    P.publish_dir(staging, out, MANIFEST + ["eval2"], MARKER)
  assert not os.path.exists(out) and os.path.isdir(staging)


def test_a_second_daily_run_leaves_the_relabeling_and_reference_of_a_live_one_alone(tmp_path):
  # The same pattern in orchestration/daily.py: an unfinished relabel dir, and the reference
  # transform's staging copy, were removed by whichever run came next, live or not.
  from orchestration import daily
  relabeled = str(tmp_path / "runs" / "20240110" / "relabeled")
  os.makedirs(os.path.join(relabeled, "train"))       # a live run is writing it (no marker yet)
  reference = str(tmp_path / "transform_reference")
  os.makedirs(reference + ".tmp/transform_fn")          # a live run is copying the reference
  holders = [_holder(relabeled + P.LOCK_SUFFIX), _holder(reference + P.LOCK_SUFFIX)]
  try:
    plan = {"train_days": ["20240108"], "eval_day": "20240109", "conversion_logs": {}}
    with pytest.raises(daily.UsageError, match=f"in use by another daily run.*pid {holders[0].pid} "):
      daily.run_relabel(plan, str(tmp_path / "logs"), relabeled, 7, [])
    with pytest.raises(daily.UsageError, match=f"in use by another daily run.*pid {holders[1].pid} "):
      daily.check_transform(reference, str(tmp_path / "transformed"), [])
    assert os.path.isdir(os.path.join(relabeled, "train"))
    assert os.path.isdir(reference + ".tmp/transform_fn")
  finally:
    for h in holders:
      _release(h)
  # Once the other run is gone, its leftover staging copy is replaced and the reference set.
  transformed = tmp_path / "transformed"
  for sub in ("transform_fn", "transformed_metadata"):
    (transformed / sub).mkdir(parents=True)
    (transformed / sub / "f").write_text(sub)
  assert daily.check_transform(reference, str(transformed), []) == "reference set"
  assert sorted(os.listdir(reference)) == ["transform_fn", "transformed_metadata"]
  assert not os.path.exists(reference + ".tmp")


# pipeline.preprocess.run with a stand-in for the Beam job.

ROWS = {"train": 5, "eval": 3}


def _inputs(tmp_path, empty=()):
  raw = tmp_path / "raw"
  raw.mkdir(exist_ok=True)
  patterns = {}
  for split in ("train", "eval"):
    patterns[split] = {}
    for kind in ("skeleton", "common"):
      path = raw / f"{kind}_{split}.csv"
      path.write_bytes(b"" if (split, kind) in empty else b"1,0,0,x,1,y\n")
      patterns[split][kind] = str(path)
  return patterns


def _stand_in(entries=tuple(MANIFEST) + ("transformed_metadata",), rows=ROWS, token="new", calls=None):
  """A run_job that writes ``entries`` and counts ``rows`` read and written per split."""
  def run_job(output_dir, **kwargs):
    if calls is not None:
      calls.append(output_dir)
    for entry in entries:
      os.makedirs(os.path.join(output_dir, entry), exist_ok=True)
      with open(os.path.join(output_dir, entry, "part-0"), "w") as f:
        f.write(token)
    counters = {}
    for split, n in rows.items():
      counters[f"aliccp/{split}/skeleton_rows_read"] = n
      counters[f"aliccp/{split}/rows_written"] = n
    return counters
  return run_job


def _run(tmp_path, out, **kwargs):
  return preprocess.run("aliccp", _inputs(tmp_path), out, [], train_block_rows=0, **kwargs)


def test_preprocessing_publishes_nothing_that_lacks_an_entry_of_its_manifest(tmp_path, monkeypatch):
  # The probe's symptom: another run removed this one's files at the end, and it published an
  # output holding only reconciliation.json.
  out = _fresh(tmp_path)
  monkeypatch.setattr(preprocess, "run_job", _stand_in(entries=()))
  with pytest.raises(preprocess.BadOutput, match="lacks train, eval, transform_fn, transformed_metadata, "
                                                  "dead_letter; not published"):
    _run(tmp_path, out)
  assert not os.path.exists(out)
  monkeypatch.setattr(preprocess, "run_job", _stand_in())
  _run(tmp_path, out)
  assert sorted(os.listdir(out)) == sorted(MANIFEST + ["transformed_metadata", "distinct_ids", MARKER])
  assert _siblings(out) == []


def test_a_preprocessing_run_killed_between_its_renames_loses_no_output(tmp_path, monkeypatch):
  out = _fresh(tmp_path)
  monkeypatch.setattr(preprocess, "run_job", _stand_in(token="old"))
  _run(tmp_path, out)
  old = open(os.path.join(out, "train", "part-0")).read()

  # --overwrite killed after OUT -> OUT.replaced-*, before staging -> OUT.
  rename = tf.io.gfile.rename

  def killed_at_the_second_rename(src, dst, overwrite=False):
    if preprocess.STAGING in os.path.basename(src.rstrip("/")):
      raise _Killed()
    return rename(src, dst, overwrite)

  monkeypatch.setattr(tf.io.gfile, "rename", killed_at_the_second_rename)
  monkeypatch.setattr(preprocess, "run_job", _stand_in(token="new"))
  with pytest.raises(_Killed):
    _run(tmp_path, out, overwrite=True)
  monkeypatch.setattr(tf.io.gfile, "rename", rename)
  P._IN_PROGRESS.clear()             # the killed process's runs are over
  assert not os.path.exists(out) and len(tf.io.gfile.glob(out + ".replaced-*")) == 1

  # The next run fails (here: its job breaks) - the old output must be back, not deleted.
  def broken(**kwargs):
    raise RuntimeError("the job broke")

  monkeypatch.setattr(preprocess, "run_job", broken)
  with pytest.raises(RuntimeError, match="the job broke"):
    _run(tmp_path, out, overwrite=True)
  assert open(os.path.join(out, "train", "part-0")).read() == old
  assert os.path.exists(os.path.join(out, MARKER))
  assert tf.io.gfile.glob(out + ".replaced-*") == []

  # Without --overwrite the restored output is refused as before, and stays.
  with pytest.raises(preprocess.UsageError, match="is not empty"):
    _run(tmp_path, out)
  assert open(os.path.join(out, "train", "part-0")).read() == old


@pytest.mark.parametrize("empty", [("eval", "skeleton"), ("eval", "common"), ("train", "skeleton")])
def test_an_aliccp_split_of_empty_files_is_refused_before_the_job_runs(tmp_path, monkeypatch, empty):
  # The probe: 0-byte sample_skeleton_test.csv / common_features_test.csv gave exit 0, and
  # training then printed loss 0 and AUC nan.
  out = _fresh(tmp_path)
  calls = []
  monkeypatch.setattr(preprocess, "run_job", _stand_in(rows={"train": 5, "eval": 0}, calls=calls))
  split, kind = empty
  with pytest.raises(preprocess.UsageError, match=rf"every {kind} file of the {split} split is empty"):
    preprocess.run("aliccp", _inputs(tmp_path, empty=[empty]), out, [], train_block_rows=0)
  assert calls == [] and not os.path.exists(out) and _siblings(out) == []


def test_a_split_with_no_row_kept_is_not_published(tmp_path, monkeypatch):
  out = _fresh(tmp_path)
  monkeypatch.setattr(preprocess, "run_job", _stand_in(rows={"train": 5, "eval": 0}))
  with pytest.raises(preprocess.BadOutput, match=r"^eval: no row written, nothing to evaluate on"):
    _run(tmp_path, out, max_dead_letter_fraction=1.0)
  assert not os.path.exists(out)


# Properties.

_STATES = st.fixed_dictionaries({
    "out": st.sampled_from(["absent", "complete", "incomplete"]),
    "replaced": st.lists(st.booleans(), max_size=2),      # stale replaced copies: complete?
    "staging": st.lists(st.booleans(), max_size=2),       # dead runs' staging dirs: complete?
    "remote": st.booleans(),   # an object store: no lock, names say who is alive, marker renamed last
    "overwrite": st.booleans(),
})


def _prior_state(out: str, state: dict) -> list:
  """Lays out ``state``; returns the tokens of the complete copies, oldest first."""
  complete = []
  if state["out"] == "complete":
    _write_output(out, "old")
  elif state["out"] == "incomplete":
    os.makedirs(os.path.join(out, "train"))
  for k, whole in enumerate(state["replaced"]):
    path = P.owned_name(out, P.REPLACED_DIR)
    _write_output(path, f"replaced{k}")
    if whole:
      os.utime(os.path.join(path, MARKER), (1000 + k, 1000 + k))
      complete.append(f"replaced{k}")
    else:
      os.remove(os.path.join(path, MARKER))
  for k, whole in enumerate(state["staging"]):
    path = P.owned_name(out, P.STAGING_DIR)
    _write_output(path, f"staging{k}")
    if not whole:
      os.remove(os.path.join(path, MARKER))
  if state["remote"]:   # another host's run: nothing here may touch it
    os.makedirs(out + P.STAGING_DIR + "77@otherhost-0123456789ab")
  return complete + (["old"] if state["out"] == "complete" else [])


def _run_model(out: str, token: str, overwrite: bool, remote: bool) -> None:
  """What preprocess.run does to the output, with the Beam job's writes standing in."""
  with P.OutputLock("gs://stand-in" if remote else out) as lock:
    try:
      P.recover(out, MARKER, lock.held, atomic_rename=not remote)
      if os.path.exists(out) and os.listdir(out) and not overwrite:
        return
      staging = P.start_staging(out)
      _write_output(staging, token)
      P.publish_dir(staging, out, MANIFEST, MARKER, overwrite=True, atomic_rename=not remote)
    finally:
      P._IN_PROGRESS.clear()


@PROPERTY
@given(state=_STATES, crash_at=st.integers(0, 10))
def test_a_run_killed_at_any_step_leaves_the_old_or_the_new_output(tmp_path_factory, state, crash_at):
  out = _fresh(tmp_path_factory.mktemp("p"))
  history = _prior_state(out, state)
  latest = [history[-1] if history else None]     # the newest complete output published so far
  steps = [0]

  def check_instant():
    """The published path holds a complete output, or the latest one waits beside it."""
    token = _token(out)
    if token is not None:
      latest[0] = token
      return
    if latest[0] is not None:
      beside = [_token(p) for p in tf.io.gfile.glob(out + P.REPLACED_DIR + "*")]
      assert latest[0] in beside, (steps[0], latest[0], beside, _siblings(out))

  def step(fn):
    def mutate(*args):
      check_instant()
      published_copy = args[0].rstrip("/") == out or P.REPLACED_DIR in os.path.basename(args[0])
      if fn is remove and published_copy and _token(args[0]) is not None:
        # A complete copy of a published output goes only while a complete output is
        # published (and not that one). A dead run's staging was never published.
        assert args[0].rstrip("/") != out and _token(out) is not None, (args, _siblings(out))
      if steps[0] == crash_at:
        raise _Killed()
      steps[0] += 1
      fn(*args)
      check_instant()
    return mutate

  rename, remove = P._rename, P._remove
  P._rename, P._remove = step(rename), step(remove)
  try:
    with _maybe_killed():
      _run_model(out, "new", state["overwrite"], state["remote"])
  finally:
    P._rename, P._remove = rename, remove
  check_instant()
  # Recovery (the next run's first step) puts the newest published output back.
  P.recover(out, MARKER, locked=not state["remote"], atomic_rename=not state["remote"])
  if latest[0] is not None:
    assert _token(out) == latest[0], (state, crash_at, _siblings(out))
  # And a run to the end publishes its output and leaves nothing of the others.
  _run_model(out, "newer", True, state["remote"])
  assert _token(out) == "newer"
  left = _siblings(out)
  if state["remote"]:
    # Another host's run is left alone; an incomplete replaced copy goes once a complete
    # output is published (the next run's recovery), since there renames are copies.
    keep = [out + P.STAGING_DIR + "77@otherhost-0123456789ab"]
    assert [p for p in left if p not in keep] == [] or all(
        P.REPLACED_DIR in p and _token(p) is None for p in left if p not in keep), left
    P.recover(out, MARKER, locked=False, atomic_rename=False)
    assert keep[0] in _siblings(out)
    left = [p for p in _siblings(out) if p not in keep]
  assert left == [], left


class _maybe_killed:
  """The run may get to its end before ``crash_at`` mutations."""

  def __enter__(self):
    return self

  def __exit__(self, kind, value, tb):
    return kind is _Killed


@PROPERTY
@given(old=st.booleans(), missing=st.sets(st.sampled_from(MANIFEST + [MARKER]), min_size=1),
       emptied=st.booleans(), remote=st.booleans())
def test_a_staged_output_missing_any_manifest_entry_is_refused(tmp_path_factory, old, missing, emptied,
                                                               remote):
  out = _fresh(tmp_path_factory.mktemp("m"))
  if old:
    _write_output(out, "old")
  staging = P.start_staging(out)
  _write_output(staging, "new")
  for entry in missing:
    path = os.path.join(staging, entry)
    if emptied and entry != MARKER:
      tf.io.gfile.rmtree(path)
      os.makedirs(path)      # there, but empty
    else:
      tf.io.gfile.rmtree(path) if os.path.isdir(path) else os.remove(path)
  with pytest.raises(P.IncompleteOutput) as e:
    P.publish_dir(staging, out, MANIFEST, MARKER, overwrite=True, atomic_rename=not remote)
  for entry in missing:
    assert entry in str(e.value)
  assert _token(out) == ("old" if old else None) and os.path.isdir(staging)
  assert _siblings(out) == [staging]


_OWNERS = st.lists(st.tuples(st.sampled_from([P.STAGING_DIR, P.REPLACED_DIR]),
                             st.sampled_from(["dead", "dead_pid", "in_progress", "live_pid", "other_host",
                                              "unnamed"])), max_size=6)


@pytest.fixture(scope="module")
def dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@PROPERTY
@given(owners=_OWNERS, locked=st.booleans())
def test_recovery_removes_only_dead_runs_leftovers(tmp_path_factory, dead_pid, owners, locked):
  out = _fresh(tmp_path_factory.mktemp("o"))
  _write_output(out, "current")
  dead, alive = [], []
  for k, (infix, owner) in enumerate(owners):
    tag = {"dead": P.owner_tag(), "in_progress": P.owner_tag(), "dead_pid": f"{dead_pid}@{P._host()}",
           "live_pid": f"{os.getppid()}@{P._host()}", "other_host": "1@otherhost"}.get(owner)
    path = f"{out}{infix}{tag}-{k:012x}" if tag else f"{out}{infix}{k:08x}"
    os.makedirs(os.path.join(path, "train"))
    if owner == "in_progress":
      P._IN_PROGRESS.add(path)
    (dead if locked or owner in ("dead", "dead_pid") else alive).append(path)
  P.recover(out, MARKER, locked)
  assert _siblings(out) == sorted(alive) and _token(out) == "current"


def _rec(fmt: str, rows: dict, dead: dict) -> dict:
  rec = {}
  for split, n in rows.items():
    if fmt == "avazu":
      rec[split] = {"rows_read": n + dead[split], "rows_written": n, "rows_set_aside": {"bad_row": dead[split]}}
    else:
      rec[split] = {"skeleton_rows_read": n + dead[split], "rows_written": n,
                    "skeleton_rows_set_aside": {"bad_sample_id": dead[split]}}
  return rec


@PROPERTY
@given(fmt=st.sampled_from(sorted(F.FORMATS)),
       rows=st.fixed_dictionaries({"train": st.integers(0, 3), "eval": st.integers(0, 3)}),
       dead=st.fixed_dictionaries({"train": st.integers(0, 3), "eval": st.integers(0, 3)}))
def test_a_split_without_a_row_written_is_refused_in_every_format(fmt, rows, dead):
  empty = [split for split, n in rows.items() if n == 0]
  if not empty:
    reconciliation.check_quality(_rec(fmt, rows, dead), fmt, max_dead_fraction=1.0)
    return
  with pytest.raises(preprocess.BadOutput) as e:
    reconciliation.check_quality(_rec(fmt, rows, dead), fmt, max_dead_fraction=1.0)
  for split in empty:
    assert f"{split}: no row written" in str(e.value)


_FILES = st.lists(st.booleans(), min_size=1, max_size=3)    # per file: does it hold bytes?


@PROPERTY
@given(fmt=st.sampled_from(sorted(F.FORMATS)),
       files=st.fixed_dictionaries({(split, kind): _FILES for split in ("train", "eval")
                                    for kind in ("skeleton", "common", "files")}))
def test_a_split_whose_files_are_all_empty_is_refused_before_the_job_in_every_format(tmp_path_factory, fmt,
                                                                                     files):
  raw = tmp_path_factory.mktemp("raw")
  kinds = ("files",) if fmt == "avazu" else ("skeleton", "common")
  patterns = {}
  for split in ("train", "eval"):
    patterns[split] = {}
    for kind in kinds:
      paths = []
      for k, full in enumerate(files[split, kind]):
        path = raw / f"{split}_{kind}_{k}.csv"
        path.write_bytes(b"a,b\n1,2\n" if full else b"")
        paths.append(str(path))
      # Avazu: a list of patterns; Ali-CCP: one glob per kind.
      patterns[split][kind] = paths if kind == "files" else str(raw / f"{split}_{kind}_*.csv")
  empty = [(split, kind) for split in ("train", "eval") for kind in kinds if not any(files[split, kind])]
  if not empty:
    preprocess._check_splits_have_rows(fmt, patterns)
    return
  with pytest.raises(preprocess.UsageError, match=rf"file of the {empty[0][0]} split is empty"):
    preprocess._check_splits_have_rows(fmt, patterns)
