"""ESMM (Ma et al., SIGIR 2018) as a tf.estimator model_fn, and its baselines.

Shared embedding tables feed a CTR tower and a CVR tower; pCTCVR = pCTR x pCVR; the
loss is logloss(click, pCTR) + logloss(click AND conversion, pCTCVR) over all
impressions, so pCVR is learned over the entire space without a label of its own.

Variants through params (same code path):
  model='esmm'                          the paper's ESMM (shared embeddings)
  model='esmm', share_embeddings=False  ESMM-NS
  model='base'                          BASE: CVR tower trained on clicked impressions only,
                                        with its own embeddings; CTR tower over all impressions
"""

import copy
from typing import Any, Dict

import tensorflow as tf

from model_fn import heads, layers
from preprocessing import features as F

DEFAULT_PARAMS: Dict[str, Any] = {
    "model": "esmm",
    "format": "aliccp",
    "hash_buckets": None,            # {field: buckets}; read from the transformed schema
    "embedding_dim": 18,
    "ctr_hidden_units": [360, 200, 80],
    "cvr_hidden_units": [360, 200, 80],
    "dropout": 0.0,
    "share_embeddings": None,        # None: True for esmm, False for base
    "optimizer": "adam",             # dense layers
    "learning_rate": 1e-3,
    "embedding_optimizer": "adagrad",
    "embedding_learning_rate": 0.05,
    "ctr_loss_weight": 1.0,
    "ctcvr_loss_weight": 1.0,
    "cvr_loss_weight": 1.0,          # base only
    "embedding_init_stddev": 0.05,
    "objective": None,               # derived from model
}

MODELS = ("esmm", "base")


def resolve_params(params) -> Dict[str, Any]:
  """DEFAULT_PARAMS overridden by ``params``; unknown keys are an error."""
  unknown = set(params) - set(DEFAULT_PARAMS)
  if unknown:
    raise ValueError(f"unknown params {sorted(unknown)}")
  p = copy.deepcopy(DEFAULT_PARAMS)
  p.update(params)
  if p["model"] not in MODELS:
    raise ValueError(f"model must be one of {MODELS}, got {p['model']!r}")
  if p["share_embeddings"] is None:
    p["share_embeddings"] = p["model"] == "esmm"
  if not p["hash_buckets"]:
    raise ValueError("params['hash_buckets'] is required (read it from the transform output)")
  p["objective"] = "base" if p["model"] == "base" else "esmm"
  return p


def _embeddings(features, p, scope):
  schema = F.fields(p["format"])
  pooled, tables = layers.embed_fields(features, schema, p["hash_buckets"], p["embedding_dim"],
                                       scope, p["embedding_init_stddev"])
  for t in tables:
    tf.compat.v1.add_to_collection(heads.EMBEDDING_COLLECTION, t)
  return pooled


def esmm_model_fn(features, labels, mode, params):
  """tf.estimator model_fn of ESMM (and ESMM-NS / BASE, see the module doc)."""
  p = resolve_params(params)
  training = mode == tf.estimator.ModeKeys.TRAIN
  ctr_input = _embeddings(features, p, "embeddings")
  cvr_input = ctr_input if p["share_embeddings"] else _embeddings(features, p, "cvr_embeddings")
  ctr_logit = layers.mlp_logit(ctr_input, p["ctr_hidden_units"], "ctr_tower", p["dropout"], training)
  cvr_logit = layers.mlp_logit(cvr_input, p["cvr_hidden_units"], "cvr_tower", p["dropout"], training)
  return heads.estimator_spec(features, labels, mode, p, ctr_logit, cvr_logit)
