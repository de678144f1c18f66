"""Writing a benchmark's results: benchmarks/results/<name>.json (numbers) and .md (table)."""

import json
import math
import os
import platform
from typing import Dict

import numpy as np


def write(results_dir: str, name: str, numbers, markdown: str) -> str:
  """Writes <results_dir>/<name>.{json,md}, prints the markdown; returns the path stem."""
  os.makedirs(results_dir, exist_ok=True)
  base = os.path.join(results_dir, name)
  from model_fn.metrics import json_ready    # TensorFlow: imported when results are written
  with open(base + ".json", "w") as f:
    # An undefined figure (the interval of a single seed, say) is null, never NaN.
    json.dump(json_ready(numbers), f, indent=2, sort_keys=True, allow_nan=False)
  with open(base + ".md", "w") as f:
    f.write(markdown if markdown.endswith("\n") else markdown + "\n")
  print(markdown)
  return base


def machine() -> str:
  """The machine in words: architecture, CPU model, cores, the CPU's native bfloat16 instructions
  (what the trainer's train_matmul_dtype "auto" decides on: machines that differ there train at
  different speeds) and Python."""
  from model_fn import hardware   # TensorFlow: imported when results are written, not at start-up
  try:
    with open("/proc/cpuinfo") as f:
      cpuinfo = f.read()
  except OSError:               # no /proc (macOS): model from platform, no bfloat16 flags
    cpuinfo = ""
  model = next((line.partition(":")[2].strip() for line in cpuinfo.splitlines()
                if line.partition(":")[0].strip() == "model name"), platform.processor())
  bf16 = hardware.native_bfloat16_flags(cpuinfo)
  return (f"{platform.machine()}, {model or 'CPU model unknown'}, {os.cpu_count()} cores, native bfloat16: "
          f"{', '.join(bf16) if bf16 else 'none'}, Python {platform.python_version()}")


def t_interval(values) -> Dict[str, float]:
  """Mean, standard deviation and the 95% t-interval of the mean of ``values`` (one per seed)."""
  from scipy import stats
  values = np.asarray(values, np.float64)
  n = len(values)
  mean = float(values.mean())
  std = float(values.std(ddof=1)) if n > 1 else 0.0
  half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else float("nan")
  return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": n}
