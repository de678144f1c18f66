"""The one schema of the project and the TensorFlow Transform preprocessing_fn."""

from preprocessing import quiet as _quiet  # noqa: F401  (before TensorFlow: see its doc)
