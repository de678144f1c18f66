"""How much memory and disk a training run will take, estimated from its params before anything
is built, and the checks that refuse a run that will not fit this machine.

  peak = FIXED_BYTES + state x (1 + SAVE_FACTOR) + calibration rows x CALIBRATION_ROW_BYTES

where state is the variables the run holds: every embedding table (rows x embedding_dim x 4
bytes, twice when the towers do not share embeddings) with its embedding optimizer's slots, and
the dense layers with Adam's two slots and their moving average. A checkpoint save writes the
variables out through copies of them (SAVE_FACTOR); FIXED_BYTES is TensorFlow, the graph and the
input pipeline. Both constants were fitted to the peak RSS of short training runs
(benchmarks/memory_estimate.py, benchmarks/results/memory_estimate.md). After training, the
calibration pass keeps the labels and logits of the impressions it is fitted on
(calibration.HeadData), on top of what the final save left allocated."""

import os
import shutil
from typing import Dict, Optional

from model_fn import params as P

FLOAT_BYTES = 4
# Slots per table of each embedding optimizer.
OPTIMIZER_SLOTS = {"lazy_adam": 2, "adam": 2, "adagrad": 1, "ftrl": 2, "sgd": 0}
# Dense layers: the weights, Adam's two slots, the moving average (dense_ema_decay > 0).
DENSE_SLOTS = 2
# Fitted by benchmarks/memory_estimate.py.
FIXED_BYTES = int(0.95 * (1 << 30))
SAVE_FACTOR = 1.5
# A calibration pass's bytes per impression: its click (1) and CTR logit (4, twice while the
# batches are joined), an isotonic fit's sort order (8), and 7 for the clicked rows' conversions
# and CVR logits (8 bytes each) and the fit's million-row chunk of temporaries.
CALIBRATION_ROW_BYTES = 24
GIB = 1 << 30
# The flags that change a run's memory, named when one does not fit.
MEMORY_FLAGS = ("--table_rows_per_id", "--table_rows", "--embedding_dim", "--memory_limit_gb")
# The flags that shrink the calibration pass (fitted on a held-out slice, or none).
CALIBRATION_FLAGS = ("--calibration_holdout", "--calibration=none")
# ... and its disk.
DISK_FLAGS = ("--keep_checkpoints", "--table_rows_per_id", "--table_rows", "--embedding_dim")


class DoesNotFit(ValueError):
  """A run whose estimated peak memory exceeds the memory it may take."""


def table_sets(p: Dict) -> int:
  return 1 if p["share_embeddings"] else 2


def table_optimizers(p: Dict) -> int:
  """Embedding optimizers (each with its own slots): one per loss term with per_loss updates."""
  if p["embedding_update"] != "per_loss":
    return 1
  terms = [p["ctr_loss_weight"], p["ctcvr_loss_weight"], p["cvr_loss_weight"],
           p["counterfactual_loss_weight"] if p["counterfactual"] else 0.0]
  return sum(1 for w in terms if w > 0)


def table_bytes(p: Dict) -> int:
  """The embedding tables' bytes, every table set."""
  return sum(P.table_rows(p).values()) * p["embedding_dim"] * FLOAT_BYTES * table_sets(p)


def table_state_bytes(p: Dict) -> int:
  """The tables with their optimizer slots: what a checkpoint holds of them."""
  return table_bytes(p) * (1 + OPTIMIZER_SLOTS[p["embedding_optimizer"]] * table_optimizers(p))


def _mlp(width: int, units, out: int = 1, norm: str = "none") -> int:
  n = 0
  for u in units:
    n += width * u + u + (2 * u if norm == "layer" else 0)     # LayerNorm's gain and shift
    width = u
  return n + (width * out + out if out else 0)


def dense_weights(p: Dict) -> int:
  """Weights of the dense layers (towers, experts, gates), approximately for the multi-task ones."""
  width = len(P.table_rows(p)) * p["embedding_dim"]
  network = P.MODEL_SPECS[p["model"]]["network"]
  norm = p["hidden_norm"]
  if network == "towers":
    n = _mlp(width, p["ctr_hidden_units"], norm=norm) + _mlp(width, p["cvr_hidden_units"], norm=norm)
    tower = p["cvr_hidden_units"]
  else:
    expert = _mlp(width, p["expert_hidden_units"], out=0, norm=norm)
    top = p["expert_hidden_units"][-1]
    experts = {"shared_bottom": 1, "mmoe": p["num_experts"]}.get(
        network, (2 * p["num_task_experts"] + p["num_shared_experts"]) * (p["ple_levels"] or 1))
    gates = 0 if network == "shared_bottom" else 3 * width * experts
    n = experts * expert + gates + 2 * _mlp(top, p["tower_hidden_units"], norm=norm)
    tower = p["tower_hidden_units"]
  if p["counterfactual"] == "dr":
    n += _mlp(width, tower, norm=norm)
  return n


def dense_state_bytes(p: Dict) -> int:
  copies = 1 + DENSE_SLOTS + (1 if p["dense_ema_decay"] else 0)
  return dense_weights(p) * FLOAT_BYTES * copies


def estimate(p: Dict, calibration_rows: int = 0) -> Dict[str, int]:
  """{tables, table_slots, dense, checkpoint_save, calibration, fixed, peak} in bytes for resolved
  params and a calibration fitted on ``calibration_rows`` impressions."""
  tables = table_bytes(p)
  table_state = table_state_bytes(p)
  dense = dense_state_bytes(p)
  save = int(SAVE_FACTOR * (table_state + dense))
  calibration = int(calibration_rows) * CALIBRATION_ROW_BYTES
  return {"tables": tables, "table_slots": table_state - tables, "dense": dense, "checkpoint_save": save,
          "calibration": calibration, "fixed": FIXED_BYTES,
          "peak": FIXED_BYTES + table_state + dense + save + calibration}


def _read_int(path: str) -> Optional[int]:
  try:
    with open(path) as f:
      text = f.read().strip()
    return int(text)
  except (OSError, ValueError):
    return None      # absent, or "max" (no limit)


def available_bytes() -> int:
  """MemAvailable of /proc/meminfo, or what this process's cgroup has left if that is less."""
  avail = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          avail = int(line.split()[1]) * 1024
  except OSError:
    pass
  for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                  "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    limit, usage = _read_int(limit_path), _read_int(usage_path)
    if limit is not None and usage is not None and limit < (1 << 60):
      left = max(0, limit - usage)
      avail = left if avail is None else min(avail, left)
  return avail if avail is not None else 1 << 62


def check_fits(p: Dict, memory_limit_gb: float = P.DEFAULT_MEMORY_LIMIT_GB,
               calibration_rows: int = 0) -> Dict[str, int]:
  """The estimate (with a calibration fitted on ``calibration_rows`` impressions); DoesNotFit
  (one line: the estimate, the limit, the flags) when its peak exceeds ``memory_limit_gb``
  (0: available_bytes())."""
  est = estimate(p, calibration_rows)
  if memory_limit_gb:
    limit, where = int(memory_limit_gb * GIB), "--memory_limit_gb"
  else:
    limit, where = available_bytes(), "available on this machine"
  if est["peak"] > limit:
    rows = sum(P.table_rows(p).values())
    calibration = ""
    if est["calibration"] and est["peak"] - est["calibration"] <= limit:     # the pass tips it over
      calibration = (f" and a calibration pass over {calibration_rows:,} impressions, "
                     f"{est['calibration'] / GIB:.1f} GiB: fit it on a slice with {CALIBRATION_FLAGS[0]} "
                     f"or not at all with {CALIBRATION_FLAGS[1]}")
    raise DoesNotFit(
        f"training {p['model']} needs about {est['peak'] / GIB:.1f} GiB at its peak ({rows:,} table rows x "
        f"{p['embedding_dim']} x {table_sets(p)} table set(s) with {p['embedding_optimizer']} slots: "
        f"{(est['tables'] + est['table_slots']) / GIB:.1f} GiB, plus a checkpoint save's copy{calibration}) "
        f"but {limit / GIB:.1f} GiB are {where}; make the tables smaller with {', '.join(MEMORY_FLAGS[:3])} "
        f"or set {MEMORY_FLAGS[3]}")
  return est


def disk_estimate(p: Dict, keep_checkpoints: int = P.DEFAULT_KEEP_CHECKPOINTS) -> Dict[str, int]:
  """{checkpoint, saved_model, peak} in bytes: a checkpoint holds the tables with their slots and
  the dense state; the model dir holds ``keep_checkpoints`` of them, one more while a save is
  written, and a SavedModel of the tables and dense weights."""
  checkpoint = table_state_bytes(p) + dense_state_bytes(p)
  saved_model = table_bytes(p) + dense_weights(p) * FLOAT_BYTES
  return {"checkpoint": checkpoint, "saved_model": saved_model,
          "peak": (keep_checkpoints + 1) * checkpoint + saved_model}


def _size(path: str) -> int:
  try:
    return os.path.getsize(path)
  except OSError:        # removed since it was listed (a checkpoint the Estimator replaced)
    return 0


def local_bytes(path: str) -> int:
  """Bytes of a local file, or of the files under a local directory (0 when absent)."""
  if os.path.isfile(path):
    return _size(path)
  return sum(_size(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files)


def check_disk(p: Dict, model_dir: str, keep_checkpoints: int = P.DEFAULT_KEEP_CHECKPOINTS) -> Dict[str, int]:
  """The disk estimate; DoesNotFit (one line, naming the flags) when it exceeds the free space of
  a local ``model_dir``'s file system plus what the model dir already holds. A remote model dir
  (``scheme://``) is not checked."""
  est = disk_estimate(p, keep_checkpoints)
  if "://" in model_dir:
    return est
  existing = os.path.abspath(model_dir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  free = shutil.disk_usage(existing).free + local_bytes(model_dir)
  if est["peak"] > free:
    raise DoesNotFit(
        f"training {p['model']} needs about {est['peak'] / GIB:.1f} GiB of disk in {model_dir} "
        f"({keep_checkpoints} checkpoint(s) of {est['checkpoint'] / GIB:.1f} GiB, one more while saving, "
        f"and a SavedModel of {est['saved_model'] / GIB:.1f} GiB) but {free / GIB:.1f} GiB are free there; "
        f"keep fewer checkpoints with {DISK_FLAGS[0]} or make the tables smaller with {', '.join(DISK_FLAGS[1:])}")
  return est
