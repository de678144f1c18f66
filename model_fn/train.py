"""Training entry point: tf.estimator.train_and_evaluate on a preprocessing output.

  python -m model_fn.train --transform_dir=PREPROCESSED --model_dir=MODEL \
      [--model=esmm|esmm_ns|base|mmoe|mmoe_esmm]

--model picks the network (model_fn/params.py): esmm (the paper's), esmm_ns (no shared
embeddings), base (CVR trained on clicked impressions only), mmoe (experts and gates,
tasks CTR and CTCVR) or mmoe_esmm (MMoE's bottom with ESMM's pCTR x pCVR head).
The input format and the table sizes are read from the preprocessing output; a model
that needs the conversion label stops before training when the output has none.

Resumes from the latest checkpoint in --model_dir: the step budget is a total
(--num_epochs over the train split, or --train_steps), so a restarted run trains only
the remaining steps. At the end it evaluates on the eval split (the paper's protocol,
see model_fn/metrics.py) and exports a SavedModel for TF Serving under MODEL/export/.

On a cluster, every task runs this same command with its TF_CONFIG (see
pipeline/launch_local_cluster.py and the README's "Distributed training"): parameter servers
hold the variables, the chief and the workers train on their shards of the input, an
evaluator evaluates new checkpoints, and the chief exports.
"""

import sys
from typing import Any, Dict

from absl import app, flags

from model_fn import estimator as E
from model_fn import input_fn as I
from model_fn.params import DEFAULT_PARAMS, EMBEDDING_LEARNING_RATES, MATMUL_DTYPES, MODELS
from preprocessing import transform as T

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (only when run as a program, so the module imports as a library)."""
  flags.DEFINE_string("transform_dir", None, "Output dir of pipeline.preprocess.")
  flags.DEFINE_string("model_dir", None, "Checkpoints, eval summaries and exports go here.")
  flags.DEFINE_enum("model", "esmm", list(MODELS),
                    "esmm (the paper's), esmm_ns (no shared embeddings), base (CVR on clicks only), "
                    "mmoe (experts + gates; CTR and CTCVR tasks) or mmoe_esmm (MMoE with ESMM's head).")
  flags.DEFINE_string("share_embeddings", "default",
                      "true|false|default (false for esmm_ns and base, true otherwise).")
  flags.DEFINE_integer("batch_size", 1024, "Examples per step.")
  flags.DEFINE_float("num_epochs", 1.0, "Passes over the train split (ignored if --train_steps > 0).")
  flags.DEFINE_integer("train_steps", 0, "Total training steps (0: derived from --num_epochs).")
  flags.DEFINE_integer("eval_steps", 0, "Eval batches (0: the whole eval split).")
  flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate of the dense layers.")
  flags.DEFINE_float("embedding_learning_rate", None, "Learning rate of the embedding optimizer "
                     f"(default: the optimizer's own, {EMBEDDING_LEARNING_RATES}).")
  flags.DEFINE_enum("embedding_optimizer", DEFAULT_PARAMS["embedding_optimizer"],
                    sorted(EMBEDDING_LEARNING_RATES),
                    "Optimizer of the embedding tables: lazy_adam (Adam on the batch's rows only), "
                    "adagrad (the default before 2026-12-05; updates only the batch's rows too), adam "
                    "(decays every row's moments every step: slow on large tables), ftrl, sgd.")
  flags.DEFINE_integer("embedding_dim", 18, "Embedding size per field.")
  flags.DEFINE_float("embedding_init_stddev", DEFAULT_PARAMS["embedding_init_stddev"],
                     "Standard deviation of the embedding tables' truncated-normal initialiser "
                     "(0.05 was the default before 2026-12-05, with adagrad).")
  flags.DEFINE_list("fields", None, "Fields to embed (default: every field of the transform "
                    "output), e.g. 101,205,206 to train on a subset without preprocessing again.")
  flags.DEFINE_integer("table_rows", 0, "Rows per embedding table (0: each field's hash bucket "
                       "count); fewer rows fold the hashed ids modulo this number.")
  flags.DEFINE_list("ctr_hidden_units", ["360", "200", "80"], "CTR tower layer sizes.")
  flags.DEFINE_list("cvr_hidden_units", ["360", "200", "80"], "CVR tower layer sizes.")
  flags.DEFINE_integer("num_experts", 8, "MMoE: number of experts.")
  flags.DEFINE_list("expert_hidden_units", ["256", "128"], "MMoE: layer sizes of each expert.")
  flags.DEFINE_list("tower_hidden_units", ["128", "64"], "MMoE: layer sizes of each task tower.")
  flags.DEFINE_float("dropout", 0.0, "Dropout rate in the towers (and experts).")
  flags.DEFINE_boolean("uncertainty_weighting", False,
                       "Weight the task losses by learned task uncertainty (Kendall et al. 2018).")
  flags.DEFINE_float("ctr_loss_weight", 1.0, "Weight of the CTR log loss.")
  flags.DEFINE_float("ctcvr_loss_weight", 1.0, "Weight of the CTCVR log loss (esmm).")
  flags.DEFINE_float("cvr_loss_weight", 1.0, "Weight of the clicked-only CVR log loss (base).")
  flags.DEFINE_enum("train_matmul_dtype", "auto", list(MATMUL_DTYPES), "Dtype the dense layers "
                    "compute in while training; bfloat16 is mixed precision (float32 variables and "
                    "optimizer), fast on CPUs with AMX-BF16 or AVX512_BF16 and on GPUs of compute "
                    "capability 8.0+; auto: bfloat16 where this machine has it natively, else "
                    "float32. Eval and export use float32.")
  flags.DEFINE_integer("save_checkpoints_steps", 1000, "Checkpoint every N steps.")
  flags.DEFINE_integer("seed", 42, "Graph-level random seed.")
  flags.DEFINE_integer("embedding_partitions", 0, "Shards per large embedding table (0: one per "
                       "parameter server in TF_CONFIG, 1 on one machine).")
  flags.DEFINE_integer("eval_throttle_secs", 30, "On a cluster: the evaluator's shortest interval "
                       "between two evaluations.")
  flags.DEFINE_boolean("export", True, "Export a SavedModel at the end.")
  flags.DEFINE_enum("train_input", "auto", list(I.TRAIN_INPUTS), "What training reads: the train "
                    "split's column blocks (blocks), its tf.Examples (examples), or the blocks when "
                    "the preprocessing run wrote them (auto).")


def params_from_flags(tft_output, fmt: str) -> Dict[str, Any]:
  share_flag = FLAGS.share_embeddings.lower()
  if share_flag not in ("default", "true", "false"):
    raise ValueError(f"--share_embeddings must be true, false or default, not {FLAGS.share_embeddings!r}")
  share = {"default": None, "true": True, "false": False}[share_flag]
  units = lambda values: [int(u) for u in values]
  return {
      "model": FLAGS.model, "format": fmt,
      "hash_buckets": T.transformed_hash_buckets(tft_output),
      "embedding_dim": FLAGS.embedding_dim, "embedding_init_stddev": FLAGS.embedding_init_stddev,
      "fields": FLAGS.fields, "table_rows": FLAGS.table_rows,
      "ctr_hidden_units": units(FLAGS.ctr_hidden_units),
      "cvr_hidden_units": units(FLAGS.cvr_hidden_units),
      "num_experts": FLAGS.num_experts,
      "expert_hidden_units": units(FLAGS.expert_hidden_units),
      "tower_hidden_units": units(FLAGS.tower_hidden_units),
      "uncertainty_weighting": FLAGS.uncertainty_weighting,
      "dropout": FLAGS.dropout, "share_embeddings": share,
      "learning_rate": FLAGS.learning_rate,
      "embedding_optimizer": FLAGS.embedding_optimizer,
      "embedding_learning_rate": FLAGS.embedding_learning_rate,
      "ctr_loss_weight": FLAGS.ctr_loss_weight, "ctcvr_loss_weight": FLAGS.ctcvr_loss_weight,
      "cvr_loss_weight": FLAGS.cvr_loss_weight,
      "train_matmul_dtype": FLAGS.train_matmul_dtype,
      "embedding_partitions": FLAGS.embedding_partitions,
  }


def main(argv):
  del argv
  if not FLAGS.transform_dir or not FLAGS.model_dir:
    print("error: --transform_dir and --model_dir are required", file=sys.stderr)
    return 2
  try:
    tft_output = I.load_transform_output(FLAGS.transform_dir)
    params = params_from_flags(tft_output, I.transform_format(FLAGS.transform_dir))
    out = E.train_and_evaluate(FLAGS.transform_dir, FLAGS.model_dir, params, FLAGS.batch_size,
                             FLAGS.num_epochs, FLAGS.train_steps, FLAGS.eval_steps, FLAGS.seed,
                             FLAGS.save_checkpoints_steps, FLAGS.export,
                             eval_throttle_secs=FLAGS.eval_throttle_secs, train_input=FLAGS.train_input)
  except (I.IncompleteTransformOutput, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"task {out['task']} done; global step budget {out['train_steps']}")
  if "train_compute_dtype" in out:
    print(f"dense layers trained in {out['train_compute_dtype']} (--train_matmul_dtype={FLAGS.train_matmul_dtype})")
  for k in sorted(out.get("metrics", {})):
    print(f"{k:28s} {out['metrics'][k]:.5f}")
  if "saved_model" in out:
    print(f"saved_model: {out['saved_model']}")
  if out.get("task_steps"):
    print("task steps: " + ", ".join(f"{t} {n}" for t, n in sorted(out["task_steps"].items())))
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
