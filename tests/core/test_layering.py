"""jaxbn's layering, read from its imports (tests/layering.py): the library imports nothing of
the experiments, benchmarks or tests; its modules import each other without a cycle,
function-level imports included; and each layer imports only the layers below it — the
records, then the passes, then the two paths, then ops, then the modules and tools."""

from pathlib import Path

import layering

JAXBN = Path(__file__).resolve().parents[2] / "jaxbn"
GRAPH = layering.import_graph(JAXBN, "jaxbn")

# Below both paths: the records they take, and the pure-JAX passes and formulas.
BASE = {"jaxbn._records", "jaxbn._args", "jaxbn._per_feature", "jaxbn._passes"}
CPU = {m for m in GRAPH if m == "jaxbn._cpu" or m.startswith("jaxbn._cpu.")}
# What uses ops; ops uses none of it.
ABOVE_OPS = {"jaxbn", "jaxbn.linen", "jaxbn.nnx", "jaxbn.equinox", "jaxbn.recompute",
             "jaxbn._recording", "jaxbn._renorm_schedule", "jaxbn.reference", "jaxbn.interop", "jaxbn.kernels",
             "jaxbn.cli", *(m for m in GRAPH if m.startswith("jaxbn.checks"))}
# jaxbn._cpu's modules from the top: each imports only modules after it in this list.
CPU_ORDER = ["path", "calls", "primitive", "twins", "library", "build", "cache"]


def test_the_graph_finds_a_cycle_through_a_function_level_import(tmp_path):
  package = tmp_path / "pkg"
  (package / "sub").mkdir(parents=True)
  (package / "__init__.py").write_text("from pkg.a import f\n")
  (package / "a.py").write_text("from pkg.sub import b\n\ndef f():\n  return b.g()\n")
  (package / "sub" / "__init__.py").write_text("")
  (package / "sub" / "b.py").write_text("def g():\n  from pkg import a\n  return a\n")
  graph = layering.import_graph(package, "pkg")
  assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(),
                   "pkg.sub.b": {"pkg.a"}}
  assert layering.find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
  (package / "sub" / "b.py").write_text("def g():\n  return 1\n")
  assert layering.find_cycle(layering.import_graph(package, "pkg")) is None


def test_jaxbn_imports_nothing_from_the_experiments_benchmarks_or_tests():
  outside = {"experiments", "benchmarks", "configs", "scripts", "tests"}
  found = {module: names & outside
           for module, names in layering.external_imports(JAXBN, "jaxbn").items()}
  assert not {module: names for module, names in found.items() if names}


def test_only_the_equinox_module_imports_equinox():
  """Equinox is an optional extra (jaxbn[equinox]): `import jaxbn` must work without it."""
  importers = {module for module, names in layering.external_imports(JAXBN, "jaxbn").items()
               if "equinox" in names}
  assert importers == {"jaxbn.equinox"}
  assert not layering.reachable(GRAPH, "jaxbn") & {"jaxbn.equinox"}


def test_jaxbn_has_no_import_cycles():
  assert layering.find_cycle(GRAPH) is None


def test_the_records_import_nothing_of_jaxbn():
  assert GRAPH["jaxbn._records"] == set()


def test_the_passes_know_neither_path():
  for module in ("jaxbn._passes", "jaxbn._per_feature"):
    assert layering.reachable(GRAPH, module) <= BASE, module


def test_the_paths_import_only_the_records_the_passes_and_their_own_modules():
  assert layering.reachable(GRAPH, "jaxbn._xla_path") <= BASE
  for module in sorted(CPU):
    assert layering.reachable(GRAPH, module) <= BASE | CPU, module


def test_ops_imports_nothing_that_uses_it():
  assert GRAPH["jaxbn.ops"] >= {"jaxbn._xla_path", "jaxbn._cpu.path", "jaxbn._records"}
  assert not layering.reachable(GRAPH, "jaxbn.ops") & ABOVE_OPS


def test_the_cpu_modules_import_only_those_below_them():
  assert {f"jaxbn._cpu.{name}" for name in CPU_ORDER} == CPU - {"jaxbn._cpu"}
  for i, name in enumerate(CPU_ORDER):
    imported = {m.removeprefix("jaxbn._cpu.") for m in GRAPH[f"jaxbn._cpu.{name}"] & CPU}
    assert imported <= set(CPU_ORDER[i + 1:]), name
