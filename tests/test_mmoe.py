"""Multi-task networks (MMoE, CGC/PLE, Shared-Bottom): layer shapes and gate softmax, independent
experts, the model_fn's heads and loss, and uncertainty weighting; the dense layers of every
model_fn and their mixed precision (train_matmul_dtype: bfloat16 matmuls while training, float32
variables, float32 eval and serving) -- on small graphs built here."""

import numpy as np
import pytest
import tensorflow as tf

from model_fn import esmm, hardware, heads, layers, mmoe
from model_fn.params import resolve_params

from graph_inputs import BATCH, feature_batch, label_batch, model_params

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
    experts = [tf.compat.v1.get_default_graph().get_tensor_by_name(f"mmoe/expert_{e}/hidden_0/LeakyRelu:0")
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


GATE_WIDTH = {"mmoe": 3, "cgc": 4, "ple": 4}     # num_experts; num_task_experts + num_shared_experts


@pytest.mark.parametrize("model", ["shared_bottom", "mmoe", "cgc", "ple"])
def test_multi_task_model_fn_predictions(model):
  with tf.Graph().as_default():
    spec = mmoe.mmoe_model_fn(feature_batch(), None, tf.estimator.ModeKeys.PREDICT, model_params(model))
    p = _run(spec.predictions)
    assert set(spec.export_outputs) == {"serving_default", "regression", "predict"}
  for k in ("ctr", "cvr", "ctcvr"):
    assert p[k].shape == (BATCH,) and np.all((p[k] > 0) & (p[k] < 1)), k
  np.testing.assert_allclose(p["ctcvr"], p["ctr"] * p["cvr"], rtol=1e-5)
  gates = sorted(k for k in p if k.startswith("gate_"))
  assert gates == ([] if model == "shared_bottom" else ["gate_ctr", "gate_cvr"])
  for key in gates:
    assert p[key].shape == (BATCH, GATE_WIDTH[model])
    np.testing.assert_allclose(p[key].sum(axis=1), 1.0, rtol=1e-6)


def test_ple_levels_have_their_own_experts_and_shared_gates():
  with tf.Graph().as_default():
    x = tf.constant(np.random.default_rng(0).normal(size=(BATCH, 7)), tf.float32)
    out, gates = layers.ple(x, ("ctr", "cvr"), levels=2, task_experts=2, shared_experts=1, expert_units=[5])
    names = {v.name.split(":")[0] for v in tf.compat.v1.trainable_variables()}
    o = _run({"out": out, "gates": gates})
  for level in (0, 1):
    for e in ("ctr_0", "ctr_1", "cvr_0", "cvr_1", "shared_0"):
      assert f"ple/level_{level}/expert_{e}/hidden_0/kernel" in names
  # The shared gate mixes every expert of a level into the next; the last level has none.
  assert "ple/level_0/gate_shared/kernel" in names and "ple/level_1/gate_shared/kernel" not in names
  for task in ("ctr", "cvr"):
    assert o["out"][task].shape == (BATCH, 5) and o["gates"][task].shape == (BATCH, 3)
  assert not np.allclose(o["out"]["ctr"], o["out"]["cvr"])


def _log_loss(t, q):
  return -(t * np.log(q) + (1 - t) * np.log(1 - q))


@pytest.mark.parametrize("model", ["mmoe", "ple", "shared_bottom", "esmm", "base"])
def test_training_loss_is_the_models_weighted_task_losses(model):
  """The TRAIN loss equals the numpy sum of the model's task losses on the same graph's heads:
  CTR over all impressions and CVR over clicked impressions, plus for ESMM CTCVR over all."""
  fn = mmoe.mmoe_model_fn if model not in ("esmm", "base") else esmm.esmm_model_fn
  with tf.Graph().as_default():
    feats, labels = feature_batch(), label_batch()
    tf.compat.v1.set_random_seed(5)
    train = fn(feats, labels, tf.estimator.ModeKeys.TRAIN, model_params(model))
    with tf.compat.v1.variable_scope(tf.compat.v1.get_variable_scope(), reuse=True):
      pred = fn(feats, None, tf.estimator.ModeKeys.PREDICT, model_params(model))
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      loss, p, y = sess.run([train.loss, pred.predictions, labels])
  clicked = y["click"] > 0
  want = np.mean(_log_loss(y["click"], p["ctr"])) + np.mean(_log_loss(y["conversion"][clicked], p["cvr"][clicked]))
  if model == "esmm":
    want += np.mean(_log_loss(y["ctcvr"], p["ctcvr"]))
  np.testing.assert_allclose(loss, want, rtol=1e-4)


def test_mmoe_eval_reports_gate_utilisation_and_the_protocol_metrics():
  with tf.Graph().as_default():
    spec = mmoe.mmoe_model_fn(feature_batch(), label_batch(), tf.estimator.ModeKeys.EVAL, model_params("mmoe"))
    values = {k: v[0] for k, v in spec.eval_metric_ops.items()}
    updates = [v[1] for v in spec.eval_metric_ops.values()]
    with tf.compat.v1.Session() as sess:
      sess.run([tf.compat.v1.global_variables_initializer(), tf.compat.v1.local_variables_initializer()])
      sess.run(updates)
      m = sess.run(values)
  for task in ("ctr", "cvr"):
    weights = [m[f"gate/{task}/expert_{e}"] for e in range(3)]
    assert abs(sum(weights) - 1) < 1e-5
  for key in ("auc/ctr", "auc/ctcvr", "auc/cvr_clicked", "calibration/cvr_clicked", "log_loss/ctcvr"):
    assert key in m


def test_uncertainty_weighting_learns_a_weight_per_task():
  with tf.Graph().as_default():
    per_example = {"ctr": tf.constant([0.7, 0.5]), "ctcvr": tf.constant([0.02, 0.04]),
                   "cvr": tf.constant([0.3, 0.1])}
    labels = {"click": tf.constant([1.0, 0.0])}
    plain = heads.total_loss(labels, {}, per_example, resolve_params(model_params("esmm", cvr_loss_weight=0)))
    weighted = heads.total_loss(labels, {}, per_example, resolve_params(
        model_params("esmm", cvr_loss_weight=0, uncertainty_weighting=True)))
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
  with pytest.raises(ValueError, match="separates its embeddings by definition"):
    resolve_params(model_params("base", share_embeddings=True))
  with pytest.raises(ValueError, match="shares its embeddings by definition"):
    resolve_params(model_params("mmoe", share_embeddings=False))
  with pytest.raises(ValueError, match="pCVR has no loss"):
    resolve_params(model_params("mmoe", cvr_loss_weight=0))
  with pytest.raises(ValueError, match="cgc is one level"):
    resolve_params(model_params("cgc", ple_levels=2))
  with pytest.raises(ValueError, match="model must be one of"):
    resolve_params(model_params("mmoe_esmm"))
  assert resolve_params(model_params("esmm", share_embeddings=False))["share_embeddings"] is False
  with pytest.raises(ValueError, match="unknown params"):
    resolve_params(model_params("mmoe", experts=3))
  assert resolve_params(model_params("esmm_ns"))["share_embeddings"] is False
  with tf.Graph().as_default(), pytest.raises(ValueError, match="mmoe_model_fn builds"):
    mmoe.mmoe_model_fn(feature_batch(), None, tf.estimator.ModeKeys.PREDICT, model_params("esmm"))


def test_embedding_optimizer_defaults_and_learning_rate_per_optimizer():
  """The tables default to lazy Adam 1e-3 from a near-zero init; naming another optimizer
  alone gives it its own learning rate (adagrad: 0.05)."""
  p = resolve_params(model_params("esmm"))
  assert (p["embedding_optimizer"], p["embedding_learning_rate"], p["embedding_init_stddev"]) == (
      "lazy_adam", 1e-3, 1e-4)
  assert resolve_params(model_params("esmm", embedding_optimizer="adagrad"))["embedding_learning_rate"] == 0.05
  assert resolve_params(model_params("esmm", embedding_optimizer="adagrad",
                                embedding_learning_rate=0.2))["embedding_learning_rate"] == 0.2
  assert resolve_params(p) == p       # resolving again (the model_fn does) changes nothing
  with pytest.raises(ValueError, match="embedding_optimizer must be one of"):
    resolve_params(model_params("esmm", embedding_optimizer="adadelta"))
  with tf.Graph().as_default():
    tf.compat.v1.set_random_seed(1)
    esmm.esmm_model_fn(feature_batch(), label_batch(), tf.estimator.ModeKeys.TRAIN, model_params("esmm"))
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


def test_layer_norm_hidden_layers_normalise_each_impression_s_pre_activations():
  rng = np.random.default_rng(0)
  with tf.Graph().as_default() as g:
    x = tf.constant(rng.normal(size=(16, 7)) * 50, tf.float32)
    y = layers.mlp(x, [6, 5], "mlp", activation="relu", norm="layer")
    variables = {v.name: v for v in tf.compat.v1.global_variables()}
    names = list(variables)
    first = g.get_tensor_by_name("mlp/hidden_0/Relu:0")
    kernel, bias = variables["mlp/hidden_1/kernel:0"], variables["mlp/hidden_1/bias:0"]
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      out, h, k, b = session.run([y, first, kernel, bias])
  assert "mlp/hidden_0/layer_norm/gamma:0" in names and "mlp/hidden_1/layer_norm/beta:0" in names
  pre = h @ k + b
  normed = (pre - pre.mean(axis=1, keepdims=True)) / np.sqrt(pre.var(axis=1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out, np.maximum(normed, 0), rtol=1e-4, atol=1e-5)   # gain 1, shift 0 at the start
  assert (out > 0).any(axis=1).all()     # no impression has every unit at zero


def test_leaky_relu_hidden_layers_pass_a_share_of_negative_pre_activations():
  with tf.Graph().as_default():
    x = tf.constant(np.random.default_rng(1).normal(size=(32, 4)), tf.float32)
    y = layers.mlp(x, [3], "mlp", activation="leaky_relu")
    kernel, bias = tf.compat.v1.global_variables()
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      out, pre = session.run([y, tf.matmul(x, kernel) + bias])
  assert (pre < 0).any()
  np.testing.assert_allclose(out, np.where(pre > 0, pre, layers.LEAKY_SLOPE * pre), rtol=1e-6)


@pytest.mark.parametrize("key,value", [("hidden_activation", "tanh"), ("hidden_norm", "batch")])
def test_params_reject_an_unknown_hidden_layer(key, value):
  with pytest.raises(ValueError, match=f"{key} must be one of"):
    resolve_params(model_params("esmm", **{key: value}))


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


def test_padded_rows_are_a_few_shapes_at_most_an_eighth_larger():
  rows = list(range(1, 70)) + [127, 128, 129, 1000, 1024, 1041, 1500, 2049, 65537, 2**31 - 1]
  with tf.Graph().as_default():
    r = tf.compat.v1.placeholder(tf.int32, [])
    padded = layers.padded_rows(r)
    with tf.compat.v1.Session() as sess:
      got = {n: int(sess.run(padded, {r: n})) for n in rows}
  assert all(got[n] == n for n in range(1, 65))
  assert got[65] == got[69] == 72 and got[128] == 128 and got[129] == 144
  assert (got[1000], got[1024], got[1041], got[1500], got[2049]) == (1024, 1024, 1152, 1536, 2304)
  assert got[2**31 - 1] == 2**31 - 1
  assert all(n <= got[n] <= n + n // 8 for n in rows)
  # Grouped batches of 700 to 1,536 impressions meet 10 shapes.
  assert len({p for p in layers.PAD_ROWS if 700 <= p <= 1536}) == 10


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_padded_matmuls_give_the_unpadded_outputs_and_gradients(monkeypatch, dtype):
  """Where oneDNN runs the matmuls, dense pads their rows to padded_rows and drops the padding
  again: the outputs and every gradient are those of the plain matmul."""
  x_value = np.random.default_rng(0).normal(size=(77, 33)).astype(np.float32)
  outputs = {}
  for pad in (False, True):
    monkeypatch.setattr(layers.hardware, "onednn", lambda pad=pad: pad)
    with tf.Graph().as_default() as graph:
      tf.compat.v1.set_random_seed(3)
      x = tf.constant(x_value)
      y = layers.dense(layers.dense(x, 9, "a", tf.nn.relu, dtype), 5, "b", None, dtype)
      grads = tf.gradients(tf.reduce_sum(y ** 2), tf.compat.v1.trainable_variables() + [x])
      pads = [op for op in graph.get_operations() if op.type in ("Pad", "PadV2")]
      assert len(pads) == (2 if pad else 0)
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        outputs[pad] = sess.run([y] + grads)
  assert outputs[True][0].shape == (77, 5)
  for padded, plain in zip(outputs[True], outputs[False]):
    np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-6)


def _matmul_dtypes(graph, op_type="MatMul"):
  return sorted({op.get_attr("T").name for op in graph.get_operations() if op.type == op_type})


@pytest.mark.parametrize("model", ["esmm", "mmoe", "ple"])
def test_bfloat16_matmuls_only_while_training(model):
  fn = mmoe.mmoe_model_fn if model != "esmm" else esmm.esmm_model_fn
  params = model_params(model, train_matmul_dtype="bfloat16")
  for mode, want in [(tf.estimator.ModeKeys.TRAIN, ["bfloat16"]), (tf.estimator.ModeKeys.EVAL, ["float32"]),
                     (tf.estimator.ModeKeys.PREDICT, ["float32"])]:
    with tf.Graph().as_default() as g:
      tf.compat.v1.train.create_global_step()
      spec = fn(feature_batch(), label_batch() if mode != tf.estimator.ModeKeys.PREDICT else None, mode, params)
      # Every MatMul of the graph: the towers' (and experts' and gates'), and in training their
      # gradients' too.
      assert _matmul_dtypes(g) == want, mode
      if mode == tf.estimator.ModeKeys.TRAIN:
        # Only the matmuls: the bias adds and activations (and their gradients) stay float32 (with
        # them in bfloat16 too: benchmarks/results/peer_throughput_bf16_activations.md).
        for op_type in ("BiasAdd", "LeakyRelu", "LeakyReluGrad", "BiasAddGrad"):
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
      spec = esmm.esmm_model_fn(feature_batch(), label_batch(), tf.estimator.ModeKeys.TRAIN,
                                model_params("esmm", train_matmul_dtype=dtype))
      with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        losses[dtype] = sess.run(spec.loss)
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


def test_params_reject_an_unknown_matmul_dtype():
  assert resolve_params(model_params("esmm"))["train_matmul_dtype"] == "auto"
  with pytest.raises(ValueError, match="train_matmul_dtype must be one of"):
    resolve_params(model_params("esmm", train_matmul_dtype="float16"))


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw {extra}
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw {extra}
"""


def test_native_bfloat16_is_read_from_the_cpu_flags():
  assert hardware.cpu_has_native_bfloat16(CPUINFO.format(extra="amx_tile amx_bf16 amx_int8"))
  assert hardware.cpu_has_native_bfloat16(CPUINFO.format(extra="avx512_bf16 avx512_vnni"))
  assert not hardware.cpu_has_native_bfloat16(CPUINFO.format(extra="avx512_vnni amx_int8"))
  # A flag's name elsewhere than on a flags line (or as part of another word) does not count.
  assert not hardware.cpu_has_native_bfloat16("model name\t: has avx512_bf16\nflags\t: avx2 xavx512_bf16\n")
  assert not hardware.cpu_has_native_bfloat16("")
  # The flags themselves, as the benchmarks' machine line names them (benchmarks/results_io.py).
  assert hardware.native_bfloat16_flags(CPUINFO.format(extra="amx_bf16 avx512_bf16")) == ["amx_bf16", "avx512_bf16"]
  assert hardware.native_bfloat16_flags(CPUINFO.format(extra="avx512_vnni")) == []


@pytest.mark.parametrize("native", [True, False])
def test_auto_trains_in_bfloat16_only_where_the_hardware_has_it(monkeypatch, native):
  monkeypatch.setattr(hardware, "native_bfloat16", lambda: native)
  params = resolve_params(model_params("esmm"))          # the default, "auto"
  want = "bfloat16" if native else "float32"
  assert layers.matmul_dtype(params, training=True) == tf.as_dtype(want)
  assert layers.matmul_dtype(params, training=False) == tf.float32
  # Explicit values win over the hardware.
  assert layers.matmul_dtype(dict(params, train_matmul_dtype="float32"), training=True) == tf.float32
  assert layers.matmul_dtype(dict(params, train_matmul_dtype="bfloat16"), training=True) == tf.bfloat16
  with tf.Graph().as_default() as g:
    tf.compat.v1.train.create_global_step()
    esmm.esmm_model_fn(feature_batch(), label_batch(), tf.estimator.ModeKeys.TRAIN, params)
    assert _matmul_dtypes(g) == [want]


@pytest.mark.parametrize("model,norm", [("esmm", "none"), ("esmm", "layer"), ("base", "layer"),
                                        ("shared_bottom", "layer")])
def test_the_memory_estimate_counts_every_dense_weight(model, norm):
  from model_fn import memory
  p = resolve_params(model_params(model, hidden_norm=norm))
  with tf.Graph().as_default():
    (esmm.esmm_model_fn if model in esmm.ESMM_MODELS else mmoe.mmoe_model_fn)(
        feature_batch(), None, tf.estimator.ModeKeys.PREDICT, p)
    dense = sum(int(np.prod(v.shape)) for v in tf.compat.v1.trainable_variables() if "/table_" not in v.name)
  assert memory.dense_weights(p) == dense
