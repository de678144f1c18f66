"""The public Ali-CCP at its size and shape, end to end on this machine: generate, preprocess,
train one epoch of each model, evaluate on the whole test split, export.

  .venv/bin/python benchmarks/full_scale.py --scale=1 --work_dir=/data/aliccp_full
  .venv/bin/python benchmarks/full_scale.py --scale=0.1      # the development loop
  .venv/bin/python benchmarks/full_scale.py --scale=0.01     # the mechanics, in minutes

Each stage is a process of its own, run as a user would run it:

  generate     python -m datagen.synthetic --profile=release --scale=S --output_dir=WORK/raw
  preprocess   python -m pipeline.preprocess --format=aliccp --layout=grouped --input_dir=WORK/raw
                   --output_dir=WORK/preprocessed [--partitions=P --parallel_partitions=2]
  train_MODEL  python -m model_fn.train --transform_dir=WORK/preprocessed --model_dir=WORK/models/MODEL
                   --model=MODEL --num_epochs=1 --keep_checkpoints=1 (the SavedModel export included)
  evaluate_MODEL  python -m model_fn.evaluate --data=WORK/preprocessed --models=MODEL:DIR
                   --ground_truth=WORK/raw/ground_truth_test.csv.gz (the paper's protocol on the
                   whole test split, and the entire-space CVR AUC against the true conversions);
                   one process per model, so each stage's peak memory is one model's

A stage that finished is not run again (its figures are kept in WORK/stages/STAGE.json), so a
run that stopped goes on where it stopped; --redo names stages to run again. Per stage: wall
seconds, the peak resident memory of its process tree (sampled), the bytes its output holds on
disk and its rows per second. Then the targets of the full release (docs/scaling.md) and the
AUCs. Writes benchmarks/results/NAME.{json,md} (default full_scale, or full_scale_SCALE).
"""

import glob
import json
import math
import os
import re
import shutil
import sys
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

import process_stats  # noqa: E402
import results_io  # noqa: E402
from model_fn.memory import local_bytes  # noqa: E402

FLAGS = flags.FLAGS
GIB = 1 << 30
# The targets for the full release on this machine.
TARGETS = {"generate_s": 30 * 60, "end_to_end_s": 90 * 60, "preprocess_rows_per_s": 40_000,
           "train_rows_per_s": 40_000, "peak_rss_bytes": 16 * GIB, "disk_bytes": 60 * 10 ** 9,
           "preprocessed_over_raw_text": 0.5}
STAGES = ("generate", "preprocess", "train", "evaluate")
# Impressions (train and test) per preprocessing partition: the DirectRunner holds a partition's
# join in memory, about 1.9 GiB per million impressions of the release's shape, and two run at once.
IMPRESSIONS_PER_PARTITION = 3_000_000


def define_flags():
  flags.DEFINE_float("scale", 1.0, "Size of the generated release (1: the public release's 85M impressions).",
                     lower_bound=1e-5, upper_bound=1.0)
  flags.DEFINE_string("work_dir", None, "Where the data, the outputs and the stage markers go "
                      "(default: runs/full_scale_SCALE in the checkout).")
  flags.DEFINE_list("models", ["esmm", "base"], "The models trained, one epoch each: MODEL, or "
                    "MODEL:FLAG;FLAG... with model_fn.train flags of its own (after --train_args), e.g. "
                    "base:--table_rows_per_id=2; each model once (a flag's value cannot hold a comma).")
  flags.DEFINE_enum("layout", "grouped", ["grouped", "rows"], "pipeline.preprocess --layout (rows: with "
                    "--notrain_examples, the train split as column blocks only).")
  flags.DEFINE_integer("batch_size", 1024, "Training batch size (impressions).")
  flags.DEFINE_integer("partitions", -1, "--partitions of the preprocessing job, 2 at a time (-1: one per "
                       f"{IMPRESSIONS_PER_PARTITION:,} impressions of both splits, an even count, at least 2: both "
                       "cores busy to the end).")
  flags.DEFINE_integer("eval_steps_in_training", 20, "--eval_steps of the training stages: the whole test "
                       "split is evaluated once, by the evaluate stage.")
  flags.DEFINE_integer("save_checkpoints_steps", 10_000, "--save_checkpoints_steps of the training stages "
                       "(10,000 steps: about 10M impressions between saves).")
  flags.DEFINE_integer("keep_checkpoints", 1, "--keep_checkpoints of the training stages (1: the last "
                       "checkpoint and the SavedModel are what a model dir holds).")
  flags.DEFINE_list("train_args", [], "More model_fn.train flags (comma-separated).")
  flags.DEFINE_list("preprocess_args", [], "More pipeline.preprocess flags (comma-separated).")
  flags.DEFINE_enum("through", "evaluate", list(STAGES), "The last stage run (the results hold the "
                    "stages run so far).")
  flags.DEFINE_list("redo", [], "Stages to run again even if they finished (generate, preprocess, "
                    "train_MODEL, evaluate_MODEL).")
  flags.DEFINE_float("sample_seconds", 1.0, "Interval of the memory sampler.")
  flags.DEFINE_string("results_dir", os.path.join(ROOT, "benchmarks", "results"), "Where to write the results.")
  flags.DEFINE_string("name", None, "Results file name (default full_scale, or full_scale_SCALE).")


def model_args(item: str) -> Tuple[str, List[str]]:
  """(model, its own model_fn.train flags) of a --models item MODEL[:FLAG;FLAG...]."""
  model, _, rest = item.partition(":")
  return model, [a for a in rest.split(";") if a]


def _scale_label(scale: float) -> str:
  return "1" if scale == 1 else format(scale, "g").replace(".", "_")


class Run:
  """The stages of one work dir: each runs once, its figures kept in WORK/stages/STAGE.json."""

  def __init__(self, work: str):
    self.work = work
    self.raw, self.pre = os.path.join(work, "raw"), os.path.join(work, "preprocessed")
    os.makedirs(os.path.join(work, "stages"), exist_ok=True)
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)

  def model_dir(self, model: str) -> str:
    return os.path.join(self.work, "models", model)

  def stage(self, name: str, cmd: List[str], output: str, rows: int = 0, clean: Optional[str] = None) -> dict:
    """Runs stage ``name`` unless it finished before; its figures."""
    marker = os.path.join(self.work, "stages", name + ".json")
    if os.path.exists(marker) and name not in FLAGS.redo:
      with open(marker) as f:
        got = json.load(f)
      print(f"{name}: finished before ({got['seconds']:.0f} s); not run again")
      return got
    if clean and os.path.exists(clean):
      shutil.rmtree(clean)        # a stage that did not finish leaves nothing a rerun would trip on
    log = os.path.join(self.work, "logs", name + ".log")
    print(f"{name}: {' '.join(cmd)}", flush=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    run = process_stats.run_measured(cmd, log, ROOT, env, FLAGS.sample_seconds, disk_path=self.work)
    if run.returncode != 0:
      with open(log) as f:
        tail = f.read()[-3000:]
      raise SystemExit(f"{name} failed (exit {run.returncode}); the end of {log}:\n{tail}")
    got = {"seconds": round(run.seconds, 1), "peak_rss_bytes": run.peak_rss, "cpu_s": run.cpu,
           "output_bytes": local_bytes(output), "peak_disk_growth_bytes": run.peak_disk_growth,
           "command": " ".join(cmd)}
    if rows:
      got["rows"] = rows
      got["rows_per_s"] = round(rows / run.seconds)
    with open(marker, "w") as f:
      json.dump(got, f, indent=2)
    print(f"{name}: {got['seconds']:.0f} s, peak RSS {run.peak_rss / GIB:.2f} GiB, "
          f"{got['output_bytes'] / 1e9:.2f} GB on disk", flush=True)
    return got


def _generated(raw: str) -> dict:
  """The generator's summary of what it wrote (datagen.release's summary file)."""
  path = os.path.join(raw, "summary.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _train_rate(log: str, batch_size: int) -> Optional[float]:
  """Impressions per second while training: the Estimator's global_step/sec lines (after the
  first, which holds the start-up) times the batch size."""
  with open(log) as f:
    rates = [float(m) for m in re.findall(r"global_step/sec: ([0-9.]+)", f.read())]
  rates = rates[1:] or rates
  return round(batch_size * sum(rates) / len(rates)) if rates else None


def main(argv):
  del argv
  py = sys.executable
  label = _scale_label(FLAGS.scale)
  work = FLAGS.work_dir or os.path.join(ROOT, "runs", f"full_scale_{label}")
  r = Run(work)
  stages: Dict[str, dict] = {}
  start = time.perf_counter()
  stages["generate"] = r.stage("generate", [py, "-m", "datagen.synthetic", "--profile=release",
                                            f"--scale={FLAGS.scale}", f"--output_dir={r.raw}"],
                               r.raw, clean=r.raw)
  gen = _generated(r.raw)
  impressions = {s: int(gen.get(s, {}).get("impressions", 0)) for s in ("train", "test")}
  if sum(impressions.values()):
    stages["generate"]["rows_per_s"] = round(sum(impressions.values()) / stages["generate"]["seconds"])
  # An even count: two at a time, no partition runs alone at the end.
  partitions = FLAGS.partitions if FLAGS.partitions >= 0 else 2 * max(1, math.ceil(
      sum(impressions.values()) / (2 * IMPRESSIONS_PER_PARTITION)))
  if STAGES.index(FLAGS.through) >= STAGES.index("preprocess"):
    stages["preprocess"] = r.stage(
        "preprocess", [py, "-m", "pipeline.preprocess", "--format=aliccp", f"--layout={FLAGS.layout}",
                       *(["--notrain_examples"] if FLAGS.layout == "rows" else []),
                       f"--input_dir={r.raw}", f"--output_dir={r.pre}", "--overwrite",
                       *([f"--partitions={partitions}", "--parallel_partitions=2"] if partitions > 1 else []),
                       *FLAGS.preprocess_args],
        r.pre, rows=sum(impressions.values()))
  models = dict(model_args(item) for item in FLAGS.models)
  if len(models) != len(FLAGS.models):
    raise app.UsageError(f"--models names a model twice: {FLAGS.models}")
  for model, own_args in models.items() if STAGES.index(FLAGS.through) >= STAGES.index("train") else ():
    name = f"train_{model}"
    stages[name] = r.stage(
        name, [py, "-m", "model_fn.train", f"--transform_dir={r.pre}", f"--model_dir={r.model_dir(model)}",
               f"--model={model}", "--num_epochs=1", f"--batch_size={FLAGS.batch_size}",
               f"--eval_steps={FLAGS.eval_steps_in_training}",
               f"--save_checkpoints_steps={FLAGS.save_checkpoints_steps}",
               f"--keep_checkpoints={FLAGS.keep_checkpoints}", *FLAGS.train_args, *own_args],
        r.model_dir(model), rows=impressions["train"], clean=r.model_dir(model))
    stages[name]["train_rows_per_s"] = _train_rate(os.path.join(work, "logs", name + ".log"), FLAGS.batch_size)
    stages[name]["checkpoint_bytes"] = sum(os.path.getsize(p) for p in glob.glob(
        os.path.join(r.model_dir(model), "model.ckpt-*.data-*")))
  truth = os.path.join(r.raw, "ground_truth_test.csv.gz")
  metrics = {}
  for model in models if FLAGS.through == "evaluate" else ():
    name, report = f"evaluate_{model}", os.path.join(work, f"evaluation_{model}.json")
    stages[name] = r.stage(
        name, [py, "-m", "model_fn.evaluate", f"--data={r.pre}", f"--models={model}:{r.model_dir(model)}",
               f"--ground_truth={truth}", f"--output={report}",
               f"--report_dir={os.path.join(work, 'report', model)}"],
        report, rows=impressions["test"])
    with open(report) as f:
      metrics.update(json.load(f))    # MODEL, MODEL:uncalibrated and the oracle (the same in each)
  wall = time.perf_counter() - start
  numbers = {"command": " ".join([".venv/bin/python benchmarks/full_scale.py", *sys.argv[1:]]),
             "scale": FLAGS.scale, "through": FLAGS.through, "layout": FLAGS.layout, "work_dir": work, "machine": results_io.machine(), "generated": gen,
             "stages": stages, "metrics": metrics, "wall_s_this_invocation": round(wall, 1),
             "disk_bytes": {"raw": local_bytes(r.raw), "preprocessed": local_bytes(r.pre),
                            "models": local_bytes(os.path.join(work, "models"))}}
  numbers["targets"] = targets(numbers)
  results_io.write(FLAGS.results_dir, FLAGS.name or ("full_scale" if FLAGS.scale == 1 else f"full_scale_{label}"),
                   numbers, markdown(numbers))


def peak_disk(stages: dict) -> int:
  """The most the work dir held at once: at each stage, the earlier stages' outputs plus what the
  stage added at its fullest sample (the preprocessing's partition files, a checkpoint save)."""
  before, peak = 0, 0
  for st in stages.values():
    peak = max(peak, before + st["peak_disk_growth_bytes"])
    before += st["output_bytes"]
  return peak


def targets(n: dict) -> List[dict]:
  """Each target of the full release against this run (at another scale, for the record)."""
  st = n["stages"]
  trains = [k for k in st if k.startswith("train_")]
  done = "evaluate_esmm" in st and "train_esmm" in st
  raw_text = n["generated"].get("raw_text_bytes")
  disk = sum(n["disk_bytes"].values())
  out = [("generation of the release", st["generate"]["seconds"], TARGETS["generate_s"] * n["scale"], "<=")]
  if "preprocess" in st:
    out.append(("preprocessing, impressions/s", st["preprocess"].get("rows_per_s", 0),
                TARGETS["preprocess_rows_per_s"], ">="))
  if done:
    end_to_end = st["preprocess"]["seconds"] + st["evaluate_esmm"]["seconds"] + st["train_esmm"]["seconds"]
    out.insert(1, ("preprocess + ESMM epoch + evaluation + export, s", end_to_end,
                   TARGETS["end_to_end_s"] * n["scale"], "<="))
  out += [(f"training {k[6:]}, impressions/s", st[k].get("train_rows_per_s") or 0, TARGETS["train_rows_per_s"], ">=")
          for k in trains]
  out += [(f"peak RSS of {k}, GiB", st[k]["peak_rss_bytes"] / GIB, TARGETS["peak_rss_bytes"] / GIB, "<=") for k in st]
  if done:
    out.append(("raw + preprocessed + models on disk, GB", disk / 1e9, TARGETS["disk_bytes"] / 1e9 * n["scale"], "<="))
  if all("peak_disk_growth_bytes" in v for v in st.values()):
    out.append(("disk at the fullest moment of any stage, GB", peak_disk(st) / 1e9,
                TARGETS["disk_bytes"] / 1e9 * n["scale"], "<="))
  if raw_text and "preprocess" in st:
    out.append(("preprocessed output / raw text bytes", n["disk_bytes"]["preprocessed"] / raw_text,
                TARGETS["preprocessed_over_raw_text"], "<="))
  return [{"target": what, "measured": round(float(v), 3), "wanted": round(float(w), 3), "op": op,
           "met": bool(v <= w if op == "<=" else v >= w)} for what, v, w, op in out]


def markdown(n: dict) -> str:
  gen = n["generated"]
  through = n.get("through", "evaluate")
  lines = [f"# Ali-CCP at scale {n['scale']:g}, " + ("end to end" if through == "evaluate" else f"through {through}"),
           "", f"`{n['command']}` on {n['machine']}.", ""]
  if gen:
    splits = ", ".join("{} {:,} impressions over {:,} common rows".format(s, gen[s]["impressions"], gen[s]["common_rows"])
                       for s in ("train", "test") if s in gen)
    lines += [f"Generated: {splits}; raw text {gen.get('raw_text_bytes', 0) / 1e9:.2f} GB, "
              f"gzip {n['disk_bytes']['raw'] / 1e9:.2f} GB on disk.", ""]
  lines += ["| stage | wall s | rows/s | peak RSS GiB | output GB | disk added at its fullest GB |",
            "|---|---|---|---|---|---|"]
  for name, st in n["stages"].items():
    rate = st.get("train_rows_per_s") or st.get("rows_per_s")
    growth = st.get("peak_disk_growth_bytes")
    lines.append(f"| {name} | {st['seconds']:.0f} | {rate if rate else '-'} | {st['peak_rss_bytes'] / GIB:.2f} | "
                 f"{st['output_bytes'] / 1e9:.2f} | {'-' if growth is None else f'{growth / 1e9:.2f}'} |")
  if any(k.startswith("train_") for k in n["stages"]):
    lines += ["", "Training rows/s: the Estimator's steps per second times the batch size; the train stage's "
              "wall time also holds start-up, a short evaluation and the export."]
  if n["metrics"]:
    lines += ["", "| metric | " + " | ".join(n["metrics"]) + " |", "|---|" + "---|" * len(n["metrics"])]
  keys = ["auc/ctr", "auc/cvr_clicked", "auc/ctcvr", "auc/cvr_all_vs_truth", "calibration/cvr_clicked"]
  for key in keys if n["metrics"] else ():
    if any(key in m for m in n["metrics"].values()):
      lines.append(f"| {key} | " + " | ".join(
          "-" if m.get(key) is None else f"{m[key]:.4f}" for m in n["metrics"].values()) + " |")
  from model_fn.evaluation import constant_heads   # here: the stages' launcher stays without TensorFlow
  dead = constant_heads({name: m for name, m in n["metrics"].items() if isinstance(m, dict)})
  if dead:
    lines += ["", "Heads that predict one value for every impression (a dead tower): " + ", ".join(dead) + "."]
  lines += ["", "| target (full release; time and disk scaled to this run) | measured | wanted | met |",
            "|---|---|---|---|"]
  lines += [f"| {t['target']} | {t['measured']:,} | {t['op']} {t['wanted']:,} | {'yes' if t['met'] else 'NO'} |"
            for t in n["targets"]]
  return "\n".join(lines)


if __name__ == "__main__":
  define_flags()
  app.run(main)
