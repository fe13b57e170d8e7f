"""deploy/docker/Dockerfile parses with BuildKit's own parser (the `dockerfile` package) and installs only pins.

No Docker engine runs in CI, so the build itself is not run; these checks catch what breaks a build or makes it
irreproducible: a missing stage, a COPY of a path that is absent or excluded from the build context, an
unpinned base image or package, a pip install without the torch constraint, a project package left out.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
IGNORE = REPO / "deploy" / "docker" / "Dockerfile.dockerignore"
STAGES = ("cpu", "gpu", "engine")
_PIP = re.compile(r"\b(?:uv )?pip install\b")


def instructions() -> list[Any]:
    import dockerfile

    return list(dockerfile.parse_file(str(DOCKERFILE)))


def stages() -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    current: list[Any] = []
    for ins in instructions():
        if ins.cmd == "FROM":
            current = []
            name = ins.value[2] if len(ins.value) == 3 and ins.value[1].upper() == "AS" else ins.value[0]
            out[name] = current
        current.append(ins)
    return out


def pip_installs(run: str) -> list[list[str]]:
    """The argument lists of every `pip install` / `uv pip install` in one RUN (split at && and ;)."""
    out = []
    for part in re.split(r"&&|;", run.replace("\\\n", " ")):
        m = _PIP.search(part)
        if m:
            out.append(shlex.split(part[m.end() :]))
    return out


def test_stages_exist_and_build_on_pinned_images() -> None:
    """Guards against `--target cpu|gpu|engine` (used by docker-compose.yml) failing, and against base images that
    float (`latest` or no tag) so the same Dockerfile builds something else next month."""
    found = stages()
    assert set(STAGES) <= set(found)
    args = {}
    for ins in instructions():
        if ins.cmd == "ARG" and "=" in ins.value[0]:
            key, value = ins.value[0].split("=", 1)
            args[key] = value
    for ins in instructions():
        if ins.cmd == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), ins.value[0])
            if image in found:  # FROM an earlier stage
                continue
            assert ":" in image and not image.endswith(":latest"), f"unpinned base image {ins.value[0]} -> {image!r}"


def test_every_pip_install_is_constrained_and_pinned() -> None:
    """Guards against a pip install that pulls an unpinned torch (a different CUDA build) or a floating package."""
    runs = [ins.value[0] for ins in instructions() if ins.cmd == "RUN"]
    installs = [args for run in runs for args in pip_installs(run)]
    assert len(installs) >= 6
    for args in installs:
        assert "constraints.txt" in args and args[args.index("constraints.txt") - 1] == "-c", args
        value_flags = {"-c", "-r", "--python", "--extra-index-url", "--index-url"}
        packages = [a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] not in value_flags]
        for pkg in packages:
            assert pkg == "." or "==" in pkg, f"unpinned package {pkg!r} in pip install {args}"


@pytest.mark.parametrize("stage", STAGES)
def test_copies_exist_and_include_every_project_package(stage: str) -> None:
    """Guards against a build failing on a COPY of a missing or .dockerignore'd path, and against an image whose
    `pip install .` lacks a package of the project (pyproject's packages.find list)."""
    ignored = IGNORE.read_text().splitlines()
    copied = set()
    for ins in stages()[stage]:
        if ins.cmd != "COPY" or any(f.startswith("--from") for f in ins.flags):
            continue
        for src in ins.value[:-1]:
            assert (REPO / src).exists(), f"{stage}: COPY {src}: no such path in the repository"
            assert f"!{src.rstrip('/')}" in [line.rstrip("/") for line in ignored], (
                f"{src} is excluded from the context"
            )
            copied.add(src.rstrip("/"))
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    assert packages <= copied, f"{stage}: project packages not copied: {packages - copied}"
    assert {"pyproject.toml", "configs"} <= copied


LIGHT_DEPS = ("pydantic", "httpx", "redis", "msgspec", "numpy")  # what the engine image's launcher venv holds
_BLOCKER = """
import importlib.abc, sys
allowed = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in allowed or top.startswith("_"):
            return None
        raise ImportError(f"the engine image's launcher venv has no {top!r}")
sys.meta_path.insert(0, Block())
import broker.factory, rollout_server.launch  # what a real launch imports after the dry run's parse
from deploy.cli import main
main(["engine", "launch", "--backend", "sglang", "--model_path", "/m", "--dry_run", "true"])
"""


def test_engine_image_launcher_needs_only_its_light_dependencies() -> None:
    """Guards against the engine image breaking when `longtrace engine launch` (or the CLI modules it loads)
    starts importing something its SGLang-side venv lacks (torch, transformers, fastapi, ...)."""
    import subprocess
    import sys

    project = (
        "common",
        "broker",
        "weights",
        "reward_service",
        "rollout_server",
        "learner",
        "datagen",
        "eval",
        "deploy",
        "experiments",
        "tests",
    )
    third_party = ("annotated_types", "typing_extensions", "typing_inspection", "pydantic_core", "anyio", "sniffio")
    transport = ("certifi", "h11", "httpcore", "idna", "async_timeout")  # httpx's and redis-py's own dependencies
    allowed = ",".join((*LIGHT_DEPS, *project, *third_party, *transport))
    out = subprocess.run(
        [sys.executable, "-c", _BLOCKER, allowed], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("python -m sglang.launch_server --model-path /m")
    run = next(i.value[0] for i in stages()["engine"] if i.cmd == "RUN" and "uv venv" in i.value[0])
    assert all(f"{dep}==" in run for dep in LIGHT_DEPS), "the engine stage must install exactly these deps"
