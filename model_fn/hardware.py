"""What this machine computes natively: the CPU's or GPUs' bfloat16 support, which the trainer's
train_matmul_dtype "auto" decides on, and whether TensorFlow runs its CPU matmuls through oneDNN."""

import functools
from typing import List

import tensorflow as tf


# /proc/cpuinfo flags of native bfloat16 arithmetic (oneDNN runs bfloat16 matmuls on them).
BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bfloat16_flags(cpuinfo: str) -> List[str]:
  """The native bfloat16 instruction sets that the ``flags`` lines of a /proc/cpuinfo text name."""
  found = set()
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "flags":
      found |= set(value.split()) & set(BFLOAT16_CPU_FLAGS)
  return sorted(found)


def cpu_has_native_bfloat16(cpuinfo: str) -> bool:
  """Whether the ``flags`` lines of a /proc/cpuinfo text name a native bfloat16 instruction set."""
  return bool(native_bfloat16_flags(cpuinfo))


@functools.lru_cache(maxsize=None)
def native_bfloat16() -> bool:
  """Whether this machine trains faster in bfloat16 than in float32: every visible GPU has compute
  capability 8.0 or more, or, without GPUs, the CPU has AMX-BF16 or AVX512_BF16 (read from
  /proc/cpuinfo; False where there is none, as on macOS)."""
  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    return all(tuple(tf.config.experimental.get_device_details(g).get("compute_capability") or (0, 0))
               >= (8, 0) for g in gpus)
  try:
    with open("/proc/cpuinfo") as f:
      return cpu_has_native_bfloat16(f.read())
  except OSError:
    return False


@functools.lru_cache(maxsize=None)
def onednn() -> bool:
  """Whether this process's TensorFlow runs CPU ops through oneDNN (on by default where the CPU
  has AVX512-VNNI, AVX512-BF16 or AMX; TF_ENABLE_ONEDNN_OPTS=0 turns it off). oneDNN builds and
  caches a primitive per matmul shape, in each thread, up to 1,024 of them."""
  from tensorflow.python.util import _pywrap_util_port   # pylint: disable=g-import-not-at-top
  return bool(_pywrap_util_port.IsMklEnabled())
