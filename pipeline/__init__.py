"""Beam jobs: raw logs -> parsed, joined, validated rows -> TFT -> TFRecords."""
