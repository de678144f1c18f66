"""The one schema of the project and the TensorFlow Transform preprocessing_fn."""
