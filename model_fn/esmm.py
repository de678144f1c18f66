"""ESMM (Ma et al., SIGIR 2018) as a tf.estimator model_fn, with its baselines and ESCM2.

Shared embedding tables feed a CTR tower and a CVR tower; pCTCVR = pCTR x pCVR; the paper's
loss is logloss(click, pCTR) + logloss(click AND conversion, pCTCVR) over all impressions, so
pCVR is learned over the entire space. The project's ``esmm`` adds the CVR log loss over
clicked impressions by default (``cvr_loss_weight``, model_fn/params.py).

Models through ``params['model']`` (same code path, weights in model_fn/params.py):
  esmm       ESMM (shared embeddings)
  esmm_ns    ESMM-NS: the CVR tower has its own embedding tables
  base       BASE: CVR tower trained on clicked impressions only, with its own embeddings;
             CTR tower over all impressions
  escm2_ips  ESCM2 (Wang et al., SIGIR 2022): ESMM plus the IPS counterfactual CVR risk
  escm2_dr   ESCM2-DR: ESMM plus the doubly robust risk; an imputation tower (on the shared
             embeddings, which its loss does not train) predicts each impression's conversion
"""

import tensorflow as tf

from model_fn import averaging, calibration, heads, layers
from model_fn.params import MODEL_SPECS, resolve_params

ESMM_MODELS = tuple(m for m, s in MODEL_SPECS.items() if s["network"] == "towers")


def output_biases(p) -> dict:
  """The towers' output biases: the logits of the train split's base rates (0 without them, or
  with ``output_bias_init`` zero)."""
  rates = p.get("base_rates")
  if not rates or p["output_bias_init"] == "zero":
    return {"ctr": 0.0, "cvr": 0.0}
  return {"ctr": float(calibration.logit(rates["ctr"])), "cvr": float(calibration.logit(rates["cvr"]))}


def add_imputation_tower(task_heads, inputs: tf.Tensor, hidden_units, p, mode, dtype) -> None:
  """For a DR counterfactual risk, the imputation tower's logit of each impression's conversion
  (``imputed_cvr_logit``): an MLP on ``inputs`` that its loss does not train (stop_gradient)."""
  if p["counterfactual"] != "dr" or mode == tf.estimator.ModeKeys.PREDICT:
    return
  task_heads["imputed_cvr_logit"] = layers.mlp_logit(
      tf.stop_gradient(inputs), hidden_units, "imputation_tower", p["dropout"],
      mode == tf.estimator.ModeKeys.TRAIN, dtype, output_biases(p)["cvr"], p["hidden_activation"], p["hidden_norm"])


def esmm_model_fn(features, labels, mode, params):
  """tf.estimator model_fn of ESMM (and ESMM-NS, BASE, ESCM2; see the module doc)."""
  p = resolve_params(params)
  if p["model"] not in ESMM_MODELS:
    raise ValueError(f"esmm_model_fn builds {ESMM_MODELS}, not {p['model']!r} (see model_fn.mmoe)")
  training = mode == tf.estimator.ModeKeys.TRAIN
  dtype = layers.matmul_dtype(p, training)
  bias = output_biases(p)
  with averaging.reading_averages(p, mode):
    ctr_input = layers.embedding_input(features, p, "embeddings")
    cvr_input = ctr_input if p["share_embeddings"] else layers.embedding_input(features, p, "cvr_embeddings")
    hidden = (p["hidden_activation"], p["hidden_norm"])
    ctr_logit = layers.mlp_logit(ctr_input, p["ctr_hidden_units"], "ctr_tower", p["dropout"], training, dtype,
                                 bias["ctr"], *hidden)
    cvr_logit = layers.mlp_logit(cvr_input, p["cvr_hidden_units"], "cvr_tower", p["dropout"], training, dtype,
                                 bias["cvr"], *hidden)
    task_heads = heads.heads_from_logits(ctr_logit, cvr_logit, None if training else p["calibration"])
    add_imputation_tower(task_heads, cvr_input, p["cvr_hidden_units"], p, mode, dtype)
  return heads.estimator_spec(features, labels, mode, p, task_heads)
