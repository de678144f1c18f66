"""Throughput and storage cost of the Ali-CCP Beam/TFT job on DirectRunner.

  .venv/bin/python benchmarks/preprocess_throughput.py [--impressions=60000] [beam options]

Generates synthetic Ali-CCP data of the given size, runs pipeline.preprocess on it and
reports impressions/s (wall clock of the whole job, both splits) and bytes per impression
of the raw CSV and of the gzip TFRecords. The current layout copies the user side into
every impression; these figures are the baseline for the per-group layout (issue 7).
Writes benchmarks/results/preprocess_throughput.{json,md}.
"""

import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from pipeline import preprocess, synthetic  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("impressions", 60_000, "Impressions in the train split (test gets half).")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where to write the results.")


def _size(pattern_dir):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(pattern_dir) for f in fs)


def main(argv):
  beam_args = argv[1:]
  work = tempfile.mkdtemp(prefix="bench_pp_")
  try:
    raw = os.path.join(work, "raw")
    n_train, n_test = FLAGS.impressions, FLAGS.impressions // 2
    synthetic.generate(raw, n_train, n_test)
    raw_bytes = sum(os.path.getsize(os.path.join(raw, f)) for f in os.listdir(raw)
                    if not f.startswith("ground_truth"))
    out = os.path.join(work, "out")
    start = time.perf_counter()
    rec = preprocess.run("aliccp", preprocess._input_patterns(raw, {}), out, beam_args,
                         max_hash_buckets=32768)
    seconds = time.perf_counter() - start
    rows = sum(r["skeleton_rows_read"] for r in rec.values())
    written = sum(r["rows_written"] for r in rec.values())
    tfrecord_bytes = _size(os.path.join(out, "train")) + _size(os.path.join(out, "eval"))
    result = {
        "command": "python benchmarks/preprocess_throughput.py --impressions=%d %s" % (FLAGS.impressions, " ".join(beam_args)),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "beam_args": beam_args, "impressions_read": rows, "impressions_written": written,
        "seconds": round(seconds, 1), "impressions_per_second": round(rows / seconds),
        "raw_csv_bytes_per_impression": round(raw_bytes / rows, 1),
        "tfrecord_gzip_bytes_per_impression": round(tfrecord_bytes / written, 1),
        "layout": "user side copied into every impression",
    }
  finally:
    shutil.rmtree(work, ignore_errors=True)
  os.makedirs(FLAGS.results_dir, exist_ok=True)
  with open(os.path.join(FLAGS.results_dir, "preprocess_throughput.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = ["| impressions | seconds | impressions/s | raw CSV B/impr. | gzip TFRecord B/impr. | runner options |",
           "|---:|---:|---:|---:|---:|---|",
           f"| {rows:,} | {result['seconds']} | {result['impressions_per_second']:,} | "
           f"{result['raw_csv_bytes_per_impression']} | {result['tfrecord_gzip_bytes_per_impression']} | "
           f"{' '.join(beam_args) or 'DirectRunner, defaults'} |"]
  md = f"Command: `{result['command']}`\n\nMachine: {result['machine']}\n\n" + "\n".join(table) + "\n"
  with open(os.path.join(FLAGS.results_dir, "preprocess_throughput.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: FLAGS(argv, known_only=True))
