"""The Redis password of `longtrace up --redis.url redis://:PASSWORD@host`: the launcher's children get it in
their environment (their broker's `redis_password_env`), never on their command line (visible to every local user
through ps) or in a file under the run directory (which gets shared)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import redis

from broker.embedded import EmbeddedRedis
from broker.settings import PASSWORD_ENV
from common.config import ConfigError, load_config
from deploy.launcher.config import UpConfig
from deploy.launcher.dashboard import Dashboard
from deploy.launcher.rundir import RunDir
from deploy.launcher.sections import split_url_password
from deploy.launcher.up import Launcher

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "debug" / "up.toml"
PASSWORD = "pw-5f1a9c37e2"  # distinctive, to grep files and command lines for


def _cmdlines(pid: int) -> list[str]:
    """The command lines of a process and all its descendants."""
    out = []
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            out.append(" ".join(p.cmdline()))
    except psutil.NoSuchProcess:
        pass
    return out


def test_children_get_the_password_in_their_environment_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against the launcher writing `broker.redis_url` with its password into the children's config files
    (RUN_DIR/configs/*.toml, readable by whoever gets the run directory) or their command lines, and against
    children that, without it in the URL, can no longer authenticate."""
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    run = tmp_path / "run"
    with EmbeddedRedis(password=PASSWORD) as server:
        assert PASSWORD in server.url
        cfg = load_config(UpConfig, CONFIG, ["--redis.url", server.url, "--run_dir", str(run)])
        launcher = Launcher(cfg, Dashboard(RunDir.at(run), "off"))
        try:
            launcher.start_redis()  # the launcher's own namespace check authenticates with the URL's password
            # A reward worker and a rollout worker: each is ready once it reads its stream, i.e. authenticated.
            launcher._start_rl_services("rl", launcher.sup.start)
            children = launcher.sup.running()
            assert {c.name for c in children} == {"rl-reward-worker-0", "rl-rollout-0"}
            for child in children:
                assert all(PASSWORD not in cmd for cmd in _cmdlines(child.pid)), child.name
                assert psutil.Process(child.pid).environ().get(PASSWORD_ENV) == PASSWORD, child.name
                assert PASSWORD not in repr(child.spec)
            client = redis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=5)
            try:
                groups = client.xinfo_groups("longtrace:{debug-rl}:rollouts")  # created by the reward worker
                assert [g["name"] for g in groups] != []
            finally:
                client.close()
        finally:
            launcher.sup.stop_all(30)
            launcher.write_processes()
    configs = sorted((run / "configs").glob("*.toml"))
    assert len(configs) == 2
    bare = f"redis://{server.host}:{server.port}/0"
    assert all(f'redis_url = "{bare}"' in p.read_text() for p in configs)
    written = [p for p in run.rglob("*") if p.is_file()]
    assert run / "processes.json" in written  # the children's argv, as write_processes records them
    leaks = [str(p) for p in written if PASSWORD.encode() in p.read_bytes()]
    assert leaks == [], f"the Redis password was written to {leaks}"


def test_a_password_url_needs_children_that_read_the_environment(tmp_path: Path) -> None:
    """Guards against a run that starts and then fails in every child: with the password in `--redis.url`, a
    service configured to read its password from a file (or from no variable) would get none, or two."""
    base = ["--run_dir", str(tmp_path / "run"), "--redis.url", f"redis://:{PASSWORD}@127.0.0.1:6379/0"]
    with pytest.raises(ConfigError, match="--reward.config.broker.redis_password_file"):
        load_config(UpConfig, CONFIG, [*base, "--reward.config.broker.redis_password_file", "/run/secrets/redis"])
    with pytest.raises(ConfigError, match="--phases.rl.learner.broker.redis_password_env"):
        load_config(UpConfig, CONFIG, [*base, "--phases.rl.learner.broker.redis_password_env", '""'])
    bare = load_config(UpConfig, CONFIG, [*base[:2], "--reward.config.broker.redis_password_file", "/run/s"])
    assert bare.reward.config.broker.redis_password_file == "/run/s"  # no password in the URL: allowed


@pytest.mark.parametrize(
    ("url", "stripped", "password"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", None),
        ("redis://:p%40ss@host:6379/0", "redis://host:6379/0", "p@ss"),
        ("rediss://acl-user:pw@host:6380/1", "rediss://acl-user@host:6380/1", "pw"),
        ("redis://host/0?password=pw&db=2", "redis://host/0?db=2", "pw"),
        ("unix://:pw@/tmp/redis.sock?db=2", "unix:///tmp/redis.sock?db=2", "pw"),
        ("redis://:a:b@[::1]:6379/0", "redis://[::1]:6379/0", "a:b"),
    ],
)
def test_split_url_password(url: str, stripped: str, password: str | None) -> None:
    """Guards against a password left in the URL the children get (in the user info or in the `password` query
    parameter, which redis-py also reads, and which would win over the one from the environment), and against
    losing an ACL user name, a database number or a password's percent-encoding."""
    assert split_url_password(url) == (stripped, password)
