"""The `jaxbn` command: `check` prints the tables and its exit status reports failures;
`kernels` reports the CPU kernels."""

import dataclasses

import pytest

from jaxbn import checks, cli


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
  real = checks.check_case

  def one_failure(case):
    found = real(case)
    return [dataclasses.replace(found[0], passed=False)] + found[1:]

  monkeypatch.setattr(checks, "check_case", one_failure)
  assert cli.main(["check", "--quick", "--no-symbolic"]) == 1
  assert "FAIL" in capsys.readouterr().out


def test_kernels_command_reports_the_library_or_why_not(monkeypatch, capsys):
  from jaxbn import _native_build, kernels

  assert cli.main(["kernels"]) == 0
  assert str(kernels.status().library) in capsys.readouterr().out
  monkeypatch.setattr(kernels, "status",
                      lambda: _native_build.Status(False, "disabled by JAXBN_CPU_KERNEL=0"))
  assert cli.main(["kernels"]) == 1
  assert "unavailable: disabled by JAXBN_CPU_KERNEL=0" in capsys.readouterr().out
