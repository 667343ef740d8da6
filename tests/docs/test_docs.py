"""The docs hold: the site builds with warnings as errors, every Python block in the README and
the docs runs, every command and path they name exists, and the modules' doctests pass."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))
DOCUMENTS = [README, *PAGES]


def _python_blocks(path: pathlib.Path) -> list[str]:
  return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def _run_blocks(path: pathlib.Path) -> dict:
  """Runs a page's Python blocks in order in one namespace, as a reader pastes them."""
  namespace = {}
  # Users run with JAX's default (standard) promotion, not the suite's strict setting.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    for block in _python_blocks(path):
      exec(compile(block, str(path), "exec"), namespace)
  return namespace


@pytest.mark.slow
def test_readme_examples_run():
  assert len(_python_blocks(README)) >= 3
  namespace = _run_blocks(README)
  assert namespace["logits"].shape == (60, 10)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if _python_blocks(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_python_blocks_run(page):
  namespace = _run_blocks(page)
  assert namespace, page


def test_docs_site_builds_with_warnings_as_errors(tmp_path):
  """mkdocs.yml sets strict: a broken link or anchor, a page left out of the nav, or an API
  page naming a function that no longer exists fails the build."""
  env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
  result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (tmp_path / "site" / "api" / "core" / "index.html").exists()


def _named(pattern: str) -> set[tuple[str, str]]:
  return {(str(doc.relative_to(ROOT)), match)
          for doc in DOCUMENTS for match in re.findall(pattern, doc.read_text())}


@pytest.mark.parametrize("doc,module", sorted(_named(r"python3? -m ((?:experiments|benchmarks|jaxbn)[\w.]*)")))
def test_docs_commands_name_modules_that_exist(doc, module):
  assert importlib.util.find_spec(module) is not None, f"{doc} names `python -m {module}`"


@pytest.mark.parametrize("doc,path", sorted(_named(
    r"(?<![\w/.])((?:configs|scripts|benchmarks|experiments|jaxbn|tests)/[\w/.-]*"
    r"(?:\.(?:py|cc|h|sh|txt|md)\b|/(?!\w)))")))
def test_docs_paths_exist(doc, path):
  # Files by their extension, folders by a trailing slash: "jaxbn/Flax" in prose is neither.
  assert (ROOT / path).exists(), f"{doc} names {path}, which is not in the repository"


def test_module_docstring_examples_run():
  import doctest

  import jaxbn.linen
  import jaxbn.nnx

  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    for module in (jaxbn.linen, jaxbn.nnx):
      result = doctest.testmod(module, raise_on_error=False)
      assert result.attempted > 0 and result.failed == 0, module.__name__


def test_equinox_module_docstring_example_runs():
  import doctest

  pytest.importorskip("equinox", reason="jaxbn.equinox needs equinox (pip install jaxbn[equinox])")
  import jaxbn.equinox

  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    result = doctest.testmod(jaxbn.equinox, raise_on_error=False)
  assert result.attempted > 0 and result.failed == 0
