"""Weight sync pieces that need no engine: the config union, bucketing, the push template (version, failures,
sharing across ranks), NoSync and disk exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field

from broker.base import Broker
from broker.memory import MemoryBroker
from common.config import BaseConfig, ConfigError, load_config
from learner.state import LearnerState
from learner.weight_sync.base import NoSync, PushReport, Transfer, WeightSync, WeightSyncError
from learner.weight_sync.config import (
    DiskSyncConfig,
    DistributedSyncConfig,
    NoSyncConfig,
    WeightSyncConfig,
)
from learner.weight_sync.disk import write_export
from learner.weight_sync.distributed import iter_buckets
from learner.weight_sync.factory import build_weight_sync
from learner.weight_sync.sources import HFModelSource, WeightSource
from weights.exports import catch_up, latest_export


class _Root(BaseConfig):
    """A config embedding the section as TrainConfig does."""

    weight_sync: WeightSyncConfig = Field(default_factory=NoSyncConfig)


def test_config_union_picks_the_backend_and_names_bad_flags(tmp_path: Path) -> None:
    """Guards against a backend picked by the wrong key, a disk backend without a directory, and typos that
    would silently do nothing (unknown keys must be errors naming the flag)."""
    assert isinstance(load_config(_Root).weight_sync, NoSyncConfig)
    toml = tmp_path / "c.toml"
    toml.write_text('[weight_sync]\ntype = "distributed"\nbucket_mb = 64\n')
    cfg = load_config(_Root, toml, ["--weight_sync.every_k_steps", "4"]).weight_sync
    assert isinstance(cfg, DistributedSyncConfig) and cfg.bucket_mb == 64 and cfg.every_k_steps == 4
    assert cfg.update_timeout_s == cfg.broadcast_timeout_s + cfg.http_timeout_s
    cfg = load_config(_Root, None, ["--weight_sync.type", "disk", "--weight_sync.export_dir", "d"]).weight_sync
    assert isinstance(cfg, DiskSyncConfig) and cfg.export_dir == "d"
    with pytest.raises(ConfigError, match="export_dir is required"):
        load_config(_Root, None, ["--weight_sync.type", "disk"])
    with pytest.raises(ConfigError, match="bucket_mbb"):
        load_config(_Root, None, ["--weight_sync.type", "distributed", "--weight_sync.bucket_mbb", "1"])
    with pytest.raises(ConfigError, match="bucket_mb"):
        load_config(_Root, None, ["--weight_sync.type", "none", "--weight_sync.bucket_mb", "1"])
    with pytest.raises(ConfigError, match="bucket_mb"):
        load_config(_Root, None, ["--weight_sync.type", "distributed", "--weight_sync.bucket_mb", "0"])


def test_an_address_this_node_cannot_listen_on_is_refused_naming_the_flag() -> None:
    """Guards against a weight-sync address of another host (a copied WEIGHT_SYNC_ADDR, a typo) surfacing only at the
    first push as a bare `Cannot assign requested address`: the stage group refuses it when it is made, before any
    step, naming the flag, the address and where the recipe sets it (torchrun then ends the job on every node)."""
    from learner.weight_sync.group import StageGroup

    bad = DistributedSyncConfig(master_address="10.254.254.254")  # an address no interface of this host holds
    with pytest.raises(ConfigError, match=r"--weight_sync.master_address '10.254.254.254' \(10.254.254.254\): "
                                          r"this node cannot listen on it .*WEIGHT_SYNC_ADDR"):  # fmt: skip
        StageGroup(bad, client=None, stage=0)  # type: ignore[arg-type]  # refused before the client is used
    assert StageGroup(DistributedSyncConfig(), client=None, stage=0).address == "127.0.0.1"  # type: ignore[arg-type]


def _named(*numels: int) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate(numels)]


def test_buckets_keep_order_respect_the_cap_and_isolate_large_tensors() -> None:
    """Guards against a bucket over bucket_mb (OOM on the engines), a tensor larger than a bucket being
    dropped or split, lost or reordered tensors, and an empty trailing bucket."""
    cap = 100 * 4  # bytes: 100 fp32 values
    named = _named(30, 50, 20, 250, 10, 100, 1, 99)
    buckets = list(iter_buckets(iter(named), cap))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1", "t2"], ["t3"], ["t4"], ["t5"], ["t6", "t7"]]
    assert all(sum(t.numel() * 4 for _, t in b) <= cap for b in buckets if len(b) > 1)
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    assert list(iter_buckets(iter([]), cap)) == []


def test_report_metrics_and_nosync_move_the_policy_version_key() -> None:
    """Guards against NoSync leaving the policy-version key behind (admission control would stall) and a
    report whose GB/s divides by zero."""
    broker = MemoryBroker()
    state = LearnerState(step=3, policy_version=3)
    sync = build_weight_sync(NoSyncConfig(), HFModelSource(), broker, state)
    assert isinstance(sync, NoSync) and broker.policy_version.get() == 3
    state.step = 4
    report = sync.maybe_push(None)
    assert report is not None and (report.ok, report.policy_version, report.num_engines) == (True, 4, 0)
    assert state.policy_version == 4 and broker.policy_version.get() == 4
    report = PushReport(policy_version=7, bytes=2_000_000_000, transfer_s=0.5, failed={"u": "dead"})
    m = report.metrics()
    assert m["weight_sync/gb_per_s"] == 4.0 and m["weight_sync/num_failed"] == 1.0
    assert m["weight_sync/version"] == 7.0  # the metrics.jsonl key keeps its name
    assert PushReport(policy_version=1).gb_per_s == 0.0
    broker.close()


class _Flaky(WeightSync):
    """A backend whose transfers fail (engines existed, none took the weights) while `failing` says so; it
    records the versions it was asked to transfer."""

    def __init__(self, source: WeightSource, state: LearnerState, broker: Broker | None, max_failures: int) -> None:
        super().__init__(source, state, broker, every_k_steps=1, max_consecutive_failures=max_failures)
        self.failing = True
        self.transferred: list[int] = []

    def _transfer(self, policy_version: int, model: Any) -> Transfer:
        self.transferred.append(policy_version)
        if self.failing:
            return Transfer(num_engines=1, failed={"http://e:1": "refused"})
        return Transfer(num_engines=1, updated=["http://e:1"])


def test_push_owns_the_version_counts_failures_and_publishes_what_the_state_holds() -> None:
    """Guards against the policy version having more than one owner: a push must take its version from
    LearnerState.step, leave LearnerState and the broker key unchanged when it fails, publish exactly
    LearnerState's version (at start and after a success), and raise WeightSyncError after
    max_consecutive_failures failures in a row (a success resets the count)."""
    broker = MemoryBroker()
    broker.policy_version.set(99)  # left behind by an earlier learner of this run
    state = LearnerState(step=2, policy_version=2)
    sync = _Flaky(HFModelSource(), state, broker, max_failures=2)
    assert broker.policy_version.get() == 2, "a restarted learner republishes its own version"
    state.step = 3
    report = sync.push(None)
    assert (report.ok, report.policy_version, state.policy_version, broker.policy_version.get()) == (False, 2, 2, 2)
    sync.failing = False
    state.step = 4
    report = sync.push(None)
    assert (report.ok, report.policy_version, report.updated) == (True, 4, ["http://e:1"])
    assert state.policy_version == broker.policy_version.get() == 4
    sync.failing = True
    for step in (5, 6):
        state.step = step
        if step == 5:
            assert not sync.push(None).ok  # one failure after a success: the count restarted
        else:
            with pytest.raises(WeightSyncError, match="2 consecutive weight pushes reached no engine"):
                sync.push(None)
    assert sync.transferred == [3, 4, 5, 6]
    assert state.policy_version == broker.policy_version.get() == 4
    broker.close()


def test_old_retry_keys_load_into_the_retry_tables(caplog: pytest.LogCaptureFixture) -> None:
    """Guards against configs written before the RetryConfig shape failing to load or losing their value:
    `http_attempts` and the distributed backend's `max_attempts` are read, with a warning naming the new key."""
    with caplog.at_level("WARNING"):
        cfg = load_config(
            _Root, None, ["--weight_sync.type", "distributed", "--weight_sync.http_attempts", "5",
                          "--weight_sync.max_attempts", "4"],
        ).weight_sync  # fmt: skip
    assert isinstance(cfg, DistributedSyncConfig)
    assert (cfg.http_retry.max_attempts, cfg.push_retry.max_attempts) == (5, 4)
    assert "use --weight_sync.http_retry.max_attempts" in caplog.text
    assert "use --weight_sync.push_retry.max_attempts" in caplog.text
    defaults = DistributedSyncConfig()
    assert (defaults.http_retry.max_attempts, defaults.push_retry.max_attempts, defaults.push_retry.base_s) == (3, 2, 0)
    with pytest.raises(ConfigError, match="max_attempts"):  # the disk backend never had push attempts
        load_config(_Root, None, ["--weight_sync.type", "disk", "--weight_sync.export_dir", "d",
                                  "--weight_sync.max_attempts", "2"])  # fmt: skip


class _GlooSource(HFModelSource):
    """The HF source with the learner's object collectives on the default gloo group (as MegatronSource has)."""

    is_coordinator = False

    def __init__(self) -> None:
        import torch.distributed as dist

        super().__init__()
        self.is_coordinator = dist.get_rank() == 0

    def broadcast_object(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class _CoordinatorDecides(WeightSync):
    """Only the coordinator's transfer fails; every other rank's own transfer would count as a success."""

    def _transfer(self, policy_version: int, model: Any) -> Transfer:
        if self.source.is_coordinator and policy_version == 1:
            return Transfer(num_engines=1, failed={"http://e:1": "dead"})
        return Transfer()


def _ranks_share_the_outcome() -> None:
    import torch.distributed as dist

    from tests.helpers.dist import init_worker_process_group

    init_worker_process_group()
    state = LearnerState()
    sync = _CoordinatorDecides(_GlooSource(), state, None)
    state.step = 1
    failed = sync.push(None)
    state.step = 2
    ok = sync.push(None)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, (failed.ok, failed.policy_version, ok.ok, ok.policy_version, state.policy_version))
    if dist.get_rank() == 0:
        print("OUTCOMES", json.dumps(out), flush=True)
    dist.destroy_process_group()


def test_a_failed_push_leaves_the_version_unchanged_on_every_rank() -> None:
    """Guards against learner ranks disagreeing about the policy version (each rank deciding from its own view of
    a push): the coordinator's outcome is shared, so a push that failed there leaves every rank's
    LearnerState unchanged, and the next success moves every rank."""
    from tests.helpers.dist import run_torchrun

    out = run_torchrun(2, f"{__name__}:_ranks_share_the_outcome", timeout_s=120)
    line = next(x for x in out.splitlines() if "OUTCOMES" in x)
    assert json.loads(line.split("OUTCOMES", 1)[1]) == [[False, 0, True, 2, 2]] * 2, out[-2000:]


def _tiny_hf(tmp_path: Path) -> tuple[Any, Path]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    src = tmp_path / "src"
    config = Qwen3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=64, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    return model, src


def test_exports_are_atomic_pruned_and_found_by_late_engines(tmp_path: Path) -> None:
    """Guards against a late engine loading a half-written or stale export (LATEST must point at the newest
    complete one), exports filling the disk (keep_last), a missing tokenizer, and catch_up failing before
    the first export exists."""
    from safetensors.torch import load_file

    model, src = _tiny_hf(tmp_path)
    out = tmp_path / "exports"
    source = HFModelSource(src)
    assert latest_export(out) is None
    assert catch_up("http://127.0.0.1:9", out) is None  # nothing to load yet: no call is made
    (out / "v00000002.tmp").mkdir(parents=True)  # left by a crash
    for version in (1, 2, 3):
        with torch.no_grad():
            model.model.norm.weight.fill_(float(version))
        path = write_export(source, model, out, version, keep_last=2)
    assert latest_export(out) == (out.resolve() / "v00000003", 3) and path == out / "v00000003"
    assert sorted(p.name for p in out.iterdir()) == ["LATEST", "v00000002", "v00000003"]
    assert json.loads((out / "LATEST").read_text()) == {"version": 3, "path": "v00000003"}
    state = load_file(str(out / "v00000003" / "model.safetensors"))
    assert torch.equal(state["model.norm.weight"], torch.full((32,), 3.0))
    assert (out / "v00000003" / "tokenizer_config.json").is_file()


def _cli(argv: list[str]) -> Any:
    import argparse

    from experiments import bench_weight_sync_cli
    from weights import cli as weights_cli

    parser = argparse.ArgumentParser(prog="longtrace")
    commands = parser.add_subparsers(dest="command", required=True)
    benches = commands.add_parser("bench").add_subparsers(dest="bench", required=True)
    weights_cli.register(commands, benches)
    bench_weight_sync_cli.register(commands, benches)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["bench", "weight-sync", "--bucket-mb", "0"], "--bucket-mb"),
        (["bench", "weight-sync", "--rounds", "0"], "--rounds"),
        (["weight-sync", "catch-up", "--engine", "http://127.0.0.1:9", "--export-dir", "/nonexistent"], "--export-dir"),
    ],
)
def test_cli_errors_name_the_flag(argv: list[str], flag: str) -> None:
    """Guards against a bad CLI value surfacing as a traceback (or a long benchmark run) instead of a message
    naming the flag."""
    with pytest.raises(ConfigError, match=flag):
        _cli(argv)
