"""The hyper-parameters of every model_fn, with their defaults, in one place.

``params['model']`` picks the network and the training objective. Every model predicts pCTR
and pCVR with a tower each and pCTCVR = pCTR x pCVR; the objective is a weighted sum of

  ctr             logloss(click, pCTR) over all impressions
  ctcvr           logloss(click AND conversion, pCTCVR) over all impressions (ESMM's entire space)
  cvr             logloss(conversion, pCVR) over clicked impressions only (the click space)
  counterfactual  ESCM2's counterfactual CVR risk: the click-space CVR loss reweighted by
                  1 / pCTR to stand for every impression (IPS), plus an imputed error (DR)

with the weights of MODEL_SPECS unless the params override them:

  esmm           ESMM (Ma et al., SIGIR 2018): two towers on shared embeddings; ctr + ctcvr, plus
                 the click-space cvr loss (cvr_loss_weight 1; 0 is the paper's loss)
  esmm_ns        ESMM-NS: the same without shared embeddings (each tower has its own tables)
  base           BASE: ctr + cvr, each tower on its own embeddings; the practice ESMM improves on
  escm2_ips      ESCM2-IPS (Wang et al., SIGIR 2022): ESMM + the IPS counterfactual risk
  escm2_dr       ESCM2-DR: ESMM + the doubly robust risk, with an imputation tower of the error
  shared_bottom  Shared-Bottom: one MLP on shared embeddings below both towers; ctr + cvr
  mmoe           MMoE (Ma et al., KDD 2018): experts, a softmax gate per task; ctr + cvr
  cgc            CGC (Tang et al., RecSys 2020): per-task and shared experts, one level
  ple            PLE: CGC levels stacked (``ple_levels``), shared gates between them
"""

import copy
from typing import Any, Dict, Optional

# The network, and the loss weights, of each model (a param that is None takes these).
MODEL_SPECS: Dict[str, Dict[str, Any]] = {
    "esmm": {"network": "towers", "share_embeddings": True, "ctcvr_loss_weight": 1.0,
             "cvr_loss_weight": 1.0, "counterfactual": None},
    "esmm_ns": {"network": "towers", "share_embeddings": False, "ctcvr_loss_weight": 1.0,
                "cvr_loss_weight": 1.0, "counterfactual": None},
    "base": {"network": "towers", "share_embeddings": False, "ctcvr_loss_weight": 0.0,
             "cvr_loss_weight": 1.0, "counterfactual": None},
    "escm2_ips": {"network": "towers", "share_embeddings": True, "ctcvr_loss_weight": 1.0,
                  "cvr_loss_weight": 0.0, "counterfactual": "ips"},
    "escm2_dr": {"network": "towers", "share_embeddings": True, "ctcvr_loss_weight": 1.0,
                 "cvr_loss_weight": 0.0, "counterfactual": "dr"},
    "shared_bottom": {"network": "shared_bottom", "share_embeddings": True, "ctcvr_loss_weight": 0.0,
                      "cvr_loss_weight": 1.0, "counterfactual": None},
    "mmoe": {"network": "mmoe", "share_embeddings": True, "ctcvr_loss_weight": 0.0,
             "cvr_loss_weight": 1.0, "counterfactual": None},
    "cgc": {"network": "ple", "share_embeddings": True, "ctcvr_loss_weight": 0.0,
            "cvr_loss_weight": 1.0, "counterfactual": None, "ple_levels": 1},
    "ple": {"network": "ple", "share_embeddings": True, "ctcvr_loss_weight": 0.0,
            "cvr_loss_weight": 1.0, "counterfactual": None},
}
MODELS = tuple(MODEL_SPECS)
# The memory a training run may take (model_fn/memory.py); 0: what this machine has available.
DEFAULT_MEMORY_LIMIT_GB = 0.0
# Checkpoints a model dir keeps (the newest); a save writes one more before it deletes the oldest.
DEFAULT_KEEP_CHECKPOINTS = 3
DEFAULT_PLE_LEVELS = 2
COUNTERFACTUAL_RISKS = (None, "ips", "dr")
MATMUL_DTYPES = ("auto", "float32", "bfloat16")
POOLINGS = ("sum", "mean", "sqrtn")
# Every hidden layer of the towers and experts: its activation, and a normalisation of its
# pre-activations (layer: LayerNorm over the layer's units, Ba et al. 2016) before it.
HIDDEN_ACTIVATIONS = ("relu", "leaky_relu")
HIDDEN_NORMS = ("none", "layer")
EMBEDDING_UPDATES = ("joint", "per_loss")
OUTPUT_BIAS_INITS = ("base_rate", "zero")
LEARNING_RATE_SCHEDULES = ("constant", "warmup_linear_decay")
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
  # Rows per distinct id: each field's table gets min(hash buckets, the next power of two >= its
  # distinct ids in the train split x this), from the preprocessing run's counts
  # (model_fn/table_sizing.py); 0: the hash buckets (capped by table_rows).
  "table_rows_per_id": 0.0,
  # {field: rows}: the rows each table has, resolved by the trainer from the two above (or taken
  # from the model it resumes or warm-starts from) and recorded in params.json; None: table_rows.
  "field_rows": None,
    "embedding_dim": 18,
    # How a field's values are pooled into one vector: the weighted sum, or the weighted sum
    # divided by the sum of the weights (mean) or by the root of the sum of squared weights (sqrtn).
    # Mean keeps a field of hundreds of values on the scale of a one-value field: summed, the
    # release's user-side lists drove the CVR tower's ReLUs dead (benchmarks/README.md, "Pooling").
    "pooling": "mean",
    # The two towers of esmm, esmm_ns, base and escm2_* (the paper's 360-200-80).
    "ctr_hidden_units": [360, 200, 80],
    "cvr_hidden_units": [360, 200, 80],
    # Multi-task networks: each expert (and Shared-Bottom's bottom) is an MLP of
    # expert_hidden_units; each task's tower one of tower_hidden_units.
    "num_experts": 8,                # mmoe
    "num_task_experts": 2,           # cgc / ple: experts of each task, per level
    "num_shared_experts": 2,         # cgc / ple: shared experts, per level
    "ple_levels": None,              # ple: levels (None: the model's, DEFAULT_PLE_LEVELS for ple, 1 for cgc)
    "expert_hidden_units": [256, 128],
    "tower_hidden_units": [128, 64],
    "dropout": 0.0,
    # Leaky ReLUs: a unit below zero on every impression still passes a gradient, so a tower cannot
    # die into one prediction for every impression, as BASE's CVR tower did with plain ReLUs at
    # the release's size (benchmarks/README.md, "Hidden layers at the release's shape").
    "hidden_activation": "leaky_relu",
    "hidden_norm": "none",
    "share_embeddings": None,        # None: the model's (MODEL_SPECS)
    "optimizer": "adam",             # dense layers
    "learning_rate": 1e-3,
    # Evaluation and serving read an exponential moving average of the dense layers' weights
    # with this decay (model_fn/averaging.py); 0: the weights themselves.
    "dense_ema_decay": 0.99,
    "learning_rate_schedule": "constant",
    "warmup_steps": 0,               # warmup_linear_decay: steps of linear warm-up from 0
    # Tables: Adam that updates only the batch's rows (model_fn/optimizers.py), initialised near
    # zero (embedding_init_stddev); adagrad trailed it on every model and metric (benchmarks/README.md,
    # "Training throughput against DeepCTR and torch-rechub").
    "embedding_optimizer": "lazy_adam",
    "embedding_learning_rate": None,  # None: the optimizer's own (EMBEDDING_LEARNING_RATES)
    "embedding_init_stddev": 1e-4,
    # joint: one optimizer on the tables for the whole objective; per_loss: one per loss term,
    # each scaling its steps by its own gradients (model_fn/heads.py, train_op).
    "embedding_update": "joint",
    # Loss weights (None: the model's, MODEL_SPECS).
    "ctr_loss_weight": 1.0,
    "ctcvr_loss_weight": None,
    "cvr_loss_weight": None,         # the click-space CVR loss
    "counterfactual": None,          # None: the model's; "ips" or "dr" add ESCM2's risk to any model
    "counterfactual_loss_weight": 0.1,
    # IPS weights are 1 / max(pCTR, propensity_floor): at most 1 / floor per clicked impression.
    "propensity_floor": 0.01,
    # Kendall et al. 2018: weight task i by exp(-s_i) and add s_i / 2, s_i = log sigma_i^2 learned.
    "uncertainty_weighting": False,
    # {"ctr": rate, "cvr": rate on clicks}: the output biases start at their logits. The trainer
    # reads them from the preprocessing output (reconciliation.json); None: biases start at 0.
    "base_rates": None,
    # The share of the train split held out from training (for --calibration; set by the trainer).
    "train_holdout": 0.0,
    # base_rate: the towers' output biases start at the logits of base_rates; zero: at 0
    # (pCTR = pCVR = 0.5 at the first step).
    "output_bias_init": "base_rate",
}


# What a params.json written before a param existed trained with: its value then.
LEGACY_PARAMS: Dict[str, Any] = {"table_rows_per_id": 0.0, "dense_ema_decay": 0.0, "output_bias_init": "zero",
                                 "train_holdout": 0.0, "pooling": "sum",
                                 "hidden_activation": "relu", "hidden_norm": "none"}


def upgrade_recorded(recorded: Dict[str, Any]) -> Dict[str, Any]:
  """A params.json as this version reads it: the params added after it was written get the values
  that reproduce what it trained (LEGACY_PARAMS, else DEFAULT_PARAMS). One written when the
  objective followed from the model (its ``objective`` key) gets that objective's loss weights;
  the MMoE variants of that time (a CTCVR task, or ESMM's loss on MMoE) do not exist any more."""
  old = dict(recorded)
  if "objective" in old:
    objective = old.pop("objective")
    if old.get("model") not in MODEL_SPECS or MODEL_SPECS[old["model"]]["network"] != "towers":
      raise ValueError(f"a model {old.get('model')!r} of an earlier version of this project, which no "
                       "longer has it: train a new model")
    old["cvr_loss_weight" if objective == "esmm" else "ctcvr_loss_weight"] = 0.0
  for key, value in LEGACY_PARAMS.items():
    old.setdefault(key, value)
  for key, value in DEFAULT_PARAMS.items():
    old.setdefault(key, copy.deepcopy(value))
  return old


# Placement and arithmetic, not model: a checkpoint loads under any value of these, so they are
# not recorded in params.json and a model_dir may be resumed with another.
RUNTIME_PARAMS: Dict[str, Any] = {
    # Shards of each embedding table (large tables only, see model_fn/layers.py); 0: one per
    # parameter server of the cluster in TF_CONFIG (1 on one machine).
    "embedding_partitions": 0,
    # The dtype of the dense layers' (towers, experts, gates) matmuls while training. "bfloat16" is
    # mixed precision: the matmuls on bfloat16 copies of input and kernel, everything else (bias
    # add, activations, variables, gradients, optimizers) float32 (see layers.dense); evaluation,
    # export and serving always compute in float32. "auto" (the default) is bfloat16 where the
    # hardware has it natively (hardware.native_bfloat16) and float32 elsewhere, where TensorFlow
    # would emulate bfloat16 more slowly than float32. The variables are the same either way, so a
    # model dir resumes under any value, on any machine.
    "train_matmul_dtype": "auto",
    # Post-hoc calibration of the heads (model_fn/calibration.py), applied in the prediction graph
    # and so in the SavedModel; written by the trainer to MODEL_DIR/calibration.json, not params.json.
    "calibration": None,
    # Total training steps, for the learning-rate schedule (set by the trainer).
    "train_steps": 0,
}


# The params that decide the variables' names and shapes: a checkpoint restores (or warm-starts)
# only into a model with the same values.
SHAPE_PARAMS = ("model", "format", "hash_buckets", "fields", "table_rows", "field_rows", "embedding_dim",
                "ctr_hidden_units", "cvr_hidden_units", "num_experts", "num_task_experts", "num_shared_experts",
                "ple_levels", "expert_hidden_units", "tower_hidden_units", "share_embeddings", "uncertainty_weighting",
                "counterfactual", "hidden_norm")
# The params that keep every variable's shape but change what the variables compute: a warm start
# from a model trained with other values would start from weights fitted to another function.
FITTED_PARAMS = ("pooling", "hidden_activation")


def model_spec(model: str) -> Dict[str, Any]:
  if model not in MODEL_SPECS:
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")
  return MODEL_SPECS[model]


def _positive(p: Dict[str, Any], name: str, cast=int, minimum=1) -> None:
  try:
    p[name] = cast(p[name])
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number, got {p[name]!r}") from None
  if p[name] < minimum:
    raise ValueError(f"{name} must be at least {minimum}, got {p[name]}")


def resolve_params(params) -> Dict[str, Any]:
  """DEFAULT_PARAMS overridden by ``params``; unknown keys and contradictions are errors."""
  unknown = set(params) - set(DEFAULT_PARAMS) - set(RUNTIME_PARAMS)
  if unknown:
    raise ValueError(f"unknown params {sorted(unknown)}")
  p = copy.deepcopy(DEFAULT_PARAMS)
  p.update(copy.deepcopy(RUNTIME_PARAMS))
  p.update(params)
  spec = model_spec(p["model"])
  for key in ("ctcvr_loss_weight", "cvr_loss_weight", "share_embeddings", "ple_levels"):
    if p[key] is None:
      p[key] = spec.get(key, DEFAULT_PLE_LEVELS if key == "ple_levels" and spec["network"] == "ple" else None)
  if p["counterfactual"] is None:
    p["counterfactual"] = spec["counterfactual"]
  if p["share_embeddings"] != spec["share_embeddings"] and (
      not spec["share_embeddings"] or spec["network"] != "towers"):
    raise ValueError(f"model {p['model']} {'shares' if spec['share_embeddings'] else 'separates'} its "
                     f"embeddings by definition; share_embeddings={p['share_embeddings']} contradicts it")
  if p["counterfactual"] not in COUNTERFACTUAL_RISKS:
    raise ValueError(f"counterfactual must be one of {COUNTERFACTUAL_RISKS[1:]} or None, "
                     f"got {p['counterfactual']!r}")
  for key in ("ctr_loss_weight", "ctcvr_loss_weight", "cvr_loss_weight", "counterfactual_loss_weight"):
    p[key] = float(p[key])
    if not p[key] >= 0:
      raise ValueError(f"{key} must be >= 0, got {p[key]}")
  if p["ctcvr_loss_weight"] == 0 and p["cvr_loss_weight"] == 0 and not p["counterfactual"]:
    raise ValueError("pCVR has no loss: give ctcvr_loss_weight, cvr_loss_weight or counterfactual")
  if not 0 < float(p["propensity_floor"]) <= 1:
    raise ValueError(f"propensity_floor must be in (0, 1], got {p['propensity_floor']}")
  if spec["network"] == "mmoe":
    _positive(p, "num_experts")
  if spec["network"] == "ple":
    _positive(p, "num_task_experts")
    _positive(p, "num_shared_experts", minimum=0)
    _positive(p, "ple_levels")
  if p["model"] == "cgc" and p["ple_levels"] != 1:
    raise ValueError("cgc is one level of PLE; use model ple for more levels")
  if not p["hash_buckets"]:
    raise ValueError("params['hash_buckets'] is required (read it from the transform output)")
  if p["fields"] is not None:
    p["fields"] = list(p["fields"])
    unknown_fields = sorted(set(p["fields"]) - set(p["hash_buckets"]))
    if not p["fields"] or unknown_fields:
      raise ValueError(f"fields must be a non-empty subset of the transform output's fields "
                       f"{sorted(p['hash_buckets'])}; unknown: {unknown_fields}")
  if p["pooling"] not in POOLINGS:
    raise ValueError(f"pooling must be one of {POOLINGS}, got {p['pooling']!r}")
  for key, allowed in (("hidden_activation", HIDDEN_ACTIVATIONS), ("hidden_norm", HIDDEN_NORMS)):
    if p[key] not in allowed:
      raise ValueError(f"{key} must be one of {allowed}, got {p[key]!r}")
  if p["embedding_update"] not in EMBEDDING_UPDATES:
    raise ValueError(f"embedding_update must be one of {EMBEDDING_UPDATES}, got {p['embedding_update']!r}")
  if p["learning_rate_schedule"] not in LEARNING_RATE_SCHEDULES:
    raise ValueError(f"learning_rate_schedule must be one of {LEARNING_RATE_SCHEDULES}, "
                     f"got {p['learning_rate_schedule']!r}")
  _positive(p, "warmup_steps", minimum=0)
  p["train_holdout"] = float(p["train_holdout"])
  if not 0 <= p["train_holdout"] <= 0.5:
    raise ValueError(f"train_holdout must be in [0, 0.5], got {p['train_holdout']}")
  p["dense_ema_decay"] = float(p["dense_ema_decay"])
  if not 0 <= p["dense_ema_decay"] < 1:
    raise ValueError(f"dense_ema_decay must be in [0, 1), got {p['dense_ema_decay']}")
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
  p["table_rows_per_id"] = float(p["table_rows_per_id"] or 0)
  if not 0 <= p["table_rows_per_id"] < float("inf"):
    raise ValueError(f"table_rows_per_id must be >= 0 (0: the hash bucket counts), got {p['table_rows_per_id']}")
  if p["field_rows"] is not None:
    p["field_rows"] = {k: int(v) for k, v in p["field_rows"].items()}
    short = sorted(set(p.get("fields") or p["hash_buckets"]) - set(p["field_rows"]))
    if short or any(v < 1 for v in p["field_rows"].values()):
      raise ValueError(f"field_rows must give every embedded field at least 1 row; missing: {short[:8]}")
  p["base_rates"] = check_base_rates(p["base_rates"])
  if p["output_bias_init"] not in OUTPUT_BIAS_INITS:
    raise ValueError(f"output_bias_init must be one of {OUTPUT_BIAS_INITS}, got {p['output_bias_init']!r}")
  _positive(p, "embedding_dim")
  _positive(p, "embedding_partitions", minimum=0)
  for key in ("ctr_hidden_units", "cvr_hidden_units", "expert_hidden_units", "tower_hidden_units"):
    units = p[key]
    if not isinstance(units, (list, tuple)) or not all(
        isinstance(u, int) and not isinstance(u, bool) and u >= 1 for u in units):
      raise ValueError(f"{key} must be a list of layer sizes of at least 1, got {units!r}")
    p[key] = list(units)
  for key in ("learning_rate", "embedding_learning_rate"):
    p[key] = float(p[key])
    if not 0 < p[key] < float("inf"):
      raise ValueError(f"{key} must be a positive number, got {p[key]}")
  p["embedding_init_stddev"] = float(p["embedding_init_stddev"])
  if not 0 <= p["embedding_init_stddev"] < float("inf"):
    raise ValueError(f"embedding_init_stddev must be >= 0, got {p['embedding_init_stddev']}")
  p["dropout"] = float(p["dropout"])
  if not 0 <= p["dropout"] < 1:
    raise ValueError(f"dropout must be in [0, 1), got {p['dropout']}")
  return p


def check_params(params: Dict[str, Any]) -> Dict[str, Any]:
  """resolve_params before the transform output is read (its hash_buckets are not known yet): the
  one check of the model params that the entry points (model_fn.train, orchestration.daily) run on
  their flags before any work or write; a stand-in schema holds the given ``fields``."""
  fields = params.get("fields") or []
  return resolve_params({**params, "hash_buckets": params.get("hash_buckets")
                         or {f: 1 for f in list(fields) or ["_"]}})


def check_run(batch_size: int, num_epochs: float = 1.0, train_steps: int = 0, eval_steps: int = 0,
              warm_epochs: float = 0.0) -> None:
  """A training run's numbers besides the model params (model_fn.train's and orchestration.daily's
  flags), checked before any work: a run of batch size 0 or of no epoch would fail, or train
  nothing, only after writing its model_dir."""
  for name, value, minimum in (("batch_size", batch_size, 1), ("train_steps", train_steps, 0),
                               ("eval_steps", eval_steps, 0)):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")
  if not (isinstance(num_epochs, (int, float)) and 0 < num_epochs < float("inf")) and not train_steps:
    raise ValueError(f"num_epochs must be a positive number (or give train_steps), got {num_epochs!r}")
  if not (isinstance(warm_epochs, (int, float)) and 0 <= warm_epochs < float("inf")):
    raise ValueError(f"warm_epochs must be >= 0, got {warm_epochs!r}")


def check_base_rates(rates: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
  """``{"ctr": r, "cvr": r}`` with rates strictly between 0 and 1, or None."""
  if rates is None:
    return None
  out = {}
  for key in ("ctr", "cvr"):
    r = rates.get(key) if isinstance(rates, dict) else None
    if r is None or not 0 < float(r) < 1:
      raise ValueError(f"base_rates[{key!r}] must be a rate strictly between 0 and 1, got {r!r} "
                       "(a train split with no clicks or no conversions cannot train this model)")
    out[key] = float(r)
  return out


def table_rows(p: Dict[str, Any]) -> Dict[str, int]:
  """Rows of each embedded field's table: ``field_rows`` when resolved, else its hash buckets
  capped by ``table_rows``."""
  names = p.get("fields") or list(p["hash_buckets"])
  if p.get("field_rows"):
    return {n: int(p["field_rows"][n]) for n in names}
  cap = int(p.get("table_rows") or 0)
  return {n: min(p["hash_buckets"][n], cap) if cap else p["hash_buckets"][n] for n in names}
