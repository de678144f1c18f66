"""BUILD cannot rot: it lists every module, entry point and test that exists.

BUILD is Starlark, which for this file is also Python: it is evaluated here with stand-ins
for Bazel's functions that record the targets, and the targets are compared with the tree.
(`bazel test //...` itself runs with scripts/bazel_test.sh, see docs/scaling.md, "Bazel".)
"""

import fnmatch
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _targets():
  targets = []

  def rule(kind):
    def record(**attrs):
      targets.append(dict(attrs, kind=kind))
    return record

  def build_glob(patterns, exclude=()):
    out = []
    for pattern in patterns:
      for path in sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True)):
        rel = os.path.relpath(path, ROOT)
        if os.path.isfile(path) and not any(fnmatch.fnmatch(rel, e) for e in exclude):
          out.append(rel)
    return out

  scope = {"glob": build_glob, "package": lambda **_: None, "py_library": rule("py_library"),
           "py_binary": rule("py_binary"), "py_test": rule("py_test")}
  with open(os.path.join(ROOT, "BUILD")) as f:
    exec(compile(f.read(), "BUILD", "exec"), scope)
  return targets



def test_every_module_is_in_a_library_and_every_listed_file_exists(package_modules):
  targets = _targets()
  in_libraries = {src for t in targets if t["kind"] == "py_library" for src in t["srcs"]}
  missing = [m for m in package_modules if m not in in_libraries]
  assert not missing, f"modules no py_library in BUILD lists: {missing}"
  listed = {src for t in targets for src in t.get("srcs", [])} | {t["main"] for t in targets if "main" in t}
  assert all(os.path.isfile(os.path.join(ROOT, p)) for p in listed), sorted(
      p for p in listed if not os.path.isfile(os.path.join(ROOT, p)))
  # Every package directory is importable as a package (setup.py installs them by name).
  for module in package_modules:
    assert os.path.isfile(os.path.join(ROOT, os.path.dirname(module), "__init__.py")), module


def test_every_entry_point_is_a_binary(package_modules):
  mains = {t["main"] for t in _targets() if t["kind"] == "py_binary"}
  entry_points = [m for m in package_modules
                  if re.search(r'^if __name__ == "__main__":', open(os.path.join(ROOT, m)).read(), re.M)]
  assert entry_points and sorted(mains) == sorted(entry_points)


def test_every_test_file_is_a_test_target_and_the_slow_ones_are_large():
  tests = {t["srcs"][0]: t for t in _targets() if t["kind"] == "py_test"}
  files = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
  assert sorted(tests) == files
  for path, t in tests.items():
    assert t["main"] == "tests/pytest_main.py" and "tests/conftest.py" in t["srcs"], path
    assert t["size"] in ("small", "medium", "large", "enormous"), path
    # A test that builds a model or a cluster runs longer than Bazel's small-test timeout (60 s).
    text = open(os.path.join(ROOT, path)).read()
    if path != "tests/test_build.py" and re.search(r"train_and_evaluate|LocalCluster|daily\.run\(|preprocess\.run\(", text):
      assert t["size"] in ("medium", "large", "enormous"), f"{path} trains or preprocesses; mark it larger"


# Which project package may import which (BUILD's deps say the same).
ALLOWED_IMPORTS = {"preprocessing": set(), "pipeline": {"preprocessing"}, "model_fn": {"preprocessing"},
                   "orchestration": {"pipeline", "model_fn", "preprocessing"},
                   "datagen": {"pipeline", "preprocessing"}}


def _project_imports(path):
  """(package imported, at module level?) for every import of a project package in ``path``."""
  import ast
  tree = ast.parse(open(os.path.join(ROOT, path)).read())
  top = set(id(n) for n in tree.body)
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [node.module]
    for name in names:
      pkg = name.split(".")[0]
      if pkg in ALLOWED_IMPORTS:
        out.append((pkg, id(node) in top))
  return out


def test_imports_between_packages_run_one_way_and_at_module_level(package_modules):
  targets = {t["name"]: t for t in _targets() if t["kind"] == "py_library"}
  assert set(ALLOWED_IMPORTS) <= set(targets)
  for pkg, allowed in ALLOWED_IMPORTS.items():
    assert {d.lstrip(":") for d in targets[pkg].get("deps", [])} == allowed, pkg
  for module in package_modules:
    own = module.split("/")[0]
    for pkg, top_level in _project_imports(module):
      if pkg == own:
        continue
      assert pkg in ALLOWED_IMPORTS[own], f"{module} imports {pkg}: {own} may import {sorted(ALLOWED_IMPORTS[own])}"
      assert top_level, f"{module} imports {pkg} inside a function"
