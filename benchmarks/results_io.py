"""Writing a benchmark's results: benchmarks/results/<name>.json (numbers) and .md (table)."""

import json
import os
import platform


def write(results_dir: str, name: str, numbers, markdown: str) -> str:
  """Writes <results_dir>/<name>.{json,md}, prints the markdown; returns the path stem."""
  os.makedirs(results_dir, exist_ok=True)
  base = os.path.join(results_dir, name)
  with open(base + ".json", "w") as f:
    json.dump(numbers, f, indent=2, sort_keys=True)
  with open(base + ".md", "w") as f:
    f.write(markdown if markdown.endswith("\n") else markdown + "\n")
  print(markdown)
  return base


def machine() -> str:
  """The machine in words: architecture, CPU model, cores, the CPU's native bfloat16 instructions
  (what the trainer's train_matmul_dtype "auto" decides on: machines that differ there train at
  different speeds) and Python."""
  model, flags = platform.processor() or "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  bf16 = sorted(flags & {"amx_bf16", "avx512_bf16"})
  return (f"{platform.machine()}, {model or 'CPU model unknown'}, {os.cpu_count()} cores, native bfloat16: "
          f"{', '.join(bf16) if bf16 else 'none'}, Python {platform.python_version()}")
