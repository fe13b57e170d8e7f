"""`python -m rollout_server.launch` (= `longtrace engine launch`): the engine command lines it builds and its
config errors. Starting real engines and their registry heartbeats is covered by test_rollout_worker.py."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _launch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollout_server.launch", *args], capture_output=True, text=True, timeout=60
    )


def test_sglang_dry_run_prints_a_launch_server_command_that_parses() -> None:
    """Guards against a malformed SGLang command line (wrong flag names or values) that would only fail on a
    GPU node: --dry_run prints it without SGLang installed."""
    out = _launch(
        "--backend", "sglang", "--model_path", "/models/Qwen3-4B-Thinking-2507", "--tp_size", "8",
        "--mem_fraction_static", "0.7", "--context_length", "160000", "--host", "0.0.0.0", "--port", "30001",
        "--extra_args", '["--served-model-name", "policy"]', "--allow_unauthenticated", "--dry_run",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout.strip())
    assert argv[:3] == ["python", "-m", "sglang.launch_server"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags == {
        "--model-path": "/models/Qwen3-4B-Thinking-2507",
        "--host": "0.0.0.0",
        "--port": "30001",
        "--tp-size": "8",
        "--mem-fraction-static": "0.7",
        "--context-length": "160000",
        "--served-model-name": "policy",
    }


def test_builtin_dry_run_runs_engine_serve_and_bad_flags_are_named() -> None:
    """Guards against the builtin backend not starting `longtrace engine serve` with the model and port, and
    against a config mistake (sglang without a model) failing with a traceback instead of naming the flag."""
    out = _launch("--model_path", "/m/tiny", "--port", "31999", "--dry_run")
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout.strip())
    assert argv[1:5] == ["-m", "deploy.cli", "engine", "serve"]
    assert argv[argv.index("--model") + 1] == "/m/tiny" and argv[argv.index("--port") + 1] == "31999"
    bad = _launch("--backend", "sglang", "--dry_run")
    assert bad.returncode == 2 and "--model_path" in bad.stderr and "Traceback" not in bad.stderr
    typo = _launch("--tp-sise", "2", "--dry_run")
    assert typo.returncode == 2 and "tp_sise" in typo.stderr


def test_exposed_launch_without_a_token_is_refused_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against `engine launch --host 0.0.0.0` putting an engine's control endpoints (pause, weight updates)
    on the network with no token: refused, naming --allow_unauthenticated, unless a token is set (the built-in
    engine's env var, SGLang's too, handed over in a --config file and never in argv, or SGLang's --admin-api-key
    in extra_args, with a warning) or the flag is given, which reaches `engine serve`."""
    monkeypatch.delenv("LONGTRACE_ENGINE_API_KEY", raising=False)
    for backend in ("builtin", "sglang"):
        out = _launch("--backend", backend, "--model_path", "/m", "--host", "0.0.0.0", "--dry_run")
        assert out.returncode == 2 and "--allow_unauthenticated" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert _launch("--model_path", "/m", "--host", "127.0.0.1", "--dry_run").returncode == 0
    sglang_key = _launch(
        "--backend", "sglang", "--model_path", "/m", "--host", "0.0.0.0", "--dry_run",
        "--extra_args", '["--admin-api-key", "k"]',
    )  # fmt: skip
    assert sglang_key.returncode == 0, sglang_key.stderr
    allowed = _launch("--model_path", "/m", "--host", "0.0.0.0", "--allow_unauthenticated", "--dry_run")
    assert allowed.returncode == 0, allowed.stderr
    assert "--allow_unauthenticated" in shlex.split(allowed.stdout.strip())  # engine serve would refuse without it
    assert "ps" in sglang_key.stderr  # a token on SGLang's command line is visible: the launcher says so
    monkeypatch.setenv("LONGTRACE_ENGINE_API_KEY", "s3cret")
    assert _launch("--model_path", "/m", "--host", "0.0.0.0", "--dry_run").returncode == 0
    sglang_env = _launch("--backend", "sglang", "--model_path", "/m", "--host", "0.0.0.0", "--dry_run")
    assert sglang_env.returncode == 0, sglang_env.stderr  # the env var is SGLang's token too
    assert "--config" in shlex.split(sglang_env.stdout) and "s3cret" not in sglang_env.stdout


def test_late_engine_loads_the_newest_export_and_the_registry_follows_pushes(redis_url: str, tmp_path: Path) -> None:
    """Guards against an engine that joins between weight updates serving its start-up weights (with
    --export_dir the launcher loads LATEST (/update_weights_from_disk) before registering, so the registry and
    the engine report the export's version and generate with its weights), and against the heartbeat
    re-registering the version the engine started with after a push changed it (a stale registry version)."""
    import json
    import shutil

    import httpx
    import torch
    from transformers import AutoModelForCausalLM

    from broker.factory import connect
    from broker.settings import BrokerConfig
    from rollout_server.models import init_tiny_model

    start = init_tiny_model(tmp_path / "start", seed=0)
    trained = init_tiny_model(tmp_path / "trained", seed=1)
    exports = tmp_path / "exports"
    shutil.copytree(trained, exports / "v00000003")
    (exports / "LATEST").write_text(json.dumps({"version": 3, "path": "v00000003"}))

    cmd = [
        sys.executable, "-m", "rollout_server.launch", "--model_path", str(start), "--port", "0",
        "--engine_id", "late", f"--broker.redis_url={redis_url}", "--broker.run_id=late",
        "--export_dir", str(exports), "--extra_args", '["--num_threads", "1"]',
    ]  # fmt: skip
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    broker = connect(BrokerConfig(redis_url=redis_url, run_id="late"))
    try:
        deadline = time.monotonic() + 120
        while not (live := broker.engines.live()):
            assert launcher.poll() is None, launcher.stderr.read().decode()[-3000:] if launcher.stderr else ""
            assert time.monotonic() < deadline, "the engine never registered"
            time.sleep(0.2)
        assert live[0].policy_version == 3
        url = live[0].url
        assert httpx.get(f"{url}/get_model_info", timeout=10).json()["weight_version"] == "3"
        prompt = [5, 17, 33, 41]
        out = httpx.post(
            f"{url}/generate",
            json={"input_ids": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}},
            timeout=60,
        ).json()
        expected = AutoModelForCausalLM.from_pretrained(trained).generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8
        )[0, len(prompt) :]
        assert out["output_ids"] == expected.tolist()
        r = httpx.post(f"{url}/update_weight_version", json={"new_version": "5", "abort_all_requests": False})
        assert r.status_code == 200, r.text
        while (live := broker.engines.live()) and live[0].policy_version != 5:
            assert time.monotonic() < deadline + 30, f"the registry still shows version {live[0].policy_version}"
            time.sleep(0.2)
        assert live and live[0].policy_version == 5
    finally:
        broker.close()
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
