"""Multi-task networks as a tf.estimator model_fn, on ESMM's parts: Shared-Bottom, MMoE
(Ma et al., KDD 2018), CGC and PLE (Tang et al., RecSys 2020).

Shared embeddings -> the network's bottom -> a CTR tower and a CVR tower; pCTCVR = pCTR x pCVR.
The same input_fn, embeddings, heads, metrics and export as ESMM (model_fn/heads.py); only
the network between embeddings and logits differs:
  shared_bottom  one MLP (expert_hidden_units) that both towers read
  mmoe           ``num_experts`` experts; one softmax gate per task mixes them
  cgc            ``num_task_experts`` experts per task and ``num_shared_experts`` shared ones; a
                 task's gate mixes its own and the shared experts
  ple            ``ple_levels`` CGC levels, shared gates between them
By default the CVR task trains on clicked impressions (a masked loss) and the CTR task on all;
ESMM's CTCVR loss and ESCM2's risks are available to every network through the loss weights.

Gate utilisation (mean gate weight of each expert per task) is a TensorBoard summary, an eval
metric ``gate/<task>/expert_<i>`` and a prediction ``gate_<task>``.
"""

import tensorflow as tf

from model_fn import averaging, heads, layers
from model_fn.esmm import add_imputation_tower, output_biases
from model_fn.params import MODEL_SPECS, resolve_params

MULTI_TASK_MODELS = tuple(m for m, s in MODEL_SPECS.items() if s["network"] != "towers")
TASKS = ("ctr", "cvr")


def bottom(shared: tf.Tensor, p, training: bool, dtype: tf.DType):
  """({task: the task tower's input}, {task: gate weights}) of the model's network."""
  network = MODEL_SPECS[p["model"]]["network"]
  hidden = (p["hidden_activation"], p["hidden_norm"])
  if network == "shared_bottom":
    out = layers.mlp(shared, p["expert_hidden_units"], "shared_bottom", p["dropout"], training, dtype, *hidden)
    return {t: out for t in TASKS}, {}
  if network == "mmoe":
    return layers.mmoe(shared, TASKS, int(p["num_experts"]), p["expert_hidden_units"], "mmoe", p["dropout"],
                       training, dtype, *hidden)
  return layers.ple(shared, TASKS, int(p["ple_levels"]), int(p["num_task_experts"]),
                    int(p["num_shared_experts"]), p["expert_hidden_units"], "ple", p["dropout"], training, dtype,
                    *hidden)


def mmoe_model_fn(features, labels, mode, params):
  """tf.estimator model_fn of the multi-task networks (see the module doc)."""
  p = resolve_params(params)
  if p["model"] not in MULTI_TASK_MODELS:
    raise ValueError(f"mmoe_model_fn builds {MULTI_TASK_MODELS}, not {p['model']!r} (see model_fn.esmm)")
  training = mode == tf.estimator.ModeKeys.TRAIN
  dtype = layers.matmul_dtype(p, training)
  bias = output_biases(p)
  with averaging.reading_averages(p, mode):
    shared = layers.embedding_input(features, p, "embeddings")
    mixed, gates = bottom(shared, p, training, dtype)
    logits = {t: layers.mlp_logit(mixed[t], p["tower_hidden_units"], f"{t}_tower", p["dropout"], training, dtype,
                                  bias[t], p["hidden_activation"], p["hidden_norm"]) for t in TASKS}
    task_heads = heads.heads_from_logits(logits["ctr"], logits["cvr"], None if training else p["calibration"])
    add_imputation_tower(task_heads, shared, p["tower_hidden_units"], p, mode, dtype)
  return heads.estimator_spec(features, labels, mode, p, task_heads, gates=gates)
