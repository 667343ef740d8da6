"""The `jaxbn` command: `check` prints the tables and its exit status reports failures;
`kernels` reports the CPU kernels."""

import dataclasses
import os
import pty
import subprocess
import sys

import pytest

from jaxbn import checks, cli
from jaxbn.checks import numeric


@pytest.mark.slow
def test_check_passes_and_prints_the_table(capsys):
  assert cli.main(["check", "--quick"]) == 0
  out = capsys.readouterr().out
  for column in ("case", "pair", "max abs err", "max rel err", "tolerance", "result"):
    assert column in out
  assert "analytic vs finite differences" in out
  assert "closed form == dL/dx_i" in out
  assert "FAIL" not in out
  assert "CPU kernels: in use" in out  # the grid's unmasked cases ran through them


@pytest.mark.slow
def test_check_exits_nonzero_on_a_failure(monkeypatch, capsys):
  real = numeric.check_case

  def one_failure(case):
    found = real(case)
    return [dataclasses.replace(found[0], passed=False)] + found[1:]

  monkeypatch.setattr(numeric, "check_case", one_failure)
  assert cli.main(["check", "--quick", "--no-symbolic"]) == 1
  assert "FAIL" in capsys.readouterr().out


def test_kernels_command_reports_the_library_or_why_not(monkeypatch, capsys):
  from jaxbn import kernels
  from jaxbn._cpu import library

  assert cli.main(["kernels"]) == 0
  assert str(kernels.status().library) in capsys.readouterr().out
  monkeypatch.setattr(kernels, "status",
                      lambda: library.Status(False, "disabled by JAXBN_CPU_KERNEL=0"))
  assert cli.main(["kernels"]) == 1
  assert "unavailable: disabled by JAXBN_CPU_KERNEL=0" in capsys.readouterr().out


# `jaxbn check` as its console script runs it (`sys.exit(cli.main())`) in a fresh interpreter,
# on stand-in results: the real grid takes half a minute. The strings carry the characters and
# brackets that printing has to cope with. argv: "pass" or "fail", the row count, then the
# command line.
CHECK_SCRIPT = """
import sys
from jaxbn import checks, cli, kernels
from jaxbn._cpu import library

passed, rows = sys.argv[1] == "pass", int(sys.argv[2])
row = checks.Comparison("dense/σ-offset/x̂", "analytic − autodiff [check]", 1e-13, 2e-13,
                        1e-10, passed)
checks.run_checks = lambda cases: [row] * rows
checks.symbolic_checks = lambda: [checks.SymbolicResult("m", "Σ g_i x̂_i == ∂L/∂γ", True)]
kernels.status = lambda: library.Status(False, "disabled [by] the test")
sys.exit(cli.main(sys.argv[3:]))
""".encode("ascii", "backslashreplace").decode()  # a C locale decodes argv as ASCII


def _run_check(verdict, *options, env=None, shell_redirect="", rows=3, **kwargs):
  env = {**os.environ, **(env or {})}
  command = [sys.executable, "-c", CHECK_SCRIPT, verdict, str(rows), "check", *options]
  if shell_redirect:
    command = ["sh", "-c", f'exec "$0" "$@" {shell_redirect}', *command]
  kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
  return subprocess.run(command, env=env, timeout=120, **kwargs)


def _no_traceback(stderr: bytes):
  text = stderr.decode("utf-8", "replace")
  assert "Traceback" not in text and "Exception ignored" not in text, text


@pytest.mark.parametrize("env", [
    {"PYTHONIOENCODING": "latin-1"},
    {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""},
], ids=["latin-1", "C-locale"])
def test_check_prints_what_a_narrow_stdout_can_encode(env):
  result = _run_check("pass", env=env)
  _no_traceback(result.stderr)
  assert result.returncode == 0
  assert result.stdout.isascii()
  out = result.stdout.decode("ascii")
  assert "max|a - b| / max|b|" in out  # the title's minus sign
  assert "(sympy: formula -" in out
  assert "dense/sigma-offset/xhat" in out
  assert "analytic - autodiff [check]" in out
  # Transliterated before rich lays out the tables: each table's lines are equally wide.
  assert len({len(line) for line in out.splitlines() if line.startswith(("|", "+"))}) <= 2
  assert "sum g_i xhat_i == dL/dgamma" in out
  assert "All 4 checks passed." in out


def test_a_failed_check_exits_1_on_a_narrow_stdout():
  result = _run_check("fail", "--no-symbolic", env={"PYTHONIOENCODING": "latin-1"})
  _no_traceback(result.stderr)
  assert result.returncode == 1
  assert "3 of 3 checks failed." in result.stdout.decode("latin-1")


@pytest.mark.parametrize("verdict, status", [("pass", 0), ("fail", 1)])
def test_closed_stdout_runs_the_checks_and_exits_with_their_status(verdict, status):
  result = _run_check(verdict, shell_redirect=">&-")
  _no_traceback(result.stderr)
  assert result.returncode == status
  assert b"stdout is closed" in result.stderr


def test_a_reader_that_stops_early_ends_the_check_quietly():
  # Far more than a pipe buffer holds, so the writes after the reader leaves fail.
  command = [sys.executable, "-c", CHECK_SCRIPT, "pass", "5000", "check", "--no-symbolic"]
  with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
    assert process.stdout.readline().startswith(b"CPU kernels: not in use")
    process.stdout.close()
    stderr = process.stderr.read()
    status = process.wait(timeout=120)
  assert status == 141
  _no_traceback(stderr)
  assert stderr == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (ENOSPC on write)")
def test_an_unwritable_stdout_is_an_output_error_not_a_failed_check():
  with open("/dev/full", "w") as full:
    result = _run_check("pass", stdout=full)
  _no_traceback(result.stderr)
  assert result.returncode == 2
  assert b"jaxbn: cannot write the output: [Errno 28] No space left on device" in result.stderr


def test_the_spinner_on_a_latin1_terminal():
  # A terminal shows the status spinner, which rich draws in braille by default.
  primary, secondary = pty.openpty()
  script = CHECK_SCRIPT.replace("[row] * rows", "time.sleep(0.5) or [row] * rows")
  with subprocess.Popen([sys.executable, "-c", "import time\n" + script, "pass", "3", "check"],
                        stdout=secondary, stderr=subprocess.PIPE,
                        env={**os.environ, "PYTHONIOENCODING": "latin-1"}) as process:
    os.close(secondary)
    out = b""
    while True:
      try:
        chunk = os.read(primary, 65536)
      except OSError:  # EIO: the terminal's last writer is gone
        break
      if not chunk:
        break
      out += chunk
    stderr = process.stderr.read()
    status = process.wait(timeout=120)
  os.close(primary)
  _no_traceback(stderr)
  assert status == 0
  assert "running the numeric grid..." in out.decode("latin-1")
  assert "All 4 checks passed." in out.decode("latin-1")


def test_help_prints_on_any_stdout():
  result = subprocess.run([sys.executable, "-m", "jaxbn.cli", "--help"], capture_output=True,
                          timeout=120, env={**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0",
                                            "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": ""})
  _no_traceback(result.stderr)
  assert result.returncode == 0
  assert b"141 (128 + SIGPIPE)" in result.stdout


def test_brackets_in_messages_print_literally(monkeypatch, capsys):
  from jaxbn import kernels
  from jaxbn._cpu import library

  row = checks.Comparison("dense/[red]x[/]", "a [bold]b[/bold] [check]", 1e-13, 2e-13, 1e-10,
                          True)
  monkeypatch.setattr(checks, "run_checks", lambda cases: [row])
  monkeypatch.setattr(checks, "symbolic_checks",
                      lambda: [checks.SymbolicResult("m", "x[i] == [y] :smile:", True)])
  monkeypatch.setattr(kernels, "status",
                      lambda: library.Status(False, "no [cxx] at /opt/[x]/c++"))
  assert cli.main(["check"]) == 0
  out = capsys.readouterr().out
  assert "not in use (no [cxx] at /opt/[x]/c++)" in out
  assert "dense/[red]x[/]" in out
  assert "a [bold]b[/bold] [check]" in out
  assert "x[i] == [y] :smile:" in out
  assert cli.main(["kernels"]) == 1
  assert "CPU kernels unavailable: no [cxx] at /opt/[x]/c++" in capsys.readouterr().out


def test_the_no_sympy_hint_names_the_extra(monkeypatch, capsys):
  row = checks.Comparison("dense/normal/unmasked/float64", "analytic vs autodiff", 1e-13,
                          2e-13, 1e-10, True)
  monkeypatch.setattr(checks, "run_checks", lambda cases: [row])

  def no_sympy():
    raise ImportError("No module named 'sympy'")

  monkeypatch.setattr(checks, "symbolic_checks", no_sympy)
  assert cli.main(["check"]) == 1
  assert "pip install 'jaxbn[check]' for the symbolic proof" in capsys.readouterr().out
