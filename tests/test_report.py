"""The evaluation report: exact ROC curves and reliability bins against references, and the
charts and HTML page written for ESMM, MMoE (with gates) and the oracle."""

import os
import re

import numpy as np
import pytest
from sklearn import metrics as skm

from model_fn import report as R

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("case", ["continuous", "ties", "mask"])
def test_roc_curve_is_exact_against_sklearn(case):
  rng = np.random.default_rng(10)
  n = 30_000
  logit = rng.normal(-3.0, 1.2, n)
  y = (rng.random(n) < _sigmoid(logit + rng.normal(0, 1, n))).astype(np.float64)
  s = _sigmoid(logit)
  w = None
  if case == "ties":
    s = np.round(s, 2)                  # a few dozen distinct scores, many ties across classes
  if case == "mask":
    w = (rng.random(n) < 0.1).astype(np.float64)
  fpr, tpr = R.roc_curve(y, s, w)
  keep = slice(None) if w is None else w > 0
  assert abs(np.trapz(tpr, fpr) - skm.roc_auc_score(y[keep], s[keep])) < 1e-9
  # Same points as scikit-learn at every distinct threshold.
  ref_fpr, ref_tpr, _ = skm.roc_curve(y[keep], s[keep], drop_intermediate=False)
  np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
  np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  if case == "ties":
    assert len(fpr) == len(np.unique(s)) + 1


def test_roc_curve_refuses_one_class_and_bad_input():
  with pytest.raises(ValueError):
    R.roc_curve([0, 0, 0], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError):
    R.roc_curve([0, 1, 1], [0.1, 0.2, 0.3], weights=[1, 0, 0])   # the mask leaves one class
  with pytest.raises(ValueError):
    R.roc_curve([0, 1], [0.1, 0.2, 0.3])


def test_thinned_roc_keeps_exact_points_and_ends():
  rng = np.random.default_rng(11)
  n = 50_000
  s = rng.random(n)
  y = (rng.random(n) < s).astype(np.float64)
  fpr, tpr = R.roc_curve(y, s)
  x, yy = R._thin_curve(fpr, tpr, max_points=500)
  assert len(x) <= 502 and (x[0], yy[0], x[-1], yy[-1]) == (0.0, 0.0, 1.0, 1.0)
  points = set(zip(fpr.tolist(), tpr.tolist()))
  assert all(p in points for p in zip(x.tolist(), yy.tolist()))
  assert abs(np.trapz(yy, x) - np.trapz(tpr, fpr)) < 1e-3


def test_quantile_reliability_bins_of_tiny_known_probabilities():
  rng = np.random.default_rng(12)
  n = 400_000
  p = _sigmoid(rng.normal(-4.0, 1.0, n))          # CVR-like, mean about 0.03
  y = (rng.random(n) < p).astype(np.float64)
  bins = R.reliability_bins(y, p, num_bins=15)
  assert len(bins["count"]) == 15
  assert bins["count"].sum() == n
  assert bins["count"].max() - bins["count"].min() <= 1
  assert np.all(np.diff(bins["mean_predicted"]) > 0)
  # Drawn from the predicted probabilities: observed within 4 standard errors of predicted.
  se = np.sqrt(bins["mean_predicted"] * (1 - bins["mean_predicted"]) / bins["count"])
  assert np.all(np.abs(bins["observed_rate"] - bins["mean_predicted"]) < 4 * se)
  np.testing.assert_allclose(bins["positives"], bins["observed_rate"] * bins["count"])
  # A 0/1 mask: only those rows, still equal-count bins, still calibrated.
  mask = (rng.random(n) < 0.3).astype(np.float64)
  masked = R.reliability_bins(y, p, weights=mask, num_bins=10)
  assert masked["count"].sum() == mask.sum()
  assert masked["count"].max() - masked["count"].min() <= 1
  se = np.sqrt(masked["mean_predicted"] * (1 - masked["mean_predicted"]) / masked["count"])
  assert np.all(np.abs(masked["observed_rate"] - masked["mean_predicted"]) < 4 * se)


def test_uniform_bins_and_tied_predictions():
  rng = np.random.default_rng(13)
  n = 100_000
  p = rng.random(n)
  y = (rng.random(n) < p).astype(np.float64)
  bins = R.reliability_bins(y, p, num_bins=10, strategy="uniform")
  assert bins["count"].sum() == n and len(bins["count"]) == 10
  np.testing.assert_allclose(bins["mean_predicted"], np.arange(10) / 10 + 0.05, atol=0.005)
  np.testing.assert_allclose(bins["observed_rate"], bins["mean_predicted"], atol=0.02)
  # Tiny probabilities all fall in the first uniform bin: only non-empty bins come back.
  tiny = R.reliability_bins(y, p * 0.01, num_bins=10, strategy="uniform")
  assert len(tiny["count"]) == 1 and tiny["count"][0] == n
  # Tied predictions stay in one quantile bin: three values -> at most three bins, each exact.
  values = np.array([0.01, 0.02, 0.05])
  q = values[rng.integers(0, 3, n)]
  tied = R.reliability_bins((rng.random(n) < q).astype(float), q, num_bins=15)
  assert len(tied["count"]) == 3 and tied["count"].sum() == n
  np.testing.assert_allclose(tied["mean_predicted"], values)
  with pytest.raises(ValueError):
    R.reliability_bins(y, p, strategy="log")


def _predictions(rng, n, gates=False, truth=True, ctcvr=False):
  a, b = rng.normal(-3.2, 0.8, n), rng.normal(-3.0, 1.0, n)
  click = (rng.random(n) < _sigmoid(a)).astype(np.float64)
  cf = (rng.random(n) < _sigmoid(b)).astype(np.float64)
  models = {}
  for name, noise in (("esmm", 1.0), ("mmoe", 0.8), ("oracle", 0.0)):
    p = {"label_click": click, "label_conversion": click * cf,
         "ctr": _sigmoid(a + noise * rng.normal(0, 1, n)), "cvr": _sigmoid(b + noise * rng.normal(0, 1, n))}
    if truth:
      p["counterfactual_conversion"] = cf
    models[name] = p
  if ctcvr:
    models["mmoe"]["ctcvr"] = models["mmoe"]["ctr"] * models["mmoe"]["cvr"] * np.exp(rng.normal(0, 0.2, n))
  if gates:
    g = rng.dirichlet(np.ones(4), size=3)
    models["mmoe"]["gates"] = {"ctr": g[0], "cvr": g[1], "ctcvr": g[2]}
  if not truth:
    del models["oracle"]
  return models


def _report(predictions):
  """What model_fn.evaluation.evaluate returns, computed with scikit-learn."""
  report = {}
  for name, p in predictions.items():
    click, conversion = p["label_click"], p["label_conversion"]
    ctcvr = p.get("ctcvr", p["ctr"] * p["cvr"])
    r = {"auc/ctr": skm.roc_auc_score(click, p["ctr"]),
         "auc/ctcvr": skm.roc_auc_score(click * conversion, ctcvr),
         "auc/cvr_clicked": skm.roc_auc_score(conversion[click > 0], p["cvr"][click > 0]),
         "calibration/ctr": p["ctr"].mean() / click.mean(),
         "log_loss/ctr": skm.log_loss(click, p["ctr"]),
         "examples": float(len(click)), "clicks": float(click.sum()), "conversions": float(conversion.sum())}
    if "counterfactual_conversion" in p:
      r["auc/cvr_all_vs_truth"] = skm.roc_auc_score(p["counterfactual_conversion"], p["cvr"])
    if name != "oracle":
      r["model_dir"] = f"/models/{name}"
    report[name] = r
  return report


def _written(out):
  html = open(os.path.join(out, "index.html"), encoding="utf-8").read()
  linked = re.findall(r'<img src="([^"]+)"', html)
  pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
  assert sorted(linked) == pngs, "every <img> resolves to a written PNG and every PNG is linked"
  for f in pngs:
    with open(os.path.join(out, f), "rb") as fh:
      data = fh.read()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, f
  return html, pngs


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
  rng = np.random.default_rng(14)
  predictions = _predictions(rng, 40_000, gates=True, truth=True, ctcvr=True)
  report = _report(predictions)
  report["base"] = {"auc/ctr": 0.61234, "model_dir": "/models/base"}     # scored, no predictions
  out = str(tmp_path_factory.mktemp("report"))
  return out, report, R.write_report(out, report, predictions, title="ESMM vs MMoE <test>")


def test_write_report_links_every_chart(full_report):
  out, _, path = full_report
  assert path == os.path.join(out, "index.html")
  _, pngs = _written(out)
  tasks = ("ctr", "ctcvr", "cvr_clicked", "cvr_all_vs_truth")
  assert pngs == sorted([f"roc_{t}.png" for t in tasks] + [f"reliability_{t}.png" for t in tasks]
                        + ["gates_mmoe.png"])


def test_write_report_table_has_every_model_and_auc(full_report):
  out, report, _ = full_report
  html, _ = _written(out)
  table = html[html.index("<table>"):html.index("</table>")]
  for name, metrics in report.items():
    assert f'<th class="name">{name}</th>' in table
    for key, value in metrics.items():
      if key.startswith("auc/"):
        assert f"{value:.4f}" in table, (name, key)
  assert "CVR AUC all (truth)" in table and "40,000" in table
  assert "<title>ESMM vs MMoE &lt;test&gt;</title>" in html and "<test>" not in html
  assert "log_loss/ctr" in html        # other numeric keys get their own table
  assert "/models/base" in html


def test_write_report_without_optional_inputs(tmp_path):
  rng = np.random.default_rng(15)
  predictions = _predictions(rng, 20_000, gates=False, truth=False)
  report = _report(predictions)
  del report["esmm"]["calibration/ctr"]
  # A name that must be escaped; its gates only in the report, as gate/<task>/expert_<i> keys.
  odd = "mmoe<v2>&x"
  predictions[odd] = predictions.pop("mmoe")
  report[odd] = report.pop("mmoe")
  report[odd].update({f"gate/{t}/expert_{e}": w for t, row in (("ctr", [0.7, 0.3]), ("cvr", [0.2, 0.8]))
                      for e, w in enumerate(row)})
  R.write_report(str(tmp_path), report, predictions)
  html, pngs = _written(str(tmp_path))
  charts = [f"{kind}_{t}.png" for kind in ("roc", "reliability") for t in ("ctr", "ctcvr", "cvr_clicked")]
  assert pngs == sorted(charts + ["gates_mmoe_v2_x.png"])
  assert "mmoe&lt;v2&gt;&amp;x" in html and odd not in html
  assert "CVR AUC all (truth)" not in html and "gate/" not in html


def test_write_report_to_a_file_system_url_lands_there(tmp_path):
  """--report_dir=gs://...: drawn locally, copied through tf.io.gfile (ram:// stands in for gs://)."""
  import tensorflow as tf
  rng = np.random.default_rng(16)
  predictions = _predictions(rng, 5_000, gates=False, truth=False)
  index = R.write_report("ram://reports/run1", _report(predictions), predictions)
  assert index == "ram://reports/run1/index.html" and tf.io.gfile.exists(index)
  assert "roc_ctr.png" in tf.io.gfile.listdir("ram://reports/run1")
  assert not os.path.exists("ram:") and not (tmp_path / "ram:").exists()


def test_write_report_notes_a_task_without_positives_and_draws_no_gates_without_gates(tmp_path):
  n = 5_000
  rng = np.random.default_rng(16)
  click = (rng.random(n) < 0.05).astype(np.float64)
  predictions = {"esmm": {"label_click": click, "label_conversion": np.zeros(n),
                          "ctr": rng.random(n) * 0.1, "cvr": rng.random(n) * 0.05}}
  predictions["diverged"] = dict(predictions["esmm"], ctr=np.full(n, np.nan))
  R.write_report(str(tmp_path), {"esmm": {"auc/ctr": 0.5}}, predictions)
  html, pngs = _written(str(tmp_path))
  assert pngs == ["reliability_ctr.png", "roc_ctr.png"]       # no gates_*.png: no model has gates
  assert "esmm, ctcvr: left out" in html and "esmm, cvr_clicked: left out" in html
  assert "diverged, ctr: left out (scores must be finite)" in html


@pytest.mark.parametrize("ids,kind", [
    (["1", "9223372036854775807", "0"], "int"),
    (["1", "18446744073709551615", "7"], "str"),     # Avazu's ids overflow int64
    (["5", "007", "8"], "str"), (["5", "+7"], "str"), (["5", "abc"], "str")])
def test_ground_truth_sample_ids_are_read_exactly(tmp_path, ids, kind):
  import gzip

  from model_fn import evaluation
  lines = ["sample_id,true_pctr,true_pcvr,counterfactual_conversion"] + [f"{i},0.5,0.25,1" for i in ids]
  for name, opener in (("t.csv", open), ("t.csv.gz", gzip.open)):
    with opener(tmp_path / name, "wt") as f:
      f.write("\n".join(lines) + "\n")
    got = evaluation.read_ground_truth(str(tmp_path / name))
    assert [str(i) for i in got["sample_id"]] == ids
    assert (got["sample_id"].dtype == np.int64) == (kind == "int")
    assert list(got["counterfactual_conversion"]) == [1] * len(ids)


def test_ground_truth_aligns_with_sample_ids_of_either_kind():
  from model_fn import evaluation
  truth = {"sample_id": np.array(["18446744073709551615", "3", "12"]), "true_pcvr": np.array([0.1, 0.2, 0.3])}
  got = evaluation.align_truth(np.array([b"12", b"18446744073709551615"], dtype=object), truth)
  assert list(got["true_pcvr"]) == [0.3, 0.1]
  ints = {"sample_id": np.array([7, 3, 12], np.int64), "true_pcvr": np.array([0.1, 0.2, 0.3])}
  assert list(evaluation.align_truth(np.array([12, 7], np.int64), ints)["true_pcvr"]) == [0.3, 0.1]
  assert list(evaluation.align_truth(np.array([b"3"], dtype=object), ints)["true_pcvr"]) == [0.2]
