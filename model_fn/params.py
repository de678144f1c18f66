"""The hyper-parameters of every model_fn, with their defaults, in one place.

``params['model']`` picks the network and its training objective:

  esmm       the paper's ESMM: shared embeddings, CTR and CVR towers, pCTCVR = pCTR x pCVR,
             loss = logloss(click, pCTR) + logloss(click AND conversion, pCTCVR)
  esmm_ns    ESMM-NS: the same without shared embeddings (the CVR tower has its own tables)
  base       BASE: CVR tower trained on clicked impressions only (own embeddings), CTR tower
             over all impressions; the usual practice ESMM improves on
  mmoe       MMoE (Ma et al., KDD 2018): shared embeddings -> N experts -> one softmax gate
             and one tower per task; tasks CTR and CTCVR, both over the entire space, the
             same summed CTR + CTCVR log loss as ESMM. pCVR = pCTCVR / pCTR (clipped to 1)
  mmoe_esmm  MMoE's shared bottom with ESMM's head: tasks CTR and CVR on MMoE towers,
             pCTCVR = pCTR x pCVR, ESMM's loss; pCVR is a network output as in ESMM
"""

import copy
from typing import Any, Dict

MODELS = ("esmm", "esmm_ns", "base", "mmoe", "mmoe_esmm")
MMOE_MODELS = ("mmoe", "mmoe_esmm")
MATMUL_DTYPES = ("auto", "float32", "bfloat16")
# The embedding optimizers and the learning rate each gets when none is given.
EMBEDDING_LEARNING_RATES = {"lazy_adam": 1e-3, "adam": 1e-3, "adagrad": 0.05, "ftrl": 0.05, "sgd": 0.05}

DEFAULT_PARAMS: Dict[str, Any] = {
    "model": "esmm",
    "format": "aliccp",
    "hash_buckets": None,            # {field: buckets}; read from the transformed schema
    # The fields the model embeds (None: every field of hash_buckets), e.g. to train on a
    # subset of a preprocessing run's fields without preprocessing again.
    "fields": None,
    # Rows per embedding table (0: each field's hash bucket count). A smaller value folds the
    # hashed ids modulo it (exact re-hashing when it divides the bucket count), so the table
    # size is chosen at training time, not only by the preprocessing run.
    "table_rows": 0,
    "embedding_dim": 18,
    # ESMM / BASE towers (the paper's 360-200-80).
    "ctr_hidden_units": [360, 200, 80],
    "cvr_hidden_units": [360, 200, 80],
    # MMoE: experts over the concatenated embeddings, one gate and one tower per task.
    "num_experts": 8,
    "expert_hidden_units": [256, 128],
    "tower_hidden_units": [128, 64],
    "dropout": 0.0,
    "share_embeddings": None,        # None: False for esmm_ns and base, True otherwise
    "optimizer": "adam",             # dense layers
    "learning_rate": 1e-3,
    # Tables: Adam that updates only the batch's rows (model_fn/optimizers.py), initialised near
    # zero (embedding_init_stddev). Adagrad 0.05 with init 0.05, the defaults before 2026-12-05,
    # trailed DeepCTR's ESMM by 0.05 CTCVR and 0.12 CVR AUC after an epoch and every model of
    # benchmarks/compare_models.py on every metric (README, "Performance").
    "embedding_optimizer": "lazy_adam",
    "embedding_learning_rate": None,  # None: the optimizer's own (EMBEDDING_LEARNING_RATES)
    "ctr_loss_weight": 1.0,
    "ctcvr_loss_weight": 1.0,
    "cvr_loss_weight": 1.0,          # base only
    # Kendall et al. 2018: weight task i by exp(-s_i) and add s_i / 2, s_i = log sigma_i^2 learned.
    "uncertainty_weighting": False,
    "embedding_init_stddev": 1e-4,
    "objective": None,               # derived from model
}


# Placement and arithmetic, not model: a checkpoint loads under any value of these, so they are
# not recorded in params.json and a model_dir may be resumed with another.
RUNTIME_PARAMS: Dict[str, Any] = {
    # Shards of each embedding table (large tables only, see model_fn/layers.py); 0: one per
    # parameter server of the cluster in TF_CONFIG (1 on one machine).
    "embedding_partitions": 0,
    # The dtype of the dense layers' (towers, experts, gates) matmuls while training. "bfloat16" is
    # mixed precision: the matmuls on bfloat16 copies of input and kernel, everything else (bias
    # add, activations, variables, gradients, optimizers) float32 (see layers.dense); evaluation, export and serving
    # always compute in float32. "auto" (the default) is bfloat16 where the hardware has it natively
    # (a CPU with AMX-BF16 or AVX512_BF16 instructions, or GPUs of compute capability 8.0 and up;
    # layers.native_bfloat16) and float32 elsewhere, where TensorFlow would emulate bfloat16 more
    # slowly than float32. The variables are the same either way, so a model dir resumes under any
    # value, on any machine.
    "train_matmul_dtype": "auto",
}


# The params that decide the variables' names and shapes: a checkpoint restores (or warm-starts)
# only into a model with the same values.
SHAPE_PARAMS = ("model", "format", "hash_buckets", "fields", "table_rows", "embedding_dim", "ctr_hidden_units",
                "cvr_hidden_units", "num_experts", "expert_hidden_units", "tower_hidden_units",
                "share_embeddings", "uncertainty_weighting")


def resolve_params(params) -> Dict[str, Any]:
  """DEFAULT_PARAMS overridden by ``params``; unknown keys and contradictions are errors."""
  unknown = set(params) - set(DEFAULT_PARAMS) - set(RUNTIME_PARAMS)
  if unknown:
    raise ValueError(f"unknown params {sorted(unknown)}")
  p = copy.deepcopy(DEFAULT_PARAMS)
  p.update(RUNTIME_PARAMS)
  p.update(params)
  model = p["model"]
  if model not in MODELS:
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")
  separate = model in ("esmm_ns", "base")
  if p["share_embeddings"] is None:
    p["share_embeddings"] = not separate
  elif p["share_embeddings"] and separate:
    raise ValueError(f"model {model} has separate embeddings by definition; "
                     "share_embeddings=True contradicts it")
  if model in MMOE_MODELS and not p["share_embeddings"]:
    raise ValueError(f"{model} shares its embeddings and experts between tasks by design")
  if model in MMOE_MODELS and int(p["num_experts"]) < 1:
    raise ValueError("num_experts must be at least 1")
  if not p["hash_buckets"]:
    raise ValueError("params['hash_buckets'] is required (read it from the transform output)")
  if p["fields"] is not None:
    p["fields"] = list(p["fields"])
    unknown_fields = sorted(set(p["fields"]) - set(p["hash_buckets"]))
    if not p["fields"] or unknown_fields:
      raise ValueError(f"fields must be a non-empty subset of the transform output's fields "
                       f"{sorted(p['hash_buckets'])}; unknown: {unknown_fields}")
  if p["embedding_optimizer"] not in EMBEDDING_LEARNING_RATES:
    raise ValueError(f"embedding_optimizer must be one of {sorted(EMBEDDING_LEARNING_RATES)}, "
                     f"got {p['embedding_optimizer']!r}")
  if p["embedding_learning_rate"] is None:
    p["embedding_learning_rate"] = EMBEDDING_LEARNING_RATES[p["embedding_optimizer"]]
  if p["train_matmul_dtype"] not in MATMUL_DTYPES:
    raise ValueError(f"train_matmul_dtype must be one of {MATMUL_DTYPES}, got {p['train_matmul_dtype']!r}")
  p["table_rows"] = int(p["table_rows"] or 0)
  if p["table_rows"] < 0:
    raise ValueError(f"table_rows must be >= 0 (0: the hash bucket counts), got {p['table_rows']}")
  p["objective"] = "base" if model == "base" else "esmm"
  return p


def table_rows(p: Dict[str, Any]) -> Dict[str, int]:
  """Rows of each embedded field's table: its hash buckets, capped by ``table_rows``."""
  names = p.get("fields") or list(p["hash_buckets"])
  cap = int(p.get("table_rows") or 0)
  return {n: min(p["hash_buckets"][n], cap) if cap else p["hash_buckets"][n] for n in names}
