"""The `jaxbn` command.

    jaxbn check                 numeric grid + symbolic proof; exit status 1 on any failure
    jaxbn check --no-symbolic   numeric grid only (no sympy needed)
    jaxbn check --quick         float64 and float32 on the dense layout only
    jaxbn kernels               build (once per machine) and load the C++ CPU kernels, and say
                                where they are or why they are unavailable; exit status 1 if
                                they are (e.g. `RUN jaxbn kernels` in an image, ahead of time)

Exit status: 0 all checks passed (kernels available), 1 a check failed or could not run (no
sympy for the symbolic proof; kernels unavailable), 2 the output could not be written (the
reason on stderr), 141 (128 + SIGPIPE) the reader of the output went away, e.g.
`jaxbn check | head -1`: the remaining checks are not run, so it is no verdict. A closed stdout
(`jaxbn check >&-`) runs the checks with the output discarded and exits with their status,
with a note on stderr. Characters the output's encoding lacks (a C locale, PYTHONIOENCODING)
print as ASCII: the minus sign as '-', Greek letters by name (sigma), others as '?'.
"""
# The docstring is --help's text, so it stays ASCII: any stdout can print it.

from __future__ import annotations

import argparse
import codecs
import os
import sys
import unicodedata
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from jaxbn import checks, kernels

FAILED_STATUS = 1
OUTPUT_ERROR_STATUS = 2
# What a shell reports for a writer killed by SIGPIPE; Python ignores the signal and raises
# BrokenPipeError instead, so this status says the same thing without the traceback.
BROKEN_PIPE_STATUS = 128 + 13

# ASCII for the characters the tables and messages use. Greek letters not listed here print
# by name; anything else decomposes (NFKD) to ASCII if it can, or prints as '?'.
_ASCII = {
    "\u2212": "-", "\u2013": "-", "\u2014": "--", "\u00d7": "x", "\u00b7": "*",
    "\u2026": "...", "\u2248": "~", "\u2264": "<=", "\u2265": ">=", "\u2260": "!=",
    "\u2261": "==", "\u2192": "->", "\u2190": "<-", "\u00b1": "+/-", "\u221e": "inf",
    "\u2202": "d", "\u03a3": "sum", "\u2211": "sum", "\u221a": "sqrt", "\u00b2": "^2",
    "\u00b3": "^3", "\u00b5": "mu", "\u03b5": "eps", "\u0302": "hat", "\u2016": "||",
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
}


def _to_ascii(char: str) -> str:
  if char in _ASCII:
    return _ASCII[char]
  name = unicodedata.name(char, "")
  if name.startswith("GREEK SMALL LETTER ") and " " not in name[19:]:
    return name[19:].lower()
  if name.startswith("GREEK CAPITAL LETTER ") and " " not in name[21:]:
    return name[21:].capitalize()
  ascii_only = "".join(c for c in unicodedata.normalize("NFKD", char) if c.isascii())
  return ascii_only or "?"


def _transliterate(error: UnicodeError) -> tuple[str, int]:
  if not isinstance(error, UnicodeEncodeError):
    raise error
  return "".join(map(_to_ascii, error.object[error.start:error.end])), error.end


codecs.register_error("jaxbn.ascii", _transliterate)


class _OutputError(Exception):
  """Writing stdout failed: an output problem, which must not read as a failed check."""


class _Output:
  """The stream rich writes to: sys.stdout with what its encoding lacks transliterated (a
  UnicodeEncodeError would end the check like a failure), and its OSErrors as `_OutputError`
  (so they are told apart from errors of the checks themselves)."""

  def __init__(self, stream):
    self._stream = stream
    self.encoding = getattr(stream, "encoding", None) or "utf-8"
    self._encodes_all = codecs.lookup(self.encoding).name.startswith("utf")

  def write(self, text: str) -> int:
    if not self._encodes_all:
      text = text.encode(self.encoding, "jaxbn.ascii").decode(self.encoding)
    try:
      return self._stream.write(text)
    except OSError as e:
      raise _OutputError(e) from e

  def flush(self) -> None:
    try:
      self._stream.flush()
    except OSError as e:
      raise _OutputError(e) from e

  def isatty(self) -> bool:
    return self._stream.isatty()

  def fileno(self) -> int:
    return self._stream.fileno()


def _stdout_to_devnull() -> None:
  """Points file descriptor 1 at /dev/null: the interpreter's flush of stdout at exit then
  succeeds (a failed flush prints 'Exception ignored' and exits 120), and when stdout was
  closed, the next file opened cannot take descriptor 1 and receive stray writes."""
  devnull = os.open(os.devnull, os.O_WRONLY)
  if devnull != 1:
    os.dup2(devnull, 1)
    os.close(devnull)


def _stdout_is_closed() -> bool:
  if sys.stdout is not None:
    return False
  try:
    os.fstat(1)
  except OSError:
    return True
  return False  # e.g. pythonw: no sys.stdout, but the descriptor is not free either


def _plain(console: Console, text: object, style: str = "") -> Text:
  """`text` as printed: Text, not str, since rich reads a str as markup and ':name:' as an
  emoji, which mangles "jaxbn[check]", paths and identities from the checks; and in ASCII
  where the output's encoding lacks a character, before rich measures the table's columns
  (`_Output` transliterates too, but after the layout, which it would skew)."""
  text = str(text)
  if not codecs.lookup(console.encoding).name.startswith("utf"):
    text = text.encode(console.encoding, "jaxbn.ascii").decode(console.encoding)
  return Text(text, style=style)


def _numeric_table(results: Sequence[checks.Comparison], console: Console) -> Table:
  table = Table(title=_plain(
      console, "Numeric checks (relative error = max|a − b| / max|b|, per gradient)"))
  for column in ("case", "pair", "max abs err", "max rel err", "tolerance", "result"):
    table.add_column(column, justify="right" if "err" in column or column == "tolerance" else "left")
  for r in results:
    table.add_row(
        _plain(console, r.case),
        _plain(console, r.pair),
        f"{r.max_abs:.2e}",
        f"{r.max_rel:.2e}",
        "report only" if r.tolerance == float("inf") else f"{r.tolerance:.1e}",
        _plain(console, "pass", "green") if r.passed else _plain(console, "FAIL", "bold red"),
    )
  return table


def _symbolic_table(results: Sequence[checks.SymbolicResult], console: Console) -> Table:
  table = Table(title=_plain(
      console, "Symbolic checks (sympy: formula − derivative simplifies to 0)"))
  for column in ("m", "identity", "result"):
    table.add_column(column)
  for r in results:
    table.add_row(_plain(console, r.m), _plain(console, r.identity),
                  _plain(console, "proved", "green") if r.passed
                  else _plain(console, "FAIL", "bold red"))
  return table


def _check(args: argparse.Namespace, console: Console) -> int:
  cases = checks.default_cases()
  if args.quick:
    cases = [c for c in cases if c.layout == "dense"]
  # The braille "dots" spinner would print as '?' on an encoding without them.
  spinner = "dots" if codecs.lookup(console.encoding).name.startswith("utf") else "line"
  with console.status("running the numeric grid...", spinner=spinner):
    kernel_status = kernels.status()
    numeric = checks.run_checks(cases)
  # The analytic side of every case (the grid's masks pad whole examples) runs through the
  # C++ CPU kernels when they are available.
  console.print(_plain(console, "CPU kernels: " + (
      "in use for the analytic gradients" if kernel_status.available
      else f"not in use ({kernel_status.reason})")))
  console.print(_numeric_table(numeric, console))
  failed = sum(not r.passed for r in numeric)
  if args.symbolic:
    try:
      symbolic = checks.symbolic_checks()
    except ImportError:
      console.print(_plain(
          console, "sympy is not installed: pip install 'jaxbn[check]' for the symbolic proof."))
      return FAILED_STATUS
    console.print(_symbolic_table(symbolic, console))
    failed += sum(not r.passed for r in symbolic)
  total = len(numeric) + (len(symbolic) if args.symbolic else 0)
  if failed:
    console.print(_plain(console, f"{failed} of {total} checks failed.", "bold red"))
    return FAILED_STATUS
  console.print(_plain(console, f"All {total} checks passed.", "green"))
  return 0


def _kernels(console: Console) -> int:
  status = kernels.status()  # builds on first use
  if status.available:
    console.print(_plain(console, f"CPU kernels: {status.reason}: {status.library}"))
    return 0
  console.print(_plain(console, "CPU kernels unavailable", "bold red")
                + _plain(console, f": {status.reason}"))
  return FAILED_STATUS


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jaxbn", description=__doc__.split("\n")[0],
                                   epilog=__doc__[__doc__.index("Exit status:"):],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  check = commands.add_parser(
      "check", help="prove the analytic backward against autodiff, finite differences, sympy"
  )
  check.add_argument("--quick", action="store_true", help="only the dense layout")
  check.add_argument(
      "--no-symbolic", dest="symbolic", action="store_false", help="skip the sympy proof"
  )
  commands.add_parser(
      "kernels", help="build and load the C++ CPU kernels now, and report where they are")
  args = parser.parse_args(argv)
  if _stdout_is_closed():
    _stdout_to_devnull()
    if sys.stderr is not None:
      print("jaxbn: stdout is closed: the output is discarded; the exit status is the result.",
            file=sys.stderr)
    console = Console(quiet=True)
  else:
    output = _Output(sys.stdout)
    # Off a terminal (CI logs, pipes) rich would squeeze the table into 80 columns.
    console = Console(file=output, width=None if output.isatty() else 160)
  try:
    if args.command == "kernels":
      return _kernels(console)
    return _check(args, console)
  except _OutputError as e:
    try:
      _stdout_to_devnull()
    except OSError:
      pass
    if isinstance(e.__cause__, BrokenPipeError):
      return BROKEN_PIPE_STATUS  # the reader chose to stop; nothing to say
    if sys.stderr is not None:
      print(f"jaxbn: cannot write the output: {e.__cause__}", file=sys.stderr)
    return OUTPUT_ERROR_STATUS


if __name__ == "__main__":
  sys.exit(main())
