"""Each package's third-party imports are installed by the core dependencies plus its service's extras.

The service images install only their extras (`.[rollout]`, `.[learner]`, ...; deploy/docker/Dockerfile), so an
import that only the full development venv satisfies would fail in an image at run time, not here.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = {"common", "broker", "weights", "datagen", "reward_service", "rollout_server", "learner", "eval", "deploy",
         "experiments", "tests"}  # fmt: skip
# Which extras each package runs under (several sets: each must satisfy it on its own).
EXTRAS_OF = {
    "common": [[]],
    "broker": [[]],
    "reward_service": [["reward"]],
    "weights": [["rollout"], ["learner"]],  # the engines and the learner both hand weights over
    "datagen": [["rollout"]],
    "eval": [["rollout"]],
    "rollout_server": [["rollout"]],
    "learner": [["learner", "tracking"]],  # wandb is the optional `tracking` backend
    "deploy": [["demo"]],
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(req: str) -> str:
    return _norm(re.split(r"[\s\[=<>!~;(]", req.strip(), maxsplit=1)[0])


@cache
def _pyproject() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def _direct(extras: tuple[str, ...]) -> set[str]:
    """The distributions pyproject names for the core plus `extras` (self-references like longtrace[a,b] expanded)."""
    project = _pyproject()
    reqs = list(project["dependencies"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            if _name(req) == "longtrace":
                todo += re.search(r"\[(.*)\]", req).group(1).split(",")  # type: ignore[union-attr]
            else:
                reqs.append(req)
    return {_name(r) for r in reqs}


def _closure(dists: set[str]) -> set[str]:
    """`dists` and what they install (their unconditional requirements, and the extras pyproject asks of them)."""
    asked_extras = {
        _name(r): set(re.search(r"\[(.*?)\]", r).group(1).split(","))  # type: ignore[union-attr]
        for r in [*_pyproject()["dependencies"], *sum(_pyproject()["optional-dependencies"].values(), [])]
        if "[" in r.split("==")[0] and _name(r) != "longtrace"
    }
    out, todo = set(), list(dists)
    while todo:
        d = todo.pop()
        if d in out:
            continue
        out.add(d)
        try:
            requires = md.requires(d) or []
        except md.PackageNotFoundError:
            continue
        for req in requires:
            marker = req.split(";", 1)[1] if ";" in req else ""
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if extra and extra.group(1) not in asked_extras.get(d, set()):
                continue
            todo.append(_name(req))
    return out


def _imported_dists(package: str) -> dict[str, str]:
    """Distribution → one file of `package` that imports it (lazy imports inside functions included)."""
    owners = {k: [_norm(d) for d in v] for k, v in md.packages_distributions().items()}
    found: dict[str, str] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in LOCAL:
                    continue
                for dist in owners.get(top, [f"<no distribution installs {top}>"]):
                    found.setdefault(dist, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", sorted(EXTRAS_OF))
def test_every_import_is_installed_by_the_core_and_the_package_extras(package: str) -> None:
    """Guards against an import that only the full venv satisfies: a service image built with its extra only would
    fail at run time (e.g. the reward image without torch importing a module that imports torch)."""
    imported = _imported_dists(package)
    assert imported, f"the scan found no third-party import in {package}/"
    for extras in EXTRAS_OF[package]:
        allowed = _closure(_direct(tuple(extras)))
        missing = {d: f for d, f in imported.items() if d not in allowed}
        assert not missing, f"{package}/ with extras {extras}: not installed by them: {missing}"


def test_the_reward_service_and_broker_do_not_need_torch() -> None:
    """Guards against the split losing its point: the core (what the reward image installs) must not pull torch,
    transformers or megatron-core in through a dependency."""
    core = _closure(_direct(()))
    assert not {"torch", "transformers", "megatron-core", "matplotlib"} & core, sorted(core)
    assert {"torch", "megatron-core"} <= _closure(_direct(("learner",)))


def test_the_images_install_their_services_extras() -> None:
    """Guards against an image built from a requirements list that misses its services' extras (the Dockerfile's
    requirements stage runs deploy/docker/requirements.py), or a script that expands extras differently."""
    import subprocess

    dockerfile = (ROOT / "deploy/docker/Dockerfile").read_text()
    images = dict(re.findall(r"requirements\.py pyproject\.toml ([\w ]+) > requirements-(\w+)\.txt", dockerfile))
    images = {image: extras.split() for extras, image in images.items()}
    assert set(images) == {"cpu", "gpu"} and "rollout" in images["cpu"] and "learner" in images["gpu"], images
    for extras in images.values():
        out = subprocess.run(
            [sys.executable, str(ROOT / "deploy/docker/requirements.py"), str(ROOT / "pyproject.toml"), *extras],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        assert {_name(line) for line in out.split()} == _direct(tuple(extras))
