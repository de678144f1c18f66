"""The trainer's memory estimate (model_fn/memory.py) against the peak RSS of real training runs.

  .venv/bin/python benchmarks/memory_estimate.py [--runs=esmm:65536,base:65536,...]
  .venv/bin/python benchmarks/memory_estimate.py --rerender     # the table again, current constants

Preprocesses a small synthetic Ali-CCP sample with the default hash buckets, then trains each
MODEL:TABLE_ROWS of --runs for --train_steps steps (a checkpoint at step 0 and at the end, the
evaluation, the bias calibration, no export) in a process of its own; its peak RSS is the
process's ru_maxrss (os.wait4). The run's estimate comes from its params.json. Fits
peak = fixed + state x slope by least squares (memory.py's FIXED_BYTES and 1 + SAVE_FACTOR)
and writes benchmarks/results/memory_estimate.{json,md} with the estimate of every run under
memory.py's constants next to its measured peak.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import results_io  # noqa: E402  (benchmarks/ is this script's directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_list("runs", ["esmm:65536", "esmm:262144", "esmm:1048576", "base:65536", "base:262144",
                           "base:524288"], "MODEL:TABLE_ROWS of each training run (--table_rows).")
flags.DEFINE_integer("num_train", 20000, "Synthetic train impressions.")
flags.DEFINE_integer("train_steps", 20, "Steps of each run.")
flags.DEFINE_string("work_dir", None, "Data and models (default: a temporary dir, removed).")
flags.DEFINE_boolean("rerender", False, "Only write the table again from the results' runs.")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "benchmarks", "results"),
                    "Where to write memory_estimate.{json,md}.")

GIB = 1 << 30


def _env():
  return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0")


def _peak_rss(args, log):
  """Runs ``args``; its exit status and peak RSS in bytes."""
  with open(log, "w") as f:
    p = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(p.pid, 0)
  p.returncode = os.waitstatus_to_exitcode(status)
  return p.returncode, usage.ru_maxrss * 1024


def _measure(work):
  from model_fn import memory
  data = os.path.join(work, "preprocessed")
  if not os.path.exists(os.path.join(data, "reconciliation.json")):
    subprocess.run([sys.executable, "-m", "datagen.synthetic", f"--output_dir={work}/raw", "--format=aliccp",
                    f"--num_train={FLAGS.num_train}", f"--num_test={FLAGS.num_train // 4}", "--seed=1"],
                   cwd=ROOT, env=_env(), check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "pipeline.preprocess", "--format=aliccp", f"--input_dir={work}/raw",
                    f"--output_dir={data}"], cwd=ROOT, env=_env(), check=True, capture_output=True)
  runs = []
  for spec in FLAGS.runs:
    model, rows = spec.split(":")
    model_dir = os.path.join(work, f"{model}_{rows}")
    start = time.perf_counter()
    rc, peak = _peak_rss([sys.executable, "-m", "model_fn.train", f"--transform_dir={data}",
                          f"--model_dir={model_dir}", f"--model={model}", f"--table_rows={rows}",
                          f"--train_steps={FLAGS.train_steps}", "--eval_steps=1", "--noexport",
                          "--memory_limit_gb=1000"], model_dir + ".log")
    if rc:
      raise RuntimeError(f"{spec} failed (exit {rc}); see {model_dir}.log")
    with open(os.path.join(model_dir, "params.json")) as f:
      params = json.load(f)
    with open(os.path.join(model_dir, "train_result.json")) as f:
      calibration = json.load(f)["memory_estimate"]["calibration"]
    checkpoint = sum(os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir)
                     if n.startswith(f"model.ckpt-{FLAGS.train_steps}.data"))
    runs.append({"model": model, "table_rows": int(rows), "params": params, "peak_rss": peak,
                 "calibration_rows": calibration // memory.CALIBRATION_ROW_BYTES,
                 "checkpoint_bytes": checkpoint, "seconds": time.perf_counter() - start})
    print(spec, f"peak {peak / GIB:.2f} GiB, checkpoint {checkpoint / GIB:.2f} GiB", flush=True)
  return runs


def _render(runs, command):
  from model_fn import memory
  from model_fn.params import resolve_params
  rows = []
  for r in runs:
    p = resolve_params(r["params"])
    est = memory.estimate(p, r.get("calibration_rows", 0))
    state = est["tables"] + est["table_slots"] + est["dense"]
    rows.append({"model": r["model"], "table_rows": r["table_rows"],
                 "total_rows": sum(memory.P.table_rows(p).values()), "state": state,
                 "estimate": est["peak"], "measured": r["peak_rss"],
                 "checkpoint_bytes": r["checkpoint_bytes"], "error": est["peak"] / r["peak_rss"] - 1})
  state = np.array([r["state"] for r in rows], float)
  measured = np.array([r["measured"] for r in rows], float)
  slope, fixed = np.polyfit(state, measured, 1)
  lines = [f"Command: `{command}`", "", f"Machine: {results_io.machine()}.", "",
           f"Fit of the measured peaks: peak = {fixed / GIB:.2f} GiB + {slope:.2f} x state "
           f"(memory.py: FIXED_BYTES {memory.FIXED_BYTES / GIB:.2f} GiB, "
           f"1 + SAVE_FACTOR {1 + memory.SAVE_FACTOR:.2f}).",
           "", "| model | --table_rows | table rows | state (tables, slots, dense) GiB | checkpoint GiB | "
           "estimate GiB | measured peak RSS GiB | estimate / measured - 1 |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['table_rows']:,} | {r['total_rows']:,} | {r['state'] / GIB:.2f} | "
                 f"{r['checkpoint_bytes'] / GIB:.2f} | {r['estimate'] / GIB:.2f} | {r['measured'] / GIB:.2f} | "
                 f"{100 * r['error']:+.0f}% |")
  lines += ["", "state: the variables (tables with the lazy Adam slots, per table set; dense layers with "
            "Adam and the moving average). The estimate is memory.estimate of the run's params.json."]
  numbers = {"command": command, "fit": {"fixed_bytes": fixed, "slope": slope}, "table": rows, "runs": runs}
  return numbers, "\n".join(lines)


def main(argv):
  del argv
  path = os.path.join(FLAGS.results_dir, "memory_estimate.json")
  if FLAGS.rerender:
    with open(path) as f:
      old = json.load(f)
    numbers, markdown = _render(old["runs"], old["command"])
  else:
    command = (f"python benchmarks/memory_estimate.py --runs={','.join(FLAGS.runs)} "
               f"--num_train={FLAGS.num_train} --train_steps={FLAGS.train_steps}")
    if FLAGS.work_dir:
      os.makedirs(FLAGS.work_dir, exist_ok=True)
      runs = _measure(FLAGS.work_dir)
    else:
      with tempfile.TemporaryDirectory() as work:
        runs = _measure(work)
    numbers, markdown = _render(runs, command)
  results_io.write(FLAGS.results_dir, "memory_estimate", numbers, markdown)


if __name__ == "__main__":
  app.run(main)
