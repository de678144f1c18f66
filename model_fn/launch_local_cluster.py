"""A real multi-process Estimator cluster on this machine, for development and tests.

  python -m model_fn.launch_local_cluster [--ps=1] [--workers=1] [--evaluator] \
      [--task_logs=DIR] [--timeout_s=0] -- --transform_dir=T --model_dir=M [model_fn.train flags]

Starts one ``python -m model_fn.train`` process per task of a parameter-server cluster on
127.0.0.1 (free ports): the chief, ``--workers`` workers, ``--ps`` parameter servers and,
with ``--evaluator``, an evaluator. Each gets the TF_CONFIG a cluster manager (a Kubernetes
TFJob, a Slurm script) would set on its host; the training code is the same as on one
machine. The launcher waits for the chief, the workers and the evaluator to finish, then
stops the parameter servers (they serve until killed, as on a real cluster). If a task fails
or --timeout_s passes, every process is stopped and the exit status is non-zero. Each task
logs to DIR/<type>-<index>.log.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from absl import flags

from preprocessing import cli

FLAGS = flags.FLAGS
HOST = "127.0.0.1"


def define_flags(fv: flags.FlagValues = FLAGS):
  """The command-line flags (only when run as a program, so the module imports as a library),
  defined into ``fv`` with their bounds (checked as they are parsed, preprocessing/cli.py)."""
  fl = cli.Define(fv)
  fl.DEFINE_integer("ps", 1, "Parameter servers (the embedding tables are partitioned over them).",
                    lower_bound=1)
  fl.DEFINE_integer("workers", 1, "Workers besides the chief.", lower_bound=0)
  fl.DEFINE_boolean("evaluator", True, "Also start an evaluator (evaluates every new checkpoint).")
  fl.DEFINE_string("task_logs", None, "Per-task logs (default: MODEL_DIR/cluster_logs).")
  fl.DEFINE_integer("timeout_s", 0, "Stop everything and fail after this many seconds (0: no limit).",
                    lower_bound=0)


def check_train_args(train_args: Sequence[str]) -> None:
  """The model_fn.train flags every task will run with, parsed and validated here as model_fn.train
  does, before any task starts: a mistake is one error line, not a cluster of failed tasks."""
  from model_fn import train     # TensorFlow: only when a cluster is about to start
  cli.parse(["model_fn.train", *train_args], cli.flag_values(train.define_flags),
            validate=train.validate_flags)


def free_ports(n: int) -> List[int]:
  """``n`` distinct TCP ports that are free on the loopback interface now."""
  socks, ports = [], []
  try:
    for _ in range(n):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind((HOST, 0))
      socks.append(s)
      ports.append(s.getsockname()[1])
  finally:
    for s in socks:
      s.close()
  return ports


def cluster_spec(num_ps: int, num_workers: int) -> Dict[str, List[str]]:
  ports = iter(free_ports(1 + num_workers + num_ps))
  spec = {"chief": [f"{HOST}:{next(ports)}"]}
  if num_workers:
    spec["worker"] = [f"{HOST}:{next(ports)}" for _ in range(num_workers)]
  if num_ps:
    spec["ps"] = [f"{HOST}:{next(ports)}" for _ in range(num_ps)]
  return spec


def tf_config(cluster: Dict[str, List[str]], task_type: str, index: int) -> str:
  """The TF_CONFIG of one task (the evaluator is not part of the cluster spec, but gets it)."""
  return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index},
                     "environment": "cloud"})


class LocalCluster:
  """Context manager: starts the tasks; ``wait()`` for the result; every process is stopped on
  exit, also when the body raises."""

  def __init__(self, train_args: Sequence[str], log_dir: str, num_ps: int = 1, num_workers: int = 1,
               evaluator: bool = True, python: str = sys.executable):
    self.train_args = list(train_args)
    self.log_dir = log_dir
    self.cluster = cluster_spec(num_ps, num_workers)
    self.tasks = [(t, i) for t in ("ps", "chief", "worker") for i in range(len(self.cluster.get(t, [])))]
    if evaluator:
      self.tasks.append(("evaluator", 0))
    self.python = python
    self.procs: Dict[str, subprocess.Popen] = {}
    self._logs = []

  def __enter__(self) -> "LocalCluster":
    os.makedirs(self.log_dir, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for task_type, index in self.tasks:
      env = dict(os.environ, TF_CONFIG=tf_config(self.cluster, task_type, index), CUDA_VISIBLE_DEVICES="",
                 PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
      log = open(self.log_path(task_type, index), "wb")
      self._logs.append(log)
      self.procs[f"{task_type}-{index}"] = subprocess.Popen(
          [self.python, "-m", "model_fn.train", *self.train_args], env=env, stdout=log,
          stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    return self

  def log_path(self, task_type: str, index: int) -> str:
    return os.path.join(self.log_dir, f"{task_type}-{index}.log")

  def wait(self, timeout_s: float = 0) -> Dict[str, int]:
    """Waits until the chief, workers and evaluator have exited (or one failed, or the timeout).
    Returns {task: exit status} of those; raises RuntimeError on a failure or the timeout."""
    finite = {name: p for name, p in self.procs.items() if not name.startswith("ps-")}
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while True:
      codes = {name: p.poll() for name, p in finite.items()}
      failed = {n: c for n, c in codes.items() if c not in (None, 0)}
      dead_ps = {n: p.poll() for n, p in self.procs.items() if n.startswith("ps-") and p.poll() is not None}
      if failed or dead_ps:
        failed = failed or dead_ps
        reasons = "".join(f"\n  {n}: {self.last_error(n)}" for n in sorted(failed))
        raise RuntimeError(f"tasks failed: {failed}; logs in {self.log_dir}{reasons}")
      if all(c == 0 for c in codes.values()):
        return codes
      if deadline and time.monotonic() > deadline:
        raise RuntimeError(f"timed out after {timeout_s:g} s; still running: "
                           f"{sorted(n for n, c in codes.items() if c is None)}; logs in {self.log_dir}")
      time.sleep(0.5)

  def last_error(self, name: str) -> str:
    """The reason an exited task gave: the last ``error:`` line of its log, else its last line.
    (When several tasks fail at once, the first seen is reported and the others are stopped,
    possibly before they wrote their own reason, so the reason is read from the ones that
    exited by themselves.)"""
    task_type, index = name.rsplit("-", 1)
    with open(self.log_path(task_type, int(index)), errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(empty log)"])[-1]

  def stop(self) -> None:
    """SIGTERM to every task's process group, SIGKILL to what is left after 10 s."""
    for p in self.procs.values():
      if p.poll() is None:
        _signal_group(p, signal.SIGTERM)
    end = time.monotonic() + 10
    for p in self.procs.values():
      try:
        p.wait(max(0.1, end - time.monotonic()))
      except subprocess.TimeoutExpired:
        _signal_group(p, signal.SIGKILL)
        p.wait()
    for log in self._logs:
      log.close()

  def __exit__(self, *exc) -> None:
    self.stop()

  def tail(self, lines: int = 30) -> str:
    out = []
    for task_type, index in self.tasks:
      with open(self.log_path(task_type, index), errors="replace") as f:
        text = f.read().splitlines()[-lines:]
      out.append(f"--- {task_type}-{index} ---\n" + "\n".join(text))
    return "\n".join(out)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(p.pid, sig)
  except ProcessLookupError:
    pass


def _model_dir(train_args: Sequence[str]) -> Optional[str]:
  for a in train_args:
    if a.startswith("--model_dir="):
      return a.split("=", 1)[1]
  return None


def main(argv):
  train_args = argv[1:]
  model_dir = _model_dir(train_args)
  if not model_dir:
    print("error: pass the model_fn.train flags after --, --model_dir=... among them", file=sys.stderr)
    return cli.EXIT_USAGE
  try:
    check_train_args(train_args)
  except cli.UsageError as e:
    print(f"error: model_fn.train flags: {e}", file=sys.stderr)
    return cli.EXIT_USAGE
  log_dir = FLAGS.task_logs or os.path.join(model_dir, "cluster_logs")
  cluster = LocalCluster(train_args, log_dir, FLAGS.ps, FLAGS.workers, FLAGS.evaluator)
  print(f"cluster {json.dumps(cluster.cluster)}; evaluator: {FLAGS.evaluator}; logs in {log_dir}", flush=True)
  with cluster:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
      codes = cluster.wait(FLAGS.timeout_s)
    except RuntimeError as e:
      print(cluster.tail(), file=sys.stderr)
      print(f"error: {e}", file=sys.stderr)
      return 1
  print(f"all tasks finished: {codes}")
  with open(cluster.log_path("chief", 0), errors="replace") as f:
    sys.stdout.write("".join(line for line in f if line.startswith(("saved_model:", "task steps"))))
  return 0


if __name__ == "__main__":
  cli.run(main, define_flags, positional=True)   # the model_fn.train flags come after --
