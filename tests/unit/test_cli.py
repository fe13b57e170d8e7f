"""The `longtrace` CLI: fast help, overrides routed to config, clear errors naming the flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import BaseConfig, ConfigError, load_config, parse_overrides


def test_help_imports_no_heavy_modules() -> None:
    """Guards against a package's cli.py importing torch/transformers/megatron/fastapi at module level,
    which would make `longtrace --help` take seconds (STYLE.md: parse config before heavy imports)."""
    code = (
        "import sys, deploy.cli as c\n"
        "c.build_parser()\n"
        "heavy = [m for m in ('torch', 'transformers', 'megatron', 'fastapi', 'uvicorn', 'sglang') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""


def test_unknown_argument_is_rejected_with_its_name() -> None:
    """Guards against a typo'd flag being silently ignored by a command that takes no overrides."""
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "bench", "--no-such-flag"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "--no-such-flag" in out.stderr or "BENCH" in out.stderr


class _Inner(BaseConfig):
    bucket_mb: int = 512
    """bucket size"""


class _Cfg(BaseConfig):
    host: str = "127.0.0.1"
    """host"""
    inner: _Inner = _Inner()
    """a section"""


def test_overrides_parse_toml_values_and_nest() -> None:
    """Guards against override values staying strings (a port as "8000") or sections not nesting."""
    assert parse_overrides(["--inner.bucket_mb", "64", "--host=0.0.0.0", "--flag"]) == {
        "inner": {"bucket_mb": 64},
        "host": "0.0.0.0",
        "flag": True,
    }
    cfg = load_config(_Cfg, None, ["--inner.bucket-mb", "8"])
    assert cfg.inner.bucket_mb == 8


def test_unknown_key_names_the_flag(tmp_path: Path) -> None:
    """Guards against unknown keys (typos) being accepted: they must be errors that name the key."""
    with pytest.raises(ConfigError, match=r"--inner.bucket_gb"):
        load_config(_Cfg, None, ["--inner.bucket_gb", "1"])
    toml = tmp_path / "c.toml"
    toml.write_text("[inner]\nbucket_mb = 'many'\n")
    with pytest.raises(ConfigError, match=r"--inner.bucket_mb"):
        load_config(_Cfg, toml, [])
    with pytest.raises(ConfigError, match="--config"):
        load_config(_Cfg, tmp_path / "missing.toml", [])
