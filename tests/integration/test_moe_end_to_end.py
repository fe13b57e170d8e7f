"""A tiny Qwen3-MoE trained end to end on CPU: the learner CLI (2 torchrun gloo ranks, expert parallelism 2) takes
3 GRPO steps on groups from Redis and pushes its weights after each over a gloo weight-update group to a built-in
engine serving the same MoE model (issue 22).

The path is the learner tests' (test_learner_redis_loss.py, test_trainer_resume.py): a real Redis, the feeder,
trainer and weight sync of `longtrace learn`; the scored groups come from ScoredDriver (deterministic token ids
and rewards) instead of rollout workers, which keeps the test within CPU budget. The engine runs in this process so
that its parameters can be compared, tensor by tensor, with the learner's HF export of the last push.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from learner.metrics import read_metrics
from rollout_server.engine.api import build_app
from rollout_server.engine.config import EngineConfig
from rollout_server.engine.engine import Engine
from rollout_server.engine.server import BackgroundServer
from tests.helpers.dist import REPO_ROOT, free_port
from tests.helpers.moe_models import NUM_EXPERTS, per_expert, tiny_moe_model
from tests.helpers.scored_driver import ScoredDriver
from weights.exports import latest_export

STEPS = 3
ATOL = 1e-4
PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 11, 300, 12]


@pytest.fixture
def moe_engine(tmp_path: Path) -> Iterator[tuple[Engine, str, Path]]:
    """The tiny MoE on disk and a built-in engine serving it (in this process, behind real HTTP)."""
    model = tiny_moe_model(tmp_path / "moe", seed=0)
    engine = Engine(EngineConfig(model_path=str(model), max_running_requests=4, context_length=256))
    engine.start()
    with BackgroundServer(build_app(engine)) as srv:
        yield engine, srv.url, model
    engine.shutdown()


def _config(tmp: Path, model: Path, redis_url: str, run_id: str, engine_url: str) -> Path:
    from datagen.dataset import make_row, write_rows

    rows = [make_row(f"Documents: doc {i}. Question {i}?", f"a{i}", f"q{i}", [f"e{i}"], "longqa") for i in range(8)]
    write_rows(tmp / "data.jsonl", rows)
    config = tmp / "learner.toml"
    config.write_text(
        f"""run_dir = "{tmp / "run"}"
max_steps = {STEPS}
[model]
hf_path = "{model}"
ep_size = 2
dist_timeout_s = 300
[broker]
redis_url = "{redis_url}"
run_id = "{run_id}"
[data]
dataset_path = "{tmp / "data.jsonl"}"
groups_per_step = 2
num_samples = 4
max_staleness = 1
max_new_tokens = 8
max_total_tokens = 256
[batch]
max_tokens_per_micro_batch = 256
read_block_s = 0.2
batch_timeout_s = 150
lost_scan_after_s = 30
[loss]
importance_correction = "none"  # ScoredDriver's made-up rollout logprobs must not mask every token
[optim]
lr = 1e-2
[checkpoint]
interval_steps = 100
[weight_sync]
type = "distributed"
backend = "gloo"
engine_urls = ["{engine_url}"]
use_registry = false
export_dir = "{tmp / "exports"}"
init_timeout_s = 30
broadcast_timeout_s = 60
"""
    )
    return config


def _run_learner(config: Path, log: Path, timeout_s: float) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    cmd += [f"--master_port={free_port()}", "--rdzv_backend=static", "-m", "learner.train_cli", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in victims:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=30)
        raise AssertionError(f"the learner did not finish in {timeout_s}s:\n{log.read_text()[-4000:]}") from None


def _engine_logprobs(url: str) -> torch.Tensor:
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    r = httpx.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return torch.tensor([v for v, _, _ in r.json()["meta_info"]["input_token_logprobs"][1:]]).double()


def _hf_logprobs(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), dim=-1)
    return logp[:-1].gather(-1, torch.tensor(PROMPT[1:])[:, None]).squeeze(-1).double()


@pytest.mark.slow
def test_tiny_moe_trains_three_grpo_steps_and_pushes_to_the_engine(
    moe_engine: tuple[Engine, str, Path], redis_url: str, tmp_path: Path
) -> None:
    """Guards against MoE training not reaching the engines: a MoE layer the learner cannot train or export
    (expert-parallel gathers, per-expert names), pushes the built-in engine refuses or writes to the wrong expert
    slices of its fused parameters (transformers' `mlp.experts.gate_up_proj`), versions that do not advance, and
    routing statistics missing from the step metrics. After 3 steps (which moved routers and experts) the engine
    reports version 3, its served module holds exactly the learner's export of v3 (every tensor, the fused expert
    parameters split per expert by the test, not by the engine's mapping) and serves their logprobs (1e-4)."""
    engine, url, model = moe_engine
    initial = per_expert(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).state_dict(), tied=True)
    run_id = f"moe-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, model, redis_url, run_id, url)
    driver = ScoredDriver(redis_url, run_id, alternate_rewards=True)
    driver.start()
    try:
        code = _run_learner(config, tmp_path / "learner.log", timeout_s=240)
    finally:
        driver.close()
    log = (tmp_path / "learner.log").read_text()
    assert code == 0, log[-4000:]

    assert httpx.get(url + "/get_weight_version", timeout=10).json()["weight_version"] == str(STEPS)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)), log[-4000:]
    assert metrics[-1]["policy_version"] == STEPS
    for m in metrics:  # shares of routed (token, slot) pairs: the busiest expert >= 1/E >= the idlest
        assert m["moe_expert_load_max"] >= 1 / NUM_EXPERTS >= m["moe_expert_load_min"] >= 0, m

    latest = latest_export(tmp_path / "exports")
    assert latest is not None and latest[1] == STEPS
    exported: dict[str, torch.Tensor] = {}
    for file in sorted(latest[0].glob("*.safetensors")):
        exported |= load_file(str(file))
    assert set(exported) == set(initial), sorted(set(exported) ^ set(initial))[:10]
    moved = [n for n in exported if not torch.equal(exported[n].float(), initial[n])]
    assert any(".mlp.experts." in n for n in moved) and any(n.endswith("mlp.gate.weight") for n in moved), moved

    # The served module's own state, split per expert independently of the engine's name mapping.
    served = per_expert(engine.runner.model.state_dict(), tied=True)
    assert set(served) == set(exported)
    differ = [n for n, t in exported.items() if not torch.equal(served[n], t.to(served[n].dtype))]
    assert differ == [], f"the engine's weights differ from the learner's export v{STEPS}: {differ[:10]}"

    diff = float((_engine_logprobs(url) - _hf_logprobs(latest[0])).abs().max())
    assert diff <= ATOL, f"engine logprobs differ from transformers on the export by {diff}"
