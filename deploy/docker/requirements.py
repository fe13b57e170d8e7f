"""Prints the pinned requirements of the core plus the given extras of pyproject.toml, one per line, with
self-references (`longtrace[a,b]`) expanded: the Dockerfile installs an image's dependencies from this list, cached
apart from the source. Standard library only (it runs before anything is installed).

    python requirements.py pyproject.toml rollout report > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    project = tomllib.load(open(pyproject, "rb"))["project"]
    out = list(project["dependencies"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in project["optional-dependencies"]:
            raise SystemExit(f"no extra {extra!r} in {pyproject}")
        for req in project["optional-dependencies"][extra]:
            own = re.fullmatch(r"longtrace\[(.*)\]", req)
            if own:
                todo += own.group(1).split(",")
            elif req not in out:
                out.append(req)
    return out


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
