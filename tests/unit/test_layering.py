"""The package structure stays as docs/architecture.md draws it: an AST scan of every shipped module's imports.

Layers, lowest first: `common` (config, logs, retry, HTTP guard, ports, supervisor) < the queue (`broker`), the
weight hand-off (`weights`) and the data (`datagen`) < the three services (`reward_service`, `rollout_server`,
`learner`, which never import each other) < `eval` (a product feature over the services) < `deploy` (launcher,
root CLI) < `experiments` (harnesses over public interfaces). A package imports only the packages listed for it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

ALLOWED: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "broker": frozenset({"common"}),
    "weights": frozenset({"common"}),
    "datagen": frozenset({"common"}),
    "reward_service": frozenset({"common", "broker"}),
    "rollout_server": frozenset({"common", "broker", "weights", "datagen"}),
    "learner": frozenset({"common", "broker", "weights", "datagen"}),
    "eval": frozenset({"common", "broker", "weights", "datagen", "reward_service", "rollout_server"}),
    "deploy": frozenset(
        {"common", "broker", "weights", "datagen", "reward_service", "rollout_server", "learner", "eval"}
    ),
    "experiments": frozenset(
        {"common", "broker", "weights", "datagen", "reward_service", "rollout_server", "learner", "eval", "deploy"}
    ),
}
MAX_LINES = 400
SIZE_REASON = "# over 400 lines:"


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in the file, at any depth (lazy imports count)."""
    out: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def package_edges(root: Path, packages: list[str]) -> dict[tuple[str, str], list[str]]:
    """(importer, imported) top-level package pairs with the places that make them."""
    edges: dict[tuple[str, str], list[str]] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            for line, module, _ in imports_of(path):
                top = module.split(".")[0]
                if top in packages and top != pkg:
                    edges.setdefault((pkg, top), []).append(f"{path.relative_to(root)}:{line} imports {module}")
    return edges


def find_cycle(edges: dict[tuple[str, str], list[str]]) -> list[str] | None:
    """A cycle of packages (first package repeated at the end), or None."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def layer_violations(edges: dict[tuple[str, str], list[str]], allowed: dict[str, frozenset[str]]) -> list[str]:
    return [where for (a, b), places in sorted(edges.items()) if b not in allowed[a] for where in places]


def private_imports(root: Path, packages: list[str]) -> list[str]:
    """`from other_package.x import _private`: reaching around a package's public interface."""
    out = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            for line, module, names in imports_of(path):
                top = module.split(".")[0]
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if top in packages and top != pkg and private:
                    out.append(f"{path.relative_to(root)}:{line} imports {private} from {module}")
    return out


def test_no_import_cycle_between_packages() -> None:
    """Guards against two top-level packages importing each other (the learner's weight sync importing the
    engine and the engine launcher importing the learner, as before the layout change)."""
    cycle = find_cycle(package_edges(REPO, list(ALLOWED)))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_packages_import_only_lower_layers() -> None:
    """Guards against a service reaching into another service, the lower layers depending on the upper ones,
    or shipped code importing the experiments."""
    violations = layer_violations(package_edges(REPO, list(ALLOWED)), ALLOWED)
    assert not violations, "imports that break the layers:\n" + "\n".join(violations)


def test_no_private_names_imported_across_packages() -> None:
    """Guards against harnesses (and packages) using another package's internals instead of its public names."""
    found = private_imports(REPO, list(ALLOWED))
    assert not found, "\n".join(found)


def test_every_top_level_package_is_layered_and_packaged() -> None:
    """Guards against a new top-level package escaping this test (and the wheel): each one is in ALLOWED and in
    pyproject's package list."""
    tops = sorted(p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name != "tests")
    assert tops == sorted(ALLOWED)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert all(f'"{name}*"' in pyproject for name in ALLOWED)


def test_long_modules_say_why() -> None:
    """Guards against modules growing past 400 lines unnoticed: a longer one states its reason in its first
    lines (`# over 400 lines: ...`)."""
    long = []
    for pkg in ALLOWED:
        for path in sorted((REPO / pkg).rglob("*.py")):
            lines = path.read_text().splitlines()
            if len(lines) > MAX_LINES and not any(line.startswith(SIZE_REASON) for line in lines[:3]):
                long.append(f"{path.relative_to(REPO)} ({len(lines)} lines)")
    assert not long, "modules over 400 lines without a reason: " + ", ".join(long)


@pytest.mark.parametrize(
    ("files", "expect_cycle", "expect_violation"),
    [
        ({"a/m.py": "from b.x import f\n", "b/x.py": "def f(): ...\n"}, False, False),
        ({"a/m.py": "from b.x import f\n", "b/x.py": "def g():\n    import a.m\n"}, True, True),
        ({"b/x.py": "from a.m import f\n", "a/m.py": ""}, False, True),
    ],
)
def test_the_checks_see_a_cycle_and_a_wrong_direction(
    tmp_path: Path, files: dict[str, str], expect_cycle: bool, expect_violation: bool
) -> None:
    """Guards against a scanner that sees nothing (e.g. lazy imports inside functions missed): a synthetic tree
    with a cycle and an upward import must be reported."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = package_edges(tmp_path, ["a", "b"])
    assert (find_cycle(edges) is not None) is expect_cycle
    assert bool(layer_violations(edges, {"a": frozenset({"b"}), "b": frozenset()})) is expect_violation
    (tmp_path / "a" / "p.py").write_text("from b.x import _hidden\n")
    assert private_imports(tmp_path, ["a", "b"]) == ["a/p.py:1 imports ['_hidden'] from b.x"]
