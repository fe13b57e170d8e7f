"""Write a child's resolved config as TOML (the format every `--config` reads); Python only ships a TOML reader.

Covers what pydantic's JSON dump produces: tables, arrays (tables inside arrays become inline tables),
strings, integers, floats (inf/nan included) and booleans. TOML has no null, so None values are left out;
`write_config` reloads the file and checks it gives back the same config.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, TypeVar

from common.config import BaseConfig, load_config

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
C = TypeVar("C", bound=BaseConfig)


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        # JSON string escapes (\", \\, \n, \uXXXX) are valid in TOML basic strings.
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x, where) for x in v) + "]"
    if isinstance(v, dict):
        items = [f"{_key(k)} = {_value(x, f'{where}.{k}')}" for k, x in v.items() if x is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise ValueError(f"{where}: cannot write a {type(v).__name__} as TOML")


def dumps(data: dict[str, Any]) -> str:
    """TOML text of a nested dict; None values are skipped."""
    lines: list[str] = []

    def table(d: dict[str, Any], path: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if v is not None and not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if path and (scalars or not tables):
            lines.append(f"\n[{'.'.join(_key(p) for p in path)}]")
        for k, v in scalars.items():
            lines.append(f"{_key(k)} = {_value(v, '.'.join([*path, k]))}")
        for k, v in tables.items():
            table(v, [*path, k])

    table(data, [])
    return "\n".join(lines).lstrip("\n") + "\n"


def write_config(config: C, path: str | Path) -> Path:
    """Write `config` as TOML to `path`; check that loading it gives the same config back."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dumps(config.model_dump(mode="json")))
    again = load_config(type(config), p)
    assert again == config, f"{p} does not load back to the same {type(config).__name__}"
    return p
