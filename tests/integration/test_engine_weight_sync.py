"""Weight updates over a real gloo group from a separate process, the way a trainer pushes weights to SGLang."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from rollout_server.engine.api import build_app
from rollout_server.engine.config import EngineConfig
from rollout_server.engine.engine import Engine
from rollout_server.engine.server import BackgroundServer, free_port
from rollout_server.models import init_tiny_model

GROUP = "weight_update_group"


# Trainer side (rank 0), run as a plain subprocess (no transformers import): build the group with the same
# init_custom_process_group, push model B in two buckets, then announce a bucket it never sends.
SENDER = """
import json, sys, threading
import httpx, torch, torch.distributed as dist
from safetensors.torch import load_file
from weights.group import init_custom_process_group

url, port, path, group_name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
params = sorted(load_file(path).items())
replies = {}

def post(key, route, body):
    replies[key] = httpx.post(url + route, json=body, timeout=60)

init = dict(master_address="127.0.0.1", master_port=port, rank_offset=1, world_size=2, group_name=group_name, backend="gloo")
t = threading.Thread(target=post, args=("init", "/init_weights_update_group", init))
t.start()
group = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, group_name, timeout_s=30)
t.join()
post("outside", "/update_weights_from_distributed", dict(names=["x"], dtypes=["float32"], shapes=[[1]], group_name=group_name))
post("begin", "/begin_weight_update", {})
post("begin_again", "/begin_weight_update", {})
half = len(params) // 2
for i, bucket in enumerate((params[:half], params[half:])):
    body = dict(
        names=[n for n, _ in bucket],
        dtypes=[str(p.dtype).removeprefix("torch.") for _, p in bucket],
        shapes=[list(p.shape) for _, p in bucket],
        group_name=group_name,
        weight_version="1" if i == 1 else None,
    )
    t = threading.Thread(target=post, args=(f"bucket{i}", "/update_weights_from_distributed", body))
    t.start()
    for _, p in bucket:
        dist.broadcast(p, src=0, group=group)
    t.join()
never_sent = dict(names=["model.norm.weight"], dtypes=["float32"], shapes=[[128]], group_name=group_name)
post("stalled", "/update_weights_from_distributed", never_sent)
post("after", "/update_weights_from_distributed", never_sent)
post("end", "/end_weight_update", {})
post("end_again", "/end_weight_update", {})
post("destroy", "/destroy_weights_update_group", dict(group_name=group_name))
print(json.dumps({k: [r.status_code, r.json()] for k, r in replies.items()}))
"""


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("weight-sync")
    return init_tiny_model(root / "a", seed=0), init_tiny_model(root / "b", seed=1)


@pytest.fixture(scope="module")
def server(model_dirs: tuple[Path, Path]) -> Iterator[tuple[Engine, str]]:
    engine = Engine(
        EngineConfig(
            model_path=str(model_dirs[0]), max_running_requests=4, context_length=256, weight_update_timeout_s=2
        )
    )
    engine.start()
    with BackgroundServer(build_app(engine)) as srv:
        yield engine, srv.url
    engine.shutdown()


def _greedy(url: str, prompt: list[int]) -> dict[str, Any]:
    r = httpx.post(
        url + "/generate",
        json={"input_ids": prompt, "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_distributed_update_from_another_process_switches_weights(
    server: tuple[Engine, str], model_dirs: tuple[Path, Path]
) -> None:
    """Guards against the weight-sync path: a group that never meets the trainer's (init_process_group
    instead of PrefixStore), tensors applied to the wrong names, a missing version, or a stalled trainer
    hanging the engine, or an engine that takes buckets outside a weight-update session (real SGLang 0.5.23
    refuses them: a client tested only against ours would never open one). After the update, outputs are exactly
    those of the new model."""
    _, url = server
    prompt = [3, 14, 15, 92, 6]
    before = _greedy(url, prompt)
    model_b = AutoModelForCausalLM.from_pretrained(model_dirs[1], dtype=torch.float32)
    with torch.no_grad():
        want = model_b.generate(
            torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0
        )
    proc = subprocess.run(
        [sys.executable, "-c", SENDER, url, str(free_port()), str(model_dirs[1] / "model.safetensors"), GROUP],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    replies = json.loads(proc.stdout.strip().splitlines()[-1])
    assert replies["init"][0] == 200 and replies["init"][1]["success"], replies["init"]
    # As SGLang 0.5.23: distributed updates only inside a weight-update session, one session at a time.
    assert replies["outside"][0] == 400 and "must run between begin_weight_update()" in replies["outside"][1]["message"]
    assert replies["begin"][0] == 200 and replies["begin_again"][0] == 400, replies
    assert replies["end"][0] == 200 and replies["end_again"][0] == 400, replies
    assert replies["bucket0"][0] == 200 and replies["bucket1"][0] == 200, replies
    assert "Weight version updated to 1" in replies["bucket1"][1]["message"]
    stalled_code, stalled = replies["stalled"]
    assert stalled_code == 400 and "did not finish within" in stalled["message"]
    assert replies["after"][0] == 400 and "broken" in replies["after"][1]["message"]
    assert replies["destroy"][0] == 200
    after = _greedy(url, prompt)
    assert after["output_ids"] == want[0, len(prompt) :].tolist() != before["output_ids"]
    assert after["meta_info"]["weight_version"] == "1"


def test_init_group_without_a_trainer_fails_within_the_timeout(server: tuple[Engine, str]) -> None:
    """Guards against /init_weights_update_group hanging forever when rank 0 never shows up."""
    _, url = server
    body = {
        "master_address": "127.0.0.1",
        "master_port": free_port(),
        "rank_offset": 1,
        "world_size": 2,
        "group_name": "lonely",
        "backend": "gloo",
    }
    r = httpx.post(url + "/init_weights_update_group", json=body, timeout=60)
    assert r.status_code == 400 and not r.json()["success"]
    assert "lonely" in r.json()["message"]
