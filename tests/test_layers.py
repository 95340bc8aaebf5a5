"""The package is laid out as the pipeline (docs/design.md §2): a stage imports only the stages before it.

Stages, in order: the base modules (``config``, ``errors``, ``devices``, ``faults``, ``inputs``, ``task``), ``store``,
``features``, ``weights``, ``index``, ``query``, ``eval``, ``serve``, ``tasks`` (built-in tasks use the library
as a user's task would), ``integrations``, ``cli``. Imports inside functions count; imports under
``if TYPE_CHECKING:`` do not. The one allowed upward import is the string registry of built-in tasks
(``gradindex.task`` → ``gradindex.tasks``). No import cycle between modules either.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gradindex"
ORDER = ["base", "store", "features", "weights", "index", "query", "eval", "serve", "tasks", "integrations", "cli"]
BASE = {"checks", "config", "errors", "devices", "faults", "inputs", "task"}
ALLOWED_UPWARD = {("gradindex.task", "gradindex.tasks")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str | None:
    """The stage of a module; ``None`` for the package root (its lazy exports are strings)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    if parts[1] == "__main__":
        return "cli"
    return "base" if parts[1] in BASE else parts[1]


def imports(path: Path, lazy_exports: bool = True) -> set[str]:
    """The gradindex modules ``path`` imports; ``lazy_exports=False`` leaves out the imports inside a
    module-level ``__getattr__`` (PEP 562 re-exports: a name alias loaded on first use, not a dependency
    of the module's own code, so not a cycle)."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            typing_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    if not lazy_exports:
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                typing_only.update(id(child) for child in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "gradindex":
            found.update(f"gradindex.{a.name}" for a in node.names)  # from gradindex import faults
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gradindex"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gradindex"))
    return found


def import_graph(lazy_exports: bool = True) -> dict[str, set[str]]:
    return {module_name(p): imports(p, lazy_exports) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_known_stage():
    unknown = {m for m in import_graph() if stage(m) not in (None, *ORDER)}
    assert not unknown, f"modules outside the pipeline's stages: {sorted(unknown)} (add the stage to ORDER)"


def test_a_stage_imports_only_the_stages_before_it():
    upward = []
    for module, targets in import_graph().items():
        if stage(module) is None:
            continue
        for target in targets:
            here, there = stage(module), stage(target)
            if there is None or ORDER.index(there) > ORDER.index(here):
                if (module, target) not in ALLOWED_UPWARD:
                    upward.append(f"{module} -> {target}")
    assert not upward, "imports that run back up the pipeline: " + ", ".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph(lazy_exports=False)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if target == node:
                continue
            if state.get(target) == 1:  # on the current path: a cycle
                cycles.append(" -> ".join(path[path.index(target):] + [node, target]))
            elif target not in state:
                visit(target, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule is not vacuous: a store module importing the query stage is found."""
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from gradindex.query.attributor import Attributor\n")
    (target,) = imports(fake)
    assert ORDER.index(stage(target)) > ORDER.index(stage("gradindex.store.feature_store"))
