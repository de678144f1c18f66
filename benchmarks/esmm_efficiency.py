"""How much does ESMM's CTCVR loss tell the CVR factor, against BASE's loss on clicked rows?

  .venv/bin/python benchmarks/esmm_efficiency.py [--sizes=20000,80000] [--repeats=5]

A controlled experiment without the pipeline's confounders (embeddings, optimiser schedules,
one epoch): impressions with d Gaussian features, the true click and conversion logits
linear in them (so both models are well specified), click ~ Bernoulli(pCTR), conversion ~
click * Bernoulli(pCVR). Two logistic models are fit to the same rows by full-batch
gradient descent to convergence:

  BASE  log loss of conversion on the clicked rows only (pCVR = sigmoid(w.x));
  ESMM  CTR log loss on all rows + CTCVR log loss with pCTCVR = sigmoid(a.x) * sigmoid(w.x).

Both are scored on a large fresh sample: the CVR AUC over *all* impressions against the
counterfactual conversions (ESMM's target quantity) and the RMSE of the fitted CVR logit
against the true one. ``--click_selection`` adds that multiple of the conversion logit to
the click logit, i.e. clicks select on conversion propensity (sample selection bias).

Why it matters: the CTCVR label (click AND conversion) lumps "clicked, no conversion"
together with "not clicked", so by the data-processing inequality it carries no more
information about the CVR parameters than (click, conversion) does, and given the click
that information is exactly BASE's likelihood. With well-specified models BASE is the
efficient estimator even under selection on the features, and ESMM can only catch up
through what the shared parameters learn from clicks. Writes
benchmarks/results/esmm_efficiency.{json,md}.
"""

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from model_fn.metrics import exact_auc  # noqa: E402
from datagen.synthetic import solve_bias  # noqa: E402

import results_io  # noqa: E402  (benchmarks/ is this script's directory)

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["20000", "80000"], "Train impressions per fit.")
flags.DEFINE_integer("repeats", 5, "Independent train samples (seeds) per size and setting.")
flags.DEFINE_list("click_selection", ["0", "1"], "Weights of the conversion logit in the click logit.")
flags.DEFINE_integer("dim", 8, "Features.")
flags.DEFINE_float("ctr", 0.04, "Mean CTR.")
flags.DEFINE_float("cvr", 0.05, "Mean CVR over all impressions.")
flags.DEFINE_integer("num_test", 200_000, "Test impressions.")
flags.DEFINE_integer("steps", 2000, "Full-batch gradient steps (Adam) per fit.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where to write esmm_efficiency.{json,md}.")


def _sigmoid(z):
  return 0.5 * (1 + np.tanh(0.5 * z))


class World:
  """True parameters: click weights a, conversion weights w (unit-variance logits)."""

  def __init__(self, rng, dim, selection, ctr, cvr):
    self.dim = dim
    self.w = rng.normal(size=dim) / np.sqrt(dim)
    self.a = rng.normal(size=dim) / np.sqrt(dim) + selection * self.w
    x = rng.normal(size=(200_000, dim))
    self.bc = solve_bias(x @ self.a, ctr)
    self.bv = solve_bias(x @ self.w, cvr)

  def sample(self, rng, n):
    x = rng.normal(size=(n, self.dim))
    pctr, pcvr = _sigmoid(x @ self.a + self.bc), _sigmoid(x @ self.w + self.bv)
    click = (rng.random(n) < pctr).astype(np.float64)
    cf = (rng.random(n) < pcvr).astype(np.float64)
    return {"x": np.hstack([x, np.ones((n, 1))]), "click": click, "cf": cf, "conv": click * cf,
            "true_cvr_logit": x @ self.w + self.bv}


def _adam(grad, theta, steps, lr=0.05):
  m = np.zeros_like(theta)
  v = np.zeros_like(theta)
  for t in range(1, steps + 1):
    g = grad(theta)
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    theta = theta - lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-12)
  return theta


def fit_base(d, steps):
  """Logistic regression of conversion on the clicked rows; returns the CVR weights."""
  x, y = d["x"][d["click"] == 1], d["conv"][d["click"] == 1]
  return _adam(lambda w: x.T @ (_sigmoid(x @ w) - y) / len(d["x"]), np.zeros(x.shape[1]), steps)


def fit_esmm(d, steps):
  """CTR log loss + CTCVR log loss with pCTCVR = pCTR * pCVR; returns the CVR weights."""
  x, click, y = d["x"], d["click"], d["conv"]
  k = x.shape[1]

  def grad(theta):
    a, w = theta[:k], theta[k:]
    pc, pv = _sigmoid(x @ a), _sigmoid(x @ w)
    p = np.clip(pc * pv, 1e-12, 1 - 1e-12)
    # d/dz of -[y log p + (1-y) log(1-p)] with p = pc*pv, z either logit: (p - y)/(1-p) * (1 - p_own)
    r = (p - y) / (1 - p)
    g_a = x.T @ ((pc - click) + r * (1 - pc)) / len(x)
    g_w = x.T @ (r * (1 - pv)) / len(x)
    return np.concatenate([g_a, g_w])

  return _adam(grad, np.zeros(2 * k), steps)[k:]


def main(argv):
  del argv
  start = time.perf_counter()
  rows = []
  for selection in map(float, FLAGS.click_selection):
    for size in map(int, FLAGS.sizes):
      for rep in range(FLAGS.repeats):
        rng = np.random.default_rng(1000 * rep + 7)
        world = World(rng, FLAGS.dim, selection, FLAGS.ctr, FLAGS.cvr)
        train, test = world.sample(rng, size), world.sample(rng, FLAGS.num_test)
        for model, fit in (("BASE", fit_base), ("ESMM", fit_esmm)):
          w = fit(train, FLAGS.steps)
          logit = test["x"] @ w
          rows.append({"click_selection": selection, "size": size, "repeat": rep, "model": model,
                       "clicks": int(train["click"].sum()), "conversions": int(train["conv"].sum()),
                       "auc_all_vs_truth": exact_auc(test["cf"], logit),
                       "oracle_auc": exact_auc(test["cf"], test["true_cvr_logit"]),
                       "rmse_logit": float(np.sqrt(np.mean((logit - test["true_cvr_logit"]) ** 2)))})
        print({k: rows[-1][k] for k in ("click_selection", "size", "repeat")},
              {r["model"]: round(r["auc_all_vs_truth"], 4) for r in rows[-2:]}, flush=True)
  table = []
  for selection in map(float, FLAGS.click_selection):
    for size in map(int, FLAGS.sizes):
      cell = [r for r in rows if r["click_selection"] == selection and r["size"] == size]
      out = {"click_selection": selection, "size": size,
             "conversions": float(np.mean([r["conversions"] for r in cell if r["model"] == "BASE"])),
             "oracle_auc": float(np.mean([r["oracle_auc"] for r in cell if r["model"] == "BASE"]))}
      for model in ("BASE", "ESMM"):
        for key in ("auc_all_vs_truth", "rmse_logit"):
          v = np.array([r[key] for r in cell if r["model"] == model])
          out[f"{model}/{key}"] = {"mean": float(v.mean()), "std": float(v.std(ddof=1))}
      table.append(out)
  command = ("python benchmarks/esmm_efficiency.py --sizes=" + ",".join(FLAGS.sizes) +
             f" --repeats={FLAGS.repeats} --click_selection=" + ",".join(FLAGS.click_selection) +
             f" --dim={FLAGS.dim} --steps={FLAGS.steps}")
  lines = [f"Command: `{command}`", "",
           f"Machine: {platform.machine()}, {os.cpu_count()} cores. Wall time {time.perf_counter() - start:.0f} s. "
           f"CTR {FLAGS.ctr}, CVR {FLAGS.cvr}, {FLAGS.dim} features, test {FLAGS.num_test:,} impressions; "
           f"mean ± std over {FLAGS.repeats} independent worlds and samples.", "",
           "| click selection | train impressions | train conversions | BASE CVR AUC all vs truth | "
           "ESMM CVR AUC all vs truth | oracle | BASE RMSE of CVR logit | ESMM RMSE of CVR logit |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for t in table:
    f = lambda k, s=100: f"{s * t[k]['mean']:.2f} ± {s * t[k]['std']:.2f}"
    lines.append(f"| {t['click_selection']:g} | {t['size']:,} | {t['conversions']:.0f} | {f('BASE/auc_all_vs_truth')} | "
                 f"{f('ESMM/auc_all_vs_truth')} | {100 * t['oracle_auc']:.2f} | {f('BASE/rmse_logit', 1)} | "
                 f"{f('ESMM/rmse_logit', 1)} |")
  lines += ["", "AUC in %: pCVR of every test impression against its counterfactual conversion."]
  results_io.write(FLAGS.results_dir, "esmm_efficiency", {"command": command, "table": table, "runs": rows}, "\n".join(lines))


if __name__ == "__main__":
  app.run(main)
