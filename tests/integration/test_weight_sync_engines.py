"""Weight sync against real built-in engines (`longtrace engine serve` subprocesses on free ports, gloo groups).

The learner side is this test process holding a plain HF model behind the same iterator interface as the
megatron model (HFModelSource); test_weight_sync_megatron.py pushes from a real megatron model. Engines
start from the tiny model A; the learner holds model B (another seed), so every passing comparison proves
the weights moved. Launches are few: three engines, started together at module start: a and b registered in
a real Redis engine registry, c unregistered (the late joiner, registered by the test after it caught up, as
a launcher does; later the victim of the kill test).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from broker.base import EngineInfo
from broker.factory import connect
from broker.settings import BrokerConfig
from learner.state import LearnerState
from learner.weight_sync.base import PushReport, WeightSync
from learner.weight_sync.config import DiskSyncConfig, DistributedSyncConfig
from learner.weight_sync.distributed import DistributedWeightSync
from learner.weight_sync.factory import build_weight_sync
from learner.weight_sync.sources import HFModelSource
from rollout_server.engine.server import free_port
from rollout_server.models import init_tiny_model
from tests.helpers.reward_server import wait_health
from weights.engine_client import EngineCallError, EngineClient
from weights.exports import catch_up, latest_export

REPO = Path(__file__).resolve().parents[2]
PROMPT = [5, 17, 42, 99, 3, 250, 7]
CONTINUATION = [11, 400, 23, 8, 301, 77, 5, 1000, 64, 2, 19, 512]
ATOL = 1e-4
ENGINE_RECEIVE_TIMEOUT_S = 5  # a survivor gives up on a bucket whose sender lost a peer after this long


# ---------------------------------------------------------------- engines as subprocesses


class EngineProc:
    def __init__(
        self, model: Path, log: Path, broker_url: str | None = None, run_id: str = "", device: str = "cpu"
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "deploy.cli", "engine", "serve", "--model", str(model), "--port", str(self.port)]
        cmd += ["--max_running_requests", "2", "--context_length", "128", "--num_threads", "1", "--device", device]
        cmd += ["--weight_update_timeout_s", str(ENGINE_RECEIVE_TIMEOUT_S), "--log_level", "WARNING"]
        if broker_url:
            cmd += ["--broker.redis_url", broker_url, "--broker.run_id", run_id, "--engine_id", f"e{self.port}"]
            cmd += ["--heartbeat_interval_s", "0.3", "--heartbeat_ttl_s", "2"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        if device == "cuda":
            # NCCL refuses two ranks of one group on one GPU ("Duplicate GPU detected") unless they claim
            # different hosts; it then uses its socket transport, as between nodes (experiments/gpu/smoke.py).
            env["NCCL_HOSTID"] = f"engine-{self.port}"
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout_s: float = 180) -> None:
        wait_health(self.url, self.proc, self.log, timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_file.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A (served at start) and B (the learner's weights): the same tiny Qwen3 with different seeds. Hidden 256 and
    a 2048-row vocabulary make the embedding (2 MiB) larger than a 1 MiB bucket."""
    root = tmp_path_factory.mktemp("wsync-models")
    kw: dict[str, Any] = dict(hidden_size=256, num_layers=2, vocab_size=2048)
    return init_tiny_model(root / "a", seed=0, **kw), init_tiny_model(root / "b", seed=1, **kw)


@pytest.fixture(scope="module")
def cluster(
    models: tuple[Path, Path], redis_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Engines a and b registered in a real Redis engine registry, and c reachable by URL only."""
    logs = tmp_path_factory.mktemp("wsync-logs")
    run_id = f"wsync-{uuid.uuid4().hex[:6]}"
    engines = {
        "a": EngineProc(models[0], logs / "a.log", redis_server, run_id),
        "b": EngineProc(models[0], logs / "b.log", redis_server, run_id),
        "c": EngineProc(models[0], logs / "c.log"),
    }
    broker = connect(BrokerConfig(redis_url=redis_server, run_id=run_id))
    try:
        for e in engines.values():
            e.wait_healthy()
        yield {"engines": engines, "broker": broker, "run_id": run_id, "redis": redis_server, "logs": logs}
    finally:
        for e in engines.values():
            e.stop()
        broker.close()


@pytest.fixture
def learner_model(models: tuple[Path, Path]) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(models[1], dtype=torch.float32)
    return model.eval()


# ---------------------------------------------------------------- logprobs on both sides


def engine_logprobs(url: str) -> tuple[torch.Tensor, str]:
    """The engine's logprobs of CONTINUATION after PROMPT (temperature 1) and the response's weight version."""
    body = {
        "input_ids": PROMPT + CONTINUATION,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": len(PROMPT),
    }
    r = httpx.post(url + "/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    values = [v for v, _, _ in meta["input_token_logprobs"]]
    return torch.tensor(values, dtype=torch.float64), meta["weight_version"]


def learner_logprobs(model: Any) -> torch.Tensor:
    ids = torch.tensor([PROMPT + CONTINUATION], device=model.device)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1).cpu()
    positions = torch.arange(len(PROMPT) - 1, len(PROMPT) + len(CONTINUATION) - 1)
    return logp[positions, torch.tensor(CONTINUATION)].double()


def assert_serves(url: str, model: Any, version: str) -> None:
    got, meta_version = engine_logprobs(url)
    diff = (got - learner_logprobs(model)).abs().max().item()
    assert diff <= ATOL, f"{url}: engine logprobs differ from the learner's by {diff}"
    assert meta_version == version
    assert httpx.get(url + "/get_weight_version", timeout=10).json()["weight_version"] == version


def perturb(model: Any, seed: int, skip: tuple[str, ...] = ()) -> None:
    """New learner weights, as an optimizer step would give (parameters whose name contains `skip` stay)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in skip):
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.02)


def _push_at(sync: WeightSync, step: int, model: Any) -> PushReport:
    """Push as the training loop does after optimizer step `step` (the version comes from the learner state)."""
    sync.state.step = step
    return sync.push(model)


def _maybe_push_at(sync: WeightSync, step: int, model: Any) -> PushReport | None:
    sync.state.step = step
    return sync.maybe_push(model)


def static_sync(urls: list[str], backend: str = "gloo", **kw: Any) -> DistributedWeightSync:
    cfg = DistributedSyncConfig(
        engine_urls=urls, use_registry=False, broadcast_timeout_s=30, init_timeout_s=30, backend=backend, **kw
    )
    return DistributedWeightSync(cfg, HFModelSource())


# ---------------------------------------------------------------- tests


def test_push_to_two_engines_gives_the_learners_logprobs_and_version(
    cluster: dict[str, Any], learner_model: Any
) -> None:
    """Guards against weights that do not arrive or arrive wrong (names, order, dtype, tied embeddings), a
    group that never meets the engines', one engine of two missed, and a version not shown by
    /get_weight_version and meta_info.weight_version; a second push must reuse the group."""
    _push_twice_and_check([cluster["engines"][k].url for k in "ab"], learner_model, "gloo")


@pytest.mark.gpu
def test_push_over_nccl_gives_the_learners_logprobs_and_version(
    models: tuple[Path, Path], learner_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same test over NCCL: the learner and two engines share GPU 0, each process with its own NCCL host id
    (NCCL refuses two ranks of one group on one GPU otherwise)."""
    torch.cuda.set_device(0)
    monkeypatch.setenv("NCCL_HOSTID", "learner")  # read when the weight-update communicator is built
    engines = [EngineProc(models[0], tmp_path / f"gpu{i}.log", device="cuda") for i in range(2)]
    try:
        for e in engines:
            e.wait_healthy()
        _push_twice_and_check([e.url for e in engines], learner_model.cuda(), "nccl")
    finally:
        for e in engines:
            e.stop()


def _push_twice_and_check(urls: list[str], model: Any, backend: str) -> None:
    before, _ = engine_logprobs(urls[0])
    assert (before - learner_logprobs(model)).abs().max().item() > 1e-2, "engines must start elsewhere"
    sync = static_sync(urls, backend=backend)
    try:
        report = _maybe_push_at(sync, 1, model)
        assert report is not None and report.ok, report
        assert sorted(report.updated) == sorted(urls) and not report.failed and report.policy_version == 1
        assert report.bytes == sum(p.numel() * 4 for p in model.parameters())
        assert report.pause_to_continue_s > 0 and report.group_rebuilds == 1
        for url in urls:
            assert_serves(url, model, "1")
        perturb(model, seed=1)
        report = _maybe_push_at(sync, 2, model)
        assert report is not None and report.ok and report.group_rebuilds == 0, report
        for url in urls:
            assert_serves(url, model, "2")
        assert sync.state.policy_version == 2
    finally:
        sync.close()


def test_tiny_buckets_give_identical_weights(cluster: dict[str, Any], learner_model: Any) -> None:
    """Guards against bucket-boundary bugs (sglang#14178: garbled output with small buckets): with 1 MiB
    buckets, a tensor larger than a bucket goes alone and every other bucket stays under the cap."""
    a, b = (cluster["engines"][k].url for k in "ab")
    perturb(learner_model, seed=2)
    sync = static_sync([a, b], bucket_mb=1, every_k_steps=2)
    try:
        assert _maybe_push_at(sync, 3, learner_model) is None, "every_k_steps=2 must skip odd steps"
        report = _maybe_push_at(sync, 4, learner_model)
        assert report is not None and report.ok and report.buckets >= 3, report
        for url in (a, b):
            assert_serves(url, learner_model, "4")
    finally:
        sync.close()


def _megatron_logprobs(model: Any, vocab_size: int) -> torch.Tensor | None:
    """Logprobs of CONTINUATION from the megatron model (learner/logprobs.py), on the last pipeline stage."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from learner.logprobs import shifted_token_logprobs

    ids = torch.tensor([PROMPT + CONTINUATION])
    positions = torch.arange(ids.shape[1]).expand_as(ids)

    def step(data_iterator: Any, m: Any) -> Any:
        out = m(next(data_iterator), positions, None)
        return out, lambda o: (torch.zeros(()), {"logits": o.detach()})

    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([ids]),
            model=[model],
            num_microbatches=1,
            seq_length=ids.shape[1],
            micro_batch_size=1,
            forward_only=True,
        )
        if not parallel_state.is_pipeline_last_stage():
            return None
        logp = shifted_token_logprobs(collected[0]["logits"], ids, 1.0, vocab_size)
    return logp[0, len(PROMPT) - 1 :].double()


def _megatron_worker(hf_path: str, urls: list[str], layouts: list[list[int]]) -> None:
    """On each torchrun rank: for each (tp, pp) layout, load B into megatron, change it, push, compare logprobs."""
    from megatron.core import parallel_state

    from learner.config import LearnerModelConfig
    from learner.model.build import build_model
    from learner.model.hf_config import load_hf_arch
    from learner.model.load import load_hf_weights
    from learner.parallel import destroy_parallel, init_parallel
    from learner.weight_sync.sources import MegatronSource
    from tests.helpers.dist import init_worker_process_group

    init_worker_process_group()
    arch = load_hf_arch(hf_path)
    for i, (tp, pp) in enumerate(layouts):
        layout = init_parallel(LearnerModelConfig(hf_path=hf_path, tp_size=tp, pp_size=pp))
        model = build_model(arch, LearnerModelConfig(hf_path=hf_path, tp_size=tp, pp_size=pp))
        load_hf_weights(model, hf_path, arch)
        model.eval()
        # Same seed on the TP ranks of a stage: replicated parameters (norms) must stay identical replicas. The
        # tied embedding lives on both the first and the last stage under PP: training keeps the copies equal.
        perturb(model, seed=100 + 10 * i + layout.pp_rank, skip=("embedding", "output_layer"))
        cfg = DistributedSyncConfig(
            engine_urls=urls, use_registry=False, bucket_mb=1, init_timeout_s=30, broadcast_timeout_s=30, backend="gloo"
        )
        sync = DistributedWeightSync(cfg, MegatronSource(arch, hf_path, timeout_s=60))
        version = 20 + i
        report = _push_at(sync, version, model)
        where = f"tp{tp} pp{pp} rank {layout.rank}"
        assert report.ok and sorted(report.updated) == sorted(urls), f"{where}: {report}"
        assert report.group_rebuilds == pp, f"{where}: one group per pipeline stage, got {report.group_rebuilds}"
        learner = _megatron_logprobs(model, arch.vocab_size)
        if learner is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            for url in urls:
                got, meta_version = engine_logprobs(url)
                diff = (got - learner).abs().max().item()
                assert diff <= ATOL, f"{where}: {url} logprobs differ from megatron's by {diff}"
                assert meta_version == str(version), f"{where}: {url} reports version {meta_version}"
            print(f"WEIGHT_SYNC_OK tp{tp} pp{pp}", flush=True)
        sync.close()
        destroy_parallel(keep_process_group=True)


@pytest.mark.slow
def test_megatron_learner_pushes_each_pipeline_stage(cluster: dict[str, Any], models: tuple[Path, Path]) -> None:
    """Guards against the megatron path: TP shards not gathered (or a non-leader rank hanging the gathers), a
    pipeline stage's parameters missing (each stage's leader owns its own group with every engine), and
    HF-name conversion errors. The engines' logprobs must equal learner/logprobs.py's on the changed weights."""
    from tests.helpers.dist import run_torchrun

    urls = [cluster["engines"][k].url for k in "ab"]
    kwargs = {"hf_path": str(models[1]), "urls": urls, "layouts": [[2, 1], [1, 2]]}
    out = run_torchrun(2, f"{__name__}:_megatron_worker", kwargs, timeout_s=300)
    assert "WEIGHT_SYNC_OK tp2 pp1" in out and "WEIGHT_SYNC_OK tp1 pp2" in out, out[-3000:]


def test_late_engine_loads_the_latest_export_then_joins_the_group(
    cluster: dict[str, Any], models: tuple[Path, Path], learner_model: Any, tmp_path: Path
) -> None:
    """Guards against an engine that joins between updates serving its start-up weights (it must load the
    newest HF export from disk before it is registered) and against a group that is not rebuilt when the
    registry's engine set grows; the broker's policy-version key must follow every push."""
    a, b = (cluster["engines"][k].url for k in "ab")
    late = cluster["engines"]["c"].url
    broker = cluster["broker"]
    export_dir = tmp_path / "exports"
    cfg = DistributedSyncConfig(export_dir=str(export_dir), export_keep_last=1, init_timeout_s=30, backend="gloo")
    sync = DistributedWeightSync(cfg, HFModelSource(models[1]), broker)
    try:
        perturb(learner_model, seed=3)
        report = _push_at(sync, 5, learner_model)
        assert report.ok and sorted(report.updated) == sorted([a, b]), report
        assert broker.policy_version.get() == 5
        assert latest_export(export_dir) == (export_dir.resolve() / "v00000005", 5)

        assert catch_up(late, export_dir) == 5  # what a launcher does before it registers a new engine
        assert_serves(late, learner_model, "5")
        broker.engines.register(EngineInfo(engine_id="late", url=late), ttl_s=600)

        perturb(learner_model, seed=4)
        report = _push_at(sync, 6, learner_model)
        assert report.ok and sorted(report.updated) == sorted([a, b, late]), report
        assert report.group_rebuilds == 1
        for url in (a, b, late):
            assert_serves(url, learner_model, "6")
        assert broker.policy_version.get() == 6
        assert sorted(p.name for p in export_dir.iterdir()) == ["LATEST", "v00000006"], "keep_last=1 prunes"
    finally:
        sync.close()
        broker.engines.deregister("late")


def test_disk_backend_loads_each_export_into_every_engine(
    cluster: dict[str, Any], models: tuple[Path, Path], learner_model: Any, tmp_path: Path
) -> None:
    """Guards against the disk backend (the alternative to NCCL, and the late engines' source) writing an
    export the engines cannot load, or leaving them paused or at the old version."""
    urls = [cluster["engines"][k].url for k in "ab"]
    cfg = DiskSyncConfig(engine_urls=urls, use_registry=False, export_dir=str(tmp_path / "exports"))
    sync = build_weight_sync(cfg, HFModelSource(models[1]), None, LearnerState(step=8, policy_version=8))
    try:
        perturb(learner_model, seed=6)
        report = _maybe_push_at(sync, 9, learner_model)
        assert report is not None and report.ok and sorted(report.updated) == sorted(urls), report
        assert report.exported_to.endswith("v00000009") and report.pause_to_continue_s > 0
        for url in urls:
            assert_serves(url, learner_model, "9")
    finally:
        sync.close()


def test_flush_retries_while_the_engine_answers_400_and_is_bounded(cluster: dict[str, Any]) -> None:
    """Guards against a flush that gives up on the first 400 (requests still running after the pause) and one
    that retries forever: flush_cache retries until 200 or its deadline, then names the status."""
    url = cluster["engines"]["b"].url
    client = EngineClient(http_timeout_s=10)
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 110, "ignore_eos": True}}
    try:
        for _ in range(3):  # the request must still be running when the pause lands
            generation = client.submit(client.request, "POST", url + "/generate", body, 60.0)
            while client.server_info(url)["internal_states"][0]["num_running_reqs"] == 0 and not generation.done():
                time.sleep(0.005)
            client.pause(url, "in_place", 10)  # keeps the running request (and its KV): flush must wait
            if client.server_info(url)["internal_states"][0]["num_running_reqs"]:
                break
            client.resume(url)
        else:
            raise AssertionError("the generation always finished before the pause")
        t0 = time.monotonic()
        with pytest.raises(EngineCallError, match="answered 400"):
            client.flush_cache(url, deadline_s=0.5, interval_s=0.05)
        assert 0.4 <= time.monotonic() - t0 < 5
        threading.Timer(0.3, client.resume, args=(url,)).start()
        client.flush_cache(url, deadline_s=30, interval_s=0.05)  # 200 once the resumed request finished
        assert generation.result(timeout=60).json()["meta_info"]["completion_tokens"] == 110
    finally:
        client.resume(url)
        client.close()


class KillingSource(HFModelSource):
    """The HF model's tensors; after `after` of them the victim engine is SIGKILLed (mid-update, deterministic)."""

    def __init__(self, victim: EngineProc, after: int) -> None:
        super().__init__()
        self.victim = victim
        self.after = after

    def named_tensors(self, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
        for i, item in enumerate(super().named_tensors(model)):
            if i == self.after and self.victim.proc.poll() is None:
                self.victim.proc.kill()
                self.victim.proc.wait(timeout=10)
            yield item


def test_engine_killed_during_an_update_is_reported_and_the_survivor_serves(
    cluster: dict[str, Any], learner_model: Any
) -> None:
    """Guards against a dead engine hanging the push or the survivors (the broadcast has no timeout of its
    own), a survivor left paused or with a partial update, and a failure that is not reported. After the
    kill the group is rebuilt with the survivor, which gets the whole update and resumes serving."""
    a = cluster["engines"]["a"].url
    victim: EngineProc = cluster["engines"]["c"]
    perturb(learner_model, seed=5)
    cfg = DistributedSyncConfig(
        engine_urls=[a, victim.url],
        use_registry=False,
        bucket_mb=1,
        init_timeout_s=30,
        broadcast_timeout_s=30,
        backend="gloo",
    )
    sync = DistributedWeightSync(cfg, KillingSource(victim, after=6))
    try:
        t0 = time.monotonic()
        report = _push_at(sync, 7, learner_model)
        elapsed = time.monotonic() - t0
        assert report.ok and report.updated == [a] and report.attempts == 2, report
        assert list(report.failed) == [victim.url] and "dead" in report.failed[victim.url], report.failed
        assert elapsed < 4 * ENGINE_RECEIVE_TIMEOUT_S + 20, f"the push took {elapsed:.0f}s"
        assert_serves(a, learner_model, "7")
        r = httpx.post(
            a + "/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4}}, timeout=30
        )
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 4
        # The next push does not wait for the dead engine: it cannot be reached, so it is skipped.
        report = _push_at(sync, 8, learner_model)
        assert report.ok and report.updated == [a] and report.group_rebuilds == 0, report
        assert list(report.failed) == [victim.url], report.failed
    finally:
        sync.close()


def test_a_group_never_built_resumes_the_engines_with_their_previous_weights(
    cluster: dict[str, Any], learner_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a push that sent nothing leaving the engines paused: a weight-update group that cannot be
    built (here every build fails as a rendezvous at an address the engines cannot reach does) must resume the
    engines with their previous weights and version after the last attempt, so rollouts go on, and say so; the
    next push, with the group buildable again, updates them. (Before, they stayed paused: rollouts stopped.)"""
    from learner.weight_sync.group import GroupFailed, StageGroup

    a, b = cluster["engines"]["a"].url, cluster["engines"]["b"].url
    client = EngineClient(http_timeout_s=10)
    version_before = {u: client.weight_version(u) for u in (a, b)}
    perturb(learner_model, seed=9)

    def unreachable(self: StageGroup, engines: Any) -> None:
        raise GroupFailed("building group 'x' at tcp://10.254.254.254:1 failed: Timed out waiting for clients", {})

    sync = static_sync([a, b], push_retry={"max_attempts": 2, "base_s": 0.1})
    try:
        with monkeypatch.context() as m:
            m.setattr(StageGroup, "build", unreachable)
            report = _push_at(sync, 11, learner_model)
        assert not report.ok and report.updated == [] and report.attempts == 2, report
        assert set(report.failed) == {a, b} and all("nothing was sent" in w for w in report.failed.values())
        for url in (a, b):  # resumed, previous version, generating
            assert client.weight_version(url) == version_before[url]
            r = httpx.post(
                url + "/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3}}, timeout=30
            )
            assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 3, r.text
        report = _push_at(sync, 12, learner_model)
        assert report.ok and sorted(report.updated) == sorted([a, b]), report
        assert_serves(a, learner_model, "12")
    finally:
        sync.close()
        client.close()


class MidBroadcastKill(HFModelSource):
    """The HF model's tensors in one bucket; when they are all read (the broadcast comes next) the victim engine is
    stopped (SIGSTOP: it reads nothing, so rank 0 blocks inside the broadcast), then SIGKILLed once rank 0 has been
    inside the broadcast for a while: a receiver dying mid-broadcast, deterministically."""

    def __init__(self, victim: EngineProc) -> None:
        super().__init__()
        self.victim = victim
        self.killed_in_broadcast = False

    def named_tensors(self, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
        yield from super().named_tensors(model)
        if self.victim.proc.poll() is None:
            self.victim.proc.send_signal(signal.SIGSTOP)
            threading.Thread(target=self._kill_in_broadcast, daemon=True).start()

    def _kill_in_broadcast(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _broadcast_threads():
            time.sleep(0.01)
        time.sleep(1.0)
        self.killed_in_broadcast = bool(_broadcast_threads())
        self.victim.proc.kill()
        self.victim.proc.wait(timeout=10)


def _broadcast_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("weight-sync broadcast") and t.is_alive()]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_receiver_killed_mid_broadcast_leaves_rank_0_alive_and_is_dropped(
    device: str, cluster: dict[str, Any], models: tuple[Path, Path], learner_model: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Guards against defect 8 of issue 19: an engine dying inside a broadcast must cost one attempt, never rank 0.
    The weight-update group's own collective timeout (the NCCL watchdog's) must fire after rank 0's broadcast
    deadline, which gives up and aborts the group first (it was the build's init timeout, earlier than the deadline,
    so the watchdog met the abandoned broadcast and tore rank 0 down); no thread is left inside the collective;
    the survivor gets the whole update and rank 0 pushes again. NCCL: the same test on a GPU, with the launch
    scripts' watchdog settings and a heartbeat timeout short enough to have fired before the second push."""
    if device == "cuda":
        torch.cuda.set_device(0)
        monkeypatch.setenv("NCCL_HOSTID", "learner")
        monkeypatch.setenv("TORCH_NCCL_DUMP_ON_TIMEOUT", "0")
        monkeypatch.setenv("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "10")
        survivor = EngineProc(models[0], tmp_path / "survivor.log", device="cuda")
        survivor.wait_healthy()
    else:
        survivor = cluster["engines"]["a"]
    victim = EngineProc(models[0], tmp_path / "victim.log", device=device)
    model = learner_model.cuda() if device == "cuda" else learner_model
    backend = "nccl" if device == "cuda" else "gloo"
    try:
        victim.wait_healthy()
        perturb(model, seed=9)
        cfg = DistributedSyncConfig(
            engine_urls=[survivor.url, victim.url], use_registry=False, bucket_mb=64, init_timeout_s=20,
            broadcast_timeout_s=20, backend=backend,
        )  # fmt: skip
        source = MidBroadcastKill(victim)
        sync = DistributedWeightSync(cfg, source)
        try:
            t0 = time.monotonic()
            report = _push_at(sync, 11, model)
            elapsed = time.monotonic() - t0
            assert source.killed_in_broadcast, "the victim died outside the broadcast"
            assert report.ok and report.updated == [survivor.url] and report.attempts == 2, report
            assert list(report.failed) == [victim.url] and "dead" in report.failed[victim.url], report.failed
            assert elapsed < cfg.broadcast_timeout_s + 30, f"the push took {elapsed:.0f}s"
            assert not _broadcast_threads(), "a thread was left inside the abandoned broadcast"
            assert sync.group is not None
            group_timeout = sync.group.process_group._get_backend(torch.device(device)).options._timeout
            assert group_timeout.total_seconds() > cfg.broadcast_timeout_s, "the watchdog would fire first"
            assert_serves(survivor.url, model, "11")
            if device == "cuda":
                time.sleep(2 * 10 + 70)  # past the heartbeat monitor's checks and the watchdog's wait on an error
            report = _push_at(sync, 12, model)  # rank 0 is alive and pushes again, without the dead engine
            assert report.ok and report.updated == [survivor.url], report
            assert_serves(survivor.url, model, "12")
        finally:
            sync.close()
    finally:
        victim.stop()
        if device == "cuda":
            survivor.stop()
