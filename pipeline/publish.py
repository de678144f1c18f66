"""Hand-off to TF Serving: atomic, versioned publishing of an exported SavedModel.

Layout TF Serving reads (``--model_config_file=<serving_root>/models.config``)::

  <serving_root>/models.config                    model_config_list, one entry per model
  <serving_root>/<model_name>/<version>/          SavedModel (integer version, increasing)
      saved_model.pb, variables/, assets/
      assets.extra/tf_serving_warmup_requests     PredictionLog records replayed at load

Rules:
  * A version directory appears in one ``rename``: the copy is staged under a name TF
    Serving ignores (not an integer), completed, checked, then renamed. A half-written
    version is never visible, and a run killed mid-copy leaves only a stale staging dir
    that the next publish removes. One publish of a model at a time: a second is refused
    (OutputBusy, naming the first one's pid) instead of removing the first one's staging dir.
  * Publishing a version that already exists changes nothing (re-running a day is
    idempotent); a smaller version than the newest is refused (versions only increase).
  * Before the rename every warmup request is replayed against the staged SavedModel; a
    model that cannot answer its own warmup requests is not published.
  * The newest ``keep`` versions stay; older ones are moved out of sight (renamed, then
    deleted).

The second half of this module publishes a job's output directory (pipeline.preprocess): a
lock per output, a manifest checked before the rename, and a recovery that renames a replaced
output back after a kill (see the comment above OutputLock).
"""

import fcntl
import os
import re
import socket
import time
import uuid
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from google.protobuf import text_format

from preprocessing import cli

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MODEL_CONFIG = "models.config"
REGRESSION_SIGNATURES = ("regression", "serving_default")
PREDICT_SIGNATURE = "predict"
PREDICT_INPUT = "examples"
STAGING_DIR = ".staging-"     # a copy being written (or a dead run's): <model_base>/.staging-<version>-<owner>,
                              # <output>.staging-<owner>
REPLACED_DIR = ".replaced-"   # <output>.replaced-<owner>: the previous output while it is replaced
_TRASH = ".deleted-"


class PublishError(RuntimeError):
  """The model cannot be published (bad version, failing warmup, ...)."""


def versions(model_base: str) -> List[int]:
  """The published versions under ``<serving_root>/<model_name>``, ascending."""
  if not tf.io.gfile.isdir(model_base):
    return []
  return sorted(int(d.rstrip("/")) for d in tf.io.gfile.listdir(model_base) if d.rstrip("/").isdigit())


def warmup_requests(model_name: str, serialized_examples: Sequence[bytes]) -> list:
  """PredictionLogs for every exported signature, built from raw serialized tf.Examples."""
  from tensorflow_serving.apis import (model_pb2, predict_pb2, prediction_log_pb2,
                                       regression_pb2)
  if not serialized_examples:
    raise PublishError("warmup needs at least one example")
  examples = [tf.train.Example.FromString(s) for s in serialized_examples]
  logs = []
  for signature in REGRESSION_SIGNATURES:
    request = regression_pb2.RegressionRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
    request.input.example_list.examples.extend(examples)
    logs.append(prediction_log_pb2.PredictionLog(
        regress_log=prediction_log_pb2.RegressLog(request=request)))
  request = predict_pb2.PredictRequest(
      model_spec=model_pb2.ModelSpec(name=model_name, signature_name=PREDICT_SIGNATURE))
  request.inputs[PREDICT_INPUT].CopyFrom(tf.make_tensor_proto(list(serialized_examples), dtype=tf.string))
  logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
  return logs


def write_warmup(saved_model_dir: str, logs: Iterable) -> str:
  path = os.path.join(saved_model_dir, WARMUP_FILE)
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.TFRecordWriter(path) as writer:
    for log in logs:
      writer.write(log.SerializeToString())
  return path


def read_warmup(saved_model_dir: str) -> list:
  from tensorflow_serving.apis import prediction_log_pb2
  path = os.path.join(saved_model_dir, WARMUP_FILE)
  return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def replay_warmup(saved_model_dir: str) -> Dict[str, int]:
  """Runs every warmup request against the SavedModel's signatures, as TF Serving would.

  Returns {signature: examples scored}; raises PublishError when a request names a missing
  signature or input, or a signature returns a wrong shape or non-finite or out-of-range
  probabilities.
  """
  loaded = tf.saved_model.load(saved_model_dir)
  scored: Dict[str, int] = {}
  for log in read_warmup(saved_model_dir):
    kind = log.WhichOneof("log_type")
    if kind == "regress_log":
      request = log.regress_log.request
      signature = request.model_spec.signature_name or "serving_default"
      serialized = [e.SerializeToString() for e in request.input.example_list.examples]
      fn = _signature(loaded, signature)
      outputs = fn(**{_only_input(fn, signature): tf.constant(serialized)})
      values = {k: v.numpy() for k, v in outputs.items()}
    elif kind == "predict_log":
      request = log.predict_log.request
      signature = request.model_spec.signature_name or "serving_default"
      fn = _signature(loaded, signature)
      inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
      expected = set(fn.structured_input_signature[1])
      if set(inputs) != expected:
        raise PublishError(f"warmup request for {signature!r} sends {sorted(inputs)}, the signature "
                           f"takes {sorted(expected)}")
      values = {k: v.numpy() for k, v in fn(**inputs).items()}
      serialized = next(iter(inputs.values())).numpy()
    else:
      raise PublishError(f"unsupported warmup log type {kind!r}")
    for name, v in values.items():
      if v.shape[0] != len(serialized):
        raise PublishError(f"{signature}/{name}: {v.shape[0]} outputs for {len(serialized)} examples")
      if not (np.isfinite(v).all() and (v >= 0).all() and (v <= 1).all()):
        raise PublishError(f"{signature}/{name}: outputs outside [0, 1] or not finite")
    scored[signature] = scored.get(signature, 0) + len(serialized)
  return scored


def _signature(loaded, name: str):
  if name not in loaded.signatures:
    raise PublishError(f"the SavedModel has no signature {name!r} (it has {sorted(loaded.signatures)})")
  return loaded.signatures[name]


def _only_input(fn, signature: str) -> str:
  names = list(fn.structured_input_signature[1])
  if len(names) != 1:
    raise PublishError(f"signature {signature!r} takes {names}, not one serialized-example input")
  return names[0]


def copy_tree(src: str, dst: str) -> None:
  for root, _, files in tf.io.gfile.walk(src):
    rel = os.path.relpath(root, src)
    target = os.path.join(dst, rel) if rel != "." else dst
    tf.io.gfile.makedirs(target)
    for name in files:
      tf.io.gfile.copy(os.path.join(root, name), os.path.join(target, name), overwrite=True)


def _remove_out_of_sight(model_base: str, name: str) -> None:
  """Deletes ``model_base/name`` after renaming it to a name TF Serving does not load."""
  trash = os.path.join(model_base, f"{_TRASH}{name}-{owner_tag()}-{uuid.uuid4().hex[:8]}")
  tf.io.gfile.rename(os.path.join(model_base, name), trash)
  tf.io.gfile.rmtree(trash)


def write_model_config(serving_root: str, model_name: str, num_versions: int = 1) -> str:
  """Adds or updates ``model_name`` in ``<serving_root>/models.config`` (atomically).

  The other models' entries are kept. TF Serving serves the newest ``num_versions``.
  """
  from tensorflow_serving.config import model_server_config_pb2
  path = os.path.join(serving_root, MODEL_CONFIG)
  config = model_server_config_pb2.ModelServerConfig()
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      text_format.Parse(f.read(), config)
  entries = config.model_config_list.config
  entry = next((c for c in entries if c.name == model_name), None)
  if entry is None:
    entry = entries.add()
  entry.Clear()
  entry.name = model_name
  entry.base_path = cli.absolute(os.path.join(serving_root, model_name))
  entry.model_platform = "tensorflow"
  entry.model_version_policy.latest.num_versions = num_versions
  return write_atomic(path, text_format.MessageToString(config))


def write_atomic(path: str, text: str) -> str:
  """Writes ``text`` to ``path`` in one rename (a reader never sees half a file; writers at the
  same time each use a temporary name of their own); returns ``path``."""
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path


def publish(saved_model_dir: str, serving_root: str, model_name: str, version: int,
            warmup_examples: Sequence[bytes], keep: int = 3,
            extra_files: Optional[Dict[str, str]] = None) -> Dict[str, object]:
  """Publishes ``saved_model_dir`` as ``<serving_root>/<model_name>/<version>``.

  ``extra_files``: {name: text} written next to the warmup file in assets.extra (e.g. which
  training run made the model); TF Serving ignores them.

  Returns {"published": bool, "version", "path", "versions" (after pruning), "reason"}.
  """
  if version <= 0:
    raise PublishError(f"TF Serving versions are positive integers, got {version}")
  if keep < 1:
    raise PublishError("keep must be at least 1")
  model_base = os.path.join(serving_root, model_name)
  tf.io.gfile.makedirs(model_base)
  # One publisher of a model at a time (a second is refused, naming the first's pid): the
  # leftovers removed below are then a dead run's, never a live one's staging copy.
  # The lock file is <serving_root>/.<model_name>.publish.lock, out of TF Serving's sight.
  with OutputLock(os.path.join(serving_root, f".{model_name}.publish"), f"publish of {model_name}") as lock:
    return _publish_locked(saved_model_dir, serving_root, model_name, model_base, version,
                           warmup_examples, keep, extra_files, lock.held)


def _publish_locked(saved_model_dir, serving_root, model_name, model_base, version, warmup_examples,
                    keep, extra_files, locked) -> Dict[str, object]:
  final = os.path.join(model_base, str(version))
  existing = versions(model_base)
  if version in existing:
    write_model_config(serving_root, model_name)
    return {"published": False, "version": version, "path": final, "versions": existing,
            "reason": f"version {version} is already published"}
  if existing and version < existing[-1]:
    raise PublishError(f"version {version} is older than the newest published version {existing[-1]}")
  # Leftovers of killed runs (without the lock, on gs://: only this host's dead runs').
  for d in tf.io.gfile.listdir(model_base):
    d = d.rstrip("/")
    path = os.path.join(model_base, d)
    if (d.startswith(STAGING_DIR) or d.startswith(_TRASH)) and (locked or owner_alive(path) is False):
      tf.io.gfile.rmtree(path)
  staging = os.path.join(model_base, f"{STAGING_DIR}{version}-{owner_tag()}-{uuid.uuid4().hex[:8]}")
  copy_tree(saved_model_dir, staging)
  write_warmup(staging, warmup_requests(model_name, warmup_examples))
  for name, text in (extra_files or {}).items():
    with tf.io.gfile.GFile(os.path.join(staging, "assets.extra", name), "w") as f:
      f.write(text)
  try:
    replay_warmup(staging)
  except Exception as e:  # the model cannot serve its own warmup: do not publish it
    tf.io.gfile.rmtree(staging)
    raise PublishError(f"warmup requests fail against the exported model: {e}") from e
  tf.io.gfile.rename(staging, final)
  for old in versions(model_base)[:-keep]:
    _remove_out_of_sight(model_base, str(old))
  write_model_config(serving_root, model_name)
  return {"published": True, "version": version, "path": final, "versions": versions(model_base),
          "reason": "published"}


def newest(serving_root: str, model_name: str) -> Optional[str]:
  """Path of the newest published version, or None."""
  v = versions(os.path.join(serving_root, model_name))
  return os.path.join(serving_root, model_name, str(v[-1])) if v else None


# Publishing a job's output directory (pipeline.preprocess): one owner at a time, a manifest
# checked before the rename, and a recovery that puts the previous output back.
#
# Who owns an output. A run holds ``fcntl.flock`` on ``<output>.lock`` (a file beside the
# output, holding the owner's pid, host and start time) from before it looks at the output
# until it has published: a second run of the same output is refused with the first one's pid.
# The kernel drops the lock when its process dies, so a killed run never leaves a stale lock.
# Under the lock no other run of this output is alive, so every staging dir and replaced copy
# there is a dead run's and may be recovered or removed.
#
# A non-local output (gs://, any other ``scheme://``) has no flock: there the lock is not
# taken, and liveness comes from the names instead: staging dirs and replaced copies are named
# ``...-<pid>@<host>-<hex>``, and one is a dead run's only when its host is this host and no
# process has its pid; another host's are left alone (and reported), since nothing here can
# tell whether that run is alive. Two runs of one gs:// output are therefore not kept apart:
# neither removes the other's files while it runs (from one host or two), but both may publish,
# the later replacing the earlier (give each run its own output). A directory rename on an
# object store is a copy of every object, so there the marker file is moved in last and a
# reader must check it (the trainer does); a kill while the old output is renamed aside may
# leave it split between two dirs, which recovery then keeps rather than merges. (On NFS the
# lock holds where the mount supports flock, as Linux NFS clients do over NFSv4 / NLM.)
#
# The publish sequence, and what a kill at each point leaves (recover() runs first in every run):
#   1. the staged output is checked against its manifest (every expected entry present,
#      directories not empty); a missing entry refuses the publish, nothing is renamed.
#   2. OUT -> OUT.replaced-<owner>          killed after: OUT missing, the old copy complete
#                                          beside it: recover() renames it back.
#   3. staging -> OUT                        (on object stores: the marker last; killed before
#                                          it: OUT incomplete, recover() puts the old one back)
#   4. rmtree(OUT.replaced-<owner>)          killed during: OUT is the new output, complete;
#                                          recover() removes the rest of the old one.
# So the published path holds the complete old or the complete new output whenever a run is
# not between steps 2 and 3, a replaced copy is deleted only once a complete output is at the
# published path, and a run that fails after recovery leaves the restored old output in place.

LOCK_SUFFIX = ".lock"
_OWNED = re.compile(r"(\d+)@([A-Za-z0-9._-]+)-[0-9a-f]{6,}$")
_IN_PROGRESS = set()          # staging dirs of runs in this process that have not finished


class OutputBusy(PublishError):
  """Another live run owns the output."""


class IncompleteOutput(PublishError):
  """A staged output lacks entries of its manifest; it was not published."""


def is_local(path: str) -> bool:
  """Whether ``path`` is on a local (flock-able) file system rather than gs:// or the like."""
  return "://" not in path or path.startswith("file://")


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def owner_tag() -> str:
  """``<pid>@<host>``: who is writing (in lock files and staging names)."""
  return f"{os.getpid()}@{_host()}"


def owned_name(path: str, infix: str) -> str:
  """A fresh sibling of ``path``: ``<path><infix><pid>@<host>-<hex>``."""
  return f"{path.rstrip('/')}{infix}{owner_tag()}-{uuid.uuid4().hex[:12]}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def owner_alive(path: str) -> Optional[bool]:
  """Whether the run that named ``path`` (owned_name) may still be writing it: False when it
  is dead (its pid is gone on this host, or it is this process's and not in progress), None
  when this host cannot tell (another host's run, or a name without an owner)."""
  m = _OWNED.search(path.rstrip("/"))
  if not m or m.group(2) != _host():
    return None
  pid = int(m.group(1))
  if pid == os.getpid():
    return path.rstrip("/") in _IN_PROGRESS
  return _pid_alive(pid)


class OutputLock:
  """Exclusive ownership of an output path for one run: ``flock`` on ``<path>.lock``.

  ``with OutputLock(out, "preprocessing run") as lock:`` raises OutputBusy, naming the
  holder's pid and host, when another live process holds it. ``lock.held`` is False for a
  non-local path (no lock there; see the section comment above).
  """

  def __init__(self, path: str, what: str = "run"):
    self.path = path.rstrip("/")
    self.what = what
    self.lock_path = self.path + LOCK_SUFFIX
    self.held = False
    self._fd = None

  def acquire(self) -> "OutputLock":
    if self.held or not is_local(self.path):    # held already (``with OutputLock(...).acquire():``)
      return self
    local = self.lock_path[len("file://"):] if self.lock_path.startswith("file://") else self.lock_path
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    fd = os.open(local, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
      os.close(fd)
      raise OutputBusy(f"{self.path} is in use by another {self.what} "
                       f"({'pid ' + holder if holder else 'pid unknown'}, lock {local}); wait for it "
                       "to finish, or give another output") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} on {_host()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
    self._fd, self.held = fd, True
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd, self.held = None, False

  def __enter__(self) -> "OutputLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# Every change publishing and recovery make goes through these two (tests stop a run at each).
def _rename(src: str, dst: str) -> None:
  tf.io.gfile.rename(src, dst)


def _remove(path: str) -> None:
  if tf.io.gfile.isdir(path):
    tf.io.gfile.rmtree(path)
  else:
    tf.io.gfile.remove(path)


def _complete(path: str, marker: str) -> bool:
  return tf.io.gfile.exists(os.path.join(path, marker))


def _siblings(path: str, infix: str) -> List[str]:
  return sorted(p.rstrip("/") for p in tf.io.gfile.glob(path.rstrip("/") + infix + "*"))


def missing_entries(path: str, expected: Iterable[str]) -> List[str]:
  """The entries of ``expected`` (file or dir names under ``path``) that are absent, or
  directories without any file."""
  missing = []
  for name in expected:
    entry = os.path.join(path, name)
    if not tf.io.gfile.exists(entry):
      missing.append(name)
    elif tf.io.gfile.isdir(entry) and not any(files for _, _, files in tf.io.gfile.walk(entry)):
      missing.append(name + "/ (empty)")
  return missing


def start_staging(output_dir: str) -> str:
  """Creates this run's staging dir beside ``output_dir`` (owned_name) and returns it."""
  staging = owned_name(output_dir, STAGING_DIR)
  tf.io.gfile.makedirs(staging)
  _IN_PROGRESS.add(staging)
  return staging


def end_staging(staging: str) -> None:
  """The run that owns ``staging`` has ended (published, or failed and left it for a look)."""
  _IN_PROGRESS.discard(staging.rstrip("/"))


def recover(output_dir: str, marker: str, locked: bool, atomic_rename: Optional[bool] = None) -> List[str]:
  """Repairs what killed runs left beside ``output_dir``; returns what it did, one line each.

  When the output is missing or incomplete (no ``marker``) and a dead run's replaced copy is
  complete, that copy is renamed back (an incomplete output is moved aside first). Complete
  replaced copies are deleted only while a complete output is at ``output_dir``, incomplete
  ones (what --overwrite moved aside of an incomplete output) also where directory renames
  are atomic (``atomic_rename``, default: a local path; on an object store a kill while the
  output was renamed aside may leave it split between two dirs, which are then kept); dead
  runs' staging dirs are deleted. ``locked``: this process holds the output's OutputLock, so
  every run that left something here is dead; without it only this host's dead runs' are
  touched.
  """
  out = output_dir.rstrip("/")
  if atomic_rename is None:
    atomic_rename = is_local(out)
  dead = lambda p: locked or owner_alive(p) is False
  done = []
  replaced = _siblings(out, REPLACED_DIR)
  if not _complete(out, marker):
    copies = [r for r in replaced if dead(r) and _complete(r, marker)]
    if copies:
      newest = max(copies, key=lambda r: tf.io.gfile.stat(os.path.join(r, marker)).mtime_nsec)
      if tf.io.gfile.exists(out):
        aside = owned_name(out, STAGING_DIR)      # a dead staging dir from here on: removed below
        _rename(out, aside)
        done.append(f"moved the incomplete {out} aside to {aside}")
      _rename(newest, out)
      done.append(f"restored the previous output {out} from {newest} (a run was killed while replacing it)")
      replaced.remove(newest)
  published = _complete(out, marker)
  for r in replaced:
    if dead(r) and (published or (atomic_rename and not _complete(r, marker))):
      _remove(r)
      done.append(f"removed {r}, a replaced output")
  for s in _siblings(out, STAGING_DIR):
    if dead(s):
      _remove(s)
      done.append(f"removed {s}, the staging dir of an unfinished run")
  left = [p for p in _siblings(out, STAGING_DIR) + _siblings(out, REPLACED_DIR) if not dead(p)]
  if left and not locked:
    done.append(f"left {', '.join(left)}: of runs this host cannot tell are dead")
  return done


def publish_dir(staging: str, output_dir: str, expected: Sequence[str], marker: str,
                overwrite: bool = False, atomic_rename: Optional[bool] = None) -> None:
  """Moves the finished ``staging`` dir to ``output_dir`` (the sequence above).

  ``expected``: the manifest, the entries (besides ``marker``) the output must hold; any
  missing one raises IncompleteOutput and nothing is renamed. An existing ``output_dir`` is
  replaced only with ``overwrite`` (PublishError otherwise: another run published meanwhile).
  ``atomic_rename``: whether a directory rename is atomic here (default: a local path); if
  not, the marker file is renamed in after the rest.
  """
  out = output_dir.rstrip("/")
  missing = missing_entries(staging, list(expected) + [marker])
  if missing:
    raise IncompleteOutput(f"the staged output {staging} lacks {', '.join(missing)}; not published")
  if atomic_rename is None:
    atomic_rename = is_local(out)
  old = None
  if tf.io.gfile.exists(out):
    if not overwrite and tf.io.gfile.listdir(out):
      raise PublishError(f"{out} was published by another run meanwhile; not replaced without --overwrite")
    old = owned_name(out, REPLACED_DIR)
    _rename(out, old)
  if atomic_rename:
    _rename(staging, out)
  else:
    held = owned_name(out, STAGING_DIR)             # a dead run's staging if killed: removed then
    _rename(os.path.join(staging, marker), held)
    _rename(staging, out)
    _rename(held, os.path.join(out, marker))
  end_staging(staging)
  if old:
    _remove(old)
