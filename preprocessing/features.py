"""The single source of truth for fields, hash bucket sizes and labels.

Every other module reads this file; there is no second list of field names anywhere.

Naming of features through the stages (``<field>`` is the raw field id, e.g. ``150_14``):

* raw (the values as a client has them, before hashing):
  ``f_<field>``  int64 varlen: raw feature ids
  ``w_<field>``  float varlen: their weights (only for weighted fields)
* transformed (written to TFRecords, read by the model):
  ``id_<field>`` int64 varlen: hashed ids in ``[0, hash_buckets)``
  ``wt_<field>`` float varlen: weights aligned with ``id_<field>`` (weighted fields only)
* labels: raw ``click`` and ``conversion``; transformed also ``ctcvr = click AND conversion``.
"""

import dataclasses
from typing import Dict, Optional, Tuple

CLICK = "click"
CONVERSION = "conversion"
CTCVR = "ctcvr"
RAW_LABELS = (CLICK, CONVERSION)
LABELS = (CLICK, CONVERSION, CTCVR)
SAMPLE_ID = "sample_id"

RAW_ID_PREFIX = "f_"
RAW_WEIGHT_PREFIX = "w_"
ID_PREFIX = "id_"
WEIGHT_PREFIX = "wt_"


@dataclasses.dataclass(frozen=True)
class Field:
  """One categorical field of an input format."""
  name: str            # field id as it appears in the raw data, e.g. "205" or "150_14"
  side: str            # user | item | cross | context
  hash_buckets: int    # default bucket count, sized for the public release
  multi_valued: bool   # may repeat within a row
  weighted: bool       # carries a real weight that must be kept
  description: str

  @property
  def raw_ids(self) -> str:
    return RAW_ID_PREFIX + self.name

  @property
  def raw_weights(self) -> str:
    return RAW_WEIGHT_PREFIX + self.name

  @property
  def ids(self) -> str:
    return ID_PREFIX + self.name

  @property
  def weights(self) -> str:
    return WEIGHT_PREFIX + self.name


def _f(name, side, log2_buckets, description, multi=False, weighted=False):
  return Field(name, side, 1 << log2_buckets, multi, weighted, description)


# Ali-CCP (see shared/docs/data-formats.md). Bucket sizes: about 2x the public
# cardinality (4.3M items, 0.4M users), powers of two.
ALICCP_FIELDS: Tuple[Field, ...] = (
    _f("101", "user", 20, "user id"),
    _f("121", "user", 12, "user profile category id"),
    _f("122", "user", 8, "user profile category group id"),
    _f("124", "user", 4, "gender"),
    _f("125", "user", 5, "age"),
    _f("126", "user", 4, "consumption level I"),
    _f("127", "user", 4, "consumption level II"),
    _f("128", "user", 4, "occupation"),
    _f("129", "user", 6, "geography"),
    _f("109_14", "user", 18, "14-day behaviour: categories", True, True),
    _f("110_14", "user", 21, "14-day behaviour: shops", True, True),
    _f("127_14", "user", 20, "14-day behaviour: brands", True, True),
    _f("150_14", "user", 18, "14-day behaviour: intention nodes", True, True),
    _f("205", "item", 23, "item id"),
    _f("206", "item", 14, "item category"),
    _f("207", "item", 21, "item shop"),
    _f("210", "item", 18, "item intention node", True, False),
    _f("216", "item", 20, "item brand"),
    _f("508", "cross", 20, "109_14 x 206", True, True),
    _f("509", "cross", 21, "110_14 x 207", True, True),
    _f("702", "cross", 21, "127_14 x 216", True, True),
    _f("853", "cross", 21, "150_14 x 210", True, True),
    _f("301", "context", 8, "position"),
)

FORMATS: Dict[str, Tuple[Field, ...]] = {"aliccp": ALICCP_FIELDS}


def fields(fmt: str) -> Tuple[Field, ...]:
  try:
    return FORMATS[fmt]
  except KeyError:
    raise ValueError(f"unknown input format {fmt!r}; known: {sorted(FORMATS)}") from None


def hash_buckets(fmt: str, max_hash_buckets: Optional[int] = None) -> Dict[str, int]:
  """Bucket count per field name, optionally capped (for small local runs)."""
  out = {}
  for f in fields(fmt):
    n = f.hash_buckets
    if max_hash_buckets:
      n = min(n, int(max_hash_buckets))
    out[f.name] = n
  return out

