"""An exponential moving average of the dense layers' weights (towers, experts, gates): kept
while training, read instead of the weights by evaluation, prediction and the SavedModel.

The last steps of a short run move the output biases by more than the run's calibration error
can afford; the average over the last ~1 / (1 - decay) steps does not. The embedding tables are
not averaged (a second copy of every table would double their memory).
"""

import contextlib

import tensorflow as tf

SHADOW_SUFFIX = "ExponentialMovingAverage"     # tf.train.ExponentialMovingAverage's default name


def _is_table(name: str) -> bool:
  return "/table_" in name


def maintain(params, train_op: tf.Operation, variables, global_step: tf.Tensor) -> tf.Operation:
  """``train_op`` followed by the average's update of ``variables`` (the dense layers'), when
  ``params['dense_ema_decay']`` > 0; early steps average over fewer steps (num_updates)."""
  decay = float(params["dense_ema_decay"])
  if decay <= 0 or not variables:
    return train_op
  ema = tf.compat.v1.train.ExponentialMovingAverage(decay, num_updates=global_step, name=SHADOW_SUFFIX)
  with tf.control_dependencies([train_op]):
    return ema.apply(variables)


@contextlib.contextmanager
def reading_averages(params, mode):
  """Outside training (with an average kept), every dense variable made inside is the average's
  copy (``<variable>/ExponentialMovingAverage`` of the checkpoint) instead of the weight."""
  if float(params["dense_ema_decay"]) <= 0 or mode == tf.estimator.ModeKeys.TRAIN:
    yield
    return

  def average_getter(getter, name, *args, **kwargs):
    if _is_table(name) or not kwargs.get("trainable", True):
      return getter(name, *args, **kwargs)
    kwargs["trainable"] = False
    return getter(f"{name}/{SHADOW_SUFFIX}", *args, **kwargs)

  with tf.compat.v1.variable_scope(tf.compat.v1.get_variable_scope(), custom_getter=average_getter):
    yield
