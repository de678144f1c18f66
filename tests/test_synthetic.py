"""The Ali-CCP generator: deterministic, funnel-consistent, with click/conversion selection by
default and a control world without it."""

import csv
import os

import numpy as np
import pytest

from datagen import synthetic
from model_fn import metrics as M

SIZES = dict(num_train=12000, num_test=8000, num_users=2000, num_items=3000)


def _read(raw: str, split: str = "test"):
  with open(os.path.join(raw, f"ground_truth_{split}.csv")) as f:
    truth = list(csv.DictReader(f))
  with open(os.path.join(raw, f"sample_skeleton_{split}.csv")) as f:
    rows = [line.split(",", 3) for line in f]
  click = np.array([int(r[1]) for r in rows])
  conversion = np.array([int(r[2]) for r in rows])
  return {"click": click, "conversion": conversion,
          "pctr": np.array([float(t["true_pctr"]) for t in truth]),
          "pcvr": np.array([float(t["true_pcvr"]) for t in truth]),
          "cf": np.array([int(t["counterfactual_conversion"]) for t in truth])}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = {}
  for selection in (0.0, 0.5):
    raw = str(tmp_path_factory.mktemp(f"sel{selection:g}"))
    summaries = synthetic.generate(raw, click_selection=selection, **SIZES)
    out[selection] = (raw, summaries)
  return out


def _bytes(raw: str):
  return {name: open(os.path.join(raw, name), "rb").read() for name in sorted(os.listdir(raw))}


def test_output_is_a_pure_function_of_the_arguments_and_selection_is_the_default(generated, tmp_path):
  assert synthetic.DEFAULT_CLICK_SELECTION == 0.5
  synthetic.generate(str(tmp_path), **SIZES)     # no click_selection argument
  assert _bytes(str(tmp_path)) == _bytes(generated[0.5][0])
  assert _bytes(str(tmp_path)) != _bytes(generated[0.0][0])


def test_the_funnel_holds_apart_from_the_injected_anomalies(generated):
  raw, summaries = generated[0.0]
  d = _read(raw)
  anomalies = (d["click"] == 0) & (d["conversion"] == 1)
  assert anomalies.sum() == summaries[1]["anomalies"] == 5
  # Observed conversion = click AND counterfactual conversion, everywhere else.
  np.testing.assert_array_equal(d["conversion"][~anomalies], (d["click"] * d["cf"])[~anomalies])


def test_clicks_select_on_conversion_propensity_except_in_the_control_world(generated):
  stats = {}
  for selection, (raw, _) in generated.items():
    d = _read(raw)
    stats[selection] = (M.exact_auc(d["click"], d["pcvr"]),
                        d["pcvr"][d["click"] == 1].mean() / d["pcvr"][d["click"] == 0].mean(),
                        d["click"].mean())
  auc0, ratio0, ctr0 = stats[0.0]
  auc5, ratio5, ctr5 = stats[0.5]
  # In the control world the clicked impressions are, as to pCVR, like the unclicked ones ...
  assert abs(auc0 - 0.5) < 0.03 and 0.85 < ratio0 < 1.15
  # ... and by default users click more of what they would buy (module doc: AUC ~0.67, ratio ~2).
  assert 0.62 < auc5 < 0.72 and 1.6 < ratio5 < 2.4
  # The CTR target holds either way (the click bias is re-solved).
  assert abs(ctr0 - 0.04) < 0.008 and abs(ctr5 - 0.04) < 0.008
