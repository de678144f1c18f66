"""One object per raw input format: everything pipeline.preprocess does differently for Ali-CCP
and for Avazu-style CSV (where a split's files are, what its first line must not look like,
the Beam reader, the labels, the row accounting), so the job itself has no format branches.

  FORMATS[fmt]   the Format of ``--format=fmt``
"""

import abc
import os
from typing import Dict, List, Mapping, Optional, Sequence

import apache_beam as beam
import tensorflow as tf

from pipeline import encode
from pipeline.sources import aliccp, avazu
from preprocessing import cli
from preprocessing import features as F

SPLITS = (("train", "train"), ("eval", "test"))   # (output split, release file suffix)
# Avazu-style files of a split under --input_dir ({} = the release file suffix).
AVAZU_RELEASE_PATTERNS = ("{}", "{}.gz", "{}*.csv", "{}*.csv.gz")

UsageError = cli.UsageError


class Format(abc.ABC):
  """The interface pipeline.preprocess runs a format through; each format implements every
  abstract method."""
  name: str
  # The flags that name a split's files in this format (override --input_dir).
  override_flags: Sequence[str] = ()
  # Whether the job can run as partitions by a join key (pipeline/partition.py).
  partitionable = False
  # The storage layouts its output can have (F.LAYOUTS; F.GROUPED needs rows grouped by a key).
  layouts: Sequence[str] = (F.ROWS,)

  @abc.abstractmethod
  def patterns(self, input_dir: Optional[str], overrides: Mapping[str, object]) -> Dict[str, Dict]:
    """{split: {kind: pattern(s)}} of the input files; UsageError when a split has none."""

  @abc.abstractmethod
  def file_patterns(self, split_patterns: Mapping) -> List[str]:
    """Every file pattern of one split."""

  @abc.abstractmethod
  def foreign_first_line(self, line: bytes) -> Optional[str]:
    """Why ``line``, the first of an input file, is plainly another format (None: it is not)."""

  def prepare(self, patterns: Dict[str, Dict]):
    """(patterns, inputs) before the job: what the launcher reads of the files (None if nothing)."""
    return patterns, None

  def labels(self, inputs) -> Sequence[str]:
    """The raw labels the inputs carry."""
    return F.RAW_LABELS

  @abc.abstractmethod
  def reader(self, split: str, split_patterns: Mapping, arrow_schema, inputs, dedup_sample_ids: bool,
             conflicts: Optional[Mapping[int, int]], layout: str = F.ROWS) -> beam.PTransform:
    """The Beam reader of one split: {"rows" or "record_batches": ..., DEAD: dead letters}; its
    record batches are of ``layout``'s raw schema."""

  @abc.abstractmethod
  def reconcile(self, counters: Mapping[str, int], split: str, inputs) -> dict:
    """The split's row accounting from the job's counters."""

  @abc.abstractmethod
  def rows_read(self, r: dict) -> int:
    """Rows read of a split (of its main file kind)."""

  @abc.abstractmethod
  def rows_set_aside(self, r: dict) -> Dict[str, int]:
    """Rows of a split set aside, by reason."""

  @abc.abstractmethod
  def balanced(self, r: dict) -> bool:
    """Whether the split's format-specific counts add up."""

  @abc.abstractmethod
  def reconciliation_lines(self, split: str, r: dict) -> List[str]:
    """The split's accounting as printed (the lines common to every format come after)."""

  def record(self, inputs) -> dict:
    """What reconciliation.json records of the inputs besides the patterns."""
    return {}


def _reason_lines(dead: Mapping[str, int]) -> List[str]:
  return [f"      {reason}: {n:,}" for reason, n in sorted(dead.items())]


def _release_file(input_dir: str, name: str) -> str:
  """``name``.csv under ``input_dir``, else ``name``.csv.gz when only that exists (the readers
  decompress by extension)."""
  plain = os.path.join(input_dir, f"{name}.csv")
  for path in (plain, plain + ".gz"):
    if tf.io.gfile.glob(path):
      return path
  return plain


class AliCCP(Format):
  name = "aliccp"
  override_flags = ("train_skeleton", "train_common", "eval_skeleton", "eval_common")
  partitionable = True
  layouts = F.LAYOUTS

  def patterns(self, input_dir, overrides):
    patterns = {}
    for split, suffix in SPLITS:
      patterns[split] = {}
      for kind, release in (("skeleton", "sample_skeleton"), ("common", "common_features")):
        pattern = overrides.get(f"{split}_{kind}")
        if not pattern:
          if not input_dir:
            raise UsageError(f"give --input_dir or --{split}_{kind}")
          pattern = _release_file(input_dir, f"{release}_{suffix}")
        if not tf.io.gfile.glob(pattern):
          raise UsageError(f"no file matches --{split}_{kind}={pattern}")
        patterns[split][kind] = pattern
    return patterns

  def file_patterns(self, split_patterns):
    return [split_patterns["skeleton"], split_patterns["common"]]

  def foreign_first_line(self, line):
    if avazu.looks_like_header(line):
      return f"starts with an Avazu-style CSV header ({line[:60]!r}...); use --format=avazu for these files"
    return None

  def reader(self, split, split_patterns, arrow_schema, inputs, dedup_sample_ids, conflicts, layout=F.ROWS):
    return aliccp.ReadAliCCP(split, split_patterns["skeleton"], split_patterns["common"], arrow_schema,
                             encode.batch_rows(layout), dedup_sample_ids, conflicts, layout)

  def reconcile(self, counters, split, inputs):
    return aliccp.reconcile(counters, split)

  def rows_read(self, r):
    return r["skeleton_rows_read"]

  def rows_set_aside(self, r):
    return r["skeleton_rows_set_aside"]

  def balanced(self, r):
    return r["skeleton_balanced"] and r["common_balanced"]

  def reconciliation_lines(self, split, r):
    dead, cdead = r["skeleton_rows_set_aside"], r["common_rows_set_aside"]
    lines = [f"  {split}: skeleton rows read {r['skeleton_rows_read']:,} = written {r['rows_written']:,}"
             f" + set aside {sum(dead.values()):,}  [{'OK' if r['skeleton_balanced'] else 'MISMATCH'}]"]
    lines += _reason_lines(dead)
    lines.append(f"    common rows read {r['common_rows_read']:,} = used {r['common_rows_used']:,}"
                 f" + unused {r['common_rows_unused']:,} + set aside {sum(cdead.values()):,}"
                 f"  [{'OK' if r['common_balanced'] else 'MISMATCH'}]")
    lines += _reason_lines(cdead)
    if r["unknown_field_items_skipped"]:
      lines.append(f"    feature items of unknown fields skipped: {r['unknown_field_items_skipped']:,}")
    return lines


class Avazu(Format):
  name = "avazu"
  override_flags = ("train_files", "eval_files")

  def patterns(self, input_dir, overrides):
    patterns = {}
    for split, suffix in SPLITS:
      given = overrides.get(f"{split}_files")
      if isinstance(given, str):
        given = given.split(",")
      given = [g.strip() for g in given or () if g.strip()]
      if given:
        for pattern in given:
          if not tf.io.gfile.glob(pattern):
            raise UsageError(f"no file matches --{split}_files={pattern}")
        patterns[split] = {"files": given}
        continue
      if not input_dir:
        raise UsageError(f"give --input_dir or --{split}_files")
      candidates = [os.path.join(input_dir, p.format(suffix)) for p in AVAZU_RELEASE_PATTERNS]
      found = [c for c in candidates
               if any(not tf.io.gfile.isdir(m) for m in tf.io.gfile.glob(c))]
      if not found:
        raise UsageError(f"no {split} file under {input_dir}: tried "
                         + ", ".join(os.path.basename(c) for c in candidates))
      patterns[split] = {"files": found}
    return patterns

  def file_patterns(self, split_patterns):
    return list(split_patterns["files"])

  def foreign_first_line(self, line):
    if aliccp.looks_like_aliccp(line):
      return (f"holds Ali-CCP rows (\\x01\\x02\\x03 feature lists: {line[:40]!r}...); use "
              "--format=aliccp for these files")
    return None

  def prepare(self, patterns):
    """Every file's header, read on the launcher; a bad set of files is a UsageError."""
    try:
      inputs = avazu.scan_inputs({split: pat["files"] for split, pat in patterns.items()})
    except avazu.BadInput as e:
      raise UsageError(str(e)) from None
    return {split: {"files": list(inputs.patterns[split])} for split in patterns}, inputs

  def labels(self, inputs):
    return inputs.labels

  def reader(self, split, split_patterns, arrow_schema, inputs, dedup_sample_ids, conflicts, layout=F.ROWS):
    return avazu.ReadAvazu(split, inputs.patterns[split], {f: inputs.headers[f] for f in inputs.files[split]},
                           dedup_sample_ids)

  def reconcile(self, counters, split, inputs):
    return avazu.reconcile(counters, split, len(inputs.files[split]))

  def rows_read(self, r):
    return r["rows_read"]

  def rows_set_aside(self, r):
    return r["rows_set_aside"]

  def balanced(self, r):
    return r["balanced"]

  def reconciliation_lines(self, split, r):
    dead = r["rows_set_aside"]
    lines = [f"  {split}: rows read {r['rows_read']:,} = written {r['rows_written']:,}"
             f" + set aside {sum(dead.values()):,}  [{'OK' if r['balanced'] else 'MISMATCH'}]"]
    lines += _reason_lines(dead)
    lines.append(f"    files {r['files']:,}, header lines {r['header_lines']:,} (not rows)")
    return lines

  def record(self, inputs):
    return {"ignored_columns": list(inputs.ignored_columns),
            "empty_files": {split: list(files) for split, files in inputs.empty_files.items()}}


FORMATS = {f.name: f for f in (AliCCP(), Avazu())}


def get(fmt: str) -> Format:
  try:
    return FORMATS[fmt]
  except KeyError:
    raise UsageError(f"unknown format {fmt!r}; known: {', '.join(sorted(FORMATS))}") from None
