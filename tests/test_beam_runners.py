"""The preprocessing job on a runner that runs the code elsewhere, the way remote workers do.

setup.py is what Beam stages with --setup_file: its sdist must carry every module the workers
import. The test builds the sdist, installs it into a directory of its own, and runs the
unchanged job with Beam's standard options for the DirectRunner's multi-process mode, from a
directory outside the checkout with only that install on the path. Its output must equal the
in-process run's, example for example.
"""

import glob
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import tensorflow as tf

from datagen import synthetic
from pipeline import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
  """Built the way Beam builds it for --setup_file (python setup.py sdist), from a copy."""
  root = tmp_path_factory.mktemp("sdist")
  src = root / "src"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info",
                                                           "bazel-*", "build", "dist"))
  proc = subprocess.run([sys.executable, "setup.py", "sdist", f"--dist-dir={root / 'dist'}"], cwd=src,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = glob.glob(str(root / "dist" / "*.tar.gz"))
  return {"root": root, "path": path}


def test_the_sdist_carries_every_module_the_workers_import(sdist, package_modules):
  with tarfile.open(sdist["path"]) as tar:
    names = tar.getnames()
  top = names[0].split("/")[0]
  inside = {n[len(top) + 1:] for n in names}
  missing = [m for m in package_modules if m not in inside]
  assert not missing, f"setup.py leaves out {missing}: remote workers could not import them"
  assert "setup.py" in inside


@pytest.fixture(scope="module")
def installed(sdist):
  target = sdist["root"] / "site"
  proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                         "--no-index", "--quiet", f"--target={target}", sdist["path"]],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return target


def test_the_installed_package_imports_without_the_checkout(installed, tmp_path, package_modules):
  modules = [m[:-len(".py")].replace("/", ".").removesuffix(".__init__") for m in package_modules]
  code = ("import importlib, sys\n"
          f"for m in {modules!r}:\n"
          "  mod = importlib.import_module(m)\n"
          f"  assert mod.__file__.startswith({str(installed)!r}), (m, mod.__file__)\n"
          "print('ok', len(sys.modules))\n")
  env = dict(os.environ, PYTHONPATH=str(installed), TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


def _examples(out_dir: str, split: str):
  rows = {}
  for path in glob.glob(os.path.join(out_dir, split, "part-*.tfrecord.gz")):
    for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
      ex = tf.train.Example.FromString(record.numpy())
      parsed = {k: tuple(getattr(v, v.WhichOneof("kind")).value) for k, v in ex.features.feature.items()}
      rows[parsed["sample_id"]] = parsed
  return rows


def test_multi_process_runner_from_the_installed_package_matches_the_in_process_run(installed, tmp_path):
  raw = str(tmp_path / "raw")
  synthetic.generate(raw, num_train=1500, num_test=500, num_users=200, num_items=300,
                     impressions_per_common=10, anomalies=2, seed=5)
  local = str(tmp_path / "local")
  preprocess.run("aliccp", preprocess._input_patterns(raw, {}), local, [], max_hash_buckets=2048)
  remote = str(tmp_path / "multi")
  work = tmp_path / "elsewhere"
  work.mkdir()
  env = dict(os.environ, PYTHONPATH=str(installed), TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "pipeline.preprocess", "--format=aliccp", f"--input_dir={raw}",
         f"--output_dir={remote}", "--max_hash_buckets=2048",
         # Beam's own options, passed through unchanged:
         "--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
  proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "[OK]" in proc.stdout and "train: skeleton rows read 1,500" in proc.stdout
  for split in ("train", "eval"):
    a, b = _examples(local, split), _examples(remote, split)
    assert len(a) > 0 and a == b, split
