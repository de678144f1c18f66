"""Data generators for the demo, the tests and the benchmarks: synthetic logs in the real raw
layouts with their ground truth (synthetic.py), and damaged raw input with the outcome each
damage must have (fuzz.py). Nothing in the pipeline imports them."""

from preprocessing import quiet as _quiet  # noqa: F401  (before TensorFlow: see its doc)
