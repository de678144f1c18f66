"""Quiet start-up for the entry points: imported by each package's __init__, before TensorFlow.

TensorFlow's C++ start-up messages (oneDNN notices, CUDA probes on a CPU machine, TensorRT) and
google.api_core's Python-version FutureWarning come before any output of the job; they are
hidden unless TF_CPP_MIN_LOG_LEVEL is set (TF_CPP_MIN_LOG_LEVEL=0 shows everything again).
"""

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.api_core\..*")
