r"""Synthetic Ali-CCP data in the exact raw layout of the public release, with ground truth.

Writes, for each split (train, test):
  sample_skeleton_<split>.csv   sample_id,click,conversion,common_feature_index,feature_num,feature_list
  common_features_<split>.csv   common_feature_index,feature_num,feature_list  (shuffled order)
  ground_truth_<split>.csv      sample_id,true_pctr,true_pcvr,counterfactual_conversion  (header)

The data come from a known model. Users and items have latent factors; what drives a
click and what drives a conversion are related but not the same:

  click logit = b_c + attractiveness(item) + <taste(user), look(item)> + interest match
                + position effect
  cvr logit   = b_v + quality(item) + <intent(user), fit(item)> + price-level fit
                + brand loyalty

``fit`` and ``intent`` are correlated with ``look`` and ``taste`` (rho), and
attractiveness is slightly anti-correlated with quality (an unattractive item can convert
well once clicked). Every impression also gets a counterfactual conversion drawn from
the true pCVR whether or not it was clicked; the observed conversion is
click AND counterfactual conversion, so the funnel holds. A few click=0,conversion=1
rows are injected as in the real release (they must be dropped by the reader).

Usage: python -m pipeline.synthetic --output_dir=/tmp/aliccp [--num_train=...]
"""

import os
from typing import Dict, List

import numpy as np
from absl import app, flags, logging

from preprocessing import features as F

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (only when run as a program, so the module imports as a library)."""
  flags.DEFINE_string("output_dir", "/tmp/esmm/raw", "Where to write the CSV files.")
  flags.DEFINE_integer("num_train", 150_000, "Impressions in the train split.")
  flags.DEFINE_integer("num_test", 75_000, "Impressions in the test split.")
  flags.DEFINE_integer("num_users", 20_000, "Distinct users.")
  flags.DEFINE_integer("num_items", 30_000, "Distinct items.")
  flags.DEFINE_float("impressions_per_common", 20.0,
                     "Mean impressions per common-features row (the public release has ~58).")
  flags.DEFINE_float("ctr", 0.04, "Target mean click-through rate.")
  flags.DEFINE_float("cvr", 0.05, "Target mean post-click conversion rate over all impressions.")
  flags.DEFINE_integer("anomalies", 5, "click=0,conversion=1 rows injected per split.")
  flags.DEFINE_integer("seed", 2018, "Random seed; the output is a pure function of the flags.")

DIM = 8
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


def _solve_bias(logits: np.ndarray, target: float) -> float:
  """Bias b such that mean(sigmoid(logits + b)) == target (bisection)."""
  lo, hi = -30.0, 30.0
  for _ in range(60):
    mid = (lo + hi) / 2
    if np.mean(1 / (1 + np.exp(-(logits + mid)))) < target:
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

  def logits(self, users, items, positions):
    """Click and conversion logits (without the calibration biases)."""
    interest = self.likes_cat[users, self.item_cat[items]]
    click = (self.item_attract[items]
             + 0.6 * np.einsum("ij,ij->i", self.taste[users], self.item_look[items]) / np.sqrt(DIM)
             + 0.8 * interest - 0.12 * positions)
    cvr = (self.item_quality[items]
           + 0.9 * np.einsum("ij,ij->i", self.intent[users], self.item_fit[items]) / np.sqrt(DIM)
           - 0.7 * np.abs(self.cons1[users] - self.item_tier[items])
           + 0.6 * self.likes_brand[users, self.item_brand[items]])
    return click, cvr

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
                ctr: float, cvr: float) -> dict:
  """Writes one split's three files; returns summary counts."""
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
  click_logit, cvr_logit = world.logits(users, items, positions)
  if world.b_click is None:   # calibrate once, on the first split written
    world.b_click = _solve_bias(click_logit, ctr)
    world.b_cvr = _solve_bias(cvr_logit, cvr)
  p_ctr = 1 / (1 + np.exp(-(click_logit + world.b_click)))
  p_cvr = 1 / (1 + np.exp(-(cvr_logit + world.b_cvr)))
  click = (rng.random(num_impressions) < p_ctr).astype(int)
  cf_conversion = (rng.random(num_impressions) < p_cvr).astype(int)
  conversion = click * cf_conversion
  non_clicks = np.flatnonzero(click == 0)
  anomalous = rng.choice(non_clicks, min(anomalies, len(non_clicks)), replace=False)
  conversion_written = conversion.copy()
  conversion_written[anomalous] = 1

  os.makedirs(out_dir, exist_ok=True)
  item_strs = {}
  with open(os.path.join(out_dir, f"sample_skeleton_{split}.csv"), "w", newline="\n") as skel, \
       open(os.path.join(out_dir, f"ground_truth_{split}.csv"), "w", newline="\n") as truth:
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
        sid = row + 1
        skel.write(f"{sid},{click[row]},{conversion_written[row]},{index},{len(its)},"
                   f"{chr(1).join(its)}\n")
        truth.write(f"{sid},{p_ctr[row]:.6g},{p_cvr[row]:.6g},{cf_conversion[row]}\n")
        row += 1
  # The common file is in another order than the skeleton, as in the real release.
  with open(os.path.join(out_dir, f"common_features_{split}.csv"), "w", newline="\n") as common:
    for s_idx in rng.permutation(n_common):
      its = _drop_some(rng, _user_common_items(world, session_user[s_idx]))
      common.write(f"{session_index[s_idx]},{len(its)},{chr(1).join(its)}\n")
  summary = {"split": split, "impressions": num_impressions, "common_rows": n_common,
             "clicks": int(click.sum()), "conversions": int(conversion.sum()),
             "anomalies": len(anomalous), "ctr": float(click.mean()),
             "cvr_on_clicks": float(conversion.sum() / max(1, click.sum()))}
  logging.info("wrote %s", summary)
  return summary


def generate(output_dir: str, num_train: int, num_test: int, num_users: int = 20_000,
             num_items: int = 30_000, impressions_per_common: float = 20.0, ctr: float = 0.04,
             cvr: float = 0.05, anomalies: int = 5, seed: int = 2018) -> List[dict]:
  """Writes the train and test splits; a pure function of its arguments."""
  rng = np.random.default_rng(seed)
  world = World(rng, num_users, num_items)
  return [write_split(world, rng, output_dir, split, n, impressions_per_common, anomalies, ctr, cvr)
          for split, n in (("train", num_train), ("test", num_test))]


def main(argv):
  del argv
  for s in generate(FLAGS.output_dir, FLAGS.num_train, FLAGS.num_test, FLAGS.num_users,
                    FLAGS.num_items, FLAGS.impressions_per_common, FLAGS.ctr, FLAGS.cvr,
                    FLAGS.anomalies, FLAGS.seed):
    print(f"{s['split']}: {s['impressions']} impressions, {s['common_rows']} common rows, "
          f"{s['clicks']} clicks (CTR {s['ctr']:.4f}), {s['conversions']} conversions "
          f"(CVR on clicks {s['cvr_on_clicks']:.4f}), {s['anomalies']} anomaly rows")


if __name__ == "__main__":
  define_flags()
  app.run(main)
