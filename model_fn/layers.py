"""Composable pieces of the networks: field embeddings with weighted pooling, MLP towers,
MMoE experts and gates."""

import dataclasses
import functools
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from model_fn import hardware
from model_fn import params as P
from preprocessing import features as F

# Embedding tables get their own (sparse-update) optimizer, see model_fn/heads.py.
EMBEDDING_COLLECTION = "esmm_embedding_tables"
# A table is split into at most ``partitions`` shards of at least this many bytes, so on a
# cluster the large tables spread over the parameter servers and the small ones stay whole.
MIN_SHARD_BYTES = 64 << 10


def embed_fields(features: Dict[str, tf.Tensor], schema: Sequence[F.Field],
                 hash_buckets: Dict[str, int], dim: int, scope: str,
                 init_stddev: float = P.DEFAULT_PARAMS["embedding_init_stddev"], partitions: int = 1,
                 table_rows: Optional[Dict[str, int]] = None,
                 pooling: str = "sum") -> Tuple[tf.Tensor, List[tf.Variable]]:
  """One table per field; the values of a field are pooled by ``pooling``: their weighted sum,
  or that divided by the sum of the weights (``mean``) or by the root of the sum of their
  squares (``sqrtn``); an unweighted field's weights are 1.

  Returns the concatenated pooled embeddings [batch, len(schema) * dim] and the tables'
  variables (every shard of a partitioned table). With ``partitions`` > 1 a table is split
  along its rows into up to that many shards of at least MIN_SHARD_BYTES; the Estimator's
  device setter places the shards round-robin on the parameter servers, and a checkpoint
  stores each table whole, so it loads under any partitioning (or none, for serving).
  A field with no value in an example pools to zeros. Ids come hashed into
  ``[0, hash_buckets[field])``; weights (weighted fields only) are aligned with them.
  ``table_rows`` (default: ``hash_buckets``) may give a field fewer rows than buckets: its
  ids are then folded modulo the rows.

  Grouped features (with F.GROUP_INDEX, model_fn.input_fn.grouped_parser): the group-level
  fields have one row per group; each is pooled once per group and the pooled vectors are
  gathered to the group's impressions, which gives what pooling each impression's own copy would.
  The result is registered as a GroupedInput, so that a dense layer reading it multiplies the
  group-level part once per group (see dense).
  """
  table_rows = table_rows or hash_buckets
  pooled, tables = [], []
  partitioner = (tf.compat.v1.min_max_variable_partitioner(max_partitions=partitions,
                                                           min_slice_size=MIN_SHARD_BYTES)
                 if partitions > 1 else None)
  with tf.compat.v1.variable_scope(scope):
    for field in schema:
      table = tf.compat.v1.get_variable(
          f"table_{field.name}", [table_rows[field.name], dim], tf.float32,
          initializer=tf.compat.v1.truncated_normal_initializer(stddev=init_stddev),
          partitioner=partitioner)
      tables.extend([table] if isinstance(table, tf.Variable) else list(table))
      ids = features[field.ids]
      if table_rows[field.name] < hash_buckets[field.name]:
        ids = tf.SparseTensor(ids.indices, tf.math.floormod(ids.values, table_rows[field.name]),
                              ids.dense_shape)
      weights = features[field.weights] if field.weighted else None
      pooled.append(_pool(table, ids, weights, pooling, name=f"pool_{field.name}"))
  if F.GROUP_INDEX in features and any(f.group_level for f in schema):
    return _grouped_input(pooled, [f.group_level for f in schema], features[F.GROUP_INDEX]), tables
  return tf.concat(pooled, axis=1), tables


@dataclasses.dataclass(frozen=True)
class GroupedInput:
  """The two parts of a grouped batch's embedding input x [impressions, d]: the group-level
  columns ``group`` [groups, dg] (at ``group_columns`` of x) and the others ``rows``
  [impressions, dr] (at ``row_columns``); ``group_index`` [impressions] is each impression's group."""
  group: tf.Tensor
  rows: tf.Tensor
  group_index: tf.Tensor
  group_columns: Tuple[int, ...]
  row_columns: Tuple[int, ...]


# Per graph: id of an embedding input tensor -> (the tensor, its GroupedInput).
_GROUPED: "weakref.WeakKeyDictionary[tf.Graph, Dict[int, Tuple[tf.Tensor, GroupedInput]]]" = weakref.WeakKeyDictionary()


def grouped_input(x: tf.Tensor) -> Optional[GroupedInput]:
  """The GroupedInput of an embedding input made from grouped features, else None."""
  got = _GROUPED.get(x.graph, {}).get(id(x))
  return got[1] if got is not None and got[0] is x else None


def _grouped_input(pooled: List[tf.Tensor], group_level: Sequence[bool], group_index: tf.Tensor) -> tf.Tensor:
  """The per-impression embedding input of pooled vectors of which the group-level ones have one
  row per group (gathered to the impressions in one gather), registered with its GroupedInput."""
  widths = [int(t.shape[-1]) for t in pooled]
  starts = [sum(widths[:i]) for i in range(len(widths))]
  cols = lambda keep: tuple(c for i, g in enumerate(group_level) if g == keep
                            for c in range(starts[i], starts[i] + widths[i]))
  group = tf.concat([t for t, g in zip(pooled, group_level) if g], axis=1)
  row_parts = [t for t, g in zip(pooled, group_level) if not g]
  rows = tf.concat(row_parts, axis=1) if row_parts else tf.zeros([tf.size(group_index), 0])
  with tf.name_scope("group_to_impressions"):
    pieces = iter(tf.split(tf.gather(group, group_index), [w for w, g in zip(widths, group_level) if g], axis=1))
  x = tf.concat([next(pieces) if g else t for t, g in zip(pooled, group_level)], axis=1)
  _GROUPED.setdefault(x.graph, {})[id(x)] = (x, GroupedInput(group, rows, group_index, cols(True), cols(False)))
  return x


def _pool(table, ids: tf.SparseTensor, weights: Optional[tf.SparseTensor], pooling: str,
          name: str) -> tf.Tensor:
  """The rows of ``ids`` per example pooled by ``pooling`` (see embed_fields): [batch, dim]; an
  example without a valid value (id >= 0, weight > 0) pools to zeros, as
  tf.nn.safe_embedding_lookup_sparse does.

  Written as a gather of the batch's rows and a segment sum instead of calling
  safe_embedding_lookup_sparse: Grappler rewrites that one's gather + sparse segment sum into a
  read of the whole table every step (10 ms per 2^20 x 18 table here), which made training
  speed fall with the table size. Here only the batch's rows are read, and the gradient is
  IndexedSlices of those rows, so the sparse optimizer's update stays sparse too.
  """
  with tf.name_scope(name):
    values = ids.values
    rows = ids.indices[:, 0]
    keep = values >= 0
    w = None
    if weights is not None:
      w = weights.values
      keep = tf.logical_and(keep, w > 0)
      w = tf.boolean_mask(w, keep)
    values, rows = tf.boolean_mask(values, keep), tf.boolean_mask(rows, keep)
    emb = tf.gather(table, values)
    if w is not None:
      emb = emb * tf.expand_dims(w, 1)
    batch = ids.dense_shape[0]
    pooled = tf.math.unsorted_segment_sum(emb, rows, num_segments=batch)
    if pooling == "sum":
      return pooled
    if w is None:
      w = tf.ones_like(values, tf.float32)
    norm = tf.math.unsorted_segment_sum(w if pooling == "mean" else tf.square(w), rows, num_segments=batch)
    if pooling == "sqrtn":
      norm = tf.sqrt(norm)
    return tf.math.divide_no_nan(pooled, tf.expand_dims(norm, 1))


def embedding_input(features: Dict[str, tf.Tensor], params, scope: str) -> tf.Tensor:
  """The pooled embeddings of every field the transform output has (crosses included), or of
  ``params['fields']`` when given.

  The fields are those of ``params['hash_buckets']`` (read back from the transformed
  schema), so a preprocessing run with other crosses needs no code change here.
  """
  rows = P.table_rows(params)
  schema = F.fields_for_buckets(params["format"], rows)
  pooled, tables = embed_fields(features, schema, params["hash_buckets"], params["embedding_dim"],
                                scope, params["embedding_init_stddev"],
                                max(1, int(params.get("embedding_partitions") or 1)), rows,
                                params.get("pooling", "sum"))
  for t in tables:
    tf.compat.v1.add_to_collection(EMBEDDING_COLLECTION, t)
  return pooled


def matmul_dtype(params, training: bool) -> tf.DType:
  """The dense layers' compute dtype: ``params['train_matmul_dtype']`` while training ("auto":
  bfloat16 where hardware.native_bfloat16(), else float32), float32 otherwise (the variables are float32
  either way, so a checkpoint serves the same in both)."""
  if not training:
    return tf.float32
  name = params["train_matmul_dtype"]
  if name == "auto":
    name = "bfloat16" if hardware.native_bfloat16() else "float32"
  return tf.as_dtype(name)


def dense(x: tf.Tensor, units: int, name: str, activation=None,
          matmul_dtype: tf.DType = tf.float32, bias_init: float = 0.0) -> tf.Tensor:
  """A fully connected layer with tf.compat.v1.layers.dense's variables (NAME/kernel, NAME/bias,
  Glorot-uniform and ``bias_init``, 0 by default), float32 in every case.

  ``matmul_dtype`` bfloat16 runs the matmul on bfloat16 copies of the input and the kernel and
  casts the product back (oneDNN accumulates in float32), so the variables, their gradients, the
  optimizer and the bias add stay float32: mixed precision for the towers' matmuls, which are
  most of a training step's CPU time (benchmarks/results/train_step_profile.md). The bias add and
  the activation stay float32 on purpose: in bfloat16 as well (Keras's mixed_bfloat16), training
  was faster but one-epoch CTCVR AUC fell by about 0.01
  (benchmarks/results/peer_throughput_bf16_activations.md).
  """
  with tf.compat.v1.variable_scope(name):
    kernel = tf.compat.v1.get_variable("kernel", [x.shape[-1], units], tf.float32,
                                       initializer=tf.compat.v1.glorot_uniform_initializer())
    bias = tf.compat.v1.get_variable("bias", [units], tf.float32,
                                     initializer=tf.compat.v1.constant_initializer(float(bias_init)))
    parts = grouped_input(x)
    if parts is None:
      y = _matmul(x, kernel, matmul_dtype)
    else:
      # x = the group-level columns gathered to the impressions, and the rest: its product is the
      # group part's product, once per group, gathered, plus the rest's (the same sum, reordered).
      y = (tf.gather(_matmul(parts.group, tf.gather(kernel, parts.group_columns), matmul_dtype), parts.group_index)
           + _matmul(parts.rows, tf.gather(kernel, parts.row_columns), matmul_dtype))
    y = tf.nn.bias_add(y, bias)
    return activation(y) if activation is not None else y


def _matmul(x: tf.Tensor, kernel: tf.Tensor, matmul_dtype: tf.DType) -> tf.Tensor:
  """x @ kernel, in ``matmul_dtype``, with x's rows padded to padded_rows where oneDNN runs it."""
  if matmul_dtype != tf.float32:
    x, kernel = tf.cast(x, matmul_dtype), tf.cast(kernel, matmul_dtype)
  if hardware.onednn():
    rows = tf.shape(x)[0]
    y = tf.matmul(tf.pad(x, [[0, padded_rows(rows) - rows], [0, 0]]), kernel)[:rows]
  else:
    y = tf.matmul(x, kernel)
  return y if matmul_dtype == tf.float32 else tf.cast(y, tf.float32)


# The row counts a matmul's input is padded to: every count up to 64, then 8 per octave (m * 2^e,
# m = 8..15), so a padded batch is at most 1/8 larger. A grouped batch holds whole groups, and its
# impressions change from step to step; oneDNN builds a primitive for every new shape and keeps up
# to 1,024 per thread, which cost time and gigabytes (benchmarks/README.md, "Where a training
# step's time goes"). Padded, the towers see a few dozen shapes.
PAD_ROWS = tuple(sorted({*range(1, 65), *(m << e for e in range(3, 28) for m in range(8, 16))}))


def padded_rows(rows: tf.Tensor) -> tf.Tensor:
  """The least PAD_ROWS entry >= ``rows`` (int32 scalar); ``rows`` beyond them stays as it is."""
  ladder = tf.constant(PAD_ROWS, tf.int32)
  at = tf.minimum(tf.searchsorted(ladder, tf.reshape(rows, [1]))[0], len(PAD_ROWS) - 1)
  return tf.maximum(tf.gather(ladder, at), rows)


# The hidden layers' activation and normalisation when a caller names none: the params' defaults.
HIDDEN_ACTIVATION = P.DEFAULT_PARAMS["hidden_activation"]
HIDDEN_NORM = P.DEFAULT_PARAMS["hidden_norm"]
# The slope of leaky_relu below zero (tf.nn.leaky_relu's default).
LEAKY_SLOPE = 0.2


def mlp_logit(inputs: tf.Tensor, hidden_units: Sequence[int], name: str, dropout: float = 0.0,
              training: bool = False, matmul_dtype: tf.DType = tf.float32,
              bias_init: float = 0.0, activation: str = HIDDEN_ACTIVATION, norm: str = HIDDEN_NORM) -> tf.Tensor:
  """MLP tower ending in one logit: [batch, n] -> [batch]. The logit's bias starts at
  ``bias_init`` (the logit of the task's base rate, so the first predictions are the base rate)."""
  with tf.compat.v1.variable_scope(name):
    x = _hidden_layers(inputs, hidden_units, dropout, training, matmul_dtype, activation, norm)
    logit = dense(x, 1, "logit", matmul_dtype=matmul_dtype, bias_init=bias_init)
  return tf.squeeze(logit, axis=1)


def _hidden_activation(activation: str, norm: str):
  """What a hidden layer applies to its pre-activations, inside the layer's scope (so a LayerNorm's
  variables are NAME/layer_norm/gamma and beta)."""
  act = tf.nn.relu if activation == "relu" else functools.partial(tf.nn.leaky_relu, alpha=LEAKY_SLOPE)
  if norm == "none":
    return act
  return lambda y: act(layer_norm(y, "layer_norm"))


def _hidden_layers(x: tf.Tensor, hidden_units: Sequence[int], dropout: float, training: bool,
                   matmul_dtype: tf.DType, activation: str, norm: str) -> tf.Tensor:
  act = _hidden_activation(activation, norm)
  for i, units in enumerate(hidden_units):
    x = dense(x, units, f"hidden_{i}", act, matmul_dtype)
    if dropout > 0:
      x = tf.compat.v1.layers.dropout(x, rate=dropout, training=training)
  return x


def layer_norm(x: tf.Tensor, name: str, epsilon: float = 1e-5) -> tf.Tensor:
  """LayerNorm (Ba et al. 2016) over the last axis, with a gain (NAME/gamma, from 1) and a
  shift (NAME/beta, from 0)."""
  with tf.compat.v1.variable_scope(name):
    units = x.shape[-1]
    gamma = tf.compat.v1.get_variable("gamma", [units], tf.float32, initializer=tf.compat.v1.ones_initializer())
    beta = tf.compat.v1.get_variable("beta", [units], tf.float32, initializer=tf.compat.v1.zeros_initializer())
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + epsilon) * gamma + beta


def mlp(inputs: tf.Tensor, hidden_units: Sequence[int], name: str, dropout: float = 0.0,
        training: bool = False, matmul_dtype: tf.DType = tf.float32, activation: str = HIDDEN_ACTIVATION,
        norm: str = HIDDEN_NORM) -> tf.Tensor:
  """MLP without an output layer: [batch, n] -> [batch, hidden_units[-1]]."""
  with tf.compat.v1.variable_scope(name):
    return _hidden_layers(inputs, hidden_units, dropout, training, matmul_dtype, activation, norm)


def _mix(experts: tf.Tensor, gate_input: tf.Tensor, name: str,
         matmul_dtype: tf.DType) -> Tuple[tf.Tensor, tf.Tensor]:
  """A softmax gate (a linear layer of ``gate_input``) over ``experts`` [batch, E, d]: returns the
  gated mixture [batch, d] and the gate weights [batch, E]."""
  gate = tf.nn.softmax(dense(gate_input, experts.shape[1], name, matmul_dtype=matmul_dtype), axis=-1)
  return tf.reduce_sum(experts * gate[:, :, None], axis=1), gate


def mmoe(inputs: tf.Tensor, tasks: Sequence[str], num_experts: int, expert_units: Sequence[int],
         name: str = "mmoe", dropout: float = 0.0, training: bool = False,
         matmul_dtype: tf.DType = tf.float32, activation: str = HIDDEN_ACTIVATION,
         norm: str = HIDDEN_NORM) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
  """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

  ``num_experts`` MLPs read the shared input; each task has a softmax gate (a linear
  layer of the shared input) that mixes the expert outputs into that task's tower input.
  Every expert has its own variables, initialised independently.

  Returns ({task: [batch, expert_units[-1]]}, {task: gate weights [batch, num_experts]}).
  """
  with tf.compat.v1.variable_scope(name):
    experts = tf.stack([mlp(inputs, expert_units, f"expert_{e}", dropout, training, matmul_dtype, activation, norm)
                        for e in range(num_experts)], axis=1)          # [batch, E, d]
    mixed, gates = {}, {}
    for task in tasks:
      mixed[task], gates[task] = _mix(experts, inputs, f"gate_{task}", matmul_dtype)
  return mixed, gates


def ple(inputs: tf.Tensor, tasks: Sequence[str], levels: int, task_experts: int, shared_experts: int,
        expert_units: Sequence[int], name: str = "ple", dropout: float = 0.0, training: bool = False,
        matmul_dtype: tf.DType = tf.float32, activation: str = HIDDEN_ACTIVATION,
        norm: str = HIDDEN_NORM) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
  """Progressive Layered Extraction (Tang et al., RecSys 2020); one level is CGC.

  Each level has ``task_experts`` experts per task and ``shared_experts`` shared ones. A task's
  gate (a linear layer of the task's input) mixes its own experts and the shared ones into the
  task's output; below the last level a shared gate mixes every expert into the next level's
  shared input. Level 1 reads ``inputs`` everywhere.

  Returns ({task: [batch, expert_units[-1]]}, {task: last level's gate weights
  [batch, task_experts + shared_experts], own experts first}).
  """
  if levels < 1 or task_experts < 1 or shared_experts < 0:
    raise ValueError("PLE needs at least one level and one expert per task")
  task_in = {t: inputs for t in tasks}
  shared_in = inputs
  gates: Dict[str, tf.Tensor] = {}
  with tf.compat.v1.variable_scope(name):
    for level in range(levels):
      with tf.compat.v1.variable_scope(f"level_{level}"):
        own = {t: [mlp(task_in[t], expert_units, f"expert_{t}_{e}", dropout, training, matmul_dtype,
                       activation, norm)
                   for e in range(task_experts)] for t in tasks}
        shared = [mlp(shared_in, expert_units, f"expert_shared_{e}", dropout, training, matmul_dtype,
                      activation, norm)
                  for e in range(shared_experts)]
        task_out = {}
        for t in tasks:
          task_out[t], gates[t] = _mix(tf.stack(own[t] + shared, axis=1), task_in[t], f"gate_{t}",
                                       matmul_dtype)
        if level < levels - 1:
          everything = [x for t in tasks for x in own[t]] + shared
          shared_in, _ = _mix(tf.stack(everything, axis=1), shared_in, "gate_shared", matmul_dtype)
        task_in = task_out
  return task_in, gates
