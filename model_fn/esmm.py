"""ESMM (Ma et al., SIGIR 2018) as a tf.estimator model_fn, and its baselines.

Shared embedding tables feed a CTR tower and a CVR tower; pCTCVR = pCTR x pCVR; the
loss is logloss(click, pCTR) + logloss(click AND conversion, pCTCVR) over all
impressions, so pCVR is learned over the entire space without a label of its own.

Variants through ``params['model']`` (same code path, see model_fn/params.py):
  esmm     the paper's ESMM (shared embeddings)
  esmm_ns  ESMM-NS: the CVR tower has its own embedding tables
  base     BASE: CVR tower trained on clicked impressions only, with its own embeddings;
           CTR tower over all impressions
"""

import tensorflow as tf

from model_fn import heads, layers
from model_fn.params import resolve_params

ESMM_MODELS = ("esmm", "esmm_ns", "base")


def esmm_model_fn(features, labels, mode, params):
  """tf.estimator model_fn of ESMM (and ESMM-NS / BASE, see the module doc)."""
  p = resolve_params(params)
  if p["model"] not in ESMM_MODELS:
    raise ValueError(f"esmm_model_fn builds {ESMM_MODELS}, not {p['model']!r} (see model_fn.mmoe)")
  training = mode == tf.estimator.ModeKeys.TRAIN
  dtype = layers.matmul_dtype(p, training)
  ctr_input = layers.embedding_input(features, p, "embeddings")
  cvr_input = ctr_input if p["share_embeddings"] else layers.embedding_input(features, p, "cvr_embeddings")
  ctr_logit = layers.mlp_logit(ctr_input, p["ctr_hidden_units"], "ctr_tower", p["dropout"], training, dtype)
  cvr_logit = layers.mlp_logit(cvr_input, p["cvr_hidden_units"], "cvr_tower", p["dropout"], training, dtype)
  return heads.estimator_spec(features, labels, mode, p, heads.heads_from_logits(ctr_logit, cvr_logit),
                              product=True)
