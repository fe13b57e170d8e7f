"""Typed configuration shared by every service: pydantic models loaded from TOML with CLI overrides.

Precedence is defaults < TOML file < `--section.key value` flags. Unknown keys are errors, in the
file and on the command line, so a typo never silently does nothing.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="BaseConfig")


class BaseConfig(BaseModel):
    """Base of every config: unknown keys rejected, fields validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A config file or flag is invalid; the message names the key or flag."""


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn `--a.b value` / `--a.b=value` flags into a nested dict; values are parsed as TOML when they can be."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--") or len(flag) < 3:
            raise ConfigError(f"unexpected argument {flag!r}: overrides are written --section.key value")
        if "=" in flag:
            key, raw = flag[2:].split("=", 1)
            i += 1
        else:
            key = flag[2:]
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raw = "true"  # a bare flag is a boolean switch
                i += 1
            else:
                raw = args[i + 1]
                i += 2
        _set_path(out, key.replace("-", "_").split("."), _parse_value(raw))
    return out


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string such as a host name or a path


def _set_path(d: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        d = d.setdefault(part, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--{'.'.join(path)} overrides a value that is not a section")
    d[path[-1]] = value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Build `cls` from an optional TOML file and CLI override flags; raise ConfigError naming the bad key."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file {str(p)!r}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {p}: invalid TOML: {e}") from e
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"--{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors(include_url=False)
        )
        raise ConfigError(f"invalid {cls.__name__}: {problems}") from e


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config as JSON (into a run directory), for reproducibility; passwords inside URLs
    (`redis://:secret@host`) are masked, since run directories get shared."""
    data = _mask_url_passwords(config.model_dump(mode="json"))
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _mask_url_passwords(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask_url_passwords(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_url_passwords(v) for v in value]
    if isinstance(value, str) and "://" in value and "@" in value:
        parts = urlsplit(value)
        if parts.password:
            user = parts.username or ""
            return urlunsplit(parts._replace(netloc=f"{user}:***@{parts.netloc.rsplit('@', 1)[1]}"))
    return value


def merge_tables(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, recursively for tables (copies; neither argument changes)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_tables(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def has_path(d: dict[str, Any], dotted: str) -> bool:
    """Whether the nested tables hold the dotted key (`reward.config.eta`)."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def get_path(d: dict[str, Any], dotted: str, default: Any) -> Any:
    """The value at the dotted key, or `default`."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d
