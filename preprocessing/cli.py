"""The command line of every entry point: every flag parsed and checked before any work.

Each entry point (``python -m pipeline.preprocess``, ``model_fn.train``, ...) starts with
``cli.run(main, define_flags, validate, beam=...)``. Before ``main`` runs, and so before
anything is read, computed or written:

  * absl parses the flags: a value of the wrong type, outside a flag's bounds
    (``lower_bound``, ``upper_bound``) or not among an enum flag's values is refused;
  * an argument that is not a flag of the module is refused, naming it and the closest known
    flag. An entry point that runs Beam (``beam=True``) hands the arguments it does not define
    to Beam's PipelineOptions; those must be options that Beam's own parser knows (any
    registered PipelineOptions subclass), else they are refused the same way; Beam itself
    would only log "Discarding unparseable args" and run with its defaults;
  * ``validate(flag_values)`` checks what a flag's own definition cannot (required flags,
    paths that must exist, flags that contradict each other, model params) and raises
    UsageError.

Every refusal is one line ``error: ...`` on stderr and exit status 2 (EXIT_USAGE), the way
the entry points report their other usage errors; no traceback.
"""

import difflib
import functools
import logging
import os
import sys
from typing import Callable, List, Optional, Sequence

from absl import app, flags

EXIT_USAGE = 2


class UsageError(Exception):
  """A mistake in how a job was called; printed as one ``error:`` line, exit status 2."""


class Define:
  """``flags.DEFINE_*`` bound to a FlagValues: ``Define(fv).DEFINE_integer(...)`` defines into
  ``fv``, so each entry point's flags can also be defined into a fresh FlagValues (tests)."""

  def __init__(self, flag_values: flags.FlagValues = flags.FLAGS):
    self.flag_values = flag_values

  def __getattr__(self, name):
    if not name.startswith("DEFINE_"):
      raise AttributeError(name)
    return functools.partial(getattr(flags, name), flag_values=self.flag_values)


def flag_values(define_flags: Callable[[flags.FlagValues], None]) -> flags.FlagValues:
  """A fresh FlagValues holding the flags ``define_flags`` defines."""
  fv = flags.FlagValues()
  define_flags(fv)
  return fv


def _beam_parser():
  # The parser PipelineOptions.get_all_options builds: every registered PipelineOptions
  # subclass adds its arguments (a runner's own options register when its module is imported).
  from apache_beam.options import pipeline_options as po
  # allow_abbrev=False: an abbreviation (argparse's default would take --direct_num_worker for
  # --direct_num_workers) is refused like any other misspelling, naming the option meant.
  parser = po._BeamArgumentParser(add_help=False, allow_abbrev=False)   # pylint: disable=protected-access
  seen = {}
  for cls in po.PipelineOptions.__subclasses__():
    seen[str(cls)] = cls
  for cls in seen.values():
    cls._add_argparse_args(parser)   # pylint: disable=protected-access

  def error(message):     # argparse would print its whole usage and exit
    raise UsageError(f"Beam pipeline option: {message}")
  parser.error = error
  return parser


def beam_option_names() -> List[str]:
  """Every ``--option`` name Beam's PipelineOptions parser knows, without the dashes."""
  return sorted({s.lstrip("-") for a in _beam_parser()._actions for s in a.option_strings   # pylint: disable=protected-access
                 if s.startswith("--")})


def unknown_beam_args(args: Sequence[str]) -> List[str]:
  """The arguments in ``args`` that Beam's PipelineOptions would discard as unparseable."""
  _, unknown = _beam_parser().parse_known_args(list(args))
  return unknown


def _flag_names(fv: flags.FlagValues) -> List[str]:
  names = []
  for name, flag in fv._flags().items():   # pylint: disable=protected-access
    names.append(name)
    if isinstance(flag, flags.BooleanFlag):
      names.append("no" + name)
  return names


def closest(name: str, known: Sequence[str]) -> Optional[str]:
  match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  return match[0] if match else None


def _unknown_message(arg: str, known: Sequence[str], beam: bool) -> str:
  name = arg.lstrip("-").split("=", 1)[0]
  if not arg.startswith("-"):
    return f"unexpected argument {arg!r}: every argument is a --flag"
  what = "a flag of this program nor a Beam pipeline option" if beam else "a flag of this program"
  near = closest(name, known)
  return f"unknown flag --{name}: not {what}" + (f"; did you mean --{near}?" if near else "")


def parse(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS, beam: bool = False,
          validate: Optional[Callable[[flags.FlagValues], None]] = None,
          positional: bool = False) -> List[str]:
  """Parses ``argv`` (program name first) into ``fv`` and validates; returns [program name]
  plus, with ``beam``, the Beam pipeline options, and with ``positional`` the arguments after
  ``--``. Raises UsageError."""
  try:
    rest = fv(list(argv), known_only=beam)
  except flags.Error as e:
    name = getattr(e, "flagname", None)
    if isinstance(e, flags.UnrecognizedFlagError) and name:
      raise UsageError(_unknown_message("--" + name, _flag_names(fv), False)) from None
    raise UsageError(str(e)) from None
  if beam:
    extra = rest[1:]
    unknown = unknown_beam_args(extra)
    if unknown:
      raise UsageError(_unknown_message(unknown[0], _flag_names(fv) + beam_option_names(), True))
  elif len(rest) > 1 and not positional:
    raise UsageError(_unknown_message(rest[1], _flag_names(fv), False))
  if validate is not None:
    validate(fv)
  return list(rest)


def flags_parser(beam: bool = False, validate: Optional[Callable[[flags.FlagValues], None]] = None,
                 fv: flags.FlagValues = flags.FLAGS, positional: bool = False):
  """An ``app.run`` flags_parser: parse(); a UsageError is one ``error:`` line and exit 2."""
  def parser(argv):
    try:
      return parse(argv, fv, beam, validate, positional)
    except UsageError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USAGE)
  return parser


def run(main, define_flags: Callable[[flags.FlagValues], None],
        validate: Optional[Callable[[flags.FlagValues], None]] = None, beam: bool = False,
        positional: bool = False) -> None:
  """Defines the flags into flags.FLAGS and runs ``main`` after they are parsed and validated."""
  define_flags(flags.FLAGS)

  def main_once(argv):
    # TensorFlow, imported before absl set up the root logger, gave its logger a handler of its
    # own; absl's handler on the root logger prints every line already (no line twice).
    tf_logger = logging.getLogger("tensorflow")
    for handler in list(tf_logger.handlers):
      tf_logger.removeHandler(handler)
    return main(argv)

  app.run(main_once, flags_parser=flags_parser(beam, validate, positional=positional))


def absolute(path: str) -> str:
  """A local path (or glob) made absolute; a URL of a file system (gs://, s3://, hdfs://) as it is."""
  return path if "://" in path else os.path.abspath(path)


def require(fv: flags.FlagValues, *names: str) -> None:
  """Raises UsageError for the first of ``names`` that has no value."""
  for name in names:
    if fv[name].value in (None, "", []):
      raise UsageError(f"--{name} is required")
