"""tf.estimator model functions (ESMM and its baselines), input_fn, metrics and export."""

from preprocessing import quiet as _quiet  # noqa: F401  (before TensorFlow: see its doc)
