"""Composable pieces of the networks: field embeddings with weighted pooling, MLP towers."""

from typing import Dict, List, Sequence, Tuple

import tensorflow as tf

from preprocessing import features as F


def embed_fields(features: Dict[str, tf.Tensor], schema: Sequence[F.Field],
                 hash_buckets: Dict[str, int], dim: int, scope: str,
                 init_stddev: float = 0.05) -> Tuple[tf.Tensor, List[tf.Variable]]:
  """One table per field; weighted sum pooling of every value of a field.

  Returns the concatenated pooled embeddings [batch, len(schema) * dim] and the tables.
  A field with no value in an example pools to zeros. Ids come hashed into
  ``[0, hash_buckets[field])``; weights (weighted fields only) are aligned with them.
  """
  pooled, tables = [], []
  with tf.compat.v1.variable_scope(scope):
    for field in schema:
      table = tf.compat.v1.get_variable(
          f"table_{field.name}", [hash_buckets[field.name], dim], tf.float32,
          initializer=tf.compat.v1.truncated_normal_initializer(stddev=init_stddev))
      tables.append(table)
      ids = features[field.ids]
      weights = features[field.weights] if field.weighted else None
      pooled.append(tf.nn.safe_embedding_lookup_sparse(
          table, ids, weights, combiner="sum", name=f"pool_{field.name}"))
  return tf.concat(pooled, axis=1), tables


def mlp_logit(inputs: tf.Tensor, hidden_units: Sequence[int], name: str, dropout: float = 0.0,
              training: bool = False) -> tf.Tensor:
  """ReLU MLP tower ending in one logit: [batch, n] -> [batch]."""
  x = inputs
  with tf.compat.v1.variable_scope(name):
    for i, units in enumerate(hidden_units):
      x = tf.compat.v1.layers.dense(x, units, activation=tf.nn.relu, name=f"hidden_{i}")
      if dropout > 0:
        x = tf.compat.v1.layers.dropout(x, rate=dropout, training=training)
    logit = tf.compat.v1.layers.dense(x, 1, name="logit")
  return tf.squeeze(logit, axis=1)
