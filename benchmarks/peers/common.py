"""What the three benchmark runners (this project, DeepCTR, torch-rechub) share.

Each runner is a separate program, run by benchmarks/peer_throughput.py with its own
interpreter (this project's .venv or the peers' .venv-peers), so this module uses only the
standard library and numpy, which both have.

A runner trains ESMM on the same rows and fields with the same shape (embedding 18, towers
360-200-80, batch 1024) and writes one JSON result: examples/s in the timed window, steps,
peak resident memory, and (after a full pass) its test predictions for the parent to score.
"""

import argparse
import json
import os
import time

import numpy as np

# The arrays the parent writes for the peers (benchmarks/peer_throughput.py, _export_arrays):
# <data>/<split>.npz with ids [n, len(fields)] int64 (hashed ids, before folding) and the labels.
LABELS = ("click", "conversion", "ctcvr")


def parse_args(description: str) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument("--data", required=True, help="Directory of train.npz / test.npz (peers) or the "
                  "transform output (this project).")
  ap.add_argument("--fields", required=True, help="Comma-separated field names, in column order.")
  ap.add_argument("--table_rows", type=int, required=True, help="Rows per embedding table (cap).")
  ap.add_argument("--buckets", required=True, help="JSON {field: hash buckets} of the transform output.")
  ap.add_argument("--batch_size", type=int, default=1024)
  ap.add_argument("--embedding_dim", type=int, default=18)
  ap.add_argument("--hidden", default="360,200,80")
  ap.add_argument("--seconds", type=float, default=0.0,
                  help="Throughput mode: stop after this many timed seconds (0: train --epochs).")
  ap.add_argument("--epochs", type=int, default=1)
  ap.add_argument("--warmup_steps", type=int, default=20, help="Steps before the timed window.")
  ap.add_argument("--seed", type=int, default=1)
  ap.add_argument("--params", type=json.loads, default={},
                  help="JSON: this project's model params over its defaults; DeepCTR's "
                  "keras_policy (a Keras mixed precision policy).")
  ap.add_argument("--work_dir", required=True, help="Scratch dir of this run.")
  ap.add_argument("--out", required=True, help="Result JSON path (predictions go next to it).")
  args = ap.parse_args()
  args.fields = args.fields.split(",")
  args.hidden = [int(u) for u in args.hidden.split(",")]
  buckets = json.loads(args.buckets)
  args.rows = {f: min(int(buckets[f]), args.table_rows) for f in args.fields}
  return args


def fold(ids: np.ndarray, fields, rows) -> np.ndarray:
  """Hashed ids [n, fields] folded into each field's table (ids mod rows), as this project's
  ``table_rows`` does in its graph."""
  return np.stack([ids[:, j] % rows[f] for j, f in enumerate(fields)], axis=1)


def load_split(data: str, split: str, fields, rows):
  z = np.load(os.path.join(data, f"{split}.npz"))
  return fold(z["ids"], fields, rows), {k: z[k].astype(np.float32) for k in LABELS}


class Clock:
  """Counts steps; the timed window starts after ``warmup`` steps and, with ``seconds`` > 0,
  ``done`` turns true once the window is that long."""

  def __init__(self, warmup: int, seconds: float):
    self.warmup, self.seconds = warmup, seconds
    self.steps = 0
    self.t0 = self.t1 = None
    self.timed_steps = 0

  def step(self) -> None:
    self.steps += 1
    now = time.perf_counter()
    if self.steps == self.warmup:
      self.t0 = now
    elif self.steps > self.warmup:
      self.t1, self.timed_steps = now, self.steps - self.warmup

  @property
  def done(self) -> bool:
    return self.seconds > 0 and self.t0 is not None and self.t1 is not None and \
        self.t1 - self.t0 >= self.seconds

  def examples_per_s(self, batch_size: int) -> float:
    if not self.timed_steps:
      raise RuntimeError(f"no timed steps: only {self.steps} steps ran (warm-up {self.warmup})")
    return self.timed_steps * batch_size / (self.t1 - self.t0)


def peak_rss_mb() -> float:
  """This process's peak resident set (VmHWM). Not ru_maxrss: Linux keeps that across execve,
  so a process started by a large parent reports the parent's peak if it is higher."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  raise RuntimeError("no VmHWM in /proc/self/status")


def write_result(args, system: str, clock: Clock, predictions=None, extra=None) -> None:
  """The result JSON; ``predictions`` {ctr, cvr, ctcvr} of the test split go to <out>.npz."""
  result = {"system": system, "table_rows": args.table_rows, "rows": args.rows,
            "examples_per_s": clock.examples_per_s(args.batch_size), "steps": clock.steps,
            "timed_steps": clock.timed_steps, "timed_seconds": clock.t1 - clock.t0,
            "peak_rss_mb": peak_rss_mb(), "peak_rss_source": "VmHWM", "mode": "throughput" if args.seconds > 0 else "epochs",
            "epochs": args.epochs, **(extra or {})}
  if predictions is not None:
    np.savez(args.out + ".npz", **{k: np.asarray(v, np.float64).reshape(-1) for k, v in predictions.items()})
    result["predictions"] = args.out + ".npz"
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
