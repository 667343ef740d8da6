"""The README's Python examples and the modules' docstring examples run."""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 3
  namespace = {}
  # Users run with JAX's default (standard) promotion, not the suite's strict setting.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    for block in blocks:
      exec(compile(block, str(README), "exec"), namespace)
  assert namespace["logits"].shape == (60, 10)


def test_module_docstring_examples_run():
  import doctest

  import jaxbn.linen
  import jaxbn.nnx

  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    for module in (jaxbn.linen, jaxbn.nnx):
      result = doctest.testmod(module, raise_on_error=False)
      assert result.attempted > 0 and result.failed == 0, module.__name__
