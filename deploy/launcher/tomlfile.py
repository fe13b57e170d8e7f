"""Write a child's resolved config as TOML (the format every `--config` reads), with tomli_w: Python only ships a
TOML reader.

TOML has no null, so None values (in tables and in arrays of tables) are left out; `write_config` reloads the file
and checks it gives back the same config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from common.config import BaseConfig, load_config

C = TypeVar("C", bound=BaseConfig)


def _without_none(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _without_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [_without_none(x) for x in v]
    return v


def dumps(data: dict[str, Any]) -> str:
    """TOML text of a nested dict; None values are skipped."""
    return tomli_w.dumps(_without_none(data))


def write_config(config: C, path: str | Path) -> Path:
    """Write `config` as TOML to `path`; check that loading it gives the same config back."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dumps(config.model_dump(mode="json")))
    again = load_config(type(config), p)
    assert again == config, f"{p} does not load back to the same {type(config).__name__}"
    return p
