"""Fuzzing both raw readers at volume: inputs tried, crashes, rows unaccounted.

  .venv/bin/python benchmarks/fuzz_readers.py [--rows=200000] [--pipeline_rows=40000] [--seed=1]

Parser level: --rows mutated lines per reader (Ali-CCP skeleton, Ali-CCP common, Avazu-style
CSV), 90% of them damaged (datagen/fuzz.py: truncation, wrong separators, non-UTF-8 bytes,
huge lines, NaN/inf/negative weights, non-0/1 labels, bad ids, control characters, stray
line breaks, byte flips, missing or extra columns, empty lines). Every line must be set aside
with a known reason or accepted as a valid row (checked field by field and encoded in the
raw TFT schema). A crash is any other exception.

Pipeline level: the Beam/TFT job (DirectRunner) on damaged files of both formats built from
--pipeline_rows impressions per split: 25% of rows damaged, duplicated and conflicting
sample ids, 5% of the common-feature rows missing, empty files, CRLF endings, byte-order
marks, repeated headers, cut last lines. Unaccounted rows = physical lines - headers -
records written - dead letters on disk; mismatches = reasons whose count differs from
what the parse functions give line by line.

Writes benchmarks/results/fuzz_readers.{json,md}.
"""

import collections
import os
import platform
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import results_io  # noqa: E402  (benchmarks/ is this script's directory)
from datagen import fuzz, synthetic  # noqa: E402
from pipeline import preprocess  # noqa: E402
from pipeline.sources import avazu  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", 200_000, "Mutated lines per reader at the parser level.")
flags.DEFINE_integer("pipeline_rows", 40_000, "Impressions per split and format in the Beam runs.")
flags.DEFINE_integer("seed", 1, "Seed of the mutations.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where to write the results.")


def _pools(work, n):
  synthetic.generate(os.path.join(work, "ali"), num_train=n, num_test=n, num_users=max(300, n // 20),
                     num_items=max(500, n // 10), impressions_per_common=5, anomalies=0, seed=3)
  synthetic.generate_avazu(os.path.join(work, "ava"), num_train=n, num_test=n, num_days=2,
                           num_devices=max(200, n // 10), bad_rows=0, seed=4)
  read = lambda *p: open(os.path.join(work, *p), "rb").read().splitlines()
  pools = {}
  for split in ("train", "test"):
    ava = read("ava", f"{split}.csv")
    pools[split] = {"skeleton": read("ali", f"sample_skeleton_{split}.csv"),
                    "common": read("ali", f"common_features_{split}.csv"),
                    "avazu_header": ava[0], "avazu": ava[1:]}
  return pools


def parser_level(pools, rows, rng):
  header = avazu.parse_header(pools["avazu_header"])
  coders = {"aliccp": fuzz.raw_coder("aliccp"), "avazu": fuzz.raw_coder("avazu")}
  out = {}
  for source in ("skeleton", "common", "avazu"):
    row = fuzz.Row(fuzz.AVAZU, header.columns) if source == "avazu" else fuzz.Row(fuzz.ALICCP)
    pool = pools[source]
    tally, crashes, invalid, n, huge = collections.Counter(), [], [], 0, 0
    start = time.perf_counter()
    while n < rows:
      base = [pool[rng.randrange(len(pool))] for _ in range(1000)]
      for line in fuzz.mutate_lines(base, rng, row, fraction=0.9, huge_every=800):
        for rec in fuzz.records(line + b"\n"):
          n += 1
          huge += len(rec) > (1 << 20)
          try:
            if source == "avazu":
              tally[fuzz.classify_avazu(rec, header, coders["avazu"])] += 1
            else:
              tally[fuzz.classify_aliccp(rec, source, coders["aliccp"])] += 1
          except fuzz.InvalidRow as e:
            invalid.append(str(e)[:300])
          except Exception as e:  # noqa: BLE001 -- a crash is what this counts
            crashes.append(f"{type(e).__name__}: {e}"[:300])
    seconds = time.perf_counter() - start
    out[source] = {"lines": n, "huge_lines": huge, "accepted": tally.pop(fuzz.ACCEPTED, 0),
                   "set_aside": dict(sorted(tally.items())), "crashes": len(crashes),
                   "crash_examples": crashes[:5], "invalid_accepted": len(invalid),
                   "invalid_examples": invalid[:5], "lines_per_s": round(n / seconds)}
    print(f"parser {source}: {n:,} lines, crashes {len(crashes)}, invalid accepted {len(invalid)}", flush=True)
  return out


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return data


def _damaged_aliccp(pools, raw, rng):
  row = fuzz.Row(fuzz.ALICCP)
  contents = {}
  for split, release in preprocess.SPLITS:
    pool = pools[release]
    skel = fuzz.mutate_lines(pool["skeleton"], rng, row, fraction=0.25, huge_every=2000)
    common = fuzz.mutate_lines([l for l in pool["common"] if rng.random() > 0.05], rng, row,
                               fraction=0.2, conflict_fraction=0)
    half = len(skel) // 2
    files = {f"sample_skeleton_{release}_0.csv": skel[:half], f"sample_skeleton_{release}_1.csv": skel[half:],
             f"sample_skeleton_{release}_2.csv": [], f"common_features_{release}_0.csv": common}
    contents[split] = {name: _write(os.path.join(raw, name), fuzz.file_bytes(lines, rng) if lines else b"")
                       for name, lines in files.items()}
  patterns = {s: {"skeleton": os.path.join(raw, f"sample_skeleton_{r}_*.csv"),
                  "common": os.path.join(raw, f"common_features_{r}_*.csv")} for s, r in preprocess.SPLITS}
  return contents, patterns


def _damaged_avazu(pools, raw, rng):
  contents = {}
  for split, release in preprocess.SPLITS:
    pool = pools[release]
    row = fuzz.Row(fuzz.AVAZU, avazu.parse_header(pool["avazu_header"]).columns)
    lines = fuzz.mutate_lines(pool["avazu"], rng, row, fraction=0.25, huge_every=2000)
    third = len(lines) // 3
    files = {f"{release}_{i}.csv": fuzz.file_bytes(lines[i * third:(i + 1) * third if i < 2 else None], rng,
                                                   header=pool["avazu_header"]) for i in range(3)}
    files[f"{release}_empty.csv"] = b""
    files[f"{release}_header_only.csv"] = pool["avazu_header"] + b"\n"
    contents[split] = {name: _write(os.path.join(raw, name), data) for name, data in files.items()}
  return contents, {s: {"files": [os.path.join(raw, f"{r}_*.csv")]} for s, r in preprocess.SPLITS}


def pipeline_level(pools, work, rng):
  out = {}
  for fmt, build in (("aliccp", _damaged_aliccp), ("avazu", _damaged_avazu)):
    raw, dest = os.path.join(work, f"{fmt}_raw"), os.path.join(work, f"{fmt}_out")
    contents, patterns = build(pools, raw, rng)
    start = time.perf_counter()
    crash = None
    try:
      rec = preprocess.run(fmt, patterns, dest, [], max_hash_buckets=4096, max_dead_letter_fraction=1.0)
    except Exception as e:  # noqa: BLE001 -- a crash is what this counts
      crash, rec = f"{type(e).__name__}: {e}"[:500], None
    seconds = time.perf_counter() - start
    result = {"seconds": round(seconds, 1), "crash": crash, "splits": {}}
    for split, _ in preprocess.SPLITS:
      data = contents[split]
      lines = sum(fuzz.physical_lines(d) for d in data.values())
      s = {"physical_lines": lines, "bytes": sum(len(d) for d in data.values())}
      if rec is not None:
        letters = fuzz.dead_letter_counts(dest, split)
        written = fuzz.written_sample_ids(dest, split)
        r = rec[split]
        if fmt == "aliccp":
          want = fuzz.expected_aliccp([d for n, d in data.items() if n.startswith("sample_skeleton")],
                                      [d for n, d in data.items() if n.startswith("common_features")])
          used = r["common_rows_used"] + r["common_rows_unused"]
          s.update(headers=0, written=len(written), set_aside=sum(letters.values()),
                   common_rows_used_or_unused=used,
                   unaccounted=lines - len(written) - sum(letters.values()) - used,
                   mismatches=int(want["skeleton_dead"] != r["skeleton_rows_set_aside"])
                   + int(want["common_dead"] != r["common_rows_set_aside"])
                   + int(want["written_ids"] != written),
                   set_aside_by_reason={f"{src}/{k}": v for (src, k), v in sorted(letters.items())})
        else:
          want = fuzz.expected_avazu(list(data.values()))
          s.update(headers=r["header_lines"], written=len(written), set_aside=sum(letters.values()),
                   unaccounted=lines - r["header_lines"] - len(written) - sum(letters.values()),
                   mismatches=int(want["dead"] != r["rows_set_aside"]) + int(want["written_ids"] != written),
                   set_aside_by_reason={k: v for (_, k), v in sorted(letters.items())})
      result["splits"][split] = s
    out[fmt] = result
    print(f"pipeline {fmt}: {result}", flush=True)
  return out


def _markdown(parser, pipeline, command, machine):
  lines = ["# Fuzzing the raw readers", "", f"Command: `{command}`", "", f"Machine: {machine}", "",
           "## Parser level (every line classified and checked)", "",
           "| reader | lines tried | of them > 1 MB | accepted (valid) | set aside | crashes | accepted but invalid | lines/s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for source, r in parser.items():
    lines.append(f"| {source} | {r['lines']:,} | {r['huge_lines']} | {r['accepted']:,} | "
                 f"{sum(r['set_aside'].values()):,} | {r['crashes']} | {r['invalid_accepted']} | {r['lines_per_s']:,} |")
  lines += ["", "Reasons set aside: " + "; ".join(
      f"{s}: " + ", ".join(f"{k} {v:,}" for k, v in r["set_aside"].items()) for s, r in parser.items()), "",
      "## Beam/TFT job on damaged files (DirectRunner)", "",
      "| format | split | physical lines | headers | written | set aside | common rows used/unused | unaccounted | mismatches vs line-by-line | crash |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for fmt, r in pipeline.items():
    for split, s in r["splits"].items():
      lines.append(f"| {fmt} | {split} | {s['physical_lines']:,} | {s.get('headers', '-')} | "
                   f"{s.get('written', '-'):,} | {s.get('set_aside', '-'):,} | "
                   f"{s.get('common_rows_used_or_unused', '-')} | {s.get('unaccounted', '-')} | "
                   f"{s.get('mismatches', '-')} | {r['crash'] or 'none'} |")
  return "\n".join(lines)


def main(argv):
  del argv
  rng = random.Random(FLAGS.seed)
  work = tempfile.mkdtemp(prefix="bench_fuzz_")
  try:
    pools = _pools(work, FLAGS.pipeline_rows)
    parser = parser_level(pools["train"], FLAGS.rows, rng)
    pipeline = pipeline_level(pools, work, rng)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  command = (".venv/bin/python benchmarks/fuzz_readers.py " + f"--rows={FLAGS.rows} --pipeline_rows={FLAGS.pipeline_rows} "
             f"--seed={FLAGS.seed}")
  machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
  totals = {"inputs_tried": sum(r["lines"] for r in parser.values())
            + sum(s["physical_lines"] for r in pipeline.values() for s in r["splits"].values()),
            "crashes": sum(r["crashes"] for r in parser.values()) + sum(bool(r["crash"]) for r in pipeline.values()),
            "invalid_accepted": sum(r["invalid_accepted"] for r in parser.values()),
            "rows_unaccounted": sum(s.get("unaccounted", 0) for r in pipeline.values() for s in r["splits"].values()),
            "mismatches": sum(s.get("mismatches", 0) for r in pipeline.values() for s in r["splits"].values())}
  md = _markdown(parser, pipeline, command, machine) + "\n\nTotals: " + ", ".join(
      f"{k.replace('_', ' ')} {v:,}" for k, v in totals.items()) + "\n"
  results_io.write(FLAGS.results_dir, "fuzz_readers",
                   {"command": command, "machine": machine, "totals": totals, "parser": parser,
                    "pipeline": pipeline}, md)
  return 0 if not (totals["crashes"] or totals["rows_unaccounted"] or totals["invalid_accepted"]
                   or totals["mismatches"]) else 1


if __name__ == "__main__":
  app.run(main)
