"""The `jaxbn` command.

    jaxbn check                 numeric grid + symbolic proof; exit status 1 on any failure
    jaxbn check --no-symbolic   numeric grid only (no sympy needed)
    jaxbn check --quick         float64 and float32 on the dense layout only
    jaxbn kernels               build (once per machine) and load the C++ CPU kernels, and say
                                where they are or why they are unavailable; exit status 1 if
                                they are (e.g. `RUN jaxbn kernels` in an image, ahead of time)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from jaxbn import checks, kernels


def _numeric_table(results: Sequence[checks.Comparison]) -> Table:
  table = Table(title="Numeric checks (relative error = max|a − b| / max|b|, per gradient)")
  for column in ("case", "pair", "max abs err", "max rel err", "tolerance", "result"):
    table.add_column(column, justify="right" if "err" in column or column == "tolerance" else "left")
  for r in results:
    table.add_row(
        r.case,
        r.pair,
        f"{r.max_abs:.2e}",
        f"{r.max_rel:.2e}",
        "report only" if r.tolerance == float("inf") else f"{r.tolerance:.1e}",
        "[green]pass[/]" if r.passed else "[bold red]FAIL[/]",
    )
  return table


def _symbolic_table(results: Sequence[checks.SymbolicResult]) -> Table:
  table = Table(title="Symbolic checks (sympy: formula − derivative simplifies to 0)")
  for column in ("m", "identity", "result"):
    table.add_column(column)
  for r in results:
    table.add_row(str(r.m), r.identity, "[green]proved[/]" if r.passed else "[bold red]FAIL[/]")
  return table


def _check(args: argparse.Namespace, console: Console) -> int:
  cases = checks.default_cases()
  if args.quick:
    cases = [c for c in cases if c.layout == "dense"]
  with console.status("running the numeric grid...", spinner="dots"):
    kernel_status = kernels.status()
    numeric = checks.run_checks(cases)
  # The analytic side of every case (the grid's masks pad whole examples) runs through the
  # C++ CPU kernels when they are available.
  console.print("CPU kernels: " + ("in use for the analytic gradients" if kernel_status.available
                                   else f"not in use ({kernel_status.reason})"))
  console.print(_numeric_table(numeric))
  failed = sum(not r.passed for r in numeric)
  if args.symbolic:
    try:
      symbolic = checks.symbolic_checks()
    except ImportError:
      console.print("sympy is not installed: pip install 'jaxbn[check]' for the symbolic proof.")
      return 1
    console.print(_symbolic_table(symbolic))
    failed += sum(not r.passed for r in symbolic)
  total = len(numeric) + (len(symbolic) if args.symbolic else 0)
  if failed:
    console.print(f"[bold red]{failed} of {total} checks failed.[/]")
    return 1
  console.print(f"[green]All {total} checks passed.[/]")
  return 0


def _kernels(console: Console) -> int:
  status = kernels.status()  # builds on first use
  if status.available:
    console.print(f"CPU kernels: {status.reason}: {status.library}")
    return 0
  console.print(f"[bold red]CPU kernels unavailable[/]: {status.reason}")
  return 1


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jaxbn", description=__doc__.split("\n")[0])
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
  # Off a terminal (CI logs, pipes) rich would squeeze the table into 80 columns.
  console = Console(width=None if sys.stdout.isatty() else 160)
  if args.command == "kernels":
    return _kernels(console)
  return _check(args, console)


if __name__ == "__main__":
  sys.exit(main())
