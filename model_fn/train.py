"""Training entry point: tf.estimator.train_and_evaluate on a preprocessing output.

  python -m model_fn.train --transform_dir=PREPROCESSED --model_dir=MODEL \
      [--model=esmm|esmm_ns|base|escm2_ips|escm2_dr|shared_bottom|mmoe|cgc|ple]

--model picks the network and its objective (model_fn/params.py): esmm (the paper's), esmm_ns
(no shared embeddings), base (CVR trained on clicked impressions only), escm2_ips / escm2_dr
(ESMM with a counterfactual CVR risk), or a multi-task network (shared_bottom, mmoe, cgc, ple)
whose CVR task trains on clicked impressions.
The input format and the table sizes are read from the preprocessing output; a model
that needs the conversion label stops before training when the output has none.

Resumes from the latest checkpoint in --model_dir: the step budget is a total
(--num_epochs over the train split, or --train_steps), so a restarted run trains only
the remaining steps. At the end it evaluates on the eval split (the paper's protocol,
see model_fn/metrics.py) and exports a SavedModel for TF Serving under MODEL/export/.

On a cluster, every task runs this same command with its TF_CONFIG (see
model_fn/launch_local_cluster.py and docs/scaling.md, "Distributed training"): parameter servers
hold the variables, the chief and the workers train on their shards of the input, an
evaluator evaluates new checkpoints, and the chief exports.
"""

import sys
from typing import Any, Dict

from absl import flags

from model_fn import estimator as E
from model_fn import input_fn as I
from model_fn import calibration as C
from model_fn.params import (COUNTERFACTUAL_RISKS, DEFAULT_KEEP_CHECKPOINTS, DEFAULT_MEMORY_LIMIT_GB, DEFAULT_PARAMS, EMBEDDING_LEARNING_RATES, EMBEDDING_UPDATES,
                             HIDDEN_ACTIVATIONS, HIDDEN_NORMS, LEARNING_RATE_SCHEDULES, MATMUL_DTYPES, MODELS,
                             OUTPUT_BIAS_INITS, POOLINGS, RUNTIME_PARAMS, check_params, check_run)
from preprocessing import cli
from preprocessing import transform as T

FLAGS = flags.FLAGS


D = DEFAULT_PARAMS


def _units(values) -> list:
  return [str(u) for u in values]


def define_flags(fv: flags.FlagValues = FLAGS):
  """The command-line flags (only when run as a program, so the module imports as a library),
  defined into ``fv``. Defaults come from model_fn.params.DEFAULT_PARAMS; a None there (the
  model's own value, see MODEL_SPECS) is an empty flag here. Bounds and enums are checked as the
  flags are parsed, the rest by validate_flags (model_fn.params.check_params), before any work."""
  fl = cli.Define(fv)
  fl.DEFINE_string("transform_dir", None, "Output dir of pipeline.preprocess.")
  fl.DEFINE_string("model_dir", None, "Checkpoints, eval summaries and exports go here.")
  fl.DEFINE_enum("model", D["model"], list(MODELS),
                 "esmm (the paper's), esmm_ns (no shared embeddings), base (CVR on clicks only), "
                 "escm2_ips / escm2_dr (ESMM + counterfactual CVR risk), shared_bottom, mmoe, cgc, ple "
                 "(multi-task networks, CVR on clicks); see model_fn/params.py.")
  fl.DEFINE_string("share_embeddings", "default",
                   "true|false|default (false for esmm_ns and base, true otherwise).")
  fl.DEFINE_integer("batch_size", 1024, "Examples per step.", lower_bound=1)
  fl.DEFINE_float("num_epochs", 1.0, "Passes over the train split (ignored if --train_steps > 0).",
                  lower_bound=0.0)
  fl.DEFINE_integer("train_steps", 0, "Total training steps (0: derived from --num_epochs).",
                    lower_bound=0)
  fl.DEFINE_integer("eval_steps", 0, "Eval batches (0: the whole eval split).", lower_bound=0)
  fl.DEFINE_float("learning_rate", D["learning_rate"], "Adam learning rate of the dense layers.")
  fl.DEFINE_enum("learning_rate_schedule", D["learning_rate_schedule"], list(LEARNING_RATE_SCHEDULES),
                 "constant, or warmup_linear_decay: a linear rise over --warmup_steps, then a linear "
                 "fall to 0 at the last step (both learning rates).")
  fl.DEFINE_integer("warmup_steps", D["warmup_steps"], "Warm-up steps of warmup_linear_decay.",
                    lower_bound=0)
  fl.DEFINE_enum("output_bias_init", D["output_bias_init"], list(OUTPUT_BIAS_INITS),
                 "base_rate: each tower's output bias starts at the logit of its base rate in the train "
                 "split (pCTR the click rate, pCVR the conversion rate on clicks); zero: at 0.")
  fl.DEFINE_float("dense_ema_decay", D["dense_ema_decay"], "Evaluate and serve an exponential moving "
                  "average of the dense layers' weights with this decay (0: the weights themselves).")
  fl.DEFINE_float("embedding_learning_rate", D["embedding_learning_rate"], "Learning rate of the "
                  f"embedding optimizer (default: the optimizer's own, {EMBEDDING_LEARNING_RATES}).")
  fl.DEFINE_enum("embedding_optimizer", D["embedding_optimizer"], sorted(EMBEDDING_LEARNING_RATES),
                 "Optimizer of the embedding tables: lazy_adam (Adam on the batch's rows only), "
                 "adagrad (updates only the batch's rows too), adam (decays every row's moments "
                 "every step: slow on large tables), ftrl, sgd.")
  fl.DEFINE_enum("embedding_update", D["embedding_update"], list(EMBEDDING_UPDATES),
                 "joint: one table optimizer for the whole objective; per_loss: one per loss term, "
                 "so each task's steps on shared tables are scaled by its own gradients.")
  fl.DEFINE_integer("embedding_dim", D["embedding_dim"], "Embedding size per field.",
                    lower_bound=1)
  fl.DEFINE_float("embedding_init_stddev", D["embedding_init_stddev"],
                  "Standard deviation of the embedding tables' truncated-normal initialiser.")
  fl.DEFINE_enum("pooling", D["pooling"], list(POOLINGS), "How a field's values (and weights) are "
                 "pooled: weighted sum, weighted mean, or sum over the root of the summed squared weights.")
  fl.DEFINE_list("fields", D["fields"], "Fields to embed (default: every field of the transform "
                 "output), e.g. 101,205,206 to train on a subset without preprocessing again.")
  fl.DEFINE_integer("table_rows", D["table_rows"], "Rows per embedding table (0: each field's hash "
                    "bucket count); fewer rows fold the hashed ids modulo this number.", lower_bound=0)
  fl.DEFINE_float("table_rows_per_id", D["table_rows_per_id"], "Size each table to the next power of "
                  "two >= the field's distinct ids in the train split times this, at most its hash buckets "
                  "(0: the hash buckets, capped by --table_rows). A resumed or warm-started model keeps "
                  "its tables' rows.", lower_bound=0.0)
  fl.DEFINE_float("memory_limit_gb", DEFAULT_MEMORY_LIMIT_GB, "Refuse to train when the estimated peak "
                  "memory (model_fn/memory.py) exceeds this many GiB (0: MemAvailable, or the cgroup's "
                  "limit if lower).", lower_bound=0.0)
  fl.DEFINE_list("ctr_hidden_units", _units(D["ctr_hidden_units"]), "CTR tower layer sizes (two-tower models).")
  fl.DEFINE_list("cvr_hidden_units", _units(D["cvr_hidden_units"]), "CVR tower layer sizes (two-tower models).")
  fl.DEFINE_integer("num_experts", D["num_experts"], "mmoe: number of experts.", lower_bound=1)
  fl.DEFINE_integer("num_task_experts", D["num_task_experts"], "cgc/ple: experts per task and level.",
                    lower_bound=1)
  fl.DEFINE_integer("num_shared_experts", D["num_shared_experts"], "cgc/ple: shared experts per level.",
                    lower_bound=0)
  fl.DEFINE_integer("ple_levels", D["ple_levels"], "ple: levels (default 2; cgc is 1).",
                    lower_bound=1)
  fl.DEFINE_list("expert_hidden_units", _units(D["expert_hidden_units"]),
                 "Multi-task networks: layer sizes of each expert (and of Shared-Bottom's bottom).")
  fl.DEFINE_list("tower_hidden_units", _units(D["tower_hidden_units"]),
                 "Multi-task networks: layer sizes of each task tower.")
  fl.DEFINE_float("dropout", D["dropout"], "Dropout rate in the towers (and experts).")
  fl.DEFINE_enum("hidden_activation", D["hidden_activation"], list(HIDDEN_ACTIVATIONS),
                 "Activation of every hidden layer of the towers and experts.")
  fl.DEFINE_enum("hidden_norm", D["hidden_norm"], list(HIDDEN_NORMS), "layer: LayerNorm on every hidden "
                 "layer's pre-activations (towers and experts); none: the layer's bias only.")
  fl.DEFINE_boolean("uncertainty_weighting", D["uncertainty_weighting"],
                    "Weight the task losses by learned task uncertainty (Kendall et al. 2018).")
  fl.DEFINE_float("ctr_loss_weight", D["ctr_loss_weight"], "Weight of the CTR log loss.")
  fl.DEFINE_float("ctcvr_loss_weight", D["ctcvr_loss_weight"],
                  "Weight of the CTCVR log loss over all impressions (default: the model's).")
  fl.DEFINE_float("cvr_loss_weight", D["cvr_loss_weight"],
                  "Weight of the CVR log loss over clicked impressions (default: the model's).")
  fl.DEFINE_enum("counterfactual", D["counterfactual"], [r for r in COUNTERFACTUAL_RISKS if r],
                 "Add ESCM2's counterfactual CVR risk, ips or dr (default: the model's; escm2_*).")
  fl.DEFINE_float("counterfactual_loss_weight", D["counterfactual_loss_weight"],
                  "Weight of the counterfactual CVR risk.")
  fl.DEFINE_float("propensity_floor", D["propensity_floor"],
                  "The smallest pCTR an IPS weight divides by.")
  fl.DEFINE_enum("calibration", C.DEFAULT_METHOD, list(C.METHODS),
                 "Calibration of pCTR and pCVR built into the evaluation and the SavedModel "
                 "(model_fn/calibration.py): bias refits each output bias on the train split after "
                 "training; platt and isotonic are fitted on a held-out slice of it; none keeps the "
                 "towers' own values.")
  fl.DEFINE_float("calibration_holdout", None, "Share of the train split held out (not trained on) "
                  f"to fit --calibration on; 0: the whole train split after training (default: "
                  f"{C.DEFAULT_HOLDOUT}).")
  fl.DEFINE_enum("train_matmul_dtype", RUNTIME_PARAMS["train_matmul_dtype"], list(MATMUL_DTYPES),
                 "Dtype the dense layers compute in while training; bfloat16 is mixed precision "
                 "(float32 variables and optimizer), fast on CPUs with AMX-BF16 or AVX512_BF16 and "
                 "on GPUs of compute capability 8.0+; auto: bfloat16 where this machine has it "
                 "natively, else float32. Eval and export use float32.")
  fl.DEFINE_integer("save_checkpoints_steps", 1000, "Checkpoint every N steps.", lower_bound=1)
  fl.DEFINE_integer("keep_checkpoints", DEFAULT_KEEP_CHECKPOINTS, "Checkpoints the model dir keeps (the "
                    "newest); a run whose checkpoints and SavedModel will not fit the free disk is "
                    "refused before it starts.", lower_bound=1)
  fl.DEFINE_integer("seed", 42, "Graph-level random seed; also the order of the training data.")
  fl.DEFINE_integer("embedding_partitions", RUNTIME_PARAMS["embedding_partitions"], "Shards per large "
                    "embedding table (0: one per parameter server in TF_CONFIG, 1 on one machine).",
                    lower_bound=0)
  fl.DEFINE_integer("eval_throttle_secs", 30, "On a cluster: the evaluator's shortest interval "
                    "between two evaluations.", lower_bound=0)
  fl.DEFINE_boolean("export", True, "Export a SavedModel at the end.")
  fl.DEFINE_enum("train_input", "auto", list(I.TRAIN_INPUTS), "What training reads: the train "
                 "split's column blocks (blocks), its tf.Examples (examples), or the blocks when "
                 "the preprocessing run wrote them (auto).")


# Flags that are model params under the same name.
PARAM_FLAGS = ("model", "embedding_dim", "embedding_update", "embedding_init_stddev", "pooling", "fields",
               "table_rows", "table_rows_per_id", "num_experts", "num_task_experts", "num_shared_experts", "ple_levels",
               "uncertainty_weighting", "dropout", "hidden_activation", "hidden_norm", "learning_rate",
               "learning_rate_schedule", "warmup_steps",
               "dense_ema_decay", "output_bias_init", "embedding_optimizer", "embedding_learning_rate",
               "ctr_loss_weight", "ctcvr_loss_weight", "cvr_loss_weight", "counterfactual",
               "counterfactual_loss_weight", "propensity_floor", "train_matmul_dtype", "embedding_partitions")
UNIT_FLAGS = ("ctr_hidden_units", "cvr_hidden_units", "expert_hidden_units", "tower_hidden_units")


def _flag_params(fv: flags.FlagValues) -> Dict[str, Any]:
  """The model params the flags give (without the transform output's format and schema)."""
  share_flag = fv["share_embeddings"].value.lower()
  if share_flag not in ("default", "true", "false"):
    raise ValueError(f"--share_embeddings must be true, false or default, not {fv['share_embeddings'].value!r}")
  params = {name: fv[name].value for name in PARAM_FLAGS}
  for name in UNIT_FLAGS:
    try:
      params[name] = [int(u) for u in fv[name].value]
    except ValueError:
      raise ValueError(f"--{name} must be a comma-separated list of integers, got {fv[name].value}") from None
  params["share_embeddings"] = {"default": None, "true": True, "false": False}[share_flag]
  return params


def params_from_flags(tft_output, fmt: str, fv: flags.FlagValues = FLAGS) -> Dict[str, Any]:
  return dict(_flag_params(fv), format=fmt, hash_buckets=T.transformed_hash_buckets(tft_output))


def validate_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Every flag together, before anything is read or written (run by the flags parser,
  preprocessing/cli.py): the model params as model_fn.params.check_params checks them (the same
  check orchestration.daily runs), the run's numbers as check_run, and the calibration's."""
  cli.require(fv, "transform_dir", "model_dir")
  try:
    check_params(_flag_params(fv))
    check_run(fv["batch_size"].value, fv["num_epochs"].value, fv["train_steps"].value, fv["eval_steps"].value)
    C.holdout_fraction(fv["calibration"].value, fv["calibration_holdout"].value)
  except (TypeError, ValueError) as e:
    raise cli.UsageError(str(e)) from None


def main(argv):
  del argv
  try:
    tft_output = I.load_transform_output(FLAGS.transform_dir)
    params = params_from_flags(tft_output, I.transform_format(FLAGS.transform_dir))
    out = E.train_and_evaluate(FLAGS.transform_dir, FLAGS.model_dir, params, FLAGS.batch_size,
                             FLAGS.num_epochs, FLAGS.train_steps, FLAGS.eval_steps, FLAGS.seed,
                             FLAGS.save_checkpoints_steps, FLAGS.export,
                             eval_throttle_secs=FLAGS.eval_throttle_secs, train_input=FLAGS.train_input,
                             calibration=FLAGS.calibration, calibration_holdout=FLAGS.calibration_holdout,
                             memory_limit_gb=FLAGS.memory_limit_gb, keep_checkpoints=FLAGS.keep_checkpoints)
  except (I.IncompleteTransformOutput, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return cli.EXIT_USAGE
  print(f"task {out['task']} done; global step budget {out['train_steps']}")
  if "train_compute_dtype" in out:
    print(f"dense layers trained in {out['train_compute_dtype']} (--train_matmul_dtype={FLAGS.train_matmul_dtype})")
  for k in sorted(out.get("metrics", {})):
    value = out["metrics"][k]
    print(f"{k:28s} {'undefined (null in train_result.json)' if value is None else f'{value:.5f}'}")
  if "saved_model" in out:
    print(f"saved_model: {out['saved_model']}")
  if out.get("task_steps"):
    print("task steps: " + ", ".join(f"{t} {n}" for t, n in sorted(out["task_steps"].items())))
  return 0


if __name__ == "__main__":
  cli.run(main, define_flags, validate_flags)
