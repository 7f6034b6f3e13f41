"""The dependency direction, checked on the source: flows -> tasks -> science -> storage.

Every .py under sae_transfer/, storage/, tasks/ and flows/ is parsed with `ast`; imports inside
functions count as much as those at the top (a deferred import is still a dependency). The
stage folders are installed as sae_transfer.storage, sae_transfer.tasks and sae_transfer.flows."""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"sae_transfer": "sae_transfer", "storage": "sae_transfer.storage", "tasks": "sae_transfer.tasks",
           "flows": "sae_transfer.flows"}
STAGES = ("storage", "tasks", "flows", "cli")  # sae_transfer.<stage>: one group each; the rest is science
STORAGE_MAY_IMPORT = ("sae_transfer.storage", "sae_transfer.errors")  # besides stdlib and third-party libraries


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root
    line: int
    target: str  # absolute module name, e.g. sae_transfer.sae.io

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.target}"


def _modules() -> dict[str, Path]:
    """Dotted name -> source file, for every module of the four folders."""
    out = {}
    for folder, package in FOLDERS.items():
        for file in sorted((REPO / folder).rglob("*.py")):
            parts = file.relative_to(REPO / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = file
    return out


MODULES = _modules()
TREES = {name: ast.parse(file.read_text(), str(file)) for name, file in MODULES.items()}


def _imports(name: str) -> list[Import]:
    """Every import statement of module `name`, anywhere in the file, as absolute module names;
    `from package import module` also yields package.module."""
    file = MODULES[name]
    rel = str(file.relative_to(REPO))
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            out += [Import(rel, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join(parent + ([node.module] if node.module else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            out += [Import(rel, node.lineno, target) for target in submodules or [base]]
    return out


IMPORTS = {name: _imports(name) for name in MODULES}


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def group(name: str) -> str | None:
    """The package-level node of a module: sae_transfer.storage/tasks/flows/cli, or the science
    subpackage or module it belongs to (sae_transfer.sae, sae_transfer.corpus, ...); None if not ours."""
    parts = name.split(".")
    if parts[0] != "sae_transfer":
        return None
    return ".".join(parts[:2])


def is_science(name: str) -> bool:
    return group(name) is not None and not _under(name, *(f"sae_transfer.{s}" for s in STAGES))


def _violations(modules, bad) -> list[str]:
    return [str(imp) for name in modules for imp in IMPORTS[name] if bad(imp.target)]


def test_storage_imports_no_science():
    storage = [n for n in MODULES if _under(n, "sae_transfer.storage")]
    bad = _violations(storage, lambda t: group(t) is not None and not _under(t, *STORAGE_MAY_IMPORT))
    assert not bad, ("storage/ may import only stdlib, libraries, sae_transfer.storage.* and sae_transfer.errors:\n"
                     + "\n".join(bad))


def test_science_imports_neither_tasks_flows_nor_prefect():
    science = [n for n in MODULES if is_science(n)]
    bad = _violations(science, lambda t: _under(t, "sae_transfer.tasks", "sae_transfer.flows", "prefect"))
    assert not bad, "the science must not import the pipeline (tasks, flows) or Prefect:\n" + "\n".join(bad)


def test_tasks_never_import_flows():
    tasks = [n for n in MODULES if _under(n, "sae_transfer.tasks")]
    bad = _violations(tasks, lambda t: _under(t, "sae_transfer.flows"))
    assert not bad, "tasks/ must not import flows/:\n" + "\n".join(bad)


def test_stage_folders_are_imported_by_their_installed_names():
    bad = _violations(MODULES, lambda t: t.split(".")[0] in ("storage", "tasks", "flows"))
    assert not bad, "import sae_transfer.storage / .tasks / .flows, not the top-level folder names:\n" + "\n".join(bad)


def test_no_module_level_getattr():
    bad = [f"{MODULES[name].relative_to(REPO)}:{node.lineno} defines a module-level __getattr__"
           for name, tree in TREES.items() for node in tree.body
           if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "__getattr__"]
    assert not bad, "import names from the module that defines them instead of re-exporting lazily:\n" + "\n".join(bad)


def _cycles(edges: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def package_edges() -> dict[str, dict[str, list[Import]]]:
    """group -> group it imports -> the import statements that make the edge."""
    edges: dict[str, dict[str, list[Import]]] = defaultdict(lambda: defaultdict(list))
    for name, imports in IMPORTS.items():
        for imp in imports:
            a, b = group(name), group(imp.target)
            if b is not None and a != b:
                edges[a][b].append(imp)
    return edges


def test_package_import_graph_has_no_cycle():
    edges = package_edges()
    report = []
    for component in _cycles(edges):
        report.append("cycle between " + ", ".join(component) + ":")
        report += [f"  {a} -> {b}: {edges[a][b][0]}" + (f" (+{len(edges[a][b]) - 1} more)" if len(edges[a][b]) > 1 else "")
                   for a in component for b in component if b in edges.get(a, {})]
    assert not report, "\n".join(report)
