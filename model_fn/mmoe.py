"""MMoE (Ma et al., KDD 2018) as a tf.estimator model_fn, on ESMM's parts.

Shared embeddings -> ``num_experts`` expert MLPs -> one softmax gate and one tower per
task. Same input_fn, embeddings, objective, metrics and export as ESMM
(model_fn/heads.py); only the network between embeddings and logits differs.

  mmoe       tasks CTR and CTCVR, both over the entire space, trained with the summed
             CTR + CTCVR log loss (the same labels and loss as ESMM). pCVR for the
             regression signature is pCTCVR / pCTR, clipped to 1 (two heads do not
             guarantee pCTCVR <= pCTR; see losses.division_cvr_logits).
  mmoe_esmm  tasks CTR and CVR on MMoE towers, pCTCVR = pCTR x pCVR and ESMM's loss:
             ESMM's structure on MMoE's shared bottom, pCVR a network output.

Gate utilisation (mean gate weight of each expert per task) is a TensorBoard summary,
an eval metric ``gate/<task>/expert_<i>`` and a prediction ``gate_<task>``.
"""

import tensorflow as tf

from model_fn import heads, layers
from model_fn.params import MMOE_MODELS, resolve_params


def mmoe_model_fn(features, labels, mode, params):
  """tf.estimator model_fn of MMoE and of MMoE with ESMM's head (see the module doc)."""
  p = resolve_params(params)
  if p["model"] not in MMOE_MODELS:
    raise ValueError(f"mmoe_model_fn builds {MMOE_MODELS}, not {p['model']!r} (see model_fn.esmm)")
  training = mode == tf.estimator.ModeKeys.TRAIN
  dtype = layers.matmul_dtype(p, training)
  product = p["model"] == "mmoe_esmm"
  second = "cvr" if product else "ctcvr"
  shared = layers.embedding_input(features, p, "embeddings")
  mixed, gates = layers.mmoe(shared, ("ctr", second), int(p["num_experts"]), p["expert_hidden_units"],
                             "mmoe", p["dropout"], training, dtype)
  ctr_logit = layers.mlp_logit(mixed["ctr"], p["tower_hidden_units"], "ctr_tower", p["dropout"], training,
                               dtype)
  second_logit = layers.mlp_logit(mixed[second], p["tower_hidden_units"], f"{second}_tower",
                                  p["dropout"], training, dtype)
  if product:
    task_heads = heads.heads_from_logits(ctr_logit, cvr_logit=second_logit)
  else:
    task_heads = heads.heads_from_logits(ctr_logit, ctcvr_logit=second_logit)
  return heads.estimator_spec(features, labels, mode, p, task_heads, product=product, gates=gates)
