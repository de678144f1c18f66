"""Occupied hash buckets per field as bitmaps ({field: np.bool_ array, True where an id occurs}):
OR-merged, counted, and stored packed (np.packbits) in one .npz file. The preprocessing job
writes them (pipeline/distinct_ids.py); the trainer reads them for the collision rates of its
table sizes (model_fn/table_sizing.py)."""

import io
import os
from typing import Dict, Iterable, Optional

import numpy as np
import tensorflow as tf

from preprocessing import features as F

TRAIN_FILE = "train.npz"
Bitmaps = Dict[str, np.ndarray]


def mark(bitmap: Optional[np.ndarray], ids: np.ndarray) -> np.ndarray:
  """``bitmap`` (None: empty) with ``ids`` set, grown to hold the largest id."""
  size = int(ids.max()) + 1 if len(ids) else 0
  bitmap = grow(bitmap, size)
  bitmap[ids] = True
  return bitmap


def grow(bitmap: Optional[np.ndarray], size: int) -> np.ndarray:
  if bitmap is None:
    return np.zeros(size, np.bool_)
  if len(bitmap) >= size:
    return bitmap
  out = np.zeros(size, np.bool_)
  out[:len(bitmap)] = bitmap
  return out


def merge(maps: Iterable[Bitmaps]) -> Bitmaps:
  """The union (bitwise OR) of the maps, field by field."""
  out: Bitmaps = {}
  for m in maps:
    for field, bits in m.items():
      mine = grow(out.get(field), len(bits))
      mine[:len(bits)] |= bits
      out[field] = mine
  return out


def counts(maps: Bitmaps) -> Dict[str, int]:
  return {field: int(bits.sum()) for field, bits in sorted(maps.items())}


def save(path: str, maps: Bitmaps) -> None:
  buf = io.BytesIO()
  arrays = {}
  for field, bits in maps.items():
    arrays[f"bits/{field}"] = np.packbits(bits)
    arrays[f"size/{field}"] = np.int64(len(bits))
  np.savez_compressed(buf, **arrays)
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(buf.getvalue())


def load(path: str) -> Bitmaps:
  with tf.io.gfile.GFile(path, "rb") as f:
    data = np.load(io.BytesIO(f.read()))
    return {k[len("bits/"):]: np.unpackbits(data[k], count=int(data["size/" + k[len("bits/"):]])).astype(np.bool_)
            for k in data.files if k.startswith("bits/")}


def train_path(transform_dir: str) -> str:
  """The merged bitmaps of a preprocessing output's train split."""
  return os.path.join(transform_dir, F.DISTINCT_IDS_DIR, TRAIN_FILE)
