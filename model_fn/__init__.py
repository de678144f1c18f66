"""tf.estimator model functions (ESMM and its baselines), input_fn, metrics and export."""
