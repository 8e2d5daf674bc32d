"""The floors of the code (docs/architecture.md) and the import graph between its modules.

edgeinfer (configfile, cliargs, structcheck) <- edgeinfer.contract <- edgeinfer.runtimes
<- edgeinfer.agent, and edgeinfer.fleet on the contract alone: no import runs back up a
floor, the operator's side and the SDK never load the daemon, and no two modules import
each other, directly or round a longer circle (function-local imports count too).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"edgeinfer": REPO / "edgeinfer", "edgeinfer.agent": REPO / "agent",
           "edgeinfer.runtimes": REPO / "runtimes", "edgeinfer.fleet": REPO / "fleet"}
# What each floor may import of the project (besides itself and the floors below).
MAY_IMPORT = {
    "edgeinfer.contract": {"edgeinfer"},
    "edgeinfer.runtimes": {"edgeinfer", "edgeinfer.contract"},
    "edgeinfer.agent": {"edgeinfer", "edgeinfer.contract", "edgeinfer.runtimes"},
    "edgeinfer.fleet": {"edgeinfer", "edgeinfer.contract"},
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "edgeinfer" and parts and parts[0] in {"agent", "runtimes", "fleet"}:
                continue  # the links to the other folders
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that `name` imports, anywhere in its body."""
    out: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + int(is_package)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for dotted in targets:
            target = dotted
            while target and target not in known:  # `from pkg import name`: name may not be a module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _floor(module: str) -> str:
    for floor in ("edgeinfer.contract", "edgeinfer.runtimes", "edgeinfer.agent", "edgeinfer.fleet"):
        if module == floor or module.startswith(floor + "."):
            return floor
    return "edgeinfer"


def test_no_import_runs_up_a_floor() -> None:
    def allowed(module: str, target: str) -> bool:
        mine, theirs = _floor(module), _floor(target)
        if mine == theirs:
            return True
        return mine != "edgeinfer" and theirs in MAY_IMPORT[mine]

    wrong = sorted(f"{module} imports {target}" for module, targets in _graph().items()
                   for target in targets if not allowed(module, target))
    assert wrong == []


def test_no_import_circles() -> None:
    graph = _graph()
    # Tarjan's strongly connected components: a component of two or more is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_sdk_and_the_cli_load_no_daemon_and_no_runtime() -> None:
    code = ("import sys, edgeinfer.fleet.client, edgeinfer.fleet.aio, edgeinfer.fleet.cli; "
            "print(sorted(m for m in sys.modules if m.startswith(('edgeinfer.agent', "
            "'edgeinfer.runtimes', 'onnxruntime', 'openvino'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_graph_sees_imports() -> None:
    # The checks above are only as good as the graph: it must see known edges.
    graph = _graph()
    assert "edgeinfer.contract.topics" in graph["edgeinfer.agent.jobs"]
    assert "edgeinfer.contract.manifest" in graph["edgeinfer.fleet.deploy"]


def test_every_package_is_installed() -> None:
    # pyproject.toml lists the packages one by one (package-dir maps the top folders under
    # edgeinfer.*): a subpackage missing there is missing from every wheel and install.
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert found == listed
