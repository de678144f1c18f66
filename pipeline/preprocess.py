"""Beam + TensorFlow Transform job: raw logs -> hashed gzip TFRecords + transform_fn.

  python -m pipeline.preprocess --format=aliccp --input_dir=RAW --output_dir=OUT \
      [--max_hash_buckets=N] [--partitions=K --parallel_partitions=J]
      [Beam options: --runner=... --direct_num_workers=2 ...]
  python -m pipeline.preprocess --format=avazu --input_dir=RAW --output_dir=OUT \
      [--crosses=app_id:device_id,site_id:device_id] [--train_files=P,... --eval_files=P,...]

Ali-CCP: reads the train and test splits (``sample_skeleton_{train,test}.csv`` and
``common_features_{train,test}.csv`` under --input_dir, or explicit file patterns) and
joins them on common_feature_index.

Avazu-style CSV: reads the train split from ``train``, ``train.gz``, ``train*.csv`` and
``train*.csv.gz`` under --input_dir (the public release's names, and day partitions such
as ``train_20141021.csv``), the eval split likewise from ``test*``; --train_files and
--eval_files (comma-separated patterns) override them. Columns are read by the header's
names; the launcher reads every file's header first: all files of a run must agree on
whether they have a ``conversion`` column (without one the output has ``click`` only,
no ``conversion`` nor ``ctcvr``). --crosses lists the feature crosses hashed in TFT.

Then the TFT ``preprocessing_fn`` hashes every categorical field and the job writes:

  OUT/train/part-*.tfrecord.gz, OUT/eval/part-*.tfrecord.gz   transformed tf.Examples
      (train: not with --notrain_examples)
  OUT/train_blocks/part-*.tfrecord.gz   the train split again as column blocks of
      --train_block_rows rows, in a random order over the split (what training reads;
      pipeline.encode.EncodeBlocks, ShuffleBlocks)
  OUT/transform_fn/, OUT/transformed_metadata/                the TFT graph and schema
  OUT/dead_letter/{train,eval}-*.jsonl                        rows set aside, with reasons
  OUT/reconciliation.json                                     written last: marks the output complete
      (format, inputs, labels, crosses, max_hash_buckets, per split the rows read =
      written + set aside per reason, and the train blocks' rows, which must equal the train
      split's rows written; with --notrain_examples the blocks are the train split's rows
      written)

The job writes into OUT.staging-<pid>@<host>-<id> and renames it to OUT only when it has
finished, every row is accounted for, every split has rows written (an empty split, e.g.
0-byte test files, is an error), no split set aside more than --max_dead_letter_fraction of
its rows, and the staged output holds every file and dir listed above; so a killed run never
leaves a partial OUT (the next run removes its staging dir), and --overwrite keeps the
previous OUT until the new one is complete (a run killed while replacing it leaves it as
OUT.replaced-*, which the next run renames back before anything else). A run holds the lock
file OUT.lock until it has published: a second run of the same OUT is refused, naming the
first one's pid (local paths only; on gs:// nothing keeps two runs of one OUT apart, see
pipeline/publish.py). Rows sharing
a sample id are resolved (identical copies: one kept; differing copies: all set aside).
The first line of the inputs is checked against --format before anything runs.

Any flag this module does not define is handed to Beam untouched, so the same job runs
on DirectRunner, Dataflow, Flink or Spark; an argument that is neither this module's flag nor
an option Beam's PipelineOptions know (a misspelling) is refused before anything runs, naming
the closest known flag (preprocessing/cli.py). On the DirectRunner, which holds its shuffles in
memory, --partitions=K runs an Ali-CCP job as K pipelines by common_feature_index, each in its
own process (--parallel_partitions at a time), writing the output the whole job would
(pipeline/partition.py).
"""

import collections
import json
import multiprocessing
import os
import sys
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from typing import Dict, List, Mapping, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
import tensorflow as tf
import tensorflow_transform.beam as tft_beam
from absl import flags
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline import encode, formats, partition, processes, publish, tfrecords
from pipeline import reconciliation as R
from pipeline import distinct_ids
from pipeline.reconciliation import BadOutput, format_reconciliation
from pipeline.sources import avazu
from pipeline.sources.deadletter import DEAD
from preprocessing import cli
from preprocessing import features as F
from preprocessing import transform as T

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS):
  """The command-line flags (only when run as a program, so the module imports as a library),
  defined into ``fv``; validate_flags checks them together."""
  d = cli.Define(fv)
  d.DEFINE_enum("format", "aliccp", sorted(F.FORMATS), "Raw input format.")
  d.DEFINE_string("input_dir", None, "Directory with the raw files under their release names.")
  d.DEFINE_string("train_skeleton", None, "File pattern of train skeleton rows (overrides --input_dir).")
  d.DEFINE_string("train_common", None, "File pattern of train common-features rows.")
  d.DEFINE_string("eval_skeleton", None, "File pattern of eval skeleton rows.")
  d.DEFINE_string("eval_common", None, "File pattern of eval common-features rows.")
  d.DEFINE_list("train_files", None,
                "Avazu: comma-separated file patterns of the train split (overrides --input_dir).")
  d.DEFINE_list("eval_files", None,
                "Avazu: comma-separated file patterns of the eval split (overrides --input_dir).")
  d.DEFINE_list("crosses", None,
                "Feature crosses hashed in TFT, as a:b field pairs (each becomes the field "
                "a_x_b). Default: the format's (avazu: " + ",".join(F.DEFAULT_CROSSES["avazu"])
                + "; aliccp: none); an empty value makes none.")
  d.DEFINE_string("output_dir", None, "Where to write TFRecords, transform_fn and dead letters.")
  d.DEFINE_integer("max_hash_buckets", 0,
                   "Cap on every field's hash bucket count (0: the schema's sizes for the full data).",
                   lower_bound=0)
  d.DEFINE_integer("num_shards", 0, "TFRecord shards per split (0: let the runner decide).",
                   lower_bound=0)
  d.DEFINE_boolean("overwrite", False, "Replace an existing --output_dir (it stays until the new "
                   "output is complete).")
  d.DEFINE_boolean("dedup_sample_ids", True, "Keep one of identical rows sharing a sample id and "
                   "set aside rows whose copies differ (each with its reason).")
  d.DEFINE_float("max_dead_letter_fraction", 0.5, "Do not publish the output when more than this "
                 "fraction of a split's rows was set aside (the wrong files or --format).",
                 lower_bound=0.0, upper_bound=1.0)
  d.DEFINE_integer("train_block_rows", F.DEFAULT_BLOCK_ROWS, "Rows per column block of "
                   "OUT/train_blocks, the training input (0: write no blocks; training then "
                   "reads the train tf.Examples, about 4x the CPU per row).", lower_bound=0)
  d.DEFINE_boolean("train_examples", True, "Write the train split as one tf.Example per row "
                   "under OUT/train besides the blocks. Training reads the blocks; the tf.Examples "
                   "are for other readers (and --train_input=examples). --notrain_examples writes "
                   "the blocks only: about 30% less work for the job "
                   "(benchmarks/results/preprocess_blocks_only.md).")
  d.DEFINE_integer("partitions", 0, "Ali-CCP on the DirectRunner: run the job as this many "
                   "partitions by common_feature_index, each a pipeline in its own process, so "
                   "memory follows a partition's rows instead of the input's (0: one job). The "
                   "output is the whole job's; see pipeline/partition.py.", lower_bound=0)
  d.DEFINE_integer("parallel_partitions", 1, "With --partitions: how many run at a time (and how many "
                   "processes write the splits into the partitions first).",
                   lower_bound=1)
  d.DEFINE_string("temp_dir", None, "TFT/Beam temp dir (default: OUTPUT_DIR/tmp, removed at the end).")
  d.DEFINE_enum("layout", F.ROWS, list(F.LAYOUTS), "Storage of the output. rows: one tf.Example per "
                "impression, the user side copied into each. grouped (Ali-CCP): one record per "
                "common-features row, its user side stored once and its impressions' own fields and "
                "labels as lists; training pools the user side once per group (docs/preprocessing.md).")

SPLITS = formats.SPLITS


UsageError = cli.UsageError   # a mistake in how the job was called; printed without a traceback (exit 2)


def validate_flags(fv: flags.FlagValues = FLAGS) -> None:
  """What the flags' own definitions (types, bounds, enums) cannot check, before any work: run
  by the flags parser (preprocessing/cli.py), so a mistake is one error line and nothing is read
  or written. run() runs _check_job too, for callers that do not come through the command line."""
  cli.require(fv, "output_dir")
  own = formats.get(fv["format"].value).override_flags
  other = [k for f in formats.FORMATS.values() for k in f.override_flags if k not in own]
  wrong = [f"--{k}" for k in other if fv[k].value]
  if wrong:
    raise UsageError(f"{', '.join(wrong)}: not used with --format={fv['format'].value}")
  _check_job(fv["format"].value, fv["crosses"].value, fv["train_block_rows"].value,
             fv["train_examples"].value, fv["partitions"].value, fv["layout"].value)


def _check_job(fmt: str, crosses: Optional[Sequence[str]], train_block_rows: int, train_examples: bool,
               partitions: int, layout: str = F.ROWS) -> Sequence[F.Field]:
  """The job's flags that contradict each other (validate_flags and run()); returns the crosses."""
  if layout not in formats.get(fmt).layouts:
    raise UsageError(f"--layout={layout}: --format={fmt} has the layouts {', '.join(formats.get(fmt).layouts)}")
  if layout == F.GROUPED and not train_examples:
    raise UsageError("--layout=grouped writes the train split as grouped records; --notrain_examples "
                     "is for the rows layout's blocks")
  if train_block_rows < 0:
    raise UsageError(f"--train_block_rows must be 0 (no blocks) or more, got {train_block_rows}")
  if not train_examples and not train_block_rows:
    raise UsageError("--notrain_examples writes the train split as blocks only, and "
                     "--train_block_rows=0 writes no blocks: the train split would not be written")
  if partitions < 0:
    raise UsageError(f"--partitions must be 0 or 1 (one job) or more, got {partitions}")
  if partitions > 1 and not formats.get(fmt).partitionable:
    raise UsageError(f"--partitions splits Ali-CCP jobs by common_feature_index; not with --format={fmt}")
  try:
    return F.parse_crosses(fmt, crosses)
  except ValueError as e:
    raise UsageError(f"--crosses: {e}") from None


def _input_patterns(input_dir, overrides: Dict[str, str], fmt: str = "aliccp") -> Dict[str, Dict]:
  """The file patterns of each split (pipeline/formats.py): {split: {kind: pattern}} for Ali-CCP
  (kinds skeleton and common), {split: {"files": [pattern, ...]}} for Avazu."""
  return formats.get(fmt).patterns(input_dir, overrides)


def _first_line(pattern: str) -> bytes:
  """The first line of the first file ``pattern`` matches (b"" when there is none)."""
  for path in avazu.match_files(cli.absolute(pattern)):
    with FileSystems.open(path) as f:
      line = f.readline()
    if line:
      return line
  return b""


def _check_format(fmt: str, patterns) -> None:
  """Reads the first line of each split's inputs and stops when it is plainly another format."""
  source = formats.get(fmt)
  for split, pats in patterns.items():
    for line in (_first_line(p) for p in source.file_patterns(pats)):
      why = source.foreign_first_line(line)
      if why:
        raise UsageError(f"the {split} input {why}")


def _counters(result) -> Dict[str, int]:
  """Committed counter values summed over steps, keyed 'namespace/name'."""
  out: Dict[str, int] = {}
  for c in result.metrics().query(MetricsFilter())["counters"]:
    value = c.committed if c.committed is not None else c.attempted
    key = f"{c.key.metric.namespace}/{c.key.metric.name}"
    out[key] = out.get(key, 0) + int(value or 0)
  return out


def build_pipeline(p: beam.Pipeline, fmt: str, patterns, output_dir: str, temp_dir: str,
                   max_hash_buckets: int, num_shards: int, crosses: Sequence[F.Field] = (),
                   inputs=None, dedup_sample_ids: bool = True,
                   train_block_rows: int = F.DEFAULT_BLOCK_ROWS, part: str = "",
                   conflicts: Optional[Mapping[str, Mapping[int, int]]] = None,
                   write_transform_fn: bool = True, train_examples: bool = True,
                   layout: str = F.ROWS) -> None:
  """Adds the whole job to pipeline ``p``.

  ``crosses``: cross fields (F.parse_crosses). ``inputs``: what the format's ``prepare`` read of
  the files (pipeline/formats.py; read here if not given). ``dedup_sample_ids``: resolve rows sharing a
  sample id (pipeline/sources/dedup.py). ``train_block_rows``: rows per column block of
  the train split written again under train_blocks/ (0: none); ``train_examples`` False
  writes the train split as those blocks only (they then count as its rows written). For one partition of a
  partitioned job (pipeline/partition.py): ``part`` goes into its file names
  (part-<part>-*, <split>-<part>-*), ``conflicts`` are the sample ids per split whose copies
  in other partitions differ, and ``write_transform_fn`` False leaves the transform_fn to
  another partition (they are all the same graph). ``layout`` F.GROUPED writes both splits as
  grouped records (one per common-features row, pipeline.encode.EncodeGroups), the train
  split's in a random order, and no blocks; the transform_fn written is the per-impression one
  (what serving applies), whose ids the grouped records hold.
  """
  if layout == F.GROUPED:
    _build_grouped(p, fmt, patterns, output_dir, temp_dir, max_hash_buckets, num_shards, inputs,
                   dedup_sample_ids, part, conflicts, write_transform_fn)
    return
  source = formats.get(fmt)
  if inputs is None:
    patterns, inputs = source.prepare(patterns)
  labels = source.labels(inputs)
  reader = lambda split, pat, arrow_schema: source.reader(split, pat, arrow_schema, inputs, dedup_sample_ids,
                                                          (conflicts or {}).get(split))
  raw_md = T.raw_metadata(fmt, labels)
  preprocessing_fn = T.make_preprocessing_fn(fmt, max_hash_buckets or None, crosses, labels)
  with tft_beam.Context(temp_dir=temp_dir, force_tf_compat_v1=True):
    # TFT reads Arrow RecordBatches built from the rows (its TFXIO input) and hands its output
    # over as RecordBatches too, encoded to tf.Examples a batch at a time in C++ (tfx_bsl). The
    # instance-dict path (each row encoded as a tf.Example in Python and decoded again on the
    # way in, converted back to a dict and encoded in Python on the way out) took about half
    # of the job's CPU (benchmarks/preprocess_throughput.py). The Ali-CCP reader builds the
    # RecordBatches in its join; Avazu's reader hands over instance dicts, batched here.
    tfxio = encode.raw_tfxio(raw_md)
    arrow_schema = tfxio.ArrowSchema()
    read = {split: p | f"Read_{split}" >> reader(split, pat, arrow_schema) for split, pat in patterns.items()}
    batches = {split: (out["record_batches"] if "record_batches" in out else
                       encode.to_record_batches(out["rows"], arrow_schema, f"_{split}", f"{fmt}/{split}"))
               for split, out in read.items()}
    raw_config = tfxio.TensorAdapterConfig()
    if T.analyzed_columns(preprocessing_fn, tfxio.TensorAdapter().OriginalTypeSpecs()):
      (train_data, _), transform_fn = (
          (batches["train"], raw_config) | "AnalyzeAndTransform" >> tft_beam.AnalyzeAndTransformDataset(
              preprocessing_fn, output_record_batches=True))
    else:
      # Nothing in the transform is computed from the data, so the transform_fn is analyzed
      # over no rows, and is ready before the first row is read. Analyzed over the train
      # rows, it would be a side input that waits for all of them: the runner would hold
      # every joined row between the join and the transform, and send it on once the last
      # one arrived (on the DirectRunner, through the job's own process, while the workers
      # wait). This way the join, the transform and the writes run as one stage.
      no_rows = p | "NoRowsToAnalyze" >> beam.Create([]).with_output_types(pa.RecordBatch)
      transform_fn = (no_rows, raw_config) | "Analyze" >> tft_beam.AnalyzeDataset(preprocessing_fn)
      train_data, _ = (((batches["train"], raw_config), transform_fn)
                       | "TransformTrain" >> tft_beam.TransformDataset(output_record_batches=True))
    eval_data, _ = (((batches["eval"], raw_config), transform_fn)
                    | "TransformEval" >> tft_beam.TransformDataset(output_record_batches=True))
    if write_transform_fn:
      _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(output_dir)
    infix = f"-{part}" if part else ""
    for split, data in (("train", train_data), ("eval", eval_data)):
      examples = split != "train" or train_examples
      if examples:
        _ = (data
             | f"Encode_{split}" >> beam.ParDo(encode.EncodeRecordBatches(f"{fmt}/{split}"))
             | f"Write_{split}" >> _write_tfrecords(os.path.join(output_dir, split), num_shards, infix))
      if split == "train":
        _ = data | "DistinctIds_train" >> distinct_ids.WriteDistinctIds(output_dir, infix)
      if split == "train" and train_block_rows:
        _ = (data
             | "EncodeBlocks_train" >> beam.ParDo(encode.EncodeBlocks(f"{fmt}/{split}", train_block_rows,
                                                                 count_rows_written=not examples))
             | "ShuffleBlocks_train" >> encode.ShuffleBlocks()
             | "WriteBlocks_train" >> _write_tfrecords(os.path.join(output_dir, F.BLOCKS_DIR), num_shards, infix))
      _ = (read[split][DEAD]
           | f"WriteDeadLetters_{split}" >> beam.io.WriteToText(
               os.path.join(output_dir, "dead_letter", split + infix), file_name_suffix=".jsonl"))


def _build_grouped(p: beam.Pipeline, fmt: str, patterns, output_dir: str, temp_dir: str,
                   max_hash_buckets: int, num_shards: int, inputs, dedup_sample_ids: bool, part: str,
                   conflicts, write_transform_fn: bool) -> None:
  """build_pipeline for F.GROUPED (see there)."""
  source = formats.get(fmt)
  if inputs is None:
    patterns, inputs = source.prepare(patterns)
  labels = source.labels(inputs)
  row_fn = T.make_preprocessing_fn(fmt, max_hash_buckets or None, (), labels)
  grouped_fn = T.make_grouped_preprocessing_fn(fmt, max_hash_buckets or None, labels)
  with tft_beam.Context(temp_dir=temp_dir, force_tf_compat_v1=True):
    # Neither transform is computed from the data (_check_grouped), so both are analyzed over no
    # rows: the join, the transform and the writes run as one stage (as in build_pipeline).
    row_tfxio = encode.raw_tfxio(T.raw_metadata(fmt, labels))
    tfxio = encode.raw_tfxio(T.raw_metadata(fmt, labels, F.GROUPED))
    arrow_schema = tfxio.ArrowSchema()

    def analyzed(label, fn, io):
      no_rows = p | f"NoRows{label}" >> beam.Create([]).with_output_types(pa.RecordBatch)
      return (no_rows, io.TensorAdapterConfig()) | f"Analyze{label}" >> tft_beam.AnalyzeDataset(fn)

    grouped_transform = analyzed("Grouped", grouped_fn, tfxio)
    if write_transform_fn:
      _ = analyzed("Rows", row_fn, row_tfxio) | "WriteTransformFn" >> tft_beam.WriteTransformFn(output_dir)
    infix = f"-{part}" if part else ""
    for split, pat in patterns.items():
      read = p | f"Read_{split}" >> source.reader(split, pat, arrow_schema, inputs, dedup_sample_ids,
                                                  (conflicts or {}).get(split), F.GROUPED)
      data, _ = (((read["record_batches"], tfxio.TensorAdapterConfig()), grouped_transform)
                 | f"Transform_{split}" >> tft_beam.TransformDataset(output_record_batches=True))
      records = data | f"Encode_{split}" >> beam.ParDo(encode.EncodeGroups(f"{fmt}/{split}"))
      if split == "train":
        _ = data | "DistinctIds_train" >> distinct_ids.WriteDistinctIds(output_dir, infix)
        records = records | "ShuffleGroups_train" >> encode.ShuffleBlocks()
      _ = records | f"Write_{split}" >> _write_tfrecords(os.path.join(output_dir, split), num_shards, infix)
      _ = (read[DEAD]
           | f"WriteDeadLetters_{split}" >> beam.io.WriteToText(
               os.path.join(output_dir, "dead_letter", split + infix), file_name_suffix=".jsonl"))


def _check_grouped(fmt: str, max_hash_buckets: int, labels) -> None:
  """The grouped layout hashes the groups with a transform of its own: only where nothing in the
  per-impression transform is computed from the data."""
  fn = T.make_preprocessing_fn(fmt, max_hash_buckets or None, (), labels)
  analyzed = T.analyzed_columns(fn, T.raw_feature_spec(fmt, labels=labels))
  if analyzed:
    raise UsageError(f"--layout=grouped needs a transform without analyzers; this one analyzes "
                     f"{', '.join(analyzed)}")


def _write_tfrecords(directory: str, num_shards: int, infix: str = "") -> beam.PTransform:
  """Writes serialized records as DIRECTORY/part-*.tfrecord.gz (what model_fn.input_fn reads)."""
  return tfrecords.WriteGzipTFRecords(os.path.join(directory, "part" + infix), num_shards)


STAGING = publish.STAGING_DIR    # <output_dir>.staging-<pid>@<host>-<id>: a run in progress (or killed)


def _manifest(train_examples: bool, train_block_rows: int) -> List[str]:
  """The entries a finished output holds besides reconciliation.json; publishing refuses a
  staged output that lacks one (publish.publish_dir)."""
  return ((["train"] if train_examples else []) + ([F.BLOCKS_DIR] if train_block_rows else [])
          + ["eval", "transform_fn", "transformed_metadata", "dead_letter"])


def _check_splits_have_rows(fmt: str, patterns) -> None:
  """A split whose input files are all empty (0 bytes) has no row to write: stop before the
  job runs, in every format (Avazu's scan_inputs refuses it the same way)."""
  for split, pats in patterns.items():
    for kind, given in pats.items():          # Ali-CCP: skeleton, common; Avazu: files
      given = given if isinstance(given, (list, tuple)) else [given]
      files = [f for g in given for f in avazu.match_files(cli.absolute(g))]
      if files and all(tf.io.gfile.stat(f).length == 0 for f in files):
        what = "" if kind == "files" else f"{kind} "
        raise UsageError(f"every {what}file of the {split} split is empty: {', '.join(files[:5])}; "
                         f"the {split} split would have no rows")


DIRECT_RUNNERS = (None, "DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner")


def _check_partitionable(fmt: str, beam_args: Sequence[str], max_hash_buckets: int,
                         cross_fields: Sequence[F.Field], parallel: int) -> None:
  """--partitions: only where the partitions' outputs add up to the whole job's (besides
  _check_job's checks)."""
  if parallel < 1:
    raise UsageError(f"--parallel_partitions must be 1 or more, got {parallel}")
  runner = PipelineOptions(list(beam_args)).view_as(StandardOptions).runner
  if runner not in DIRECT_RUNNERS:
    raise UsageError(f"--partitions is for the DirectRunner, which holds its shuffles in memory; "
                     f"--runner={runner} shuffles through disk: run the job whole there")
  # Every partition writes the rows its own TFT transform makes; that is the whole job's
  # transform only when nothing in it is computed from the data (an analyzer).
  preprocessing_fn = T.make_preprocessing_fn(fmt, max_hash_buckets or None, cross_fields, F.RAW_LABELS)
  analyzed = T.analyzed_columns(preprocessing_fn, T.raw_feature_spec(fmt))
  if analyzed:
    raise UsageError("--partitions: the preprocessing_fn has analyzers (over "
                     f"{', '.join(analyzed)}), which need the whole data in one job")


def run_job(fmt: str, patterns, output_dir: str, temp_dir: str, beam_args: Sequence[str], **kwargs) -> Dict[str, int]:
  """One Beam pipeline of the job (build_pipeline's arguments), run to the end; its counters."""
  p = beam.Pipeline(options=PipelineOptions(list(beam_args), save_main_session=False))
  build_pipeline(p, fmt, patterns, output_dir, temp_dir, **kwargs)
  result = p.run()
  result.wait_until_finish()
  return _counters(result)


def _run_job_kwargs(kwargs: dict) -> Dict[str, int]:
  return run_job(**kwargs)


def _run_partitions(parts: partition.Partitions, job: dict, output_dir: str, temp_dir: str,
                    parallel: int) -> Dict[str, int]:
  """Runs every partition's pipeline in a process of its own (``parallel`` at a time), all
  writing into ``output_dir`` under their own file names; the first one writes the
  transform_fn (the others' are the same graph, see _check_partitionable). Returns the
  counters summed."""
  jobs = []
  for k, patterns in enumerate(parts.patterns):
    name = f"p{k:05d}"
    own_temp = FileSystems.join(temp_dir, name)
    jobs.append(dict(job, patterns=patterns, output_dir=output_dir, temp_dir=own_temp, part=name,
                     conflicts=parts.conflicts, write_transform_fn=k == 0))
  # A fresh process per partition: what one partition's runner held is given back to the
  # system before the next one starts (spawned, not forked: TensorFlow is loaded here).
  try:
    with futures.ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn"),
                                     max_tasks_per_child=1, initializer=processes.end_with_parent,
                                     initargs=(os.getpid(),)) as pool:
      results = list(pool.map(_run_job_kwargs, jobs))
  except BrokenProcessPool as e:
    raise RuntimeError(f"a partition's process died without an error of its own ({e}); if the "
                       "system killed it for memory, run with more --partitions or fewer "
                       "--parallel_partitions") from None
  total = collections.Counter()
  for counters in results:
    total.update(counters)      # update, not +: a counter that is 0 stays in
  return dict(total)


def run(fmt: str, patterns, output_dir: str, beam_args: List[str], max_hash_buckets: int = 0,
        num_shards: int = 0, overwrite: bool = False, temp_dir: str = None,
        crosses: Optional[Sequence[str]] = None, dedup_sample_ids: bool = True,
        max_dead_letter_fraction: float = 0.5,
        train_block_rows: int = F.DEFAULT_BLOCK_ROWS, partitions: int = 0,
        parallel_partitions: int = 1, train_examples: bool = True, layout: str = F.ROWS) -> Dict[str, dict]:
  """Runs the job to completion; returns the reconciliation per split.

  ``crosses``: ``a:b`` specs (None: the format's default crosses). For Avazu every
  file's header is read first, so a bad set of inputs fails before anything is written.

  The job writes to ``<output_dir>.staging-<owner>`` and renames it to ``output_dir`` only
  when it finished, every row is accounted for, every split has rows written, at most
  ``max_dead_letter_fraction`` of a split's rows were set aside and the staged output holds
  every entry of its manifest (_manifest); ``reconciliation.json`` is written last, into the
  staged output before the rename. The run holds ``<output_dir>.lock`` throughout, so a second
  run of the same output is refused (UsageError); a killed run leaves only its staging dir,
  and the next run first recovers: it puts back a previous output that a killed ``overwrite``
  left renamed aside, then removes dead runs' leftovers (pipeline/publish.py, publish_dir).
  ``train_block_rows``: see build_pipeline; the blocks' rows must add up to the train split's.
  ``train_examples`` False: the train split is written as blocks only (build_pipeline).
  ``partitions`` (2 or more; Ali-CCP on the DirectRunner): run the job as that many partitions
  by common_feature_index (pipeline/partition.py), ``parallel_partitions`` of them at a time,
  each in its own process; the output is the one the whole job would write, in more files.
  """
  cross_fields = _check_job(fmt, crosses, train_block_rows, train_examples, partitions, layout)
  if layout == F.GROUPED:
    train_block_rows = 0          # the grouped train records are the training input
  if partitions > 1:
    _check_partitionable(fmt, beam_args, max_hash_buckets, cross_fields, parallel_partitions)
  _check_format(fmt, patterns)
  source = formats.get(fmt)
  patterns, inputs = source.prepare(patterns)     # Avazu: every file's header, read here
  labels = source.labels(inputs)
  if layout == F.GROUPED:
    if cross_fields:
      raise UsageError("--layout=grouped makes no crosses (--crosses); crosses of the user side with "
                       "the item side would have to be copied into every impression")
    _check_grouped(fmt, max_hash_buckets, labels)
  _check_splits_have_rows(fmt, patterns)
  # The run owns the output until it has published: a second run of it is refused (one line,
  # naming this run's pid), so no run removes what a live one is writing (publish.OutputLock).
  try:
    lock = publish.OutputLock(output_dir, "preprocessing run").acquire()
  except publish.OutputBusy as e:
    raise UsageError(str(e)) from None
  staging = None
  try:
    # Recovery first: a run killed while it replaced the output left the previous one beside it.
    for line in publish.recover(output_dir, F.RECONCILIATION, lock.held):
      print(line, file=sys.stderr)
    if tf.io.gfile.exists(output_dir) and tf.io.gfile.listdir(output_dir) and not overwrite:
      raise UsageError(f"--output_dir={output_dir} is not empty; pass --overwrite to replace it")
    staging = publish.start_staging(output_dir)
    own_temp = temp_dir is None
    temp_dir = temp_dir or os.path.join(staging, "tmp")
    job = dict(fmt=fmt, beam_args=list(beam_args), max_hash_buckets=max_hash_buckets, num_shards=num_shards,
               crosses=cross_fields, inputs=inputs, dedup_sample_ids=dedup_sample_ids,
               train_block_rows=train_block_rows, train_examples=train_examples, layout=layout)
    parts = None
    if partitions > 1:
      parts = partition.split_inputs(patterns, partitions, FileSystems.join(temp_dir, "partitions"),
                                     dedup_sample_ids, parallel_partitions)
      counters = _run_partitions(parts, job, staging, temp_dir, parallel_partitions)
    else:
      counters = run_job(patterns=patterns, output_dir=staging, temp_dir=temp_dir, **job)
    rec = {split: source.reconcile(counters, split, inputs) for split, _ in SPLITS}
    for split, r in rec.items():
      r["label_positives"] = R.label_positives(counters, f"{fmt}/{split}/", F.transformed_labels(labels))
      if layout == F.GROUPED:
        r["groups_written"] = int(counters.get(f"{fmt}/{split}/groups_written", 0))
    if train_block_rows:
      rec["train"]["blocks"] = R.reconcile_blocks(counters, f"{fmt}/train/", rec["train"]["rows_written"],
                                                  train_block_rows)
    rec["train"]["distinct_ids"] = distinct_ids.merge_outputs(staging)
    if parts is not None:
      for split, r in rec.items():
        r["partitions"] = R.reconcile_partitions(parts, split, r)
    rec_all = {"format": fmt, "inputs": patterns, "max_hash_buckets": max_hash_buckets,
               "labels": list(labels), "crosses": [c.name for c in cross_fields], "splits": rec,
               "dedup_sample_ids": dedup_sample_ids, "partitions": partitions if parts else 0,
               "train_examples": train_examples, "layout": layout}
    rec_all.update(source.record(inputs))
    if own_temp and tf.io.gfile.exists(temp_dir):
      tf.io.gfile.rmtree(temp_dir)
    if not R.balanced(rec, fmt):
      raise RuntimeError(f"row counts do not reconcile; output not published (left in {staging}):\n"
                         + format_reconciliation(rec, fmt) + R.lost_rows_hint(rec))
    try:
      R.check_quality(rec, fmt, max_dead_letter_fraction)
    except BadOutput as e:
      raise BadOutput(f"{e} Output not published; its dead letters are in "
                      f"{os.path.join(staging, 'dead_letter')}.\n" + format_reconciliation(rec, fmt)) from None
    # Written last: its presence marks the output complete for the trainer. The staged output
    # is checked against its manifest, then renamed into place (publish.publish_dir).
    with tf.io.gfile.GFile(os.path.join(staging, F.RECONCILIATION), "w") as f:
      json.dump(rec_all, f, indent=2, sort_keys=True)
    try:
      publish.publish_dir(staging, output_dir, _manifest(train_examples, train_block_rows),
                          F.RECONCILIATION, overwrite)
    except publish.PublishError as e:
      raise BadOutput(str(e)) from None
    return rec
  finally:
    if staging:
      publish.end_staging(staging)
    lock.release()


def main(argv):
  beam_args = argv[1:]     # Beam's own options only: cli.parse refused any other argument
  try:
    overrides = {k: getattr(FLAGS, k) for k in formats.get(FLAGS.format).override_flags}
    patterns = _input_patterns(FLAGS.input_dir, overrides, FLAGS.format)
    rec = run(FLAGS.format, patterns, FLAGS.output_dir, beam_args, FLAGS.max_hash_buckets,
              FLAGS.num_shards, FLAGS.overwrite, FLAGS.temp_dir, FLAGS.crosses,
              FLAGS.dedup_sample_ids, FLAGS.max_dead_letter_fraction, FLAGS.train_block_rows,
              FLAGS.partitions, FLAGS.parallel_partitions, FLAGS.train_examples, FLAGS.layout)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return cli.EXIT_USAGE
  print(format_reconciliation(rec, FLAGS.format))
  print(f"output: {FLAGS.output_dir}")
  return 0


if __name__ == "__main__":
  # Flags this module does not define go to Beam; one that Beam does not know either is an error.
  cli.run(main, define_flags, validate_flags, beam=True)
