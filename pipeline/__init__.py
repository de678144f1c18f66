"""Beam jobs: raw logs -> parsed, joined, validated rows -> TFT -> TFRecords."""

from preprocessing import quiet as _quiet  # noqa: F401  (before TensorFlow: see its doc)
