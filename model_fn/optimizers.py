"""Optimizers of the embedding tables.

``LazyAdamOptimizer``: Adam whose sparse update reads and writes only the rows in the batch.
TF1's AdamOptimizer decays both moment slots of the *whole* table every step (m *= beta1,
v *= beta2 before the scatter), so its cost grows with the table (20x slower than Adagrad at
2^20 rows). Here a row's moments and value change only in a step whose batch holds it; a row
not in the batch keeps its moments (as if the step had not happened for it, not as if its
gradient were zero). Per epoch it learns rare ids as fast as Adam does, where Adagrad's shrinking
steps fall behind (benchmarks/peer_throughput.py: CTCVR and CVR AUC after one epoch).
"""

import tensorflow as tf


class LazyAdamOptimizer(tf.compat.v1.train.AdamOptimizer):
  """Adam (Kingma & Ba) with row-wise lazy sparse updates; dense gradients get plain Adam.

  The base Optimizer sums the gradients of repeated ids first (``_apply_sparse_duplicate_indices``),
  so each row of ``indices`` is unique here.
  """

  def _lazy_rows(self, grad, var, indices):
    dtype = var.dtype.base_dtype
    beta1_power, beta2_power = self._get_beta_accumulators()
    beta1_power, beta2_power = tf.cast(beta1_power, dtype), tf.cast(beta2_power, dtype)
    lr = tf.cast(self._lr_t, dtype)
    beta1, beta2 = tf.cast(self._beta1_t, dtype), tf.cast(self._beta2_t, dtype)
    epsilon = tf.cast(self._epsilon_t, dtype)
    step = lr * tf.sqrt(1 - beta2_power) / (1 - beta1_power)
    m, v = self.get_slot(var, "m"), self.get_slot(var, "v")
    m_rows = beta1 * tf.gather(m, indices) + (1 - beta1) * grad
    v_rows = beta2 * tf.gather(v, indices) + (1 - beta2) * tf.square(grad)
    m_update = tf.compat.v1.scatter_update(m, indices, m_rows, use_locking=self._use_locking)
    v_update = tf.compat.v1.scatter_update(v, indices, v_rows, use_locking=self._use_locking)
    var_update = tf.compat.v1.scatter_sub(var, indices, step * m_rows / (tf.sqrt(v_rows) + epsilon),
                                          use_locking=self._use_locking)
    return tf.group(var_update, m_update, v_update)

  def _apply_sparse(self, grad, var):
    return self._lazy_rows(grad.values, var, grad.indices)

  def _resource_apply_sparse(self, grad, var, indices):
    return self._lazy_rows(grad, var, indices)
