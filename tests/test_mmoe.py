"""MMoE: layer shapes and gate softmax, independent experts, the model_fn's heads and loss,
the division head, and uncertainty weighting; the dense layers of every model_fn and their mixed
precision (train_matmul_dtype: bfloat16 matmuls while training, float32 variables, float32 eval
and serving) -- on small graphs built here."""

import numpy as np
import pytest
import tensorflow as tf

from model_fn import esmm, heads, layers, losses, mmoe
from model_fn.params import resolve_params

BUCKETS = {"101": 40, "205": 60, "150_14": 30}
BATCH = 6


def _features(seed=0):
  """A batch of transformed features for BUCKETS (150_14 is weighted and multi-valued)."""
  rng = np.random.default_rng(seed)
  feats = {}
  for name, n in BUCKETS.items():
    rows = [list(rng.integers(0, n, size=rng.integers(0, 4))) for _ in range(BATCH)]
    indices = [[r, j] for r, ids in enumerate(rows) for j in range(len(ids))]
    values = [v for ids in rows for v in ids]
    shape = [BATCH, max(1, max(len(r) for r in rows))]
    feats[f"id_{name}"] = tf.SparseTensor(np.array(indices, np.int64).reshape(-1, 2),
                                          np.array(values, np.int64), shape)
    if name == "150_14":
      feats[f"wt_{name}"] = tf.SparseTensor(np.array(indices, np.int64).reshape(-1, 2),
                                            rng.random(len(values)).astype(np.float32), shape)
  return feats


def _labels(seed=1):
  rng = np.random.default_rng(seed)
  click = (rng.random(BATCH) < 0.5).astype(np.float32)
  conversion = click * (rng.random(BATCH) < 0.5)
  return {"click": tf.constant(click), "conversion": tf.constant(conversion, tf.float32),
          "ctcvr": tf.constant(click * conversion, tf.float32)}


def _params(model, **kw):
  return dict({"model": model, "hash_buckets": BUCKETS, "embedding_dim": 4, "num_experts": 3,
               "expert_hidden_units": [8, 5], "tower_hidden_units": [6],
               "ctr_hidden_units": [6], "cvr_hidden_units": [6]}, **kw)


def _run(fetches, seed=3):
  tf.compat.v1.set_random_seed(seed)
  with tf.compat.v1.Session() as sess:
    sess.run([tf.compat.v1.global_variables_initializer(), tf.compat.v1.local_variables_initializer()])
    return sess.run(fetches)


def test_mmoe_layer_shapes_and_gates_are_softmax_distributions():
  with tf.Graph().as_default():
    x = tf.constant(np.random.default_rng(0).normal(size=(BATCH, 7)), tf.float32)
    mixed, gates = layers.mmoe(x, ("ctr", "ctcvr"), num_experts=4, expert_units=[9, 5])
    out = _run({"mixed": mixed, "gates": gates})
  for task in ("ctr", "ctcvr"):
    assert out["mixed"][task].shape == (BATCH, 5)
    g = out["gates"][task]
    assert g.shape == (BATCH, 4)
    assert np.all(g > 0)
    np.testing.assert_allclose(g.sum(axis=1), 1.0, rtol=1e-6)
  # Two tasks have two gates of their own.
  assert not np.allclose(out["gates"]["ctr"], out["gates"]["ctcvr"])


def test_mmoe_layer_mixes_the_experts_with_the_gate_weights():
  with tf.Graph().as_default():
    x = tf.constant(np.random.default_rng(1).normal(size=(BATCH, 7)), tf.float32)
    mixed, gates = layers.mmoe(x, ("ctr",), num_experts=3, expert_units=[4])
    experts = [tf.compat.v1.get_default_graph().get_tensor_by_name(f"mmoe/expert_{e}/hidden_0/Relu:0")
               for e in range(3)]
    out = _run({"mixed": mixed["ctr"], "gate": gates["ctr"], "experts": experts})
  want = sum(out["gate"][:, e:e + 1] * out["experts"][e] for e in range(3))
  np.testing.assert_allclose(out["mixed"], want, rtol=1e-5, atol=1e-6)


def test_experts_start_different():
  with tf.Graph().as_default():
    x = tf.zeros([BATCH, 7])
    layers.mmoe(x, ("ctr", "ctcvr"), num_experts=2, expert_units=[9])
    kernels = {v.name: v for v in tf.compat.v1.global_variables() if "kernel" in v.name and "expert" in v.name}
    k = _run(kernels)
  a, b = k["mmoe/expert_0/hidden_0/kernel:0"], k["mmoe/expert_1/hidden_0/kernel:0"]
  assert a.shape == b.shape == (7, 9)
  assert not np.allclose(a, b)
  assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.5


@pytest.mark.parametrize("model", ["mmoe", "mmoe_esmm"])
def test_mmoe_model_fn_predictions(model):
  with tf.Graph().as_default():
    spec = mmoe.mmoe_model_fn(_features(), None, tf.estimator.ModeKeys.PREDICT, _params(model))
    p = _run(spec.predictions)
    assert set(spec.export_outputs) == {"serving_default", "regression", "predict"}
  for k in ("ctr", "cvr", "ctcvr"):
    assert p[k].shape == (BATCH,) and np.all((p[k] > 0) & (p[k] < 1)), k
  for task in ("ctr", "ctcvr" if model == "mmoe" else "cvr"):
    assert p[f"gate_{task}"].shape == (BATCH, 3)
    np.testing.assert_allclose(p[f"gate_{task}"].sum(axis=1), 1.0, rtol=1e-6)
  sig = lambda z: 1 / (1 + np.exp(-z))
  if model == "mmoe_esmm":
    np.testing.assert_allclose(p["ctcvr"], p["ctr"] * p["cvr"], rtol=1e-5)
  else:
    # CTCVR is its own task; pCVR = min(1, pCTCVR / pCTR).
    np.testing.assert_allclose(p["ctcvr"], sig(p["ctcvr_logit"]), rtol=1e-5)
    np.testing.assert_allclose(p["cvr"], np.minimum(p["ctcvr"] / p["ctr"], 1 - 1e-6), rtol=1e-4)


@pytest.mark.parametrize("model", ["mmoe", "mmoe_esmm", "esmm"])
def test_training_loss_is_ctr_plus_ctcvr_log_loss(model):
  """The TRAIN loss equals the numpy CTR + CTCVR log loss of the same graph's heads."""
  fn = mmoe.mmoe_model_fn if model != "esmm" else esmm.esmm_model_fn
  with tf.Graph().as_default():
    feats, labels = _features(), _labels()
    tf.compat.v1.set_random_seed(5)
    train = fn(feats, labels, tf.estimator.ModeKeys.TRAIN, _params(model))
    with tf.compat.v1.variable_scope(tf.compat.v1.get_variable_scope(), reuse=True):
      pred = fn(feats, None, tf.estimator.ModeKeys.PREDICT, _params(model))
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      loss, p, y = sess.run([train.loss, pred.predictions, labels])
  ll = lambda t, q: -np.mean(t * np.log(q) + (1 - t) * np.log(1 - q))
  np.testing.assert_allclose(loss, ll(y["click"], p["ctr"]) + ll(y["ctcvr"], p["ctcvr"]), rtol=1e-4)


def test_mmoe_eval_reports_gate_utilisation_and_the_protocol_metrics():
  with tf.Graph().as_default():
    spec = mmoe.mmoe_model_fn(_features(), _labels(), tf.estimator.ModeKeys.EVAL, _params("mmoe"))
    values = {k: v[0] for k, v in spec.eval_metric_ops.items()}
    updates = [v[1] for v in spec.eval_metric_ops.values()]
    with tf.compat.v1.Session() as sess:
      sess.run([tf.compat.v1.global_variables_initializer(), tf.compat.v1.local_variables_initializer()])
      sess.run(updates)
      m = sess.run(values)
  for task in ("ctr", "ctcvr"):
    weights = [m[f"gate/{task}/expert_{e}"] for e in range(3)]
    assert abs(sum(weights) - 1) < 1e-5
  for key in ("auc/ctr", "auc/ctcvr", "auc/cvr", "calibration/cvr", "log_loss/ctcvr"):
    assert key in m


def test_division_cvr_logits_are_finite_and_clipped():
  vals = np.array([-100.0, -20.0, -1.0, 0.0, 3.0, 50.0, 100.0])
  a, b = [g.ravel() for g in np.meshgrid(vals, vals)]
  z = losses.division_cvr_logits(tf.constant(a), tf.constant(b)).numpy()
  assert np.all(np.isfinite(z))
  p = 1 / (1 + np.exp(-z))
  sig = lambda t: 1 / (1 + np.exp(-t))
  ok = (b < a) & (np.abs(a) < 30) & (np.abs(b) < 30)
  np.testing.assert_allclose(p[ok], sig(b[ok]) / sig(a[ok]), rtol=1e-6)
  assert np.all(p <= 1 - 1e-6 + 1e-12)


def test_uncertainty_weighting_learns_a_weight_per_task():
  with tf.Graph().as_default():
    per_example = {"ctr": tf.constant([0.7, 0.5]), "ctcvr": tf.constant([0.02, 0.04]),
                   "cvr": tf.constant([0.3, 0.1])}
    labels = {"click": tf.constant([1.0, 0.0])}
    plain = heads.total_loss(labels, per_example, resolve_params(_params("esmm")))
    weighted = heads.total_loss(labels, per_example, resolve_params(_params("esmm", uncertainty_weighting=True)))
    log_vars = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES, "uncertainty_weighting")
    grads = tf.gradients(weighted, log_vars)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      plain_v, weighted_v, g = sess.run([plain, weighted, grads])
      sess.run([v.assign(1.0) for v in log_vars])
      shifted = sess.run(weighted)
  assert [v.name for v in log_vars] == ["uncertainty_weighting/log_variance_ctr:0",
                                        "uncertainty_weighting/log_variance_ctcvr:0"]
  # At s = 0 the weighting is the identity; d/ds [exp(-s) L + s/2] = 1/2 - L at s = 0.
  np.testing.assert_allclose(weighted_v, plain_v, rtol=1e-6)
  np.testing.assert_allclose(g, [0.5 - 0.6, 0.5 - 0.03], rtol=1e-5)
  np.testing.assert_allclose(shifted, np.exp(-1) * (0.6 + 0.03) + 2 * 0.5, rtol=1e-5)


def test_params_reject_contradictions():
  with pytest.raises(ValueError, match="separate embeddings"):
    resolve_params(_params("base", share_embeddings=True))
  with pytest.raises(ValueError, match="shares its embeddings"):
    resolve_params(_params("mmoe", share_embeddings=False))
  with pytest.raises(ValueError, match="unknown params"):
    resolve_params(_params("mmoe", experts=3))
  assert resolve_params(_params("esmm_ns"))["share_embeddings"] is False
  with tf.Graph().as_default(), pytest.raises(ValueError, match="mmoe_model_fn builds"):
    mmoe.mmoe_model_fn(_features(), None, tf.estimator.ModeKeys.PREDICT, _params("esmm"))


def test_embedding_optimizer_defaults_and_learning_rate_per_optimizer():
  """The tables default to lazy Adam 1e-3 from a near-zero init; naming another optimizer
  alone gives it its own learning rate (adagrad: 0.05, the defaults before 2026-12-05)."""
  p = resolve_params(_params("esmm"))
  assert (p["embedding_optimizer"], p["embedding_learning_rate"], p["embedding_init_stddev"]) == (
      "lazy_adam", 1e-3, 1e-4)
  assert resolve_params(_params("esmm", embedding_optimizer="adagrad"))["embedding_learning_rate"] == 0.05
  assert resolve_params(_params("esmm", embedding_optimizer="adagrad",
                                embedding_learning_rate=0.2))["embedding_learning_rate"] == 0.2
  assert resolve_params(p) == p       # resolving again (the model_fn does) changes nothing
  with pytest.raises(ValueError, match="embedding_optimizer must be one of"):
    resolve_params(_params("esmm", embedding_optimizer="adadelta"))
  with tf.Graph().as_default():
    tf.compat.v1.set_random_seed(1)
    esmm.esmm_model_fn(_features(), _labels(), tf.estimator.ModeKeys.TRAIN, _params("esmm"))
    tables = tf.compat.v1.get_collection(layers.EMBEDDING_COLLECTION)
    slots = {v.name for v in tf.compat.v1.global_variables() if "/table_" in v.name and v not in tables}
    assert slots == {f"{t.name.split(':')[0]}/{s}:0" for t in tables for s in ("Adam", "Adam_1")}, slots
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      values = np.concatenate([sess.run(t).ravel() for t in tables])
  assert 0.5e-4 < values.std() < 1.2e-4 and np.abs(values).max() <= 2e-4   # truncated at 2 stddev


def _variables():
  return [(v.name, tuple(v.shape.as_list()), v.dtype.base_dtype)
          for v in tf.compat.v1.global_variables()]


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_dense_has_the_variables_of_tf_layers_dense(dtype):
  """Checkpoints written before layers.dense existed (tf.compat.v1.layers.dense) still load."""
  with tf.Graph().as_default():
    with tf.compat.v1.variable_scope("tower"):
      tf.compat.v1.layers.dense(tf.zeros([3, 7]), 4, activation=tf.nn.relu, name="hidden_0")
    want = _variables()
  with tf.Graph().as_default():
    with tf.compat.v1.variable_scope("tower"):
      y = layers.dense(tf.zeros([3, 7]), 4, "hidden_0", tf.nn.relu, dtype)
    assert _variables() == want == [("tower/hidden_0/kernel:0", (7, 4), tf.float32),
                                    ("tower/hidden_0/bias:0", (4,), tf.float32)]
    assert y.dtype == tf.float32 and y.name.startswith("tower/hidden_0/")


def test_bfloat16_dense_rounds_the_matmul_and_keeps_float32_gradients():
  rng = np.random.default_rng(0)
  with tf.Graph().as_default():
    x = tf.constant(rng.normal(size=(64, 33)), tf.float32)
    y32 = layers.dense(x, 9, "a", tf.nn.relu)
    y16 = layers.dense(x, 9, "b", tf.nn.relu, tf.bfloat16)
    a = tf.compat.v1.global_variables("a")
    b = tf.compat.v1.global_variables("b")
    copy = [vb.assign(va) for va, vb in zip(a, b)]
    g32 = tf.gradients(tf.reduce_sum(y32 ** 2), a + [x])
    g16 = tf.gradients(tf.reduce_sum(y16 ** 2), b + [x])
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      sess.run(copy)
      out32, out16, grads32, grads16 = sess.run([y32, y16, g32, g16])
  assert [g.dtype for g in grads16] == [np.float32] * 3
  # The same weights: equal to bfloat16's precision (8 bits of mantissa), but rounded.
  np.testing.assert_allclose(out16, out32, rtol=3e-2, atol=3e-2)
  assert not np.array_equal(out16, out32)
  for g16_, g32_ in zip(grads16, grads32):
    np.testing.assert_allclose(g16_, g32_, rtol=5e-2, atol=5e-2 * np.abs(g32_).max())


def _matmul_dtypes(graph, op_type="MatMul"):
  return sorted({op.get_attr("T").name for op in graph.get_operations() if op.type == op_type})


@pytest.mark.parametrize("model", ["esmm", "mmoe"])
def test_bfloat16_matmuls_only_while_training(model):
  fn = mmoe.mmoe_model_fn if model == "mmoe" else esmm.esmm_model_fn
  params = _params(model, train_matmul_dtype="bfloat16")
  for mode, want in [(tf.estimator.ModeKeys.TRAIN, ["bfloat16"]), (tf.estimator.ModeKeys.EVAL, ["float32"]),
                     (tf.estimator.ModeKeys.PREDICT, ["float32"])]:
    with tf.Graph().as_default() as g:
      tf.compat.v1.train.create_global_step()
      spec = fn(_features(), _labels() if mode != tf.estimator.ModeKeys.PREDICT else None, mode, params)
      # Every MatMul of the graph: the towers' (and experts' and gates'), and in training their
      # gradients' too.
      assert _matmul_dtypes(g) == want, mode
      if mode == tf.estimator.ModeKeys.TRAIN:
        # Only the matmuls: the bias adds and ReLUs (and their gradients) stay float32. With them
        # in bfloat16 too, one-epoch CTCVR AUC fell by about 0.01 (README, "Performance").
        for op_type in ("BiasAdd", "Relu", "ReluGrad", "BiasAddGrad"):
          assert _matmul_dtypes(g, op_type) == ["float32"], op_type
        # The heads, the loss and the optimizers stay float32.
        assert spec.loss.dtype == tf.float32
        assert _matmul_dtypes(g, "Sigmoid") == ["float32"]
        assert all(v.dtype.base_dtype == tf.float32 for v in tf.compat.v1.trainable_variables())
        with tf.compat.v1.Session() as sess:
          sess.run([tf.compat.v1.global_variables_initializer(), tf.compat.v1.local_variables_initializer()])
          before = sess.run(tf.compat.v1.trainable_variables())
          loss, _ = sess.run([spec.loss, spec.train_op])
          after = sess.run(tf.compat.v1.trainable_variables())
        assert np.isfinite(loss)
        assert sum(not np.array_equal(x, y) for x, y in zip(before, after)) > len(before) // 2


def test_bfloat16_training_loss_is_close_to_float32s():
  """The same variables give the same loss to bfloat16 precision (so a checkpoint trained either
  way evaluates and serves the same in float32)."""
  losses = {}
  for dtype in ("float32", "bfloat16"):
    with tf.Graph().as_default():
      tf.compat.v1.set_random_seed(5)
      tf.compat.v1.train.create_global_step()
      spec = esmm.esmm_model_fn(_features(), _labels(), tf.estimator.ModeKeys.TRAIN,
                                _params("esmm", train_matmul_dtype=dtype))
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        losses[dtype] = sess.run(spec.loss)
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


def test_params_reject_an_unknown_matmul_dtype():
  assert resolve_params(_params("esmm"))["train_matmul_dtype"] == "auto"
  with pytest.raises(ValueError, match="train_matmul_dtype must be one of"):
    resolve_params(_params("esmm", train_matmul_dtype="float16"))


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw {extra}
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw {extra}
"""


def test_native_bfloat16_is_read_from_the_cpu_flags():
  assert layers.cpu_has_native_bfloat16(CPUINFO.format(extra="amx_tile amx_bf16 amx_int8"))
  assert layers.cpu_has_native_bfloat16(CPUINFO.format(extra="avx512_bf16 avx512_vnni"))
  assert not layers.cpu_has_native_bfloat16(CPUINFO.format(extra="avx512_vnni amx_int8"))
  # A flag's name elsewhere than on a flags line (or as part of another word) does not count.
  assert not layers.cpu_has_native_bfloat16("model name\t: has avx512_bf16\nflags\t: avx2 xavx512_bf16\n")
  assert not layers.cpu_has_native_bfloat16("")
  # The flags themselves, as the benchmarks' machine line names them (benchmarks/results_io.py).
  assert layers.native_bfloat16_flags(CPUINFO.format(extra="amx_bf16 avx512_bf16")) == ["amx_bf16", "avx512_bf16"]
  assert layers.native_bfloat16_flags(CPUINFO.format(extra="avx512_vnni")) == []


@pytest.mark.parametrize("native", [True, False])
def test_auto_trains_in_bfloat16_only_where_the_hardware_has_it(monkeypatch, native):
  monkeypatch.setattr(layers, "native_bfloat16", lambda: native)
  params = resolve_params(_params("esmm"))          # the default, "auto"
  want = "bfloat16" if native else "float32"
  assert layers.matmul_dtype(params, training=True) == tf.as_dtype(want)
  assert layers.matmul_dtype(params, training=False) == tf.float32
  # Explicit values win over the hardware.
  assert layers.matmul_dtype(dict(params, train_matmul_dtype="float32"), training=True) == tf.float32
  assert layers.matmul_dtype(dict(params, train_matmul_dtype="bfloat16"), training=True) == tf.bfloat16
  with tf.Graph().as_default() as g:
    tf.compat.v1.train.create_global_step()
    esmm.esmm_model_fn(_features(), _labels(), tf.estimator.ModeKeys.TRAIN, params)
    assert _matmul_dtypes(g) == [want]
