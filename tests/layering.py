"""The import graph of a package's modules, read from its source, for the layering tests.

`import_graph` parses every module of a package (nothing is imported) and records which
modules each imports, at the top or inside a function: a function-level import is still a
dependency, and a cycle through one still ties the modules together. `find_cycle` finds a
cycle in such a graph. Used by tests/core/test_layering.py; any package's layering test can
use it the same way.
"""

from __future__ import annotations

import ast
from pathlib import Path


def module_names(root: Path, package: str) -> dict[str, Path]:
  """Every module of `package` (whose folder is `root`) by dotted name; a package's
  `__init__.py` by the package's own name."""
  names = {}
  for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    names[".".join((package, *parts))] = path
  return names


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
  """The dotted names an import statement names: `import a.b` names a.b; `from a import b`
  names a.b (a submodule, if it is one) and a; relative imports are resolved from `module`."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  base = node.module or ""
  if node.level:
    anchor = module.split(".")
    anchor = anchor if is_package else anchor[:-1]
    anchor = anchor[:len(anchor) - (node.level - 1)]
    base = ".".join([*anchor, *([base] if base else [])])
  return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
  """module -> the modules of `package` it imports (directly, anywhere in its source).

  `from package import name` counts as importing the submodule `package.name` where there is
  one, else the package itself; importing a submodule does not count as importing the
  packages above it, which Python runs first, so that a package's `__init__` re-exporting
  its modules is no cycle with them.
  """
  modules = module_names(root, package)
  graph = {}
  for module, path in modules.items():
    is_package = path.name == "__init__.py"
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      names = _imported(node, module, is_package)
      submodules = [n for n in names[1:] if n in modules] if isinstance(node, ast.ImportFrom) else []
      if submodules:
        edges.update(submodules)
      else:
        edges.update(n for n in names[:1] if n in modules)
    edges.discard(module)
    graph[module] = edges
  return graph


def external_imports(root: Path, package: str) -> dict[str, set[str]]:
  """module -> the top-level names of everything outside `package` it imports."""
  modules = module_names(root, package)
  found = {}
  for module, path in modules.items():
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names.update(alias.name.split(".")[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
        names.add(node.module.split(".")[0])
    found[module] = names - {package}
  return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of `graph` as [a, b, ..., a], or None if it has none."""
  done, path, on_path = set(), [], set()

  def visit(node):
    path.append(node)
    on_path.add(node)
    for nxt in sorted(graph.get(node, ())):
      if nxt in on_path:
        return path[path.index(nxt):] + [nxt]
      if nxt not in done:
        cycle = visit(nxt)
        if cycle:
          return cycle
    on_path.discard(path.pop())
    done.add(node)
    return None

  for start in sorted(graph):
    if start not in done:
      cycle = visit(start)
      if cycle:
        return cycle
  return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  """Every module `start` imports, directly or through others."""
  seen, stack = set(), [start]
  while stack:
    for nxt in graph.get(stack.pop(), ()):
      if nxt not in seen:
        seen.add(nxt)
        stack.append(nxt)
  return seen
