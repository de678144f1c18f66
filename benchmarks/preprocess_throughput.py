"""Throughput, worker scaling and peak memory of the Ali-CCP Beam/TFT job on DirectRunner.

  .venv/bin/python benchmarks/preprocess_throughput.py \
      [--runs=1000000:1,1000000:2,4000000:2,1000000:1:in_memory,4000000:1:in_memory,4000000:1,
              1000000:1:in_memory:2,1000000:2:in_memory:2,4000000:2:in_memory:8]
      [--repeats=1] [--test_fraction=0.1] [--work_dir=runs/bench_preprocess]

Each run is IMPRESSIONS:WORKERS[:MODE[:PARTITIONS]]: synthetic Ali-CCP data with IMPRESSIONS train
impressions (and --test_fraction of that in the test split) is generated once per size, then
``python -m pipeline.preprocess`` runs on it as its own process on DirectRunner with
``--direct_running_mode=MODE --direct_num_workers=WORKERS`` (MODE multi_processing unless
given, or in_memory: one process; plus --beam_args). With PARTITIONS the job runs with
``--partitions=PARTITIONS --parallel_partitions=WORKERS`` (pipeline/partition.py), each
partition a pipeline of one DirectRunner worker in MODE.
Reported per run: impressions/s (rows read in both splits over the job's wall clock, from
process start to exit), the peak resident memory of the whole process tree (the launcher
and its worker processes, summed, sampled every --sample_seconds), the CPU seconds of the
launcher and of its descendants (read with the memory), and the bytes per impression of the
raw CSV and of the gzip TFRecords. Then the targets: 2 workers over 1
worker at the same size and mode (>= 1.7x), peak memory of the largest size over the smallest
at the same workers and mode (<= 1.3x; partitioned runs are compared with each other, whatever
their number of partitions), and impressions/s against the 85M-impression public release in
under 2 hours (>= 12,000/s). With --repeats=N the list runs N times over, and the scaling
target is the median of the N pairs, each 2-worker run over the 1-worker run of its own
repeat (the machine's speed drifts by the hour; a pair measured minutes apart shares it).
For each 2-worker/1-worker pair also the most scaling the 2-worker run's CPU seconds allow on
this machine's cores (all of them busy all the time), and the machine's own scaling in the same
minutes (--control_loops): a fixed pure-Python loop (short byte strings split, parsed and
hashed, as the job does per row) timed in one process and in two at once, before and after each
repeat's runs. What a 2-worker run can gain is bounded by it: on a virtual machine whose cores
share the host's, the same work takes more CPU seconds while both are busy. Writes
benchmarks/results/NAME.{json,md} (--name, default preprocess_throughput).

A run whose rows do not reconcile is refused by the job (nothing published); the benchmark
records it with the job's error and then locates the rows that went missing: it reads the
sample ids of the refused output, takes away those written and those set aside (dead
letters), and reports where the rest sat in the raw skeleton file, as stretches of line
numbers (a run of missing lines with gaps of at most 2 lines; a density of 0.5 means every
other line: the runner deals a shuffle's keys to its workers alternately).
"""

import glob
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from typing import Dict, Iterable, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

import process_stats  # noqa: E402
import results_io  # noqa: E402
from datagen import synthetic  # noqa: E402
from model_fn.memory import local_bytes  # noqa: E402
from preprocessing import features as F  # noqa: E402

FLAGS = flags.FLAGS
RATE_TARGET = 12_000          # impressions/s: 85M in under 2 hours
SCALING_TARGET = 1.7          # 2 workers over 1
MEMORY_TARGET = 1.3           # peak memory, largest size over smallest


def define_flags():
  flags.DEFINE_list("runs", ["1000000:1", "1000000:2", "4000000:2", "1000000:1:in_memory", "4000000:1:in_memory",
                             "4000000:1", "1000000:1:in_memory:2", "1000000:2:in_memory:2", "4000000:2:in_memory:8"],
                    "IMPRESSIONS:WORKERS[:MODE[:PARTITIONS]] per run (MODE: the DirectRunner's "
                    "--direct_running_mode, multi_processing unless given; PARTITIONS: the job's "
                    "--partitions, with WORKERS partitions at a time, each with one worker).")
  flags.DEFINE_integer("repeats", 1, "Run the whole --runs list this many times, one list after the "
                       "other (a drift of the machine's speed then falls on every run alike); worker "
                       "scaling is the median over the repeats of each repeat's own 2-worker/1-worker pair.")
  flags.DEFINE_float("test_fraction", 0.1, "Test impressions as a fraction of the train impressions.")
  flags.DEFINE_integer("max_hash_buckets", 1 << 20, "--max_hash_buckets of the job.")
  flags.DEFINE_list("beam_args", [], "More options for the job (comma-separated).")
  flags.DEFINE_float("sample_seconds", 0.5, "Interval of the memory sampler.")
  flags.DEFINE_string("work_dir", os.path.join(ROOT, "runs", "bench_preprocess"),
                      "Where the generated data and outputs go (data is reused across invocations).")
  flags.DEFINE_boolean("keep_outputs", False, "Keep each run's output (default: removed after measuring).")
  flags.DEFINE_string("results_dir", os.path.join(ROOT, "benchmarks", "results"), "Where to write the results.")
  flags.DEFINE_string("name", "preprocess_throughput", "Results file name (RESULTS_DIR/NAME.{json,md}).")
  flags.DEFINE_string("code_dir", ROOT, "The checkout whose job runs (default this one); another, e.g. "
                      "`git worktree add /tmp/before <commit>`, gives before/after figures on the same data "
                      "(the results name its commit).")
  flags.DEFINE_integer("control_loops", 10_000_000, "Iterations of the machine control's loop (about 5 "
                       "seconds each; 0: no control). Before and after each repeat's runs it is timed "
                       "in one process, in two at once, twice more in two and once more in one.")


def _spin(loops: int) -> float:
  """The machine control's workload: a fixed pure-Python loop of the kind the job runs per row
  (a short line split, parsed and hashed into a dict); its wall seconds."""
  start = time.perf_counter()
  table = {}
  for i in range(loops):
    fields = b"%d,%d,%d" % (i, i * 7, i % 1013)
    parts = fields.split(b",")
    table[zlib.crc32(parts[1]) & 4095] = int(parts[2])
  return time.perf_counter() - start


def machine_scaling(loops: int) -> dict:
  """The machine's own 2-process scaling now: ``loops`` iterations of _spin in one process, and
  in two processes at once (each its own ``loops``), in the order one, two, two, one (a drift of
  the machine's speed falls on both alike). Scaling: twice the work in the two-process time,
  over the work in the one-process time."""
  with multiprocessing.get_context("fork").Pool(2) as pool:
    one = [pool.apply(_spin, (loops,))]
    two = [max(pool.map(_spin, [loops, loops], chunksize=1)) for _ in range(2)]
    one.append(pool.apply(_spin, (loops,)))
  alone, both = statistics.mean(one), statistics.mean(two)
  return {"one_process_s": round(alone, 2), "two_processes_s": round(both, 2), "scaling": round(2 * alone / both, 2)}


MODES = ("multi_processing", "in_memory", "multi_threading")


def parse_run(spec: str) -> Tuple[int, int, str, int]:
  """IMPRESSIONS:WORKERS[:MODE[:PARTITIONS]] -> (impressions, workers, mode, partitions)."""
  parts = spec.split(":")
  if (len(parts) not in (2, 3, 4) or (len(parts) >= 3 and parts[2] not in MODES)
      or (len(parts) == 4 and not (parts[3].isdigit() and int(parts[3]) >= 2))):
    raise ValueError(f"--runs: {spec!r} is not IMPRESSIONS:WORKERS[:MODE[:PARTITIONS]] (MODE one of "
                     f"{', '.join(MODES)}; PARTITIONS 2 or more)")
  return (int(parts[0]), int(parts[1]), parts[2] if len(parts) >= 3 else MODES[0],
          int(parts[3]) if len(parts) == 4 else 0)


def mode_label(run: dict) -> str:
  return run.get("mode", MODES[0]) + (f", {run['partitions']} partitions" if run.get("partitions") else "")


def run_job(raw: str, out: str, workers: int, mode: str = MODES[0],
            partitions: int = 0) -> Tuple[float, int, str, int, Dict[str, float]]:
  """Runs the job as a process (its output goes to OUT.log); (seconds, peak tree RSS bytes,
  output, exit status, CPU seconds {"launcher": the job's own process, "others": its
  descendants: the runner's worker processes, or the partitions' jobs}). CPU is read at each
  sample, so what a process spends after its last sample is missed (at most --sample_seconds
  per core). With ``partitions``, ``workers`` partitions run at a time, each with one
  DirectRunner worker."""
  runner = [f"--direct_running_mode={mode}", f"--direct_num_workers={1 if partitions else workers}"]
  if partitions:
    runner += [f"--partitions={partitions}", f"--parallel_partitions={workers}"]
  cmd = [sys.executable, "-m", "pipeline.preprocess", "--format=aliccp", f"--input_dir={raw}",
         f"--output_dir={out}", f"--max_hash_buckets={FLAGS.max_hash_buckets}", "--overwrite",
         *runner, *FLAGS.beam_args]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=FLAGS.code_dir)
  log = out.rstrip("/") + ".log"
  run = process_stats.run_measured(cmd, log, FLAGS.code_dir, env, FLAGS.sample_seconds)
  return run.seconds, run.peak_rss, open(log).read(), run.returncode, run.cpu


def _failure(output: str) -> str:
  """The job's own account of why it failed: its last error and reconciliation lines."""
  lines = output.splitlines()
  start = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith(("RuntimeError", "error:"))), None)
  return "\n".join(lines[start:] if start is not None else lines[-20:])


def missing_stretches(raw_ids: Sequence[int], kept_ids: Iterable[int], max_gap: int = 2,
                      top: int = 5) -> dict:
  """Where the raw rows whose sample id is not in ``kept_ids`` sat in the raw file.

  ``raw_ids``: the sample id of each raw line, in file order. Returns the number missing and
  the ``top`` largest stretches of missing lines (0-based line numbers; lines of one stretch
  are at most ``max_gap`` apart), each with its count and density (count / lines spanned)."""
  kept = set(kept_ids)
  lines = [i for i, sid in enumerate(raw_ids) if sid not in kept]
  stretches = []
  for i in lines:
    if stretches and i - stretches[-1][1] <= max_gap:
      stretches[-1][1] = i
      stretches[-1][2] += 1
    else:
      stretches.append([i, i, 1])
  stretches.sort(key=lambda s: -s[2])
  return {"missing": len(lines), "stretches": len(stretches),
          "largest": [{"first_line": a, "last_line": b, "rows": n, "density": round(n / (b - a + 1), 3)}
                      for a, b, n in stretches[:top]]}


def _raw_sample_ids(path: str) -> List[int]:
  with open(path, "rb") as f:
    return [int(line.split(b",", 1)[0]) for line in f]


def _output_sample_ids(pattern: str) -> List[int]:
  import tensorflow as tf   # only here: the benchmark itself runs without TF otherwise
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    return []
  ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(8192).map(
      lambda x: tf.io.parse_example(x, {F.SAMPLE_ID: tf.io.FixedLenFeature([], tf.int64)})[F.SAMPLE_ID])
  return [int(v) for batch in ds.as_numpy_iterator() for v in batch]


def _dead_letter_sample_ids(staging: str, split: str) -> List[int]:
  ids = []
  for path in sorted(glob.glob(os.path.join(staging, "dead_letter", f"{split}-*.jsonl"))):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        if "sample_id" in record:
          ids.append(int(record["sample_id"]))
        elif record.get("source") == "skeleton" and "line" in record:
          head = record["line"].split(",", 1)[0]
          if head.isdigit():
            ids.append(int(head))
  return ids


def locate_missing(raw: str, staging: str) -> Dict[str, dict]:
  """Per split: the raw skeleton rows that a refused run neither wrote nor set aside."""
  out = {}
  for split, suffix in (("train", "train"), ("eval", "test")):
    kept = _output_sample_ids(os.path.join(staging, split, "part-*"))
    kept += _dead_letter_sample_ids(staging, split)
    out[split] = missing_stretches(_raw_sample_ids(os.path.join(raw, f"sample_skeleton_{suffix}.csv")), kept)
  return out


def _train_dir(out: str) -> str:
  """The train split's tf.Examples, or its blocks when the job wrote no tf.Examples for it
  (--beam_args=--notrain_examples)."""
  examples = os.path.join(out, "train")
  return examples if os.path.isdir(examples) else os.path.join(out, F.BLOCKS_DIR)


def main(argv):
  del argv
  runs = [parse_run(r) for r in FLAGS.runs]
  rows, controls = [], []

  def control(repeat: int, when: str) -> None:
    if FLAGS.control_loops > 0:
      controls.append({"repeat": repeat, "when": when, **machine_scaling(FLAGS.control_loops)})
      print(f"machine control, repeat {repeat + 1}, {when}: {controls[-1]}", flush=True)

  for repeat, index, (impressions, workers, mode, partitions) in (
      (i, j, r) for i in range(FLAGS.repeats) for j, r in enumerate(runs)):
    raw = os.path.join(FLAGS.work_dir, f"raw_{impressions}")
    stamp = os.path.join(raw, "generated.json")
    n_test = int(impressions * FLAGS.test_fraction)
    if not os.path.exists(stamp):
      shutil.rmtree(raw, ignore_errors=True)
      start = time.perf_counter()
      synthetic.generate(raw, impressions, n_test, num_users=max(20_000, impressions // 20),
                         num_items=max(30_000, impressions // 8))
      with open(stamp, "w") as f:
        json.dump({"train": impressions, "test": n_test, "seconds": time.perf_counter() - start}, f)
    out = os.path.join(FLAGS.work_dir, f"out_{impressions}_{workers}_{mode}_{partitions}")
    if FLAGS.repeats > 1:
      out += f"_r{repeat}"
    kind = {"mode": mode, "partitions": partitions, "repeat": repeat}
    print(f"preprocessing {impressions:,} + {n_test:,} impressions with {workers} worker(s), {mode_label(kind)}"
          f"{f', repeat {repeat + 1} of {FLAGS.repeats}' if FLAGS.repeats > 1 else ''} ...", flush=True)
    if index == 0:
      control(repeat, "before")
    seconds, peak, output, status, cpu = run_job(raw, out, workers, mode, partitions)
    if index == len(runs) - 1:
      control(repeat, "after")
    cpu_s = {"cpu_s_launcher": round(cpu["launcher"], 1), "cpu_s_others": round(cpu["others"], 1)}
    if status != 0:
      # Recorded, not hidden: a run whose rows do not reconcile is refused by the job itself.
      rows.append({"impressions": impressions + n_test, "workers": workers, **kind,
                   "seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2 ** 20), **cpu_s,
                   "failed": _failure(output)})
      staging = [os.path.join(FLAGS.work_dir, p) for p in os.listdir(FLAGS.work_dir)
                 if p.startswith(os.path.basename(out) + ".staging-")]
      if "do not reconcile" in rows[-1]["failed"] and len(staging) == 1:
        rows[-1]["missing"] = locate_missing(raw, staging[0])
      print(rows[-1], flush=True)
      for path in [out] + staging:
        shutil.rmtree(path, ignore_errors=True)
      write_results(rows, controls)
      continue
    with open(os.path.join(out, F.RECONCILIATION)) as f:
      rec = json.load(f)["splits"]
    read = sum(r["skeleton_rows_read"] for r in rec.values())
    written = sum(r["rows_written"] for r in rec.values())
    raw_bytes = sum(os.path.getsize(os.path.join(raw, f)) for f in os.listdir(raw)
                    if f.endswith(".csv") and not f.startswith("ground_truth"))
    rows.append({"impressions": read, "impressions_written": written, "workers": workers, **kind,
                 "seconds": round(seconds, 1), "impressions_per_second": round(read / seconds),
                 "peak_rss_mb": round(peak / 2 ** 20), **cpu_s,
                 "raw_csv_bytes_per_impression": round(raw_bytes / read, 1),
                 "tfrecord_gzip_bytes_per_impression": round(
                     (local_bytes(_train_dir(out)) + local_bytes(os.path.join(out, "eval"))) / written, 1)})
    print(rows[-1], flush=True)
    if not FLAGS.keep_outputs:
      shutil.rmtree(out, ignore_errors=True)
    write_results(rows, controls)


def scaling_pairs(ok: List[dict]) -> List[Tuple[int, str, dict, dict]]:
  """(impressions, mode label, 1-worker run, 2-worker run) of the completed runs that scale with
  workers: the multi-process runner's workers, or partitions run at a time (in_memory runs
  without partitions are one process). A 2-worker run is paired with the 1-worker run of its
  own repeat (--repeats), so each pair ran at about the same time."""
  scales = lambda r: r.get("mode", MODES[0]) == MODES[0] or r.get("partitions")  # noqa: E731
  by = {(r["impressions"], mode_label(r), r.get("repeat", 0), r["workers"]): r for r in ok if scales(r)}
  return [(n, label, by[(n, label, rep, 1)], r) for (n, label, rep, w), r in sorted(by.items())
          if w == 2 and (n, label, rep, 1) in by]


def compute_targets(rows: List[dict]) -> List[Tuple[str, str, float, bool]]:
  """(what, wanted, measured, met) of each target the runs so far can be held to."""
  targets = []
  ok = [r for r in rows if "failed" not in r]
  ratios: Dict[Tuple[int, str], List[float]] = {}
  for n, label, one, r in scaling_pairs(ok):   # worker scaling, one ratio per repeat
    ratios.setdefault((n, label), []).append(r["impressions_per_second"] / one["impressions_per_second"])
  for (n, label), rs in ratios.items():
    ratio = statistics.median(rs)
    each = f" (median of {len(rs)} pairs: {', '.join(f'{x:.2f}' for x in rs)})" if len(rs) > 1 else ""
    targets.append((f"2 workers / 1 worker at {n:,} impressions, {label}{each}", f">= {SCALING_TARGET}",
                    round(ratio, 2), ratio >= SCALING_TARGET))
  # Peak memory also of failed runs: they ran to the end, only their output was refused. Runs
  # with partitions are compared whatever their number of partitions (it grows with the input).
  # Over repeats, each size's highest peak.
  group = lambda r: (r["workers"], r.get("mode", MODES[0]), bool(r.get("partitions")))
  mem: Dict[tuple, dict] = {}
  for r in rows:
    key = (r["impressions"],) + group(r)
    if key not in mem or r["peak_rss_mb"] > mem[key]["peak_rss_mb"]:
      mem[key] = r
  for key in sorted({k[1:] for k in mem}):
    sizes = sorted(k[0] for k in mem if k[1:] == key)
    if len(sizes) > 1:
      big, small = mem[(sizes[-1],) + key], mem[(sizes[0],) + key]
      ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
      label = key[1] + (f", {small['partitions']} and {big['partitions']} partitions" if key[2] else "")
      targets.append((f"peak memory {sizes[-1]:,} / {sizes[0]:,} impressions, {key[0]} worker(s), {label}",
                      f"<= {MEMORY_TARGET}", round(ratio, 2), ratio <= MEMORY_TARGET))
  if ok:
    best = max(ok, key=lambda r: r["impressions_per_second"])
    targets.append(("impressions/s, best run (85M in 2 h)", f">= {RATE_TARGET:,}",
                    best["impressions_per_second"], best["impressions_per_second"] >= RATE_TARGET))
  if len(ok) < len(rows):
    targets.append(("runs that completed and published their output", f"{len(rows)} of {len(rows)}",
                    len(ok), False))
  return targets


def _cpu_s(r: dict) -> float:
  """A run's CPU seconds: the launcher's and its descendants'."""
  return r["cpu_s_launcher"] + r["cpu_s_others"]


def _busy_cores(r: dict) -> float:
  return _cpu_s(r) / r["seconds"]


def _repeated(rows: List[dict]) -> bool:
  """Whether the rows come from more than one repeat (--repeats): tables then name the repeat."""
  return any(r.get("repeat") for r in rows)


def machine_scaling_of(controls: Sequence[dict], repeat: int):
  """The machine control's scaling around a repeat's runs (mean of its readings), or None."""
  got = [c["scaling"] for c in controls if c["repeat"] == repeat]
  return round(statistics.mean(got), 2) if got else None


def scaling_bounds(rows: List[dict], controls: Sequence[dict] = ()) -> List[dict]:
  """For each 2-worker run with a 1-worker run of the same size and mode (both with CPU
  readings): the 2-worker run's time had all of its CPU seconds been spread over every core, and
  the scaling over the 1-worker run that this would have given; with ``controls`` (machine
  control readings), also the machine's own 2-process scaling around that repeat's runs and the
  measured scaling as a fraction of it."""
  ok = [r for r in rows if "failed" not in r and "cpu_s_launcher" in r]
  repeated = _repeated(rows)
  out = []
  for n, label, one, r in scaling_pairs(ok):
    cpu, one_cpu = _cpu_s(r), _cpu_s(one)
    ideal = cpu / os.cpu_count()
    again = f", repeat {r['repeat'] + 1}" if repeated else ""
    measured = one["seconds"] / r["seconds"]
    out.append({"what": f"{n:,} impressions, {label}{again}", "cpu_s": round(cpu, 1),
                "cpu_s_one_worker": round(one_cpu, 1), "cpu_ratio": round(cpu / one_cpu, 2),
                "ideal_seconds": round(ideal, 1), "bound": round(one["seconds"] / ideal, 2),
                "measured": round(measured, 2)})
    machine = machine_scaling_of(controls, r.get("repeat", 0))
    if machine:
      out[-1].update(machine=machine, of_machine=round(measured / machine, 2))
  return out


def code_version(path: str) -> str:
  """The commit of the checkout at ``path`` (with "+changes" when its tracked files differ from
  it), or "unknown" outside git."""
  git = lambda *args: subprocess.run(["git", "-C", path, *args], capture_output=True, text=True)  # noqa: E731
  head = git("rev-parse", "--short", "HEAD")
  if head.returncode != 0:
    return "unknown"
  return head.stdout.strip() + ("+changes" if git("status", "--porcelain", "--untracked-files=no").stdout.strip() else "")


def write_results(rows: List[dict], controls: Sequence[dict] = ()) -> None:
  """The results of the runs so far and the machine control's readings (rewritten after every
  run: a long invocation stopped part-way keeps what it measured)."""
  targets = compute_targets(rows)
  command = "python benchmarks/preprocess_throughput.py --runs=%s --test_fraction=%g --max_hash_buckets=%d%s%s%s%s" % (
      ",".join(FLAGS.runs), FLAGS.test_fraction, FLAGS.max_hash_buckets,
      f" --code_dir={FLAGS.code_dir}" if os.path.realpath(FLAGS.code_dir) != ROOT else "",
      f" --beam_args={','.join(FLAGS.beam_args)}" if FLAGS.beam_args else "",
      f" --repeats={FLAGS.repeats}" if FLAGS.repeats > 1 else "",
      f" --name={FLAGS.name}" if FLAGS.name != "preprocess_throughput" else "")
  if FLAGS.control_loops != FLAGS["control_loops"].default:
    command += f" --control_loops={FLAGS.control_loops}"
  machine, code = results_io.machine(), code_version(FLAGS.code_dir)
  bounds = scaling_bounds(rows, controls)
  repeated = _repeated(rows)
  numbers = {"command": command, "code": code, "machine": machine, "runner": "DirectRunner", "runs": rows,
             "targets": [dict(zip(("what", "target", "measured", "met"), t)) for t in targets],
             "scaling_bounds": bounds, "machine_control": list(controls)}
  lines = [f"Command: `{command}`", "", f"Code: {code}", "", f"Machine: {machine}; DirectRunner (--direct_running_mode as in the "
           "table; peak memory of the whole process tree)", "",
           "| " + ("repeat | " if repeated else "") + "impressions read | workers | mode | seconds | impressions/s | peak RSS (tree) MB | CPU s: launcher / others | busy cores | raw CSV B/impr. | gzip TFRecord B/impr. |",
           "|" + ("---:|" if repeated else "") + "---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    head = "| " + (f"{r.get('repeat', 0) + 1} | " if repeated else "") + f"{r['impressions']:,} | {r['workers']} | {mode_label(r)} | {r['seconds']} |"
    cpu = (f"{r['cpu_s_launcher']} / {r['cpu_s_others']} | {_busy_cores(r):.2f}"
           if "cpu_s_launcher" in r else " | ")
    if "failed" in r:
      lines.append(f"{head} FAILED (below) | {r['peak_rss_mb']:,} | {cpu} | | |")
      continue
    lines.append(f"{head} {r['impressions_per_second']:,} | {r['peak_rss_mb']:,} | {cpu} | "
                 f"{r['raw_csv_bytes_per_impression']} | {r['tfrecord_gzip_bytes_per_impression']} |")
  lines += ["", "CPU s: of the job's own process (the launcher: in multi_processing also the runner, "
            "which holds every shuffle's data) and of all its descendants (the worker processes, or "
            "the partitions' jobs), sampled with the memory. Busy cores: all of it over the wall time.",
            "", "| target | wanted | measured | met |", "|---|---|---:|---|"]
  for what, want, got, met in targets:
    lines.append(f"| {what} | {want} | {got:,} | {'yes' if met else 'NO'} |")
  if bounds:
    lines += ["", f"What the CPU allows on {os.cpu_count()} cores: the 2-worker run's CPU seconds spread over "
              "every core all the time would take the time below; 1 worker's seconds over that is "
              "the most scaling that run's work could have shown.", "",
              "| pair | 1-worker CPU s | 2-worker CPU s | 2-worker / 1-worker CPU | its time at every core busy | 1 worker's seconds over it | measured |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {b['what']} | {b['cpu_s_one_worker']} | {b['cpu_s']} | {b['cpu_ratio']} | {b['ideal_seconds']} | "
              f"{b['bound']}x | {b['measured']}x |" for b in bounds]
    if any("machine" in b for b in bounds):
      lines += ["", "The machine's own 2-process scaling around each pair (the control, below) and the "
                "pair's measured scaling as a fraction of it:", "",
                "| pair | measured | machine control | measured / machine |", "|---|---:|---:|---:|"]
      lines += [f"| {b['what']} | {b['measured']}x | {b['machine']}x | {b['of_machine']} |"
                for b in bounds if "machine" in b]
    lines += ["", "With partitions both runs do the same work in the same processes (one at a time or "
              "two), so a 2-worker / 1-worker CPU ratio other than 1 there is the machine's speed, not "
              "the work: above 1, its cores gave less per second while both were busy (a virtual "
              "machine's cores share the host's); below 1, it ran faster during the 2-worker run."]
  if controls:
    lines += ["", f"Machine control (`--control_loops={FLAGS.control_loops}`): a fixed pure-Python loop "
              "timed in one process and in two at once (one, two, two, one; means), before and after "
              "each repeat's runs. Scaling: twice the work in the two-process time over the work in the "
              "one-process time; 2.0 would be two cores that each give what one gives alone.", "",
              "| repeat | when | one process, s | two at once, s | scaling |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {c['repeat'] + 1} | {c['when']} | {c['one_process_s']} | {c['two_processes_s']} | "
              f"{c['scaling']}x |" for c in controls]
  for r in rows:
    if "failed" in r:
      which = f" (repeat {r.get('repeat', 0) + 1})" if repeated else ""
      lines += ["", f"Run of {r['impressions']:,} impressions with {r['workers']} worker(s), "
                f"{mode_label(r)}{which}, failed:", "", "```", r["failed"], "```"]
      for split, m in r.get("missing", {}).items():
        if not m["missing"]:
          continue
        lines += ["", f"{split}: {m['missing']:,} raw rows neither written nor set aside, in "
                  f"{m['stretches']:,} stretch(es) of the raw file; the largest:", "",
                  "| first line | last line | rows missing | density |", "|---:|---:|---:|---:|"]
        lines += [f"| {x['first_line']:,} | {x['last_line']:,} | {x['rows']:,} | {x['density']} |"
                  for x in m["largest"]]
  results_io.write(FLAGS.results_dir, FLAGS.name, numbers, "\n".join(lines))


if __name__ == "__main__":
  define_flags()
  app.run(main)
