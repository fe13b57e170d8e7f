"""The `longtrace` CLI: fast help, overrides routed to config, `--config FILE` on every command that loads a config,
clear errors naming the flag (exit 2) through the real entry points."""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.cli import parse
from common.config import BaseConfig, ConfigError, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).with_name("longtrace")  # the console script of [project.scripts]
LONGTRACE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "deploy.cli"]
MISSING = "/nonexistent/longtrace-test.toml"
BAD_FLAG = ["--no_such_flag", "1"]

NO_CONFIG: dict[tuple[str, ...], str] = {
    ("redis",): "the embedded redis-server: a few flags (port, dir, persistence); `up` has its [redis] section",
    ("weight-sync", "catch-up"): "a one-shot call of three flags (engine URL, export dir, timeout)",
    ("model", "init-tiny"): "a one-shot writer of a model directory: its sizes are flags",
    ("model", "import-smollm2"): "a one-shot conversion: OUT is its only input",
    ("data", "validate"): "reads one dataset file",
    ("data", "stats"): "reads one dataset file (and optionally a tokenizer)",
    ("data", "fit"): "one dataset file in, one out, a budget and a tokenizer",
    ("report",): "reads RUN_DIR, which holds the run's resolved config",
    ("checkpoints", "list"): "reads RUN_DIR's checkpoint directories (each checkpoint records its run)",
    ("bench", "broker"): "a benchmark whose sizes are flags; no config class",
    ("bench", "reward"): "a benchmark whose sizes are flags; no config class",
    ("bench", "engine"): "a benchmark whose sizes are flags; no config class",
    ("bench", "rollout"): "a benchmark whose sizes are flags; no config class",
    ("bench", "learner"): "a benchmark whose sizes are flags; no config class",
    ("bench", "weight-sync"): "a benchmark whose sizes are flags; no config class",
    ("bench", "fuzz"): "a benchmark whose sizes are flags; no config class",
}
"""Commands that load no config, and why: every other command must accept `--config FILE`."""

REQUIRED_ARGS: dict[tuple[str, ...], list[str]] = {
    ("weight-sync", "catch-up"): ["--engine", "http://127.0.0.1:9", "--export-dir", "."],
    ("model", "init-tiny"): ["OUT"],
    ("model", "import-smollm2"): ["OUT"],
    ("export-hf",): ["CKPT", "OUT"],
    ("data", "validate"): ["FILE"],
    ("data", "stats"): ["FILE"],
    ("data", "fit"): ["IN", "OUT", "--max_tokens", "10"],
    ("data", "build"): ["--questions", "q", "--trajectories", "t", "--docs", "d", "--out", "o"],
    ("data", "synth"): ["--out", "o"],
    ("report",): ["RUN_DIR"],
    ("checkpoints", "list"): ["RUN_DIR"],
    ("eval", "compare"): ["RUN_A", "RUN_B"],
}
"""Arguments a command needs before it looks at anything else (dummies: the run stops at the error under test)."""

CONFIG_POSITIONAL = {("up",): "configs/debug/up.toml", ("ablate",): "configs/debug/ablate.toml"}


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [path]
    return [leaf for name, sub in subs[0].choices.items() for leaf in _leaves(sub, (*path, name))]


def _commands() -> list[tuple[str, ...]]:
    from deploy.cli import build_parser

    return [*_leaves(build_parser()), ("eval", "compare")]  # `eval` dispatches `compare` itself


def _run_all(argvs: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    def one(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, argvs))


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


def test_every_command_that_loads_a_config_accepts_config_flag() -> None:
    """Guards against a command that loads a config but has no `--config FILE` (or ignores it): the same flag
    must work on every such command, `longtrace up --config F` as well as `longtrace up F`. A command added
    without a config must be listed in NO_CONFIG with its reason."""
    commands = _commands()
    assert set(NO_CONFIG) <= set(commands), (
        f"NO_CONFIG names commands that do not exist: {set(NO_CONFIG) - set(commands)}"
    )
    with_config = [c for c in commands if c not in NO_CONFIG and c != ("eval", "compare")]
    assert ("up",) in with_config and ("ablate",) in with_config and ("data", "synth") in with_config
    runs = _run_all([[*LONGTRACE, *c, *REQUIRED_ARGS.get(c, []), "--config", MISSING] for c in with_config])
    for command, out in zip(with_config, runs, strict=True):
        assert out.returncode == 2, (command, out.stderr[-2000:])
        assert f"--config: no such file {MISSING!r}" in out.stderr, (command, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, command


def test_bad_flag_exits_2_naming_the_flag_on_every_command() -> None:
    """Guards against a typo'd flag that is silently ignored, taken as a positional, surfaces as a traceback or
    exits 1, on any command: through `longtrace`, each exits 2 with the flag named on stderr."""
    commands = _commands()
    argvs = [[*LONGTRACE, *c, *REQUIRED_ARGS.get(c, []), *BAD_FLAG] for c in commands]
    argvs = [[*a, CONFIG_POSITIONAL[c]] if c in CONFIG_POSITIONAL else a for c, a in zip(commands, argvs, strict=True)]
    for command, out in zip(commands, _run_all(argvs), strict=True):
        assert out.returncode == 2, (command, out.stderr[-2000:])
        assert "--no_such_flag" in out.stderr and "Traceback" not in out.stderr, (command, out.stderr[-2000:])


def test_python_m_entries_share_the_cli_contract(tmp_path: Path) -> None:
    """Guards against the `python -m` modules the launcher and the harnesses run drifting from `longtrace`: each
    takes `--config FILE` where it loads a config and answers a bad flag with exit 2 naming it."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    py = [sys.executable, "-m"]
    with_config = [
        ["rollout_server.worker"],
        ["rollout_server.launch"],
        ["learner.train_cli"],
        ["eval.cli"],
        ["deploy.launcher.sft_source"],
        ["deploy.launcher.evaluate"],
        ["deploy.launcher.prepare", "--data-dir", "d", "--model-dir", "m"],
        ["experiments.judge_stub"],
    ]
    bad_flag = [
        ["rollout_server.worker"],
        ["rollout_server.launch"],
        ["learner.train_cli"],
        ["eval.cli"],
        ["experiments.fuzz_cli"],
        ["deploy.launcher.sft_source"],
        ["deploy.launcher.evaluate", "--config", str(empty)],
        ["deploy.launcher.prepare", "--config", str(empty), "--data-dir", "d", "--model-dir", "m"],
        ["experiments.judge_stub"],
        ["reward_service.bench_judge", "--port", "1"],
        ["experiments.gpu.smoke"],
    ]
    runs = _run_all([[*py, *m, "--config", MISSING] for m in with_config] + [[*py, *m, *BAD_FLAG] for m in bad_flag])
    for module, out in zip(with_config, runs, strict=False):
        assert out.returncode == 2 and f"--config: no such file {MISSING!r}" in out.stderr, (module, out.stderr)
    for module, out in zip(bad_flag, runs[len(with_config) :], strict=True):
        assert out.returncode == 2 and "--no_such_flag" in out.stderr, (module, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, module


def test_config_positional_and_flag_name_one_file() -> None:
    """Guards against `up --config F --run_dir x` reading x as the CONFIG positional (argparse hands the word
    after an unknown flag to a free positional), and against CONFIG and --config naming two files silently."""
    from deploy.cli import build_parser

    parser = build_parser()
    by_positional = parse(parser, ["up", "a.toml", "--run_dir", "x", "--no-dashboard"])
    by_flag = parse(parser, ["up", "--config", "a.toml", "--run_dir", "x", "--no-dashboard"])
    for args in (by_positional, by_flag):
        assert (args.config, args.overrides, args.no_dashboard) == ("a.toml", ["--run_dir", "x"], True)
    both = parse(parser, ["up", "--run_dir", "x", "./a.toml", "--config", "a.toml"])  # one file, spelled twice
    assert (both.config, both.overrides) == ("./a.toml", ["--run_dir", "x"])
    with pytest.raises(ConfigError, match="differ"):
        parse(parser, ["up", "a.toml", "--config", "b.toml"])
    with pytest.raises(ConfigError, match="CONFIG is required"):
        parse(parser, ["up", "--run_dir", "x"])
    export = parse(parser, ["export-hf", "--model.tp_size", "2", "CKPT", "OUT", "--flag"])
    assert (export.ckpt, export.out, export.overrides) == ("CKPT", "OUT", ["--model.tp_size", "2", "--flag"])


def test_abbreviated_flags_are_overrides_not_prefixes() -> None:
    """Guards against argparse's prefix matching turning an override such as `--c` (or a typo) into `--config`
    or `--no-dashboard`: every command parser must take flags only as spelled."""
    from deploy.cli import build_parser

    args = parse(build_parser(), ["up", "a.toml", "--no-dash"])
    assert args.no_dashboard is False and args.overrides == ["--no-dash"]  # load_config then names --no-dash
