"""Writing a benchmark's results: benchmarks/results/<name>.json (numbers) and .md (table)."""

import json
import os


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
