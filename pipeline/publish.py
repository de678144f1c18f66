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
    that the next publish removes.
  * Publishing a version that already exists changes nothing (re-running a day is
    idempotent); a smaller version than the newest is refused (versions only increase).
  * Before the rename every warmup request is replayed against the staged SavedModel; a
    model that cannot answer its own warmup requests is not published.
  * The newest ``keep`` versions stay; older ones are moved out of sight (renamed, then
    deleted).
"""

import os
import uuid
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from google.protobuf import text_format

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MODEL_CONFIG = "models.config"
REGRESSION_SIGNATURES = ("regression", "serving_default")
PREDICT_SIGNATURE = "predict"
PREDICT_INPUT = "examples"
_STAGING = ".staging-"
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
  trash = os.path.join(model_base, f"{_TRASH}{name}-{uuid.uuid4().hex[:8]}")
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
  entry.base_path = os.path.abspath(os.path.join(serving_root, model_name))
  entry.model_platform = "tensorflow"
  entry.model_version_policy.latest.num_versions = num_versions
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text_format.MessageToString(config))
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
  final = os.path.join(model_base, str(version))
  existing = versions(model_base)
  if version in existing:
    write_model_config(serving_root, model_name)
    return {"published": False, "version": version, "path": final, "versions": existing,
            "reason": f"version {version} is already published"}
  if existing and version < existing[-1]:
    raise PublishError(f"version {version} is older than the newest published version {existing[-1]}")
  # Leftovers of killed runs.
  for d in tf.io.gfile.listdir(model_base):
    d = d.rstrip("/")
    if d.startswith(_STAGING) or d.startswith(_TRASH):
      tf.io.gfile.rmtree(os.path.join(model_base, d))
  staging = os.path.join(model_base, f"{_STAGING}{version}-{uuid.uuid4().hex[:8]}")
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
