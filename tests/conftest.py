import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import glob  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipeline", "model_fn", "preprocessing")    # what setup.py installs and BUILD declares


@pytest.fixture(scope="session")
def package_modules():
  """Every .py file of the project's packages, relative to the checkout (sorted)."""
  return sorted(os.path.relpath(p, ROOT) for pkg in PACKAGES
                for p in glob.glob(os.path.join(ROOT, pkg, "**", "*.py"), recursive=True))
