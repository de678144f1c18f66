"""What a benchmark measures of a process it runs: wall seconds, the peak resident memory of its
process tree (sampled from /proc), the CPU seconds of the process and of its descendants, and
how much the disk it writes to filled while it ran (sampled)."""

import dataclasses
import os
import shutil
import subprocess
import time
from typing import Dict, List, Sequence, Tuple


def tree_stats(pid: int) -> Tuple[int, Dict[int, float]]:
  """(resident bytes of ``pid`` and all its descendants, {pid: CPU seconds so far} of each of
  them), from /proc."""
  children: Dict[int, List[int]] = {}
  rss: Dict[int, int] = {}
  cpu: Dict[int, float] = {}
  page, tick = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        stat = f.read()
      with open(f"/proc/{entry}/statm") as f:
        rss[int(entry)] = int(f.read().split()[1]) * page
    except (OSError, IndexError, ValueError):
      continue
    fields = stat[stat.rindex(")") + 2:].split()
    children.setdefault(int(fields[1]), []).append(int(entry))
    cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick   # utime + stime
  total, tree, todo = 0, {}, [pid]
  while todo:
    p = todo.pop()
    total += rss.get(p, 0)
    if p in cpu:
      tree[p] = cpu[p]
    todo.extend(children.get(p, ()))
  return total, tree


@dataclasses.dataclass
class Measured:
  seconds: float
  peak_rss: int                 # bytes, the process and its descendants summed, at the worst sample
  returncode: int
  cpu: Dict[str, float]         # {"launcher": the process's own CPU seconds, "others": its descendants'}
  peak_disk_growth: int = 0     # bytes: the file system's most used, at a sample, less its use at the start


def run_measured(cmd: Sequence[str], log: str, cwd: str, env: Dict[str, str], sample_seconds: float = 0.5,
                 disk_path: str = None) -> Measured:
  """Runs ``cmd`` with its output in the file ``log`` (a file, not a pipe: jobs log more than a pipe
  buffer holds), sampling its process tree every ``sample_seconds``. CPU is read at each sample, so
  what a process spends after its last sample is missed (at most ``sample_seconds`` per core).
  ``disk_path``: the file system whose used bytes are sampled too (anything else writing to it
  counts)."""
  start = time.perf_counter()
  disk_start = shutil.disk_usage(disk_path).used if disk_path else 0
  with open(log, "w") as f:
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    peak, cpu, disk_peak = 0, {}, disk_start
    while proc.poll() is None:
      rss, tree = tree_stats(proc.pid)
      peak = max(peak, rss)
      cpu.update(tree)     # processes that exited keep their last reading
      if disk_path:
        disk_peak = max(disk_peak, shutil.disk_usage(disk_path).used)
      time.sleep(sample_seconds)
  seconds = time.perf_counter() - start
  launcher = cpu.pop(proc.pid, 0.0)
  return Measured(seconds, peak, proc.returncode, {"launcher": launcher, "others": sum(cpu.values())},
                  disk_peak - disk_start)
