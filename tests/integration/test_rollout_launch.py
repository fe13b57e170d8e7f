"""`python -m rollout_server.launch` (= `longtrace engine launch`): the engine command lines it builds and its
config errors. Starting real engines and their registry heartbeats is covered by test_rollout_worker.py."""

from __future__ import annotations

import shlex
import subprocess
import sys


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
        "--extra_args", '["--served-model-name", "policy"]', "--dry_run",
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
