"""The launcher's supervisor with real child processes: readiness, failure propagation, shutdown, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from common.net import free_port
from common.supervisor import ChildFailed, HttpReady, LogReady, ProcessSpec, RedisReady, Supervisor

PY = sys.executable
ENV = {"PYTHONUNBUFFERED": "1"}


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _tree(pids: list[int]) -> list[psutil.Process]:
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        procs += [p, *p.children(recursive=True)]
    return procs


def test_a_crashing_child_fails_the_run_and_everything_stops(tmp_path: Path) -> None:
    """Guards against a crashed process going unnoticed, an error message that does not name the process, its
    exit code and its log, and against a shutdown that leaves a process behind (redis-server runs in a session
    of its own under `longtrace redis`, so stopping that child's process group alone would orphan it)."""
    redis_port, reward_port = free_port(), free_port()
    sup = Supervisor(tmp_path / "logs")
    try:
        sup.start(
            ProcessSpec(
                "redis",
                [PY, "-m", "deploy.cli", "redis", "--port", str(redis_port)],
                ENV,
                ready=RedisReady(f"redis://127.0.0.1:{redis_port}/0"),
                ready_timeout_s=60,
            )
        )
        sup.start(
            ProcessSpec(
                "reward-api",
                [PY, "-m", "deploy.cli", "reward", "serve", "--port", str(reward_port)],
                ENV,
                ready=HttpReady(f"http://127.0.0.1:{reward_port}/health"),
                ready_timeout_s=120,
            )
        )
        code = "import sys, time; print('reading the config', flush=True); time.sleep(0.3); sys.exit('boom: bad shard')"
        sup.start(ProcessSpec("crasher", [PY, "-c", code], ENV))
        tree = _tree([c.pid for c in sup.children])
        assert any("redis-server" in " ".join(p.cmdline()) for p in tree), "redis-server should run under redis"
        deadline = time.monotonic() + 30
        with pytest.raises(ChildFailed) as e:
            while time.monotonic() < deadline:
                sup.check()
                time.sleep(0.05)
        assert e.value.name == "crasher"
        message = str(e.value)
        assert "process 'crasher' exited with code 1 while it should be running" in message
        assert "boom: bad shard" in message and str(tmp_path / "logs" / "crasher.log") in message
    finally:
        sup.stop_all(deadline_s=30)
    assert _alive(tree) == []
    assert sup.exit_codes["redis"] == 0  # stopped gracefully: `longtrace redis` handles SIGTERM
    for name in ("redis", "reward-api", "crasher"):
        assert (tmp_path / "logs" / f"{name}.log").read_text().startswith("# longtrace up:")


def test_a_child_that_ignores_sigterm_is_killed_with_its_other_session_descendants(tmp_path: Path) -> None:
    """Guards against shutdown hanging on a child that ignores SIGTERM, and against orphans: a grandchild that
    started its own session is outside the child's process group and must still be stopped."""
    script = textwrap.dedent(
        """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
        print("grandchild", g.pid, flush=True)
        time.sleep(300)
        """
    )
    sup = Supervisor(tmp_path / "logs")
    child = sup.start(
        ProcessSpec("stubborn", [PY, "-c", script], ENV, ready=LogReady(r"^grandchild \d+"), stop_timeout_s=1)
    )
    grandchild = psutil.Process(int(child.read_log().split("grandchild ")[1].split()[0]))
    t0 = time.monotonic()
    code = sup.stop(child)
    assert time.monotonic() - t0 < 10
    assert code == -signal.SIGKILL and child.killed
    assert _alive([grandchild]) == []


def test_a_child_that_never_gets_ready_fails_with_its_log(tmp_path: Path) -> None:
    """Guards against waiting forever for a service that never becomes ready (and against a message that
    does not say what was awaited)."""
    sup = Supervisor(tmp_path / "logs")
    spec = ProcessSpec(
        "silent",
        [PY, "-c", "import time; print('loading', flush=True); time.sleep(60)"],
        ENV,
        ready=LogReady("^serving"),
        ready_timeout_s=1.0,
    )
    try:
        with pytest.raises(ChildFailed, match=r"'silent' was not ready after 1s \(waited for a log line") as e:
            sup.start(spec)
        assert "loading" in e.value.tail
    finally:
        sup.stop_all(deadline_s=10)
    assert sup.exit_codes["silent"] == -signal.SIGTERM


def test_a_failing_job_fails_and_a_finished_job_does_not(tmp_path: Path) -> None:
    """Guards against a job's non-zero exit read as success, and a job's exit 0 read as a crashed service."""
    sup = Supervisor(tmp_path / "logs")
    ok = sup.start(ProcessSpec("ok-job", [PY, "-c", "print('done')"], ENV, job=True))
    sup.wait(ok)
    assert sup.exit_codes["ok-job"] == 0
    bad = sup.start(ProcessSpec("bad-job", [PY, "-c", "raise SystemExit(4)"], ENV, job=True))
    with pytest.raises(ChildFailed, match="'bad-job' exited with code 4"):
        sup.wait(bad)


def test_children_die_with_a_killed_launcher(tmp_path: Path) -> None:
    """Guards against orphans when the launcher itself is SIGKILLed and cannot clean up (PR_SET_PDEATHSIG)."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from common.supervisor import ProcessSpec, Supervisor
        sup = Supervisor({str(tmp_path / "logs")!r})
        child = sup.start(ProcessSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"]))
        print(child.pid, flush=True)
        time.sleep(300)
        """
    )
    launcher = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    try:
        assert launcher.stdout is not None
        sleeper = psutil.Process(int(launcher.stdout.readline()))
        launcher.kill()
        launcher.wait(timeout=10)
        gone, _ = psutil.wait_procs([sleeper], timeout=10)
        assert gone == [sleeper]
    finally:
        if launcher.poll() is None:
            launcher.kill()
