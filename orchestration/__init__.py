"""The daily rolling retrain, above both halves: it runs the pipeline's Beam jobs (relabel,
preprocess), trains and scores through model_fn, decides on evidence (gate.py, with the
conversion-delay estimate of delay.py) and publishes to TF Serving (pipeline/publish.py)."""

from preprocessing import quiet as _quiet  # noqa: F401  (before TensorFlow: see its doc)
