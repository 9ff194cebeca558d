"""The shape of the package, enforced: imports flow one way (core <- shell <- control <- server <- top).

Every ``import`` between pgguard modules counts, those under ``if TYPE_CHECKING:`` and those
inside functions too: a lazy import taken to dodge a cycle is still an arrow. A module may
import its own layer or a lower one, never a higher one, and the module graph has no cycle.
docs/architecture.md lists the same layers (tests/unit/test_docs.py checks every module is there).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pgguard"

# Layer of every module (docs/architecture.md says what each one is for).
LAYERS: dict[str, int] = {
    # 0: core: no asyncio, no sockets, no clock of its own
    "errors": 0, "log": 0, "wire": 0, "limits": 0, "rules": 0, "scram": 0, "config": 0,
    "params": 0, "logins": 0,
    # 1: shell: one connection's I/O
    "tls": 1, "backend": 1, "pump": 1, "relay": 1, "proxy": 1, "leases": 1,
    "auth": 1, "pool": 1, "notify": 1, "listen": 1,
    # 2: control: the gate's owner and what reads or drives it
    "stats": 2, "faults": 2, "control": 2, "cluster": 2, "host": 2, "console": 2, "admin": 2, "metrics": 2, "mirror": 2,
    # 3: the process
    "server": 3,
    # 4: entry points and tools
    "cli": 4, "workers": 4, "demo": 4, "__main__": 4, "__init__": 4,
    "testing": 4, "testing.cluster": 4, "testing.guard": 4, "testing.plugin": 4, "testing.wait": 4,
    "testing.redis": 4, "testing.notify": 4,
}  # fmt: skip


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The pgguard modules ``path`` imports, wherever the import statement stands."""
    name = _module_name(path)
    package = name.rsplit(".", 1)[0] if "." in name else ""
    if path.name == "__init__.py":
        package = name if name != "__init__" else ""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("pgguard"):
                target = node.module.removeprefix("pgguard").lstrip(".")
            else:
                continue
            candidates = [f"{target}.{a.name}" if target else a.name for a in node.names]
            for candidate in candidates:
                if candidate in LAYERS:
                    found.add(candidate)
                    break
            else:
                if target in LAYERS:
                    found.add(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pgguard."):
                    found.add(alias.name.removeprefix("pgguard."))
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    missing = sorted(set(_graph()) - set(LAYERS))
    assert missing == [], f"give these modules a layer here and in docs/architecture.md: {missing}"


@pytest.mark.parametrize("module", sorted(_graph()))
def test_imports_only_flow_down(module: str) -> None:
    against = sorted(t for t in _graph()[module] if LAYERS.get(t, 0) > LAYERS[module])
    assert against == [], f"{module} (layer {LAYERS[module]}) imports a higher layer: {against}"


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_modules_stay_small_or_say_why() -> None:
    """Over ~500 lines, a module's docstring must say why it is one job (and its size)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().count("\n")
        if lines > 520:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "one job" in doc, f"{path.name}: {lines} lines; split it or say why in its docstring"
