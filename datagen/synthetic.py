r"""Synthetic Ali-CCP data in the exact raw layout of the public release, with ground truth.

Writes, for each split (train, test):
  sample_skeleton_<split>.csv   sample_id,click,conversion,common_feature_index,feature_num,feature_list
  common_features_<split>.csv   common_feature_index,feature_num,feature_list  (shuffled order)
  ground_truth_<split>.csv      sample_id,true_pctr,true_pcvr,counterfactual_conversion  (header)

The data come from a known model. Users and items have latent factors; what drives a
click and what drives a conversion are related but not the same:

  click logit = b_c + attractiveness(item) + <taste(user), look(item)> + interest match
                + position effect + click_selection * cvr logit
  cvr logit   = b_v + quality(item) + <intent(user), fit(item)> + price-level fit
                + brand loyalty

``fit`` and ``intent`` are correlated with ``look`` and ``taste`` (rho), and
attractiveness is slightly anti-correlated with quality (an unattractive item can convert
well once clicked); without the ``click_selection`` term the two logits are nearly
uncorrelated. ``click_selection`` (DEFAULT_CLICK_SELECTION, 0.5) makes users click more of
what they would buy, as in real e-commerce logs: the sample selection bias ESMM is built for.
At 0.5 the true pCVR tells clicked from unclicked impressions with an AUC of about 0.67, a
clicked impression's mean true pCVR is about twice an unclicked one's, and the true click and
conversion logits correlate at about 0.54 (benchmarks/esmm_diagnostics.py measures these);
``click_selection=0`` is the control world without selection. Every impression also gets a
counterfactual conversion drawn from the true pCVR whether or not it was clicked; the observed
conversion is click AND counterfactual conversion, so the funnel holds. A few click=0,conversion=1
rows are injected as in the real release (they must be dropped by the reader).

Avazu-style CSV (``--format=avazu``, ``generate_avazu``) writes, for each split:
  train.csv / test.csv          header + rows: the 24 public Avazu columns, ``conversion``
                                (unless --nowith_conversion) and an extra column
                                ``bid_floor`` that the reader must ignore, in a shuffled
                                order of its own per file, rows sorted by hour
  ground_truth_<split>.csv      the same four columns as above; sample_id is the string id

Impressions are a device (user) seeing an ad (creative C14 of ad group C17, banner
C15 x C16, ...) on a site or in an app at an hour; train covers --num_days days from
2014-10-21, test the day after. The true model again separates what drives a click
from what drives a conversion:

  click logit = b_c + attractiveness(ad) + appeal(placement) + <taste(device), look(ad)>
                + banner position + hour-of-day rhythm + connection type
  cvr logit   = b_v + quality(ad) + <intent(device), fit(ad)> + placement category match
                + device type + evening effect + budget x price level

``fit``/``intent`` are correlated with ``look``/``taste`` (rho) and attractiveness is
slightly anti-correlated with quality. Ids are 19- or 20-digit decimals up to 2^64 (about
half above 2^63, so they overflow int64); most devices are the anonymous ``a99f214a`` as
in the public data; a few values are left empty. ``bad_rows`` injects rows of every
reason the reader sets aside (train split only, never in the ground truth).

Usage: python -m datagen.synthetic --output_dir=/tmp/aliccp [--num_train=...]
       python -m datagen.synthetic --profile=release --scale=0.01 --output_dir=/tmp/release
         (the public release's shape and size, gzipped: datagen/release.py)
       python -m datagen.synthetic --format=avazu --output_dir=/tmp/avazu [--bad_rows=8]
"""

import datetime
import os
from typing import Dict, List, Tuple

import numpy as np
from absl import flags, logging

from pipeline import relabel
from pipeline.sources import avazu as avazu_reader
from preprocessing import cli
from preprocessing import features as F

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS):
  """The command-line flags (only when run as a program, so the module imports as a library),
  defined into ``fv`` with their bounds; validate_flags checks them together before any write."""
  fl = cli.Define(fv)
  fl.DEFINE_enum("format", "aliccp", ["aliccp", "avazu"], "Raw layout to write.")
  fl.DEFINE_enum("profile", "default", ["default", "release"],
                 "Ali-CCP: 'default' writes the small world of the sizes below as plain CSV; 'release' "
                 "the public release's shape and size times --scale as .csv.gz (datagen/release.py; "
                 "uses --output_dir, --seed, --click_selection and --scale only).")
  fl.DEFINE_float("scale", 0.01, "--profile=release: fraction of the release's impressions, common rows, "
                  "users and items (1.0: the whole release, ~85M impressions).",
                  lower_bound=1e-7, upper_bound=1.0)
  fl.DEFINE_string("output_dir", "/tmp/esmm/raw", "Where to write the CSV files.")
  fl.DEFINE_integer("num_train", 150_000, "Impressions in the train split.", lower_bound=1)
  fl.DEFINE_integer("num_test", 75_000, "Impressions in the test split.", lower_bound=1)
  fl.DEFINE_integer("num_users", 20_000, "Distinct users.", lower_bound=1)
  fl.DEFINE_integer("num_items", 30_000, "Distinct items.", lower_bound=1)
  fl.DEFINE_float("impressions_per_common", 20.0,
                  "Mean impressions per common-features row (the public release has ~58).",
                  lower_bound=1.0)
  fl.DEFINE_float("ctr", 0.04, "Target mean click-through rate (avazu default: 0.165).",
                  lower_bound=1e-6, upper_bound=1 - 1e-6)
  fl.DEFINE_float("cvr", 0.05, "Target mean post-click conversion rate over all impressions "
                  "(avazu default: 0.05).", lower_bound=1e-6, upper_bound=1 - 1e-6)
  fl.DEFINE_integer("anomalies", 5, "click=0,conversion=1 rows injected per split.",
                    lower_bound=0)
  fl.DEFINE_float("click_selection", DEFAULT_CLICK_SELECTION,
                  "Ali-CCP: weight of the conversion logit inside the click logit (users click "
                  "more of what they would buy; see the module doc for what the default gives). "
                  "0: the control world, where clicks do not select on conversion propensity.")
  fl.DEFINE_integer("seed", 2018, "Random seed; the output is a pure function of the flags "
                    "(avazu default: 2014).", lower_bound=0)
  fl.DEFINE_integer("num_days", 3, "Avazu: days of the train split (test is the day after); "
                    "daily: days of impression logs.", lower_bound=1)
  fl.DEFINE_integer("num_devices", 5_000, "Avazu: distinct devices (users).",
                    lower_bound=1)
  fl.DEFINE_boolean("with_conversion", True, "Avazu: write the conversion column.")
  fl.DEFINE_integer("bad_rows", 0, "Avazu: bad rows of every reason injected into train; daily: "
                    "malformed and unknown-impression conversion rows per day.", lower_bound=0)
  fl.DEFINE_boolean("daily", False, "Ali-CCP daily logs for orchestration.daily: --num_days days of "
                    "impressions (conversion 0) and the conversion logs their late conversions land in.")
  fl.DEFINE_integer("impressions_per_day", 20_000, "Daily logs: impressions per day.",
                    lower_bound=1)

DIM = 8
# Weight of the conversion logit in the click logit of the Ali-CCP layout's world (module doc).
DEFAULT_CLICK_SELECTION = 0.5
N_CAT, N_SHOP_PER_CAT, N_BRAND, N_NODE = 200, 10, 1000, 500
N_SHOP = N_CAT * N_SHOP_PER_CAT
RHO = 0.5            # correlation of conversion factors with click factors
_FIELD_INDEX = {f.name: i for i, f in enumerate(F.ALICCP_FIELDS)}


def feature_id(field: str, local_id) -> np.ndarray:
  """Ids of one shared id space, as in the real release: each field has its own range."""
  return _FIELD_INDEX[field] * 10_000_000 + 1 + np.asarray(local_id)


def _fmt_weight(w: float) -> str:
  return format(float(w), ".6g")


def _items_str(field: str, local_ids, weights=None) -> List[str]:
  ids = feature_id(field, local_ids)
  if weights is None:
    return [f"{field}\x02{i}\x031.0" for i in ids]
  return [f"{field}\x02{i}\x03{_fmt_weight(w)}" for i, w in zip(ids, weights)]


def solve_bias(logits: np.ndarray, target: float, weights: np.ndarray = None) -> float:
  """Bias b such that mean(sigmoid(logits + b)) == target (bisection); with ``weights``, the
  weighted mean (a post-click rate: weights are the click probabilities)."""
  lo, hi = -30.0, 30.0
  for _ in range(60):
    mid = (lo + hi) / 2
    if np.average(1 / (1 + np.exp(-(logits + mid))), weights=weights) < target:
      lo = mid
    else:
      hi = mid
  return (lo + hi) / 2


class World:
  """Users, items and the true click/conversion model."""

  def __init__(self, rng: np.random.Generator, num_users: int, num_items: int):
    self.rng = rng
    r = rng
    cat_vec = r.normal(size=(N_CAT, DIM))
    cat_pop = 1.0 / np.arange(1, N_CAT + 1) ** 0.8
    cat_pop /= cat_pop.sum()
    cat_tier = r.integers(0, 3, N_CAT)                     # price level of a category
    cat_quality = r.normal(size=N_CAT)                     # how well a category converts
    cat_attract = r.normal(size=N_CAT)                     # how well a category draws clicks
    brand_quality = r.normal(size=N_BRAND)
    shop_quality = r.normal(size=N_SHOP)

    # Items.
    self.item_cat = r.choice(N_CAT, num_items, p=cat_pop)
    self.item_shop = self.item_cat * N_SHOP_PER_CAT + r.integers(0, N_SHOP_PER_CAT, num_items)
    self.item_brand = r.integers(0, N_BRAND, num_items)
    n_nodes = r.integers(1, 4, num_items)
    self.item_nodes = [np.unique((2 * c + r.integers(0, 6, k)) % N_NODE)
                       for c, k in zip(self.item_cat, n_nodes)]
    self.item_tier = np.clip(cat_tier[self.item_cat] + (r.random(num_items) < 0.2), 0, 2)
    look = cat_vec[self.item_cat] + 0.5 * r.normal(size=(num_items, DIM))
    self.item_look = look
    self.item_fit = RHO * look + np.sqrt(1 - RHO ** 2) * r.normal(size=(num_items, DIM))
    # Effects sit partly on attributes seen often (category, price tier) and partly on
    # rarely seen ones (item, brand, shop), as in real logs.
    self.item_attract = 0.5 * cat_attract[self.item_cat] + 0.4 * r.normal(size=num_items)
    self.item_quality = (0.8 * cat_quality[self.item_cat] + 0.4 * brand_quality[self.item_brand]
                         + 0.3 * shop_quality[self.item_shop] + 0.3 * r.normal(size=num_items)
                         - 0.3 * self.item_attract)

    # Users: profile, tastes and 14-day behaviour.
    self.gender = r.integers(0, 2, num_users)
    self.age = r.integers(0, 7, num_users)
    self.cons1 = r.integers(0, 3, num_users)
    self.cons2 = np.minimum(3, self.cons1 + r.integers(0, 2, num_users))
    self.occupation = r.integers(0, 4, num_users)
    self.geo = r.integers(0, 30, num_users)
    self.profile = r.integers(0, 100, num_users)
    self.fav_cats = []
    self.behaviour: List[Dict[str, tuple]] = []
    taste = np.zeros((num_users, DIM))
    self.likes_cat = np.zeros((num_users, N_CAT), bool)
    self.likes_brand = np.zeros((num_users, N_BRAND), bool)
    # Demographic groups share category preferences, so profile fields carry signal.
    group_pref = r.dirichlet(np.full(N_CAT, 0.3), size=14) * 0.5 + cat_pop * 0.5
    for u in range(num_users):
      g = self.gender[u] * 7 + self.age[u]
      favs = np.unique(r.choice(N_CAT, r.integers(2, 8), p=group_pref[g]))
      self.fav_cats.append(favs)
      self.likes_cat[u, favs] = True
      taste[u] = cat_vec[favs].mean(0) + 0.3 * r.normal(size=DIM)
      beh = {}
      if r.random() > 0.05:     # ~5% of users have no 14-day behaviour at all
        cats = np.unique(np.concatenate([favs, r.choice(N_CAT, r.integers(0, 6), p=cat_pop)]))
        beh["109_14"] = (cats, np.round(r.gamma(2.0, 1.0, len(cats)), 4) + 0.01)
        shops = np.unique(cats[r.integers(0, len(cats), r.integers(1, 15))] * N_SHOP_PER_CAT
                          + r.integers(0, N_SHOP_PER_CAT, 1))
        beh["110_14"] = (shops, np.round(r.gamma(2.0, 1.0, len(shops)), 4) + 0.01)
        brands = np.unique(r.integers(0, N_BRAND, r.integers(1, 12)))
        self.likes_brand[u, brands] = True
        beh["127_14"] = (brands, np.round(r.gamma(2.0, 1.0, len(brands)), 4) + 0.01)
        nodes = np.unique((2 * cats[:, None] + r.integers(0, 6, (len(cats), 2))) % N_NODE)
        beh["150_14"] = (nodes, np.round(r.gamma(2.0, 1.0, len(nodes)), 4) + 0.01)
      self.behaviour.append(beh)
    self.taste = taste
    self.intent = RHO * taste + np.sqrt(1 - RHO ** 2) * r.normal(size=(num_users, DIM))
    self.num_users, self.num_items = num_users, num_items
    self.cat_pop = cat_pop
    self.b_click = None
    self.b_cvr = None

  def logits(self, users, items, positions, click_selection: float = 0.0):
    """Click and conversion logits (without the calibration biases).

    ``click_selection`` adds that multiple of the conversion logit to the click logit, so
    clicks select on conversion propensity (sample selection bias for a clicked-only model).
    """
    interest = self.likes_cat[users, self.item_cat[items]]
    click = (self.item_attract[items]
             + 0.6 * np.einsum("ij,ij->i", self.taste[users], self.item_look[items]) / np.sqrt(DIM)
             + 0.8 * interest - 0.12 * positions)
    cvr = (self.item_quality[items]
           + 0.9 * np.einsum("ij,ij->i", self.intent[users], self.item_fit[items]) / np.sqrt(DIM)
           - 0.7 * np.abs(self.cons1[users] - self.item_tier[items])
           + 0.6 * self.likes_brand[users, self.item_brand[items]])
    return click + click_selection * cvr, cvr

  def sample_items(self, users):
    """Candidate items: half from the user's favourite categories, half from the catalogue."""
    r = self.rng
    n = len(users)
    items = r.integers(0, self.num_items, n)
    targeted = r.random(n) < 0.5
    if targeted.any():
      # Items whose category is one of the user's favourites (rejection-free: pick a
      # favourite category, then an item of it).
      by_cat = getattr(self, "_by_cat", None)
      if by_cat is None:
        order = np.argsort(self.item_cat, kind="stable")
        bounds = np.searchsorted(self.item_cat[order], np.arange(N_CAT + 1))
        by_cat = self._by_cat = (order, bounds)
      order, bounds = by_cat
      for k in np.flatnonzero(targeted):
        favs = self.fav_cats[users[k]]
        c = favs[r.integers(0, len(favs))]
        lo, hi = bounds[c], bounds[c + 1]
        if hi > lo:
          items[k] = order[r.integers(lo, hi)]
    return items


def _user_common_items(world: World, u: int) -> List[str]:
  items = []
  for field, values in (("101", u), ("121", world.profile[u]), ("122", world.profile[u] // 10),
                        ("124", world.gender[u]), ("125", world.age[u]), ("126", world.cons1[u]),
                        ("127", world.cons2[u]), ("128", world.occupation[u]), ("129", world.geo[u])):
    items += _items_str(field, [values])
  for field, (ids, weights) in world.behaviour[u].items():
    items += _items_str(field, ids, weights)
  return items


def _drop_some(rng, items: List[str]) -> List[str]:
  """Any field may be missing: drop gender/occupation/geography now and then."""
  keep = []
  for it in items:
    field = it.split("\x02", 1)[0]
    p = {"124": 0.05, "128": 0.10, "129": 0.03}.get(field, 0.0)
    if p and rng.random() < p:
      continue
    keep.append(it)
  return keep


def _cross_items(world: World, u: int, i: int) -> List[str]:
  """Cross fields: a user's behaviour value matched with the item's attribute, weighted."""
  beh = world.behaviour[u]
  out = []
  for field, beh_field, item_values in (
      ("508", "109_14", [world.item_cat[i]]), ("509", "110_14", [world.item_shop[i]]),
      ("702", "127_14", [world.item_brand[i]]), ("853", "150_14", world.item_nodes[i])):
    if beh_field not in beh:
      continue
    ids, weights = beh[beh_field]
    pos = np.searchsorted(ids, item_values)
    for v, p in zip(item_values, pos):
      if p < len(ids) and ids[p] == v:
        out += _items_str(field, [v], [weights[p]])
  return out


def write_split(world: World, rng: np.random.Generator, out_dir: str, split: str,
                num_impressions: int, per_common: float, anomalies: int,
                ctr: float, cvr: float, click_selection: float = DEFAULT_CLICK_SELECTION,
                names: Dict[str, str] = None,
                first_sample_id: int = 1, log_conversions: bool = True) -> dict:
  """Writes one split's three files; returns summary counts.

  ``names``: file names {"skeleton", "common", "truth"} (default: the release's names with
  the split suffix). ``log_conversions=False`` writes conversion 0 in the skeleton, as an
  impression log written at serving time does (conversions arrive later in their own log);
  the summary then also carries the arrays the conversion log is made from.
  """
  names = names or {"skeleton": f"sample_skeleton_{split}.csv", "common": f"common_features_{split}.csv",
                    "truth": f"ground_truth_{split}.csv"}
  # Sessions (common rows): a user in a context, several impressions each.
  sizes = []
  total = 0
  while total < num_impressions:
    s = int(min(1 + rng.poisson(per_common - 1), num_impressions - total))
    sizes.append(s)
    total += s
  n_common = len(sizes)
  session_user = rng.integers(0, world.num_users, n_common)
  indices = set()
  while len(indices) < n_common:
    indices.update(f"{x:016x}" for x in rng.integers(0, 2 ** 63, n_common - len(indices)))
  session_index = np.array(sorted(indices))
  rng.shuffle(session_index)

  users = np.repeat(session_user, sizes)
  items = world.sample_items(users)
  positions = np.concatenate([rng.permutation(s) % 10 for s in sizes])
  click_logit, cvr_logit = world.logits(users, items, positions, click_selection)
  if world.b_click is None:   # calibrate once, on the first split written
    world.b_click = solve_bias(click_logit, ctr)
    world.b_cvr = solve_bias(cvr_logit, cvr)
  p_ctr = 1 / (1 + np.exp(-(click_logit + world.b_click)))
  p_cvr = 1 / (1 + np.exp(-(cvr_logit + world.b_cvr)))
  click = (rng.random(num_impressions) < p_ctr).astype(int)
  cf_conversion = (rng.random(num_impressions) < p_cvr).astype(int)
  conversion = click * cf_conversion
  non_clicks = np.flatnonzero(click == 0)
  anomalous = rng.choice(non_clicks, min(anomalies, len(non_clicks)), replace=False)
  conversion_written = conversion.copy()
  conversion_written[anomalous] = 1
  if not log_conversions:
    conversion_written[:] = 0

  os.makedirs(out_dir, exist_ok=True)
  item_strs = {}
  with open(os.path.join(out_dir, names["skeleton"]), "w", newline="\n") as skel, \
       open(os.path.join(out_dir, names["truth"]), "w", newline="\n") as truth:
    truth.write("sample_id,true_pctr,true_pcvr,counterfactual_conversion\n")
    row = 0
    for s_idx, size in enumerate(sizes):
      index = session_index[s_idx]
      u = session_user[s_idx]
      for _ in range(size):
        i = items[row]
        if i not in item_strs:
          item_strs[i] = (_items_str("205", [i]) + _items_str("206", [world.item_cat[i]])
                          + _items_str("207", [world.item_shop[i]])
                          + _items_str("210", world.item_nodes[i])
                          + _items_str("216", [world.item_brand[i]]))
        its = item_strs[i] + _items_str("301", [positions[row]]) + _cross_items(world, u, i)
        sid = row + first_sample_id
        skel.write(f"{sid},{click[row]},{conversion_written[row]},{index},{len(its)},"
                   f"{chr(1).join(its)}\n")
        truth.write(f"{sid},{p_ctr[row]:.6g},{p_cvr[row]:.6g},{cf_conversion[row]}\n")
        row += 1
  # The common file is in another order than the skeleton, as in the real release.
  with open(os.path.join(out_dir, names["common"]), "w", newline="\n") as common:
    for s_idx in rng.permutation(n_common):
      its = _drop_some(rng, _user_common_items(world, session_user[s_idx]))
      common.write(f"{session_index[s_idx]},{len(its)},{chr(1).join(its)}\n")
  summary = {"split": split, "impressions": num_impressions, "common_rows": n_common,
             "clicks": int(click.sum()), "conversions": int(conversion.sum()),
             "anomalies": len(anomalous), "ctr": float(click.mean()),
             "cvr_on_clicks": float(conversion.sum() / max(1, click.sum()))}
  logging.info("wrote %s", summary)
  if not log_conversions:
    summary["arrays"] = {"sample_id": np.arange(num_impressions) + first_sample_id, "click": click,
                         "conversion": conversion, "anomalous": anomalous}
  return summary


def generate(output_dir: str, num_train: int, num_test: int, num_users: int = 20_000,
             num_items: int = 30_000, impressions_per_common: float = 20.0, ctr: float = 0.04,
             cvr: float = 0.05, anomalies: int = 5, seed: int = 2018,
             click_selection: float = DEFAULT_CLICK_SELECTION) -> List[dict]:
  """Writes the train and test splits; a pure function of its arguments."""
  rng = np.random.default_rng(seed)
  world = World(rng, num_users, num_items)
  return [write_split(world, rng, output_dir, split, n, impressions_per_common, anomalies, ctr, cvr,
                      click_selection)
          for split, n in (("train", num_train), ("test", num_test))]


# Daily logs: impressions per day, conversions arriving days later in a log of their own.

DAILY_START = datetime.date(2014, 10, 21)
MAX_DELAY_DAYS = 14.0


def conversion_delays(rng: np.random.Generator, n: int) -> np.ndarray:
  """Days from impression to conversion: log-normal, median 0.8 days (about 80% within two
  days), a long tail (about 1.5% after a week), capped at 14 days."""
  return np.minimum(np.exp(np.log(0.8) + rng.normal(size=n)), MAX_DELAY_DAYS)


def generate_daily(output_dir: str, num_days: int, impressions_per_day: int,
                   start: datetime.date = DAILY_START, num_users: int = 20_000, num_items: int = 30_000,
                   impressions_per_common: float = 20.0, ctr: float = 0.04, cvr: float = 0.05,
                   duplicate_rate: float = 0.01, bad_rows: int = 0, seed: int = 2018,
                   test_impressions: int = 0) -> List[dict]:
  """Writes ``num_days`` days of impression logs and the conversion logs they cause.

  impressions/date=D/sample_skeleton.csv   Ali-CCP skeleton; conversion is always 0 (unknown
  impressions/date=D/common_features.csv   when the impression is logged)
  conversions/date=C/conversions.csv       sample_id,conversion_timestamp (UTC seconds): the
                                           conversions that happened on day C, for impressions of
                                           day C or earlier; written up to 14 days past the last
                                           impression day (later days exist only when reached)
  ground_truth/date=D.csv                  sample_id,true_pctr,true_pcvr,counterfactual_conversion
  test/                                    with ``test_impressions``: a split of the same world in
                                           the batch layout (sample_skeleton_test.csv, ... with
                                           every conversion known, ground_truth_test.csv), a
                                           common yardstick for models of different days

  Sample ids are unique over all days (D * 10^7 + row). The conversion log also carries what
  real postback logs do: duplicates (``duplicate_rate``), the click=0 anomalies of the release
  (5 a day), and with ``bad_rows`` that many malformed lines and conversions of unknown
  impressions per day.
  """
  if impressions_per_day >= 10 ** 7:
    raise ValueError("impressions_per_day must be below 10^7 (sample ids are D * 10^7 + row)")
  rng = np.random.default_rng(seed)
  world = World(rng, num_users, num_items)
  epoch = datetime.datetime(1970, 1, 1)
  events: Dict[str, List[str]] = {}
  summaries = []
  for d in range(num_days):
    day = start + datetime.timedelta(days=d)
    date = day.strftime("%Y%m%d")
    paths = relabel.log_paths(output_dir, date)
    os.makedirs(paths["impressions"], exist_ok=True)
    os.makedirs(os.path.dirname(paths["truth"]), exist_ok=True)
    names = {k: os.path.relpath(paths[k], paths["impressions"]) for k in ("skeleton", "common", "truth")}
    summary = write_split(world, rng, paths["impressions"], date, impressions_per_day, impressions_per_common,
                          5, ctr, cvr, names=names, first_sample_id=int(date) * 10 ** 7 + 1,
                          log_conversions=False)
    arrays = summary.pop("arrays")
    converted = np.concatenate([np.flatnonzero(arrays["conversion"]), arrays["anomalous"]])
    day_start = (datetime.datetime.combine(day, datetime.time()) - epoch).total_seconds()
    times = (day_start + rng.uniform(0, 86400, len(converted))
             + 86400 * conversion_delays(rng, len(converted))).astype(np.int64)
    dup = rng.random(len(converted)) < duplicate_rate
    for sid, t in list(zip(arrays["sample_id"][converted], times)) + list(
        zip(arrays["sample_id"][converted][dup], times[dup] + 60)):
      events.setdefault(relabel.conversion_date(t), []).append(f"{sid},{t}")
    for k in range(bad_rows):
      events.setdefault(date, []).extend([f"not-a-number,{int(day_start)}",
                                          f"{int(date) * 10 ** 7 + 9_999_000 + k},{int(day_start) + 10}"])
    summary.update(date=date, duplicates=int(dup.sum()), converted=int(arrays["conversion"].sum()))
    summaries.append(summary)
  if test_impressions:
    test = os.path.join(output_dir, "test")
    os.makedirs(test, exist_ok=True)
    summaries.append(write_split(world, rng, test, "test", test_impressions, impressions_per_common, 0, ctr, cvr,
                                 first_sample_id=9 * 10 ** 15 + 1))
  for c_date, lines in events.items():
    path = relabel.log_paths(output_dir, c_date)["conversions"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    order = np.argsort([int(line.split(",")[1]) if line.split(",")[0].isdigit() else 0 for line in lines],
                       kind="stable")
    with open(path, "w", newline="\n") as f:
      f.write(relabel.CONVERSION_LOG_HEADER + "\n")
      f.writelines(lines[i] + "\n" for i in order)
  return summaries


# Avazu-style CSV.

AVAZU_START = datetime.date(2014, 10, 21)       # first day of the public release
# In the public data, site traffic carries these app_* values and app traffic these site_*
# values, and most rows have the anonymous device id.
SITE_TRAFFIC_APP = ("ecad2386", "7801e8d9", "07d7df22")
APP_TRAFFIC_SITE = ("85f751fd", "c4e18dd6", "50e219e0")
ANONYMOUS_DEVICE = "a99f214a"
BANNER_SIZES = ((320, 50), (300, 250), (728, 90), (216, 36), (480, 320), (320, 480), (1024, 768))
AVAZU_EXTRA_COLUMN = "bid_floor"
N_SITE_CAT, N_APP_CAT, N_AD_CAT = 20, 25, 12


def _zipf(n: int, a: float) -> np.ndarray:
  p = 1.0 / np.arange(1, n + 1) ** a
  return p / p.sum()


def _hex_ids(rng: np.random.Generator, n: int, taken: set) -> np.ndarray:
  """``n`` distinct 8-hex-character ids, none in ``taken`` (which is updated)."""
  out = []
  while len(out) < n:
    for x in rng.integers(0, 1 << 32, n - len(out)):
      h = f"{x:08x}"
      if h not in taken:
        taken.add(h)
        out.append(h)
  return np.array(out)


def _sample_ids(rng: np.random.Generator, n: int, taken: set) -> List[str]:
  """Distinct decimal ids in [10^18, 2^64): 19 or 20 digits, about half above 2^63."""
  out = []
  while len(out) < n:
    for x in rng.integers(10 ** 18, 2 ** 64 - 1, n - len(out), dtype=np.uint64, endpoint=True):
      text = str(int(x))
      if text not in taken:
        taken.add(text)
        out.append(text)
  return out


def _pick(rng: np.random.Generator, values, probs, n: int) -> np.ndarray:
  return np.asarray(values)[rng.choice(len(values), n, p=np.asarray(probs) / np.sum(probs))]


def _placements(r: np.random.Generator, n: int, num_domains: int, cat_vec: np.ndarray, taken: set):
  """Sites or apps: (hex ids, domains, categories, popularity, appeal, latent vectors).

  ``num_domains`` domains are shared among the ``n`` placements; categories follow a
  Zipf law over the rows of ``cat_vec``, and each vector is its category's plus noise.
  """
  hex_ids = _hex_ids(r, n, taken)
  domains = _hex_ids(r, num_domains, taken)[r.integers(0, num_domains, n)]
  cat = r.choice(len(cat_vec), n, p=_zipf(len(cat_vec), 1.0))
  pop = _zipf(n, 1.1)[r.permutation(n)]
  appeal = 0.5 * r.normal(size=n)
  vec = cat_vec[cat] + 0.5 * r.normal(size=(n, DIM))
  return hex_ids, domains, cat, pop, appeal, vec


class AvazuWorld:
  """Devices, placements (sites and apps), ads and the true click/conversion model."""

  def __init__(self, rng: np.random.Generator, num_devices: int, num_sites: int = 400,
               num_apps: int = 500, num_ads: int = 800):
    r = self.rng = rng
    taken = set(SITE_TRAFFIC_APP + APP_TRAFFIC_SITE + (ANONYMOUS_DEVICE,))
    self.ids_taken: set = set()
    # Placements: a category each; sites and apps share the ad categories' space.
    site_cat_vec = r.normal(size=(N_SITE_CAT, DIM))
    app_cat_vec = r.normal(size=(N_APP_CAT, DIM))
    self.site_cat_hex = _hex_ids(r, N_SITE_CAT, taken)
    self.app_cat_hex = _hex_ids(r, N_APP_CAT, taken)
    self.site_cat_topic = r.integers(0, N_AD_CAT, N_SITE_CAT)
    self.app_cat_topic = r.integers(0, N_AD_CAT, N_APP_CAT)
    (self.site_hex, self.site_domain, self.site_cat, self.site_pop, self.site_appeal,
     self.site_vec) = _placements(r, num_sites, num_sites // 2, site_cat_vec, taken)
    (self.app_hex, self.app_domain, self.app_cat, self.app_pop, self.app_appeal,
     self.app_vec) = _placements(r, num_apps, num_apps // 4, app_cat_vec, taken)

    # Ads: creatives (C14) in ad groups (C17) sharing size, topic and the other C columns.
    n_groups = max(1, num_ads // 4)
    group_vec = r.normal(size=(n_groups, DIM))
    group_quality = r.normal(size=n_groups)
    group_attract = r.normal(size=n_groups)
    self.group_c17 = r.choice(np.arange(400, 2800), n_groups, replace=False)
    self.group_size = r.choice(len(BANNER_SIZES), n_groups, p=_zipf(len(BANNER_SIZES), 1.5))
    self.group_c18 = r.choice(4, n_groups, p=[0.5, 0.1, 0.15, 0.25])
    self.group_c19 = r.choice(np.arange(33, 1900), n_groups)
    self.group_c20 = np.where(r.random(n_groups) < 0.5, -1, r.choice(np.arange(100000, 100250), n_groups))
    self.group_c21 = r.choice(np.arange(1, 200), n_groups)
    self.group_topic = r.integers(0, N_AD_CAT, n_groups)
    self.group_price = r.integers(-1, 2, n_groups)
    self.ad_group = r.integers(0, n_groups, num_ads)
    self.ad_c14 = r.choice(np.arange(375, 24100), num_ads, replace=False)
    self.ad_pop = _zipf(num_ads, 0.9)[r.permutation(num_ads)]
    look = group_vec[self.ad_group] + 0.5 * r.normal(size=(num_ads, DIM))
    self.ad_look = look
    self.ad_fit = RHO * look + np.sqrt(1 - RHO ** 2) * r.normal(size=(num_ads, DIM))
    self.ad_attract = 0.5 * group_attract[self.ad_group] + 0.4 * r.normal(size=num_ads)
    self.ad_quality = (0.8 * group_quality[self.ad_group] + 0.4 * r.normal(size=num_ads)
                       - 0.3 * self.ad_attract)

    # Devices: most are anonymous in the logs; each has 1-3 ips and a model.
    self.device_hex = _hex_ids(r, num_devices, taken)
    self.device_anonymous = r.random(num_devices) < 0.7
    n_ips = r.integers(1, 4, num_devices)
    self.device_ips = [_hex_ids(r, k, taken) for k in n_ips]
    n_models = 300
    models = _hex_ids(r, n_models, taken)
    self.device_model = models[r.choice(n_models, num_devices, p=_zipf(n_models, 1.0))]
    self.device_type = _pick(r, [1, 0, 4, 5], [0.92, 0.05, 0.02, 0.01], num_devices)
    self.conn_type = _pick(r, [0, 2, 3, 5], [0.85, 0.08, 0.06, 0.01], num_devices)
    self.device_activity = r.gamma(0.7, 1.0, num_devices)
    self.device_activity /= self.device_activity.sum()
    self.app_share = r.beta(1.0, 2.0, num_devices)
    self.taste = r.normal(size=(num_devices, DIM))
    self.intent = RHO * self.taste + np.sqrt(1 - RHO ** 2) * r.normal(size=(num_devices, DIM))
    self.budget = r.normal(size=num_devices)
    self.b_click = None
    self.b_cvr = None

  def impressions(self, n: int, days: List[datetime.date]) -> Dict[str, np.ndarray]:
    """``n`` impressions over ``days``, sorted by hour, with their true logits."""
    r = self.rng
    dev = r.choice(len(self.device_hex), n, p=self.device_activity)
    in_app = r.random(n) < self.app_share[dev]
    site = r.choice(len(self.site_hex), n, p=self.site_pop)
    app = r.choice(len(self.app_hex), n, p=self.app_pop)
    ad = r.choice(len(self.ad_c14), n, p=self.ad_pop)
    group = self.ad_group[ad]
    day = r.integers(0, len(days), n)
    diurnal = 1 + 0.6 * np.sin(2 * np.pi * (np.arange(24) - 9) / 24)
    hod = r.choice(24, n, p=diurnal / diurnal.sum())
    order = np.lexsort((hod, day))
    dev, in_app, site, app, ad, group, day, hod = (
        x[order] for x in (dev, in_app, site, app, ad, group, day, hod))
    banner = _pick(r, [0, 1, 2, 4, 5, 7], [0.70, 0.27, 0.01, 0.01, 0.005, 0.005], n)
    place_vec = np.where(in_app[:, None], self.app_vec[app], self.site_vec[site])
    place_appeal = np.where(in_app, self.app_appeal[app], self.site_appeal[site])
    place_topic = np.where(in_app, self.app_cat_topic[self.app_cat[app]],
                           self.site_cat_topic[self.site_cat[site]])
    click = (self.ad_attract[ad] + place_appeal
             + 0.6 * np.einsum("ij,ij->i", self.taste[dev], self.ad_look[ad]) / np.sqrt(DIM)
             + 0.3 * np.einsum("ij,ij->i", self.taste[dev], place_vec) / np.sqrt(DIM)
             + np.select([banner == 1, banner == 0], [0.25, 0.0], -0.2)
             + 0.25 * np.sin(2 * np.pi * (hod - 14) / 24)
             + np.select([self.conn_type[dev] == 0, self.conn_type[dev] == 2], [0.0, -0.2], -0.1))
    cvr = (self.ad_quality[ad]
           + 0.9 * np.einsum("ij,ij->i", self.intent[dev], self.ad_fit[ad]) / np.sqrt(DIM)
           + 0.5 * (place_topic == self.group_topic[group])
           + np.select([self.device_type[dev] >= 4, self.device_type[dev] == 0], [0.3, -0.3], 0.0)
           + 0.3 * (hod >= 18) - 0.2 * (hod <= 6)
           + 0.5 * self.budget[dev] * self.group_price[group])
    return {"device": dev, "in_app": in_app, "site": site, "app": app, "ad": ad, "group": group,
            "day": day, "hour_of_day": hod, "banner_pos": banner,
            "click_logit": click, "cvr_logit": cvr}

  def columns(self, imp: Dict[str, np.ndarray], days: List[datetime.date]) -> Dict[str, np.ndarray]:
    """The categorical columns of impressions as the strings written to the CSV."""
    r = self.rng
    n = len(imp["device"])
    dev, in_app, site, app = imp["device"], imp["in_app"], imp["site"], imp["app"]
    group = imp["group"]
    app_traffic = lambda app_value, site_placeholder: np.where(in_app, app_value, site_placeholder)
    ip_pick = [ips[r.integers(0, len(ips))] for ips in (self.device_ips[d] for d in dev)]
    day_str = np.array([d.strftime("%y%m%d") for d in days])[imp["day"]]
    size = np.array(BANNER_SIZES)[self.group_size[group]]
    cols = {
        F.AVAZU_HOUR: np.char.add(day_str, np.char.zfill(imp["hour_of_day"].astype(str), 2)),
        "C1": _pick(r, [1005, 1002, 1010, 1007, 1001, 1008, 1012],
                    [0.90, 0.05, 0.03, 0.01, 0.005, 0.003, 0.002], n).astype(str),
        "banner_pos": imp["banner_pos"].astype(str),
        "site_id": app_traffic(APP_TRAFFIC_SITE[0], self.site_hex[site]),
        "site_domain": app_traffic(APP_TRAFFIC_SITE[1], self.site_domain[site]),
        "site_category": app_traffic(APP_TRAFFIC_SITE[2], self.site_cat_hex[self.site_cat[site]]),
        "app_id": np.where(in_app, self.app_hex[app], SITE_TRAFFIC_APP[0]),
        "app_domain": np.where(in_app, self.app_domain[app], SITE_TRAFFIC_APP[1]),
        "app_category": np.where(in_app, self.app_cat_hex[self.app_cat[app]], SITE_TRAFFIC_APP[2]),
        "device_id": np.where(self.device_anonymous[dev], ANONYMOUS_DEVICE, self.device_hex[dev]),
        "device_ip": np.array(ip_pick),
        "device_model": self.device_model[dev],
        "device_type": self.device_type[dev].astype(str),
        "device_conn_type": self.conn_type[dev].astype(str),
        "C14": self.ad_c14[imp["ad"]].astype(str),
        "C15": size[:, 0].astype(str),
        "C16": size[:, 1].astype(str),
        "C17": self.group_c17[group].astype(str),
        "C18": self.group_c18[group].astype(str),
        "C19": self.group_c19[group].astype(str),
        "C20": self.group_c20[group].astype(str),
        "C21": self.group_c21[group].astype(str),
    }
    # Any categorical value may be missing: leave a few empty.
    for name, p in (("device_model", 0.01), ("site_category", 0.005), ("C20", 0.005)):
      cols[name] = np.where(r.random(n) < p, "", cols[name].astype(object))
    return {k: np.asarray(v, dtype=object) for k, v in cols.items()}


def _bad_row(values: Dict[str, str], reason: str, k: int) -> Tuple[Dict[str, object], bool]:
  """A copy of a good row's values broken for ``reason``; (values, drop the last column)."""
  v = dict(values)
  if reason == avazu_reader.BAD_SAMPLE_ID:
    v[F.AVAZU_ID] = "" if k % 2 else v[F.AVAZU_ID][:6] + "x" + v[F.AVAZU_ID][7:]
  elif reason == avazu_reader.BAD_CLICK:
    v[F.CLICK] = ("2", "", "yes")[k % 3]
  elif reason == avazu_reader.BAD_CONVERSION:
    v[F.CONVERSION] = ("", "2")[k % 2]
  elif reason == avazu_reader.CONVERSION_WITHOUT_CLICK:
    v[F.CLICK], v[F.CONVERSION] = "0", "1"
  elif reason == avazu_reader.BAD_HOUR:
    v[F.AVAZU_HOUR] = (v[F.AVAZU_HOUR][:6] + "24", v[F.AVAZU_HOUR][:2] + "13" + v[F.AVAZU_HOUR][4:],
                       v[F.AVAZU_HOUR][:7])[k % 3]
  elif reason == avazu_reader.BAD_INTEGER:
    v["C14"] = v["C14"][:2] + "x" + v["C14"][2:]
  elif reason == avazu_reader.NOT_UTF8:
    v["site_domain"] = b"\xff\xfe" + str(v["site_domain"]).encode()
  elif reason != avazu_reader.WRONG_COLUMN_COUNT:
    raise ValueError(reason)
  return v, reason == avazu_reader.WRONG_COLUMN_COUNT


def _csv_line(values: Dict[str, object], columns, drop_last: bool = False) -> bytes:
  cells = [values[c] for c in columns]
  if drop_last:
    cells = cells[:-1]
  return b",".join(c if isinstance(c, bytes) else str(c).encode() for c in cells) + b"\n"


def write_avazu_split(world: AvazuWorld, rng: np.random.Generator, out_dir: str, split: str,
                      num_impressions: int, days: List[datetime.date], ctr: float, cvr: float,
                      with_conversion: bool, bad_rows: int) -> dict:
  """Writes one split's CSV (and ground truth); returns summary counts."""
  imp = world.impressions(num_impressions, days)
  if world.b_click is None:   # calibrate once, on the first split written
    world.b_click = solve_bias(imp["click_logit"], ctr)
    world.b_cvr = solve_bias(imp["cvr_logit"], cvr)
  p_ctr = 1 / (1 + np.exp(-(imp["click_logit"] + world.b_click)))
  p_cvr = 1 / (1 + np.exp(-(imp["cvr_logit"] + world.b_cvr)))
  click = (rng.random(num_impressions) < p_ctr).astype(int)
  cf_conversion = (rng.random(num_impressions) < p_cvr).astype(int)
  conversion = click * cf_conversion
  cols = world.columns(imp, days)
  ids = _sample_ids(rng, num_impressions + bad_rows, world.ids_taken)
  cols[F.AVAZU_ID] = np.array(ids[:num_impressions], dtype=object)
  cols[F.CLICK] = click.astype(str).astype(object)
  if with_conversion:
    cols[F.CONVERSION] = conversion.astype(str).astype(object)
  cols[AVAZU_EXTRA_COLUMN] = np.array([f"{x:.3f}" for x in rng.gamma(2.0, 0.05, num_impressions)],
                                      dtype=object)
  columns = list(F.AVAZU_COLUMNS) + ([F.CONVERSION] if with_conversion else []) + [AVAZU_EXTRA_COLUMN]
  columns = [columns[i] for i in rng.permutation(len(columns))]

  reasons = [avazu_reader.WRONG_COLUMN_COUNT, avazu_reader.BAD_SAMPLE_ID, avazu_reader.BAD_CLICK,
             avazu_reader.BAD_HOUR, avazu_reader.BAD_INTEGER, avazu_reader.NOT_UTF8]
  if with_conversion:
    reasons += [avazu_reader.BAD_CONVERSION, avazu_reader.CONVERSION_WITHOUT_CLICK]
  bad_at = {}        # row position -> bad lines written before it
  injected: Dict[str, int] = {}
  for k in range(bad_rows):
    reason = reasons[k % len(reasons)]
    template = {c: cols[c][int(rng.integers(0, num_impressions))] for c in columns}
    template[F.AVAZU_ID] = ids[num_impressions + k]
    values, drop_last = _bad_row(template, reason, k // len(reasons))
    bad_at.setdefault(int(rng.integers(0, num_impressions + 1)), []).append(
        _csv_line(values, columns, drop_last))
    injected[reason] = injected.get(reason, 0) + 1

  os.makedirs(out_dir, exist_ok=True)
  ordered = [cols[c] for c in columns]
  with open(os.path.join(out_dir, f"{split}.csv"), "wb") as out, \
       open(os.path.join(out_dir, f"ground_truth_{split}.csv"), "w", newline="\n") as truth:
    out.write((",".join(columns) + "\n").encode())
    truth.write("sample_id,true_pctr,true_pcvr,counterfactual_conversion\n")
    for row in range(num_impressions):
      for line in bad_at.get(row, ()):
        out.write(line)
      out.write((",".join(col[row] for col in ordered) + "\n").encode())
      truth.write(f"{ids[row]},{p_ctr[row]:.6g},{p_cvr[row]:.6g},{cf_conversion[row]}\n")
    for line in bad_at.get(num_impressions, ()):
      out.write(line)
  summary = {"split": split, "impressions": num_impressions, "clicks": int(click.sum()),
             "conversions": int(conversion.sum()), "ctr": float(click.mean()),
             "cvr_on_clicks": float(conversion.sum() / max(1, click.sum())),
             "days": [d.strftime("%Y%m%d") for d in days], "columns": columns,
             "with_conversion": with_conversion, "bad_rows": injected}
  logging.info("wrote %s", summary)
  return summary


def generate_avazu(output_dir: str, num_train: int, num_test: int, num_days: int = 3,
                   num_devices: int = 5_000, ctr: float = 0.165, cvr: float = 0.05,
                   with_conversion: bool = True, bad_rows: int = 0, seed: int = 2014) -> List[dict]:
  """Writes Avazu-style ``train.csv`` and ``test.csv`` with ground truth; a pure function
  of its arguments. Train covers ``num_days`` days from 2014-10-21, test the day after;
  ``bad_rows`` bad rows (every reason in turn) go into train."""
  rng = np.random.default_rng(seed)
  world = AvazuWorld(rng, num_devices)
  train_days = [AVAZU_START + datetime.timedelta(days=d) for d in range(num_days)]
  test_days = [AVAZU_START + datetime.timedelta(days=num_days)]
  return [write_avazu_split(world, rng, output_dir, "train", num_train, train_days, ctr, cvr,
                            with_conversion, bad_rows),
          write_avazu_split(world, rng, output_dir, "test", num_test, test_days, ctr, cvr,
                            with_conversion, 0)]


def validate_flags(fv: flags.FlagValues = FLAGS) -> None:
  """What the flags' bounds cannot check, before anything is written (preprocessing/cli.py)."""
  cli.require(fv, "output_dir")
  if fv["daily"].value and fv["format"].value != "aliccp":
    raise cli.UsageError("--daily writes the Ali-CCP layout")
  if fv["profile"].value == "release" and (fv["daily"].value or fv["format"].value != "aliccp"):
    raise cli.UsageError("--profile=release writes the Ali-CCP batch layout (no --daily, no --format=avazu)")


def main(argv):
  del argv
  if FLAGS.daily:
    for s in generate_daily(FLAGS.output_dir, FLAGS.num_days, FLAGS.impressions_per_day,
                            num_users=FLAGS.num_users, num_items=FLAGS.num_items, ctr=FLAGS.ctr,
                            cvr=FLAGS.cvr, bad_rows=FLAGS.bad_rows, seed=FLAGS.seed):
      print(f"{s['date']}: {s['impressions']} impressions, {s['clicks']} clicks, {s['converted']} "
            f"conversions to arrive (+{s['duplicates']} duplicate log rows)")
    return
  if FLAGS.profile == "release":
    from datagen import release    # imports this module
    for s in release.generate(FLAGS.output_dir, FLAGS.scale, FLAGS.seed, FLAGS.click_selection):
      print(f"{s['split']}: {s['impressions']} impressions, {s['common_rows']} common rows "
            f"({s['user_values_mean']:.0f} user-side values per row, max {s['user_values_max']}), "
            f"{s['clicks']} clicks (CTR {s['ctr']:.4f}), {s['conversions']} conversions "
            f"(CVR on clicks {s['cvr_on_clicks']:.4f}), {s['anomalies']} anomaly rows, "
            f"{s['raw_bytes']:,} bytes ({s['gz_bytes']:,} gzipped)")
    return
  if FLAGS.format == "avazu":
    default = lambda name, value: FLAGS[name].value if FLAGS[name].present else value
    for s in generate_avazu(FLAGS.output_dir, FLAGS.num_train, FLAGS.num_test, FLAGS.num_days,
                            FLAGS.num_devices, default("ctr", 0.165), default("cvr", 0.05),
                            FLAGS.with_conversion, FLAGS.bad_rows, default("seed", 2014)):
      print(f"{s['split']}: {s['impressions']} impressions over days {','.join(s['days'])}, "
            f"{s['clicks']} clicks (CTR {s['ctr']:.4f}), {s['conversions']} conversions "
            f"(CVR on clicks {s['cvr_on_clicks']:.4f}), bad rows {s['bad_rows'] or 0}")
    return
  for s in generate(FLAGS.output_dir, FLAGS.num_train, FLAGS.num_test, FLAGS.num_users,
                    FLAGS.num_items, FLAGS.impressions_per_common, FLAGS.ctr, FLAGS.cvr,
                    FLAGS.anomalies, FLAGS.seed, FLAGS.click_selection):
    print(f"{s['split']}: {s['impressions']} impressions, {s['common_rows']} common rows, "
          f"{s['clicks']} clicks (CTR {s['ctr']:.4f}), {s['conversions']} conversions "
          f"(CVR on clicks {s['cvr_on_clicks']:.4f}), {s['anomalies']} anomaly rows")


if __name__ == "__main__":
  cli.run(main, define_flags, validate_flags)
