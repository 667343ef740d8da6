"""The experiments import one way: the core never imports a study, the registry or main;
a study never imports another; nothing in experiments/ imports the benchmarks; and no module
is part of an import cycle, function-level imports included."""

import pathlib

import layering

ROOT = pathlib.Path(__file__).resolve().parents[2]
GRAPH = layering.import_graph(ROOT / "experiments", "experiments")
FAMILIES = ("paper", "ics", "renorm")


def _family(module: str) -> str | None:
  parts = module.split(".")
  return parts[2] if len(parts) > 2 and parts[1] == "studies" else None


def test_experiments_have_no_import_cycles():
  assert layering.find_cycle(GRAPH) is None


def test_the_core_imports_only_the_core():
  for module, imported in GRAPH.items():
    if module.startswith("experiments.core"):
      outside = {m for m in imported if not m.startswith("experiments.core")}
      assert not outside, f"{module} imports {sorted(outside)}"


def test_a_study_imports_the_core_and_its_own_family_only():
  assert {_family(m) for m in GRAPH} >= set(FAMILIES)
  for module, imported in GRAPH.items():
    family = _family(module)
    if family is None:
      continue
    for other in imported:
      assert other.startswith("experiments.core") or _family(other) == family, (
          f"{module} imports {other}")


def test_only_the_registry_and_main_know_every_study():
  for module, imported in GRAPH.items():
    if module in ("experiments.registry", "experiments.main") or _family(module):
      continue
    studies = {m for m in imported if m.startswith("experiments.studies")}
    assert not studies, f"{module} imports {sorted(studies)}"
  assert {f"experiments.studies.{f}" for f in FAMILIES} <= GRAPH["experiments.registry"]


def test_experiments_import_nothing_of_the_benchmarks():
  external = layering.external_imports(ROOT / "experiments", "experiments")
  for module, names in external.items():
    assert "benchmarks" not in names, module
