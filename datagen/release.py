r"""Ali-CCP data with the public release's shape and size (``--profile=release``), streamed.

  python -m datagen.synthetic --profile=release --scale=0.01 --output_dir=DIR

writes, per split, ``sample_skeleton_<split>.csv.gz``, ``common_features_<split>.csv.gz`` and
``ground_truth_<split>.csv.gz`` (sample_id,true_pctr,true_pcvr,counterfactual_conversion; the
probabilities with 8 decimals), the two splits in two processes.

The profile (PROFILE, at --scale=1) is the release's: train 42,300,135 impressions over 730,600
common rows, test 43,016,840 over 884,212 (about 58 impressions per common row, lognormal group
sizes), 0.4M users, 4.3M items with Zipf popularity, CTR 3.9%, CVR on clicks 0.53%, about 230
click=0,conversion=1 rows per split. --scale multiplies impressions, common rows, users, items
and anomalies (with minimums) and keeps the per-row shape: values per common row, impressions
per common row and the rates.

Values per common row. The release is about 38 GB of text. Its 85.3M skeleton rows carry about
10 item-side values each (205, 206, 207, 210, 216, 301 and the crosses) and take about 220 bytes
(sample id, labels, a 16-hex index, ~10 items of ~17 bytes): about 19 GB. The other ~19 GB are
the 1.61M common rows: about 11.8 KB each; a user-side item (``110_14\x02<id>\x03<weight>``
plus its separator) takes ~25 bytes, so a common row holds about 470 values. The profile's
target is USER_VALUES_MEAN (450, what the 9 profile fields and the four behaviour lists add up
to): behaviour list lengths are lognormal (sigma BEHAVIOUR_SIGMA, capped at BEHAVIOUR_CAP), per
user, split over ``109_14`` (categories), ``110_14`` (shops), ``127_14`` (brands) and ``150_14``
(intention nodes) with the weight ln(1 + count) of a behaviour count, as the release writes them.

Streaming: per-user and per-item state are arrays (0.4M users and 4.3M items, a few numbers
each); a user's behaviour lists are regenerated from a counter-based hash of (seed, user), so
the same user has the same lists in every common row and nothing grows with the output. Each
chunk of CHUNK_COMMON_ROWS common rows is drawn, labelled and turned into bytes with numpy
(fixed-width byte cells, compacted), then gzip-compressed (level 1). Skeleton rows are grouped by
common row; the common rows of a chunk are written in a shuffled order.

A skeleton row holds 205, 206, 207, 210 (1 to 4 nodes), 216, 301 and the crosses 508/509/702/853
where the user's behaviour lists hold the item's category/shop/brand/node: about 9 values (60%
of impressions show an item of a category the user browsed; shops and brands are skewed to a
category's popular ones, for users and items alike).

The true model (labels, ground truth) is the default profile's (datagen/synthetic.py) over these
users and items: click logit = attractiveness + <taste, look> + interest (the item's category in
the user's behaviour) - position + click_selection * cvr logit; cvr logit = quality + <intent,
fit> - |consumption level - price tier| + brand loyalty (the item's brand in the user's brand
behaviour). Both biases are solved on a calibration sample so that the CTR and the CVR on clicks
hit the profile's rates.
"""

import gzip
import json
import math
import multiprocessing
import os
from typing import Dict, List, Tuple

import numpy as np
from absl import logging

from datagen import synthetic

# The release, at --scale=1.
PROFILE = {
    "splits": {"train": (42_300_135, 730_600), "test": (43_016_840, 884_212)},
    "users": 400_000, "items": 4_300_000, "ctr": 0.039, "cvr_on_clicks": 0.0053, "anomalies": 230,
}
MIN_USERS, MIN_ITEMS = 50, 200
USER_VALUES_MEAN = 450          # user-side values per common row (module doc)
BEHAVIOUR_SIGMA = 1.0           # lognormal sigma of a user's behaviour list length
BEHAVIOUR_CAP = 4000            # longest behaviour list (all four fields together)
NO_BEHAVIOUR = 0.05             # share of users without any 14-day behaviour
# Behaviour fields: (field, share of the list, values per category of its id space).
BEHAVIOUR = (("109_14", 0.12, 1), ("110_14", 0.33, 50), ("127_14", 0.25, 31), ("150_14", 0.30, 8))
N_CAT = 8000                    # categories; shops, brands and nodes are per category
SHOPS, BRANDS, NODES = 50, 31, 8
PROFILE_FIELDS = ("101", "121", "122", "124", "125", "126", "127", "128", "129")
DROP = {"124": 0.05, "128": 0.10, "129": 0.03}   # chance a profile field is missing
DIM = 4
CHUNK_COMMON_ROWS = 2048
TARGETED = 0.6                  # share of impressions of an item in a category the user browsed
CALIBRATION_COMMON_ROWS = 2000
GROUP_SIGMA = 1.2               # lognormal sigma of impressions per common row
MAX_COUNT = 63                  # behaviour counts 1..MAX_COUNT; weight ln(1 + count)

# Byte cells: an item is [field\x02 | id digits | \x03 | weight | separator].
W_FIELD, W_ID, W_WEIGHT = 7, 9, 8
W_ITEM = W_FIELD + W_ID + 1 + W_WEIGHT + 1
FIELDS = PROFILE_FIELDS + tuple(f for f, _, _ in BEHAVIOUR) + (
    "205", "206", "207", "210", "216", "301", "508", "509", "702", "853")
CODE = {f: k for k, f in enumerate(FIELDS)}
OFFSET = np.array([synthetic.feature_id(f, 0) for f in FIELDS], np.int64)


# Counter-based randomness: a user's lists are a pure function of (seed, user, salt, j).

def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijection of uint64."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _uniform(seed: int, salt: int, users: np.ndarray, j=0) -> np.ndarray:
  """Uniforms in [0, 1) keyed by (seed, salt, user, j)."""
  with np.errstate(over="ignore"):
    key = _mix(np.array([seed * 1024 + salt], np.uint64))
    x = (users.astype(np.uint64) << np.uint64(20)) | np.asarray(j, np.uint64)
    return (_mix(x ^ key) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _normal(seed: int, salt: int, users: np.ndarray) -> np.ndarray:
  """Standard normals keyed by (seed, salt, user) (Box-Muller)."""
  u1 = _uniform(seed, salt, users, 0)
  u2 = _uniform(seed, salt, users, 1)
  return np.sqrt(-2 * np.log1p(-u1)) * np.cos(2 * np.pi * u2)


def _zipf_cdf(n: int, a: float, offset: float = 1.0) -> np.ndarray:
  p = 1.0 / (np.arange(n) + offset) ** a
  return np.cumsum(p / p.sum())


def _skewed(u: np.ndarray, n: int) -> np.ndarray:
  """Ids 0..n-1 from uniforms, low ids the most frequent (a category's popular shops, brands)."""
  return (u ** 3 * n).astype(np.int64)


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
  return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def scaled(scale: float) -> Dict:
  """The profile at ``scale``: {splits: {split: (impressions, common rows)}, users, items, ...}."""
  out = dict(PROFILE)
  splits = {}
  for split, (n, c) in PROFILE["splits"].items():
    impressions = max(1, round(n * scale))
    splits[split] = (impressions, min(impressions, max(1, round(c * scale))))
  out["splits"] = splits
  out["users"] = max(MIN_USERS, round(PROFILE["users"] * scale))
  out["items"] = max(MIN_ITEMS, round(PROFILE["items"] * scale))
  out["anomalies"] = max(1, round(PROFILE["anomalies"] * scale))
  return out


class ReleaseWorld:
  """Users, items and the true model; every array is a pure function of (seed, sizes)."""

  def __init__(self, seed: int, num_users: int, num_items: int):
    self.seed = seed
    r = np.random.default_rng([seed, 0])
    self.num_users, self.num_items = num_users, num_items
    family = r.normal(size=(N_CAT // 20 + 1, DIM))
    cat_vec = (family[np.arange(N_CAT) // 20] + 0.5 * r.normal(size=(N_CAT, DIM))).astype(np.float32)
    self.cat_cdf = _zipf_cdf(N_CAT, 0.9, 5.0)
    cat_tier = r.integers(0, 3, N_CAT)
    cat_quality, cat_attract = r.normal(size=N_CAT), r.normal(size=N_CAT)
    self._items(r, num_items, cat_vec, cat_tier, cat_quality, cat_attract)
    self._users(r, num_users, cat_vec)
    behaviour_mean = (USER_VALUES_MEAN - len(PROFILE_FIELDS) + sum(DROP.values())) / (1 - NO_BEHAVIOUR)
    self.mu = math.log(behaviour_mean) - BEHAVIOUR_SIGMA ** 2 / 2
    self.b_click = self.b_cvr = 0.0

  def _items(self, r, num_items, cat_vec, cat_tier, cat_quality, cat_attract):
    """Item attributes; item k is the k-th most popular (Zipf)."""
    brand_quality, shop_quality = r.normal(size=N_CAT * BRANDS), r.normal(size=N_CAT * SHOPS)
    self.item_cdf = _zipf_cdf(num_items, 1.0, 10.0)
    cat = _draw(self.cat_cdf, r.random(num_items)).astype(np.int32)
    self.item_cat = cat
    self.item_shop = (cat * SHOPS + _skewed(r.random(num_items), SHOPS)).astype(np.int32)
    self.item_brand = (cat * BRANDS + _skewed(r.random(num_items), BRANDS)).astype(np.int32)
    self.item_nodes = r.integers(1, 5, num_items).astype(np.int8)     # nodes cat*8 + node0 + 0..n-1
    self.item_node0 = r.integers(0, NODES - 3, num_items).astype(np.int8)
    self.item_tier = np.clip(cat_tier[cat] + (r.random(num_items) < 0.2), 0, 2).astype(np.int8)
    look = cat_vec[cat] + 0.5 * r.normal(size=(num_items, DIM)).astype(np.float32)
    self.item_look = look
    self.item_fit = (synthetic.RHO * look + np.sqrt(1 - synthetic.RHO ** 2)
                     * r.normal(size=(num_items, DIM)).astype(np.float32))
    attract = 0.5 * cat_attract[cat] + 0.4 * r.normal(size=num_items)
    self.item_attract = attract.astype(np.float32)
    self.item_quality = (0.8 * cat_quality[cat] + 0.4 * brand_quality[self.item_brand]
                         + 0.3 * shop_quality[self.item_shop] + 0.3 * r.normal(size=num_items)
                         - 0.3 * attract).astype(np.float32)
    self.by_cat = np.argsort(cat, kind="stable").astype(np.int32)
    self.cat_bounds = np.searchsorted(cat[self.by_cat], np.arange(N_CAT + 1))

  def _users(self, r, num_users, cat_vec):
    """Users: profile, favourite categories (shared by demographic group), taste, activity."""
    self.gender = r.integers(0, 2, num_users).astype(np.int8)
    self.age = r.integers(0, 7, num_users).astype(np.int8)
    self.cons1 = r.integers(0, 3, num_users).astype(np.int8)
    self.cons2 = np.minimum(3, self.cons1 + r.integers(0, 2, num_users)).astype(np.int8)
    self.occupation = r.integers(0, 4, num_users).astype(np.int8)
    self.geo = r.integers(0, 30, num_users).astype(np.int8)
    self.profile = r.integers(0, 100, num_users).astype(np.int8)
    group_cats = _draw(self.cat_cdf, r.random((14, 40)))
    group = self.gender.astype(int) * 7 + self.age
    favs = np.where(r.random((num_users, 4)) < 0.6, group_cats[group[:, None], r.integers(0, 40, (num_users, 4))],
                    _draw(self.cat_cdf, r.random((num_users, 4))))
    self.favs = favs.astype(np.int32)
    taste = cat_vec[favs].mean(1) + 0.3 * r.normal(size=(num_users, DIM)).astype(np.float32)
    self.taste = taste
    self.intent = (synthetic.RHO * taste + np.sqrt(1 - synthetic.RHO ** 2)
                   * r.normal(size=(num_users, DIM)).astype(np.float32))
    self.activity_cdf = np.cumsum(r.gamma(0.7, 1.0, num_users))
    self.activity_cdf /= self.activity_cdf[-1]

  def behaviour_length(self, users: np.ndarray) -> np.ndarray:
    """A user's behaviour values before duplicates go (lognormal, capped; 5% have none)."""
    n = np.exp(self.mu + BEHAVIOUR_SIGMA * _normal(self.seed, 1, users))
    n = np.minimum(np.round(n * DEDUP_SLACK), BEHAVIOUR_CAP).astype(np.int64)
    return np.where(_uniform(self.seed, 2, users) < NO_BEHAVIOUR, 0, n)

  def categories(self, users: np.ndarray, j: np.ndarray, salt: int) -> np.ndarray:
    """The category of a user's j-th behaviour value: near a favourite, else by popularity."""
    u = _uniform(self.seed, salt, users, j)
    fav = self.favs[users, (u * 4 * 64).astype(np.int64) % 4]
    near = (fav // 20) * 20 + (u * 4 * 64 * 20).astype(np.int64) % 20
    own = np.where(u < 0.25, fav, near)
    popular = _draw(self.cat_cdf, _uniform(self.seed, salt + 1, users, j))
    return np.where(u < 0.75, own, popular)

  def behaviour(self, users: np.ndarray) -> Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{field: (row, local id, weight code)} of each row's behaviour lists, sorted by (row, id),
    without duplicates; row k belongs to users[k]."""
    total = self.behaviour_length(users)
    out = {}
    for salt, (field, share, per_cat) in enumerate(BEHAVIOUR):
      counts = np.where(total > 0, np.maximum(1, np.round(total * share)), 0).astype(np.int64)
      row = np.repeat(np.arange(len(users)), counts)
      j = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
      u = users[row]
      if field == "109_14":
        cat = self.categories(u, j, 10)
      else:     # shops, brands and nodes of the categories the user browsed
        cat, _ = _pick_listed(out["109_14"], row, _uniform(self.seed, 10 + 4 * salt, u, j))
      sub = _uniform(self.seed, 12 + 4 * salt, u, j)
      sub = _skewed(sub, per_cat) if per_cat in (SHOPS, BRANDS) else (sub * per_cat).astype(np.int64)
      key, first = np.unique((row << 32) | (cat * per_cat + sub), return_index=True)
      weight = 1 + np.minimum(MAX_COUNT - 1, np.floor(
          -np.log1p(-_uniform(self.seed, 13 + 4 * salt, u[first], j[first])) * 1.5)).astype(np.int64)
      out[field] = (key >> 32, key & 0xFFFFFFFF, weight)
    return out

  def sample_items(self, rng: np.random.Generator, rows: np.ndarray, lists) -> np.ndarray:
    """Candidates of impressions of common rows ``rows``: by popularity (Zipf), or (TARGETED) of a
    category in the row's behaviour list (``behaviour()``)."""
    n = len(rows)
    items = _draw(self.item_cdf, rng.random(n))
    cat, behaved = _pick_listed(lists["109_14"], rows, rng.random(n))
    lo, hi = self.cat_bounds[cat], self.cat_bounds[cat + 1]
    targeted = (rng.random(n) < TARGETED) & behaved & (hi > lo)
    pick = lo + (rng.random(n) * (hi - lo)).astype(np.int64)
    items[targeted] = self.by_cat[pick[targeted]]
    return items

  def logits(self, users, items, positions, interest, loyal, click_selection):
    """Click and conversion logits without the biases (the default profile's model)."""
    click = (self.item_attract[items]
             + 0.6 * np.einsum("ij,ij->i", self.taste[users], self.item_look[items]) / np.sqrt(DIM)
             + 0.8 * interest - 0.12 * positions)
    cvr = (self.item_quality[items]
           + 0.9 * np.einsum("ij,ij->i", self.intent[users], self.item_fit[items]) / np.sqrt(DIM)
           - 0.7 * np.abs(self.cons1[users] - self.item_tier[items]) + 0.6 * loyal)
    return click + click_selection * cvr, cvr


# Share of a behaviour list lost to duplicates (values drawn twice: ~22%, measured), made up by
# drawing more.
DEDUP_SLACK = 1.31


def _pick_listed(listed, rows: np.ndarray, u: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(a value of each row's list picked by uniforms ``u``, whether the row has any) of one
  behaviour list of behaviour(); rows without values get 0."""
  row, ids, _ = listed
  first, last = np.searchsorted(row, rows), np.searchsorted(row, rows, side="right")
  has = last > first
  if not len(ids):
    return np.zeros(len(rows), np.int64), has
  at = np.minimum(first + (u * (last - first)).astype(np.int64), len(ids) - 1)
  return np.where(has, ids[at], 0), has


def _lookup(lists, field: str, rows: np.ndarray, values: np.ndarray):
  """(hit, weight code) of (row, value) in a behaviour list of behaviour()."""
  row, ids, weight = lists[field]
  keys = (row << 32) | ids
  q = (rows.astype(np.int64) << 32) | values.astype(np.int64)
  pos = np.minimum(np.searchsorted(keys, q), max(0, len(keys) - 1))
  hit = (keys[pos] == q) if len(keys) else np.zeros(len(q), bool)
  return hit, np.where(hit, weight[pos] if len(keys) else 0, 0)


# Byte cells.

def _table(strings: List[str], width: int) -> np.ndarray:
  """Rows of ``strings`` as zero-padded ASCII cells."""
  out = np.zeros((len(strings), width), np.uint8)
  for k, s in enumerate(strings):
    b = s.encode()
    out[k, :len(b)] = np.frombuffer(b, np.uint8)
  return out


FIELD_CELLS = _table([f + "\x02" for f in FIELDS], W_FIELD)
WEIGHT_CELLS = _table(["1.0"] + [f"{math.log1p(c):.6f}" for c in range(1, MAX_COUNT + 1)], W_WEIGHT)
HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def _digits(x: np.ndarray, width: int, pad: bool = False) -> np.ndarray:
  """Decimal ASCII cells of non-negative ``x``; leading zeros blank (0) unless ``pad``."""
  x = np.asarray(x).astype(np.uint64)
  out = np.empty((len(x), width), np.uint8)
  for k in range(width - 1, -1, -1):
    out[:, k] = x % np.uint64(10)
    x = x // np.uint64(10)
  if not pad:
    lead = np.cumsum(out[:, :-1], axis=1) == 0
    out += 48
    out[:, :-1][lead] = 0
  else:
    out += 48
  return out


def _hex(x: np.ndarray) -> np.ndarray:
  """16-character hex cells of uint64 ``x``."""
  shifts = np.arange(60, -1, -4, dtype=np.uint64)
  return HEX[((x[:, None] >> shifts) & np.uint64(15)).astype(np.int64)]


def _byte(n: int, value: bytes) -> np.ndarray:
  return np.full((n, 1), value[0], np.uint8)


def _pad(cells: np.ndarray, width: int) -> np.ndarray:
  return np.pad(cells, ((0, 0), (0, width - cells.shape[1])))


def _compact(cells: np.ndarray) -> bytes:
  """The bytes of ``cells`` row by row, blanks (0) dropped."""
  flat = cells.ravel()
  return flat[flat != 0].tobytes()


def item_cells(field_code: np.ndarray, ids: np.ndarray, weight_code: np.ndarray) -> np.ndarray:
  """[field\\x02 | feature id | \\x03 | weight | \\x01] cells of feature items."""
  n = len(ids)
  return np.hstack([FIELD_CELLS[field_code], _digits(OFFSET[field_code] + ids, W_ID), _byte(n, b"\x03"),
                    WEIGHT_CELLS[weight_code], _byte(n, b"\x01")])


def lines(heads: np.ndarray, items: np.ndarray, counts: np.ndarray) -> bytes:
  """Lines of head cells (n, h, W) each followed by its ``counts`` item cells (in line order),
  the items separated by \\x01 and the last followed by a newline."""
  n, h, width = heads.shape
  items = items.copy()
  ends = np.cumsum(counts) - 1
  items[ends, -1] = ord("\n")
  starts = np.arange(n) * h + np.cumsum(counts) - counts
  is_head = np.zeros(n * h + len(items), bool)
  is_head[(starts[:, None] + np.arange(h)).ravel()] = True
  cells = np.empty((len(is_head), width), np.uint8)
  cells[is_head] = heads.reshape(n * h, width)
  cells[~is_head] = items
  return _compact(cells)


def _in_line_order(owner: np.ndarray, *columns) -> List[np.ndarray]:
  """``owner`` and ``columns`` sorted by owner, keeping the given order within an owner."""
  order = np.argsort(owner, kind="stable")
  return [c[order] for c in (owner,) + columns]


# One chunk of common rows.

def common_items(world: ReleaseWorld, rng: np.random.Generator, users: np.ndarray, lists) -> Tuple:
  """(row, field code, local id, weight code) of the common rows' items, in field order."""
  n = len(users)
  values = (users, world.profile[users], world.profile[users] // 10, world.gender[users], world.age[users],
            world.cons1[users], world.cons2[users], world.occupation[users], world.geo[users])
  parts = []
  for field, v in zip(PROFILE_FIELDS, values):
    keep = rng.random(n) >= DROP.get(field, 0.0)
    rows = np.flatnonzero(keep)
    parts.append((rows, np.full(len(rows), CODE[field]), v[keep].astype(np.int64), np.zeros(len(rows), np.int64)))
  for field, _, _ in BEHAVIOUR:
    row, ids, weight = lists[field]
    parts.append((row, np.full(len(row), CODE[field]), ids, weight))
  return tuple(np.concatenate(c) for c in zip(*parts))


def skeleton_items(world: ReleaseWorld, rows: np.ndarray, items: np.ndarray, positions: np.ndarray,
                   lists) -> Tuple[Tuple, np.ndarray, np.ndarray]:
  """((impression, field code, local id, weight code) of the skeleton items, interest, loyalty)."""
  m = len(items)
  imp = np.arange(m)
  cat, shop, brand = world.item_cat[items], world.item_shop[items], world.item_brand[items]
  parts = [(imp, "205", items), (imp, "206", cat), (imp, "207", shop)]
  n_nodes = world.item_nodes[items]
  node_imp = np.repeat(imp, n_nodes)
  node_k = np.arange(len(node_imp)) - np.repeat(np.cumsum(n_nodes) - n_nodes, n_nodes)
  nodes = cat[node_imp].astype(np.int64) * NODES + world.item_node0[items][node_imp] + node_k
  parts += [(node_imp, "210", nodes), (imp, "216", brand), (imp, "301", positions)]
  out = [(i, np.full(len(i), CODE[f]), v.astype(np.int64), np.zeros(len(i), np.int64)) for i, f, v in parts]
  hits = {}
  for cross, field, who, values in (("508", "109_14", imp, cat), ("509", "110_14", imp, shop),
                                    ("702", "127_14", imp, brand), ("853", "150_14", node_imp, nodes)):
    hit, weight = _lookup(lists, field, rows[who], values)
    hits[cross] = hit
    out.append((who[hit], np.full(int(hit.sum()), CODE[cross]), values[hit].astype(np.int64), weight[hit]))
  columns = tuple(np.concatenate(c) for c in zip(*out))
  return columns, hits["508"], hits["702"]


def _probability_cells(p: np.ndarray) -> np.ndarray:
  """'0.dddddddd,' cells (8 decimals)."""
  q = np.minimum(np.round(p * 1e8), 1e8 - 1)
  n = len(p)
  return np.hstack([_byte(n, b"0"), _byte(n, b"."), _digits(q, 8, pad=True), _byte(n, b",")])


class Split:
  """One split's plan: group sizes, users and anomaly positions, drawn up front (small arrays)."""

  def __init__(self, world: ReleaseWorld, rng: np.random.Generator, impressions: int, common_rows: int,
               anomalies: int):
    w = np.exp(GROUP_SIGMA * rng.normal(size=common_rows))
    extra = impressions - common_rows
    sizes = 1 + np.floor(extra * w / w.sum()).astype(np.int64)
    sizes[rng.choice(common_rows, int(impressions - sizes.sum()), replace=False)] += 1   # floor's losses
    self.sizes = sizes
    self.users = _draw(world.activity_cdf, rng.random(common_rows))
    self.anomalies = np.sort(rng.choice(impressions, min(anomalies, impressions), replace=False))
    self.impressions, self.common_rows = impressions, common_rows


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1 / (1 + np.exp(-x))


def chunk(world: ReleaseWorld, rng: np.random.Generator, split_id: int, first_row: int, users: np.ndarray,
          sizes: np.ndarray, click_selection: float) -> Dict[str, np.ndarray]:
  """Draws one chunk of common rows and their impressions (no bytes yet)."""
  lists = world.behaviour(users)
  rows = np.repeat(np.arange(len(users)), sizes)
  imp_users = users[rows]
  items = world.sample_items(rng, rows, lists)
  positions = rng.integers(0, 10, len(items))
  sk, interest, loyal = skeleton_items(world, rows, items, positions, lists)
  click_logit, cvr_logit = world.logits(imp_users, items, positions, interest, loyal, click_selection)
  return {"lists": lists, "rows": rows, "sk": sk, "users": users, "sizes": sizes,
          "index": common_index(world.seed, split_id, first_row, len(users)),
          "click_logit": click_logit, "cvr_logit": cvr_logit,
          "p_ctr": _sigmoid(click_logit + world.b_click), "p_cvr": _sigmoid(cvr_logit + world.b_cvr)}


def common_index(seed: int, split_id: int, first_row: int, n: int) -> np.ndarray:
  """The common_feature_index (uint64, written as 16 hex digits) of common rows: a bijection of
  (split, row), so unique."""
  rows = (np.uint64(split_id) << np.uint64(40)) + np.arange(first_row, first_row + n, dtype=np.uint64)
  with np.errstate(over="ignore"):
    return _mix(rows ^ _mix(np.array([seed], np.uint64)))


def calibrate(world: ReleaseWorld, ctr: float, cvr_on_clicks: float, click_selection: float) -> None:
  """Solves the click and conversion biases on a calibration sample of the world."""
  rng = np.random.default_rng([world.seed, 99])
  n = CALIBRATION_COMMON_ROWS
  users = _draw(world.activity_cdf, rng.random(n))
  sizes = 1 + rng.poisson(PROFILE["splits"]["train"][0] / PROFILE["splits"]["train"][1] - 1, n)
  c = chunk(world, rng, 99, 0, users, sizes, click_selection)
  world.b_click = synthetic.solve_bias(c["click_logit"], ctr)
  world.b_cvr = synthetic.solve_bias(c["cvr_logit"], cvr_on_clicks,
                                     weights=_sigmoid(c["click_logit"] + world.b_click))


def _skeleton_bytes(c, first_sample_id: int, click, conversion) -> bytes:
  m = len(click)
  sid = np.arange(first_sample_id, first_sample_id + m)
  row_a = np.hstack([_digits(sid, 10), _byte(m, b","), (48 + click[:, None]).astype(np.uint8), _byte(m, b","),
                     (48 + conversion[:, None]).astype(np.uint8), _byte(m, b",")])
  imp, code, ids, weight = _in_line_order(*c["sk"])
  counts = np.bincount(imp, minlength=m)
  row_b = np.hstack([_hex(c["index"][c["rows"]]), _byte(m, b","), _digits(counts, 4), _byte(m, b",")])
  heads = np.stack([_pad(row_a, W_ITEM), _pad(row_b, W_ITEM)], axis=1)
  return lines(heads, item_cells(code, ids, weight), counts)


def _common_bytes(c, rng, world) -> Tuple[bytes, np.ndarray]:
  """The chunk's common rows in a shuffled order; also the values per row."""
  n = len(c["users"])
  row, code, ids, weight = common_items(world, rng, c["users"], c["lists"])
  counts = np.bincount(row, minlength=n)
  order = rng.permutation(n)
  rank = np.empty(n, np.int64)
  rank[order] = np.arange(n)
  _, code, ids, weight = _in_line_order(rank[row], code, ids, weight)
  heads = np.hstack([_hex(c["index"][order]), _byte(n, b","), _digits(counts[order], 5), _byte(n, b",")])
  return lines(_pad(heads, W_ITEM)[:, None, :], item_cells(code, ids, weight), counts[order]), counts


def _truth_bytes(first_sample_id: int, p_ctr, p_cvr, cf) -> bytes:
  m = len(p_ctr)
  sid = np.arange(first_sample_id, first_sample_id + m)
  return _compact(np.hstack([_digits(sid, 10), _byte(m, b","), _probability_cells(p_ctr), _probability_cells(p_cvr),
                             (48 + cf[:, None]).astype(np.uint8), _byte(m, b"\n")]))


TRUTH_HEADER = b"sample_id,true_pctr,true_pcvr,counterfactual_conversion\n"
FILES = ("sample_skeleton", "common_features", "ground_truth")


def _chunk_files(world: ReleaseWorld, rng: np.random.Generator, plan: Split, split_id: int, start: int,
                 first_imp: int, click_selection: float) -> Tuple[Dict[str, bytes], Dict]:
  """One chunk of common rows from ``start``: ({file: bytes}, its counts)."""
  stop = min(plan.common_rows, start + CHUNK_COMMON_ROWS)
  c = chunk(world, rng, split_id, start, plan.users[start:stop], plan.sizes[start:stop], click_selection)
  m = len(c["p_ctr"])
  click = (rng.random(m) < c["p_ctr"]).astype(np.int64)
  cf = (rng.random(m) < c["p_cvr"]).astype(np.int64)
  conversion = click * cf
  anomalous = plan.anomalies[(plan.anomalies >= first_imp) & (plan.anomalies < first_imp + m)] - first_imp
  anomalous = anomalous[click[anomalous] == 0]
  written = conversion.copy()
  written[anomalous] = 1
  common, values = _common_bytes(c, rng, world)
  files = {"sample_skeleton": _skeleton_bytes(c, first_imp + 1, click, written), "common_features": common,
           "ground_truth": _truth_bytes(first_imp + 1, c["p_ctr"], c["p_cvr"], cf)}
  counts = {"impressions": m, "clicks": int(click.sum()), "conversions": int(conversion.sum()),
            "anomalies": len(anomalous), "sum_pctr": float(c["p_ctr"].sum()),
            "sum_pctr_pcvr": float((c["p_ctr"] * c["p_cvr"]).sum()),
            "raw_bytes": sum(len(b) for b in files.values()),
            "raw_text_bytes": len(files["sample_skeleton"]) + len(files["common_features"])}
  return files, dict(counts, user_values=values)


def _summary(split: str, plan: Split, totals: Dict, values: np.ndarray, paths: Dict[str, str]) -> dict:
  clicks = totals["clicks"]
  return {"split": split, "impressions": plan.impressions, "common_rows": plan.common_rows, "clicks": clicks,
          "conversions": totals["conversions"], "anomalies": totals["anomalies"],
          "ctr": clicks / plan.impressions, "cvr_on_clicks": totals["conversions"] / max(1, clicks),
          "true_ctr": totals["sum_pctr"] / plan.impressions,
          "true_cvr_on_clicks": totals["sum_pctr_pcvr"] / max(1e-12, totals["sum_pctr"]),
          "user_values_mean": float(values.mean()), "user_values_max": int(values.max()),
          "user_values_p99": float(np.percentile(values, 99)), "raw_bytes": totals["raw_bytes"],
          "raw_text_bytes": totals["raw_text_bytes"],
          "gz_bytes": sum(os.path.getsize(p) for p in paths.values())}


def write_split(out_dir: str, split: str, split_id: int, scale: float, seed: int, click_selection: float) -> dict:
  """Writes one split's three gzip files chunk by chunk; returns its summary."""
  profile = scaled(scale)
  impressions, common_rows = profile["splits"][split]
  world = ReleaseWorld(seed, profile["users"], profile["items"])
  calibrate(world, profile["ctr"], profile["cvr_on_clicks"], click_selection)
  rng = np.random.default_rng([seed, 1 + split_id])
  plan = Split(world, rng, impressions, common_rows, profile["anomalies"])
  paths = {k: os.path.join(out_dir, f"{k}_{split}.csv.gz") for k in FILES}
  totals, values = {}, []
  # mtime 0: the same flags give the same bytes.
  opened = {k: gzip.GzipFile(p, "wb", compresslevel=1, mtime=0) for k, p in paths.items()}
  try:
    opened["ground_truth"].write(TRUTH_HEADER)
    for start in range(0, common_rows, CHUNK_COMMON_ROWS):
      files, counts = _chunk_files(world, rng, plan, split_id, start, totals.get("impressions", 0),
                                   click_selection)
      for k, b in files.items():
        opened[k].write(b)
      values.append(counts.pop("user_values"))
      for k, v in counts.items():
        totals[k] = totals.get(k, 0) + v
  finally:
    for f in opened.values():
      f.close()
  summary = _summary(split, plan, totals, np.concatenate(values), paths)
  logging.info("wrote %s", summary)
  return summary


# What generate writes beside the data: the summary of each split.
SUMMARY_FILE = "summary.json"


def _write_split_args(args) -> dict:
  return write_split(*args)


def generate(output_dir: str, scale: float = 0.01, seed: int = 2018,
             click_selection: float = synthetic.DEFAULT_CLICK_SELECTION, processes: int = 2) -> List[dict]:
  """Writes both splits (``processes`` at a time), then SUMMARY_FILE: each split's summary and
  ``raw_text_bytes``, the uncompressed bytes of the release's own files (skeleton and common
  features, not the ground truth). A pure function of the arguments."""
  os.makedirs(output_dir, exist_ok=True)
  jobs = [(output_dir, split, k, scale, seed, click_selection) for k, split in enumerate(PROFILE["splits"])]
  if processes <= 1:
    summaries = [_write_split_args(j) for j in jobs]
  else:
    with multiprocessing.get_context("fork").Pool(min(processes, len(jobs))) as pool:
      summaries = pool.map(_write_split_args, jobs)
  with open(os.path.join(output_dir, SUMMARY_FILE), "w") as f:
    json.dump({**{s["split"]: s for s in summaries}, "scale": scale, "seed": seed,
               "raw_text_bytes": sum(s["raw_text_bytes"] for s in summaries)}, f, indent=2, sort_keys=True)
  return summaries
