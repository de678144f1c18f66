"""The single source of truth for fields, hash bucket sizes and labels.

Every other module reads this file; there is no second list of field names anywhere.

Naming of features through the stages (``<field>`` is the raw field id, e.g. ``150_14``
for Ali-CCP or ``device_id`` for Avazu):

* raw (the values as a client has them, before hashing):
  ``f_<field>``  varlen: raw feature ids (int64, or string for the fields whose
                 ``raw_dtype`` is ``string``, such as Avazu's 8-hex-character ids)
  ``w_<field>``  float varlen: their weights (only for weighted fields)
  ``f_hour``     Avazu only: the raw ``YYMMDDHH`` hour, from which ``hour_of_day`` is derived
* transformed (written to TFRecords, read by the model):
  ``id_<field>`` int64 varlen: hashed ids in ``[0, hash_buckets)``, also for the derived
                 fields (Avazu ``hour_of_day``) and the crosses ``<a>_x_<b>``
  ``wt_<field>`` float varlen: weights aligned with ``id_<field>`` (weighted fields only)
* labels: raw ``click`` and, when the input has it, ``conversion``; transformed also
  ``ctcvr = click AND conversion`` when both are there. Avazu logs may carry ``click`` only.
* passthrough (not model features): ``sample_id`` (int64 for Ali-CCP, string for Avazu,
  whose ids overflow int64) and, for Avazu, ``day`` (``YYYYMMDD`` from the raw hour).

Crosses are configurable per preprocessing run (``cross_field`` / ``parse_crosses``):
the model learns which ones a run made from the transformed schema's bucket counts
(``fields_for_buckets``).
"""

import dataclasses
from typing import Dict, Iterable, Optional, Sequence, Tuple

CLICK = "click"
CONVERSION = "conversion"
CTCVR = "ctcvr"
RAW_LABELS = (CLICK, CONVERSION)
LABELS = (CLICK, CONVERSION, CTCVR)
SAMPLE_ID = "sample_id"
DAY = "day"
# The run marker pipeline.preprocess writes last (row counts per split, format, labels);
# the trainer refuses a directory without it.
RECONCILIATION = "reconciliation.json"
# The occupied hash buckets of each field over the train split's rows (pipeline/distinct_ids.py):
# packed bitmaps under the output dir, their counts in reconciliation.json (splits.train.distinct_ids).
DISTINCT_IDS_DIR = "distinct_ids"
# Counter-name prefix of the positive labels a split wrote (label_positives/click, ...).
LABEL_POSITIVES_PREFIX = "label_positives/"
# The train split again as column blocks (pipeline.encode.EncodeBlocks), under the output dir.
BLOCKS_DIR = "train_blocks"
# A column's row lengths in a block.
BLOCK_LENGTHS_SUFFIX = "/lengths"
# Rows per block (pipeline.preprocess --train_block_rows).
DEFAULT_BLOCK_ROWS = 128
# Counter of the rows the job hands to TFT, per split (<format>/<split>/rows_into_transform).
ROWS_INTO_TRANSFORM = "rows_into_transform"

# Storage layouts of the transformed output (pipeline.preprocess --layout). ``rows``: one
# tf.Example per impression, the user side copied into each. ``grouped`` (Ali-CCP): one record
# per common-features row: its user side once, and its impressions' own fields and labels as
# lists, each field's values cut into impressions by ``<LENGTHS_PREFIX><field>``.
ROWS = "rows"
GROUPED = "grouped"
LAYOUTS = (ROWS, GROUPED)
# The side whose fields a grouped record stores once per group.
GROUP_SIDE = "user"
# Per-impression value counts of a field in a grouped record (raw and transformed).
LENGTHS_PREFIX = "n_"
# The feature a grouped batch adds: each impression's group (row of the group-level fields).
GROUP_INDEX = "group_index"

RAW_ID_PREFIX = "f_"
RAW_WEIGHT_PREFIX = "w_"
ID_PREFIX = "id_"
WEIGHT_PREFIX = "wt_"

# Raw dtypes of a field's values.
INT64 = "int64"
STRING = "string"

# How the preprocessing_fn makes a field's ids.
HASH = "hash"                 # hash of the raw values
HOUR_OF_DAY = "hour_of_day"   # the hour of day (0-23) of a raw YYMMDDHH hour
CROSS = "cross"               # hash of the joined values of two other fields

CROSS_INFIX = "_x_"           # cross field name: <a>_x_<b>
CROSS_SEPARATOR = "\x1f"      # between the two values of a cross before hashing
CROSS_SPEC_SEPARATOR = ":"    # "a:b" on the command line
DEFAULT_CROSS_BUCKETS = 1 << 22


@dataclasses.dataclass(frozen=True)
class Field:
  """One categorical field of an input format (or a cross of two of them)."""
  name: str            # field id as it appears in the raw data, e.g. "205", "150_14", "site_id"
  side: str            # user | item | cross | context
  hash_buckets: int    # default bucket count, sized for the public release
  multi_valued: bool   # may repeat within a row
  weighted: bool       # carries a real weight that must be kept
  description: str
  raw_dtype: str = INT64     # dtype of the raw values: int64, or string (hashed as strings)
  raw_column: str = ""       # the raw column the ids come from when it is not ``name``
  transform: str = HASH      # how the preprocessing_fn makes the ids: hash | hour_of_day | cross
  crossed: Tuple[str, ...] = ()  # cross fields: the names of the two crossed fields

  @property
  def is_cross(self) -> bool:
    return self.transform == CROSS

  @property
  def raw_ids(self) -> str:
    if self.is_cross:
      raise AttributeError(f"cross field {self.name} has no raw feature; it is computed "
                           f"from {', '.join(RAW_ID_PREFIX + c for c in self.crossed)}")
    return RAW_ID_PREFIX + (self.raw_column or self.name)

  @property
  def raw_weights(self) -> str:
    return RAW_WEIGHT_PREFIX + self.name

  @property
  def ids(self) -> str:
    return ID_PREFIX + self.name

  @property
  def weights(self) -> str:
    return WEIGHT_PREFIX + self.name

  @property
  def lengths(self) -> str:
    return LENGTHS_PREFIX + self.name

  @property
  def group_level(self) -> bool:
    """Stored once per group in the grouped layout (the user side)."""
    return self.side == GROUP_SIDE


def _f(name, side, log2_buckets, description, multi=False, weighted=False, raw_dtype=INT64):
  return Field(name, side, 1 << log2_buckets, multi, weighted, description, raw_dtype)


# Ali-CCP (see docs/data-formats.md). Bucket sizes: about 2x the public
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

# Avazu-style CSV (see docs/data-formats.md): one value per column, read by the
# header's names. Bucket sizes: about 1.5-2x the cardinality of the public 40M-row
# release (6.7M device_ip, 2.7M device_id, 8k apps, 5k sites), powers of two.
AVAZU_ID = "id"        # the sample id column: a decimal that can exceed int64, kept as a string
AVAZU_HOUR = "hour"    # YYMMDDHH: gives the day partition and the hour of day
AVAZU_FIELDS: Tuple[Field, ...] = (
    Field("hour_of_day", "context", 24, False, False, "hour of day 0-23 of the raw YYMMDDHH hour",
          INT64, raw_column=AVAZU_HOUR, transform=HOUR_OF_DAY),
    _f("C1", "context", 4, "anonymised categorical"),
    _f("banner_pos", "context", 4, "banner position"),
    _f("site_id", "context", 13, "site", raw_dtype=STRING),
    _f("site_domain", "context", 14, "site domain", raw_dtype=STRING),
    _f("site_category", "context", 6, "site category", raw_dtype=STRING),
    _f("app_id", "context", 14, "app", raw_dtype=STRING),
    _f("app_domain", "context", 10, "app domain", raw_dtype=STRING),
    _f("app_category", "context", 6, "app category", raw_dtype=STRING),
    _f("device_id", "user", 22, "device", raw_dtype=STRING),
    _f("device_ip", "user", 23, "device ip", raw_dtype=STRING),
    _f("device_model", "user", 14, "device model", raw_dtype=STRING),
    _f("device_type", "user", 3, "device type"),
    _f("device_conn_type", "user", 3, "connection type"),
    _f("C14", "item", 13, "anonymised ad attribute (creative)"),
    _f("C15", "item", 4, "anonymised ad attribute (banner width)"),
    _f("C16", "item", 4, "anonymised ad attribute (banner height)"),
    _f("C17", "item", 10, "anonymised ad attribute (ad group)"),
    _f("C18", "item", 3, "anonymised ad attribute"),
    _f("C19", "item", 7, "anonymised ad attribute"),
    _f("C20", "item", 9, "anonymised ad attribute (-1: unknown)"),
    _f("C21", "item", 7, "anonymised ad attribute"),
)
# The 24 columns of the public release, in its order; a file may order them otherwise,
# add a `conversion` column and carry columns of its own (ignored).
AVAZU_COLUMNS: Tuple[str, ...] = (AVAZU_ID, CLICK, AVAZU_HOUR) + tuple(
    f.name for f in AVAZU_FIELDS if f.transform == HASH)

FORMATS: Dict[str, Tuple[Field, ...]] = {"aliccp": ALICCP_FIELDS, "avazu": AVAZU_FIELDS}

# dtype of the passthrough sample id, per format.
SAMPLE_ID_DTYPES: Dict[str, str] = {"aliccp": INT64, "avazu": STRING}
# Passthrough int64 features other than the sample id, per format.
PASSTHROUGH_INT64: Dict[str, Tuple[str, ...]] = {"aliccp": (), "avazu": (DAY,)}
# Crosses made when a run names none ("a:b" specs, see parse_crosses).
DEFAULT_CROSSES: Dict[str, Tuple[str, ...]] = {
    "aliccp": (),
    "avazu": ("app_id:device_id", "site_id:device_id"),
}


def fields(fmt: str) -> Tuple[Field, ...]:
  """The fields of input format ``fmt`` in schema order (crosses made by a run not included)."""
  try:
    return FORMATS[fmt]
  except KeyError:
    raise ValueError(f"unknown input format {fmt!r}; known: {sorted(FORMATS)}") from None


def field(fmt: str, name: str) -> Field:
  for f in fields(fmt):
    if f.name == name:
      return f
  raise ValueError(f"format {fmt!r} has no field {name!r}")


def transformed_labels(raw_labels: Sequence[str]) -> Tuple[str, ...]:
  """Labels of the transformed output for raw ``raw_labels``: ctcvr only with both labels."""
  raw_labels = tuple(raw_labels)
  if CLICK not in raw_labels or set(raw_labels) - set(RAW_LABELS):
    raise ValueError(f"raw labels must be {CLICK!r}, optionally with {CONVERSION!r}; got {raw_labels}")
  return LABELS if CONVERSION in raw_labels else (CLICK,)


def cross_field(fmt: str, a: str, b: str, hash_buckets: int = DEFAULT_CROSS_BUCKETS) -> Field:
  """The cross ``<a>_x_<b>`` of two hashed raw fields of ``fmt``.

  Its ids hash the two raw values joined (every pair, for multi-valued fields); an
  example missing either side has no value for the cross. Weighted fields cannot be
  crossed (their weights would be lost).
  """
  for name in (a, b):
    f = field(fmt, name)
    if f.transform != HASH:
      raise ValueError(f"field {name!r} is derived ({f.transform}); only raw fields can be crossed")
    if f.weighted:
      raise ValueError(f"field {name!r} is weighted; weighted fields cannot be crossed")
  if a == b:
    raise ValueError(f"a cross needs two different fields, got {a!r} twice")
  fa, fb = field(fmt, a), field(fmt, b)
  return Field(f"{a}{CROSS_INFIX}{b}", "cross", int(hash_buckets),
               fa.multi_valued or fb.multi_valued, False, f"{a} x {b}", STRING,
               transform=CROSS, crossed=(a, b))


def parse_crosses(fmt: str, specs: Optional[Iterable[str]] = None) -> Tuple[Field, ...]:
  """Cross fields from ``a:b`` specs, a list or one comma-separated string (None: the
  format's DEFAULT_CROSSES; empty: none)."""
  fields(fmt)
  if specs is None:
    specs = DEFAULT_CROSSES.get(fmt, ())
  elif isinstance(specs, str):
    specs = specs.split(",")
  out = []
  for spec in specs:
    spec = spec.strip()
    if not spec:
      continue
    parts = spec.split(CROSS_SPEC_SEPARATOR)
    if len(parts) != 2:
      raise ValueError(f"cross {spec!r} is not of the form a{CROSS_SPEC_SEPARATOR}b")
    cross = cross_field(fmt, parts[0].strip(), parts[1].strip())
    if any(c.name == cross.name for c in out):
      raise ValueError(f"cross {spec!r} is given twice")
    out.append(cross)
  return tuple(out)


def hash_buckets(fmt: str, max_hash_buckets: Optional[int] = None,
                 crosses: Sequence[Field] = ()) -> Dict[str, int]:
  """Bucket count per field name (crosses included), optionally capped (for small local runs)."""
  out = {}
  for f in tuple(fields(fmt)) + tuple(crosses):
    n = f.hash_buckets
    if max_hash_buckets:
      n = min(n, int(max_hash_buckets))
    out[f.name] = n
  return out


def fields_for_buckets(fmt: str, names: Iterable[str]) -> Tuple[Field, ...]:
  """The fields to embed for the field names of a transformed schema's bucket counts.

  ``names`` are the keys of ``preprocessing.transform.transformed_hash_buckets``: the
  format's fields and the crosses ``<a>_x_<b>`` that the preprocessing run made. Returns
  the format's fields present, in schema order, then the crosses sorted by name (so the
  order never depends on the order of ``names``). An unknown name is an error.
  """
  names = set(names)
  schema = fields(fmt)
  known = {f.name for f in schema}
  crosses = []
  for name in sorted(names - known):
    parts = name.split(CROSS_INFIX)
    if len(parts) != 2:
      raise ValueError(f"{name!r} is neither a field of format {fmt!r} nor a cross a{CROSS_INFIX}b")
    crosses.append(cross_field(fmt, *parts))
  return tuple(f for f in schema if f.name in names) + tuple(crosses)
