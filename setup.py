"""Installs the pipeline's packages; also usable as Beam's --setup_file for remote workers."""

import setuptools

# Runtime stack, pinned: tf.estimator was removed after TF 2.15, and this is the last set
# that has it and that TensorFlow Transform supports together (Python 3.11).
# requirements.lock pins the whole resolved set for reproducible installs.
INSTALL_REQUIRES = [
    "tensorflow==2.15.1",
    "tensorflow-estimator==2.15.0",
    "tensorflow-transform==1.15.0",
    "tfx-bsl==1.15.1",
    "apache-beam[gcp]==2.54.0",
    "pyarrow==10.0.1",
    "absl-py",
    "tensorflow-serving-api==2.15.1",
    "numpy<1.25",
    # TFRecord checksums (pipeline/tfrecords.py); apache-beam[gcp] installs the same release.
    "google-crc32c==1.9.0",
    # Evaluation report charts (model_fn/report.py); the daily gate's intervals (model_fn/intervals.py).
    "matplotlib==3.8.4",
    "contourpy==1.3.0",
    "scipy==1.15.3",
]

setuptools.setup(
    name="esmm-pipeline",
    version="0.1.0",
    description="Beam/TFT preprocessing and tf.estimator ESMM/MMoE training for post-click conversion rate",
    license="Apache-2.0",
    python_requires=">=3.11,<3.12",
    packages=["pipeline", "pipeline.sources", "preprocessing", "model_fn", "orchestration", "datagen"],
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest==8.3.3", "pytest-xdist==3.6.1", "scikit-learn==1.3.2"]},
)
