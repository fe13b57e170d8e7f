"""The embedded Redis's AOF fsync policy (`appendfsync`): given at redis-server's start by EmbeddedRedis, by
`longtrace redis --appendfsync` and by the launcher's `[redis] appendfsync`, so a restart keeps it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from broker.embedded import EmbeddedRedis
from common.config import ConfigError, load_config
from deploy.launcher.config import UpConfig
from deploy.launcher.dashboard import Dashboard
from deploy.launcher.rundir import RunDir
from deploy.launcher.up import Launcher
from experiments.chaos import load_chaos_config
from experiments.chaos_cli import DEFAULT_CONFIG as CHAOS_CONFIG

ROOT = Path(__file__).resolve().parents[2]
UP_CONFIG = ROOT / "configs" / "debug" / "up.toml"


def _appendfsync(url: str) -> str:
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True)
    try:
        return str(client.config_get("appendfsync")["appendfsync"])
    finally:
        client.close()


def test_embedded_redis_starts_with_the_given_policy(tmp_path: Path) -> None:
    """Guards against the embedded Redis ignoring `appendfsync` (it always ran everysec, so callers CONFIG SET it
    after the start and writes acknowledged in between could be lost), and against an unknown policy reaching
    redis-server instead of a clear error."""
    with EmbeddedRedis(data_dir=tmp_path / "always", appendonly=True, appendfsync="always") as server:
        assert _appendfsync(server.url) == "always"
    with EmbeddedRedis(data_dir=tmp_path / "default", appendonly=True) as server:
        assert _appendfsync(server.url) == "everysec"
    with pytest.raises(ValueError, match="appendfsync 'sometimes'"):
        EmbeddedRedis(appendfsync="sometimes")  # type: ignore[arg-type]


def test_longtrace_redis_passes_appendfsync(tmp_path: Path) -> None:
    """Guards against `longtrace redis --appendfsync` being accepted but not given to redis-server, and against a
    bad policy failing late instead of with an error naming the flag."""
    cmd = [sys.executable, "-m", "deploy.cli", "redis", "--dir", str(tmp_path), "--appendonly"]
    bad = subprocess.run([*cmd, "--appendfsync", "sometimes"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--appendfsync" in bad.stderr
    proc = subprocess.Popen([*cmd, "--appendfsync", "always"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()  # printed once redis-server answers
        assert url.startswith("redis://"), url
        assert _appendfsync(url) == "always"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_launcher_starts_redis_with_the_policy_and_keeps_it_across_a_restart(tmp_path: Path) -> None:
    """Guards against `[redis] appendfsync` not reaching the embedded Redis, and against a Redis restarted by the
    supervisor (the chaos bench's Redis fault) coming back with another policy: the policy is in its argv."""
    run = tmp_path / "run"
    overrides = ["--run_dir", str(run), "--redis.appendonly", "true", "--redis.appendfsync", "always"]
    cfg = load_config(UpConfig, UP_CONFIG, overrides)
    launcher = Launcher(cfg, Dashboard(RunDir.at(run), "off"))
    try:
        launcher.start_redis()
        assert _appendfsync(launcher.redis_url) == "always"
        child = next(c for c in launcher.sup.children if c.name == "redis")
        launcher.sup.kill(child)
        launcher.sup.respawn(child)
        assert _appendfsync(launcher.redis_url) == "always"
    finally:
        launcher.sup.stop_all(30)
    assert not launcher.sup.running()


def test_appendfsync_config_errors_name_the_flag(tmp_path: Path) -> None:
    """Guards against a policy that silently does nothing (a given Redis, or no append-only file), and against the
    chaos bench running a policy other than the one it reports (set in two places)."""
    base = ["--run_dir", str(tmp_path / "run")]
    with pytest.raises(ConfigError, match="--redis.appendfsync applies to the embedded Redis only"):
        load_config(UpConfig, UP_CONFIG, [*base, "--redis.url", "redis://h:1/0", "--redis.appendfsync", "always"])
    with pytest.raises(ConfigError, match="--redis.appendonly true"):
        load_config(UpConfig, UP_CONFIG, [*base, "--redis.appendonly", "false", "--redis.appendfsync", "always"])
    assert load_config(UpConfig, UP_CONFIG, [*base, "--redis.appendfsync", "always"]).redis.appendonly  # on by default
    with pytest.raises(ConfigError, match="redis.appendfsync"):
        load_config(UpConfig, UP_CONFIG, [*base, "--redis.appendfsync", "sometimes"])
    chaos = ["--up.run_dir", str(tmp_path / "chaos")]
    cfg = load_chaos_config(CHAOS_CONFIG, chaos)
    assert cfg.appendfsync == "always" and cfg.up_config().redis.appendfsync == "always"
    assert cfg.up.redis.appendfsync == "everysec"  # the policy of the run is the chaos bench's, applied above
    with pytest.raises(ConfigError, match="set the policy once"):
        load_chaos_config(CHAOS_CONFIG, [*chaos, "--up.redis.appendfsync", "everysec"])


@pytest.mark.parametrize("overrides", [[], ["--redis.appendonly", "true", "--redis.appendfsync", "always"]])
def test_a_dumped_up_config_loads_again(tmp_path: Path, overrides: list[str]) -> None:
    """Guards against a check on which fields were *given* (model_fields_set): the ablation and the launcher write
    resolved configs with every field set, and `longtrace up` on such a file failed with "--redis.appendfsync
    applies to the append-only file"."""
    from deploy.launcher.tomlfile import write_config

    cfg = load_config(UpConfig, UP_CONFIG, ["--run_dir", str(tmp_path / "run"), *overrides])
    path = write_config(cfg, tmp_path / "resolved.toml")
    again = load_config(UpConfig, path)
    assert again.redis == cfg.redis
