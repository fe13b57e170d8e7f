"""`longtrace bench reward` end to end at a small size: without an upstream, against a stand-in upstream that
speaks LongTraceRL's launch_server.py CLI and /evaluate contract (the real file is not in this repository), and
against one whose rewards differ (the bench must refuse to time servers that disagree)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reward_service.bench import run_bench

REPO = Path(__file__).resolve().parents[2]

# launch_server.py's flags and /evaluate, the outcome as the bench's judge stub answers (gold in the final answer),
# the rubric with the service's own functions; FAKE_UPSTREAM_MODE=disagree flips the outcome.
FAKE_UPSTREAM = f"""
import argparse, json, os, sys
sys.path.insert(0, {str(REPO)!r})
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from reward_service.rubric import judged_text, response_mode_turn, rubric_reward

async def evaluate(request):
    data = json.loads(await request.body())
    info = data["extra_reward_info"]
    eta = info["rubric_reward_ratio"]
    turn, answer = response_mode_turn(data["response"])
    outcome = 1.0 if str(data["label"]).lower() in judged_text(answer).lower() else 0.0
    if os.environ.get("FAKE_UPSTREAM_MODE") == "disagree":
        outcome = 1.0 - outcome
    rubric = rubric_reward([turn], info["rubrics"], info["dataset_name"], info["rubric_use_reasoning_content"],
                           info["rubric_use_content"])
    return JSONResponse({{"outcome_reward": outcome, "rubric_reward": rubric,
                         "reward": (1 - eta) * outcome + eta * rubric}})

parser = argparse.ArgumentParser()
for flag in ("--host", "--base_url", "--api_key", "--model_name"):
    parser.add_argument(flag, default="")
parser.add_argument("--port", type=int, default=7248)
args = parser.parse_args()
uvicorn.run(Starlette(routes=[Route("/evaluate", evaluate, methods=["POST"])]), host=args.host, port=args.port,
            log_level="warning")
"""

SMALL: dict[str, Any] = {"num_requests": 48, "concurrency": 8, "clients": 1, "as_json": True}


def _fake_upstream(tmp_path: Path) -> str:
    path = tmp_path / "launch_server.py"
    path.write_text(FAKE_UPSTREAM)
    (tmp_path / "openai.py").write_text("")  # the bench checks that the upstream's directory can import openai
    return str(path)


def test_without_upstream_the_bench_says_so_and_measures_the_service(capsys: pytest.CaptureFixture[str]) -> None:
    """Guards against the bench inventing a comparison when it has no upstream (a weak in-repo baseline as the
    headline ratio), and against its figures of the service being missing or zero."""
    result = run_bench(**SMALL)
    out, err = capsys.readouterr()
    assert "no upstream to compare with" in err
    assert json.loads(out.strip().splitlines()[-1]) == result
    assert result["ratio"] is None and result["upstream_req_per_s"] is None and result["upstream"] is None
    assert result["req_per_s"] > 0 and result["p99_ms"] > 0 and result["cpu_ms_per_request"] > 0


def test_against_an_upstream_the_bench_checks_agreement_then_compares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against the comparison path (upstream started with launch_server.py's flags, pointed at the judge
    stub, every distinct body checked, alternating rounds) failing or reporting figures that do not follow from
    its measurements, and against timing servers whose rewards disagree."""
    upstream = _fake_upstream(tmp_path)
    result = run_bench(**SMALL, upstream=upstream)
    assert result["agreement_checked_bodies"] == 32
    assert result["upstream_req_per_s"] > 0 and result["upstream_p99_ms"] > 0
    assert result["upstream_cpu_ms_per_request"] > 0
    assert result["ratio"] == pytest.approx(result["req_per_s"] / result["upstream_req_per_s"], abs=0.01)  # rounded
    monkeypatch.setenv("FAKE_UPSTREAM_MODE", "disagree")
    with pytest.raises(RuntimeError, match="disagree on"):
        run_bench(**SMALL, upstream=upstream)


def test_an_upstream_without_openai_is_refused_with_the_install_hint(tmp_path: Path) -> None:
    """Guards against a missing openai package (the upstream's judge client, not a dependency of this project)
    surfacing as an upstream that "did not start" with a traceback, instead of saying what to install."""
    upstream = tmp_path / "launch_server.py"
    upstream.write_text("import openai_is_not_here_either\n")
    (tmp_path / "openai.py").write_text("raise ImportError('no openai here')\n")
    with pytest.raises(RuntimeError, match="pip install"):
        run_bench(**SMALL, upstream=str(upstream))


def test_cli_refuses_a_missing_upstream_file_and_a_nonpositive_judge_delay() -> None:
    """Guards against a mistyped --upstream path silently running the upstream-less bench, or a zero judge delay
    (an infinite judge ceiling) being accepted: usage errors, exit code 2, before any server starts."""
    cli = [sys.executable, "-m", "deploy.cli", "bench", "reward"]
    missing = subprocess.run([*cli, "--upstream", "/nonexistent/launch_server.py"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no such file" in missing.stderr, missing.stderr[-2000:]
    zero = subprocess.run([*cli, "--judge_delay_s", "0"], capture_output=True, text=True)
    assert zero.returncode == 2 and "--judge_delay_s" in zero.stderr, zero.stderr[-2000:]
