import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Hypothesis's caches (the unicode tables of text strategies) go outside the checkout.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "hypothesis"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import glob  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Every hypothesis test: the same examples on every run, no deadline (CI machines vary), and no
# example database written into the checkout. A test's own settings add max_examples and the
# like on top of this profile.
settings.register_profile("project", derandomize=True, deadline=None, database=None, print_blob=False)
settings.load_profile("project")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipeline", "model_fn", "preprocessing", "orchestration", "datagen")    # what setup.py installs and BUILD declares


@pytest.fixture(scope="session")
def package_modules():
  """Every .py file of the project's packages, relative to the checkout (sorted)."""
  return sorted(os.path.relpath(p, ROOT) for pkg in PACKAGES
                for p in glob.glob(os.path.join(ROOT, pkg, "**", "*.py"), recursive=True))


def _large_test_files():
  """The test files BUILD's LARGE_TESTS names (they train models, run Beam or start processes)."""
  import ast
  with open(os.path.join(ROOT, "BUILD")) as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "LARGE_TESTS":
      return {os.path.basename(e.value) for e in node.value.elts}
  raise AssertionError("BUILD defines no LARGE_TESTS")


def pytest_collection_modifyitems(config, items):
  """Marks each test slow (its file is a large Bazel test) or fast: ./run_tests.sh -m "not slow"."""
  large = _large_test_files()
  for item in items:
    item.add_marker(pytest.mark.slow if os.path.basename(str(item.fspath)) in large else pytest.mark.fast)
