"""Weight sync pieces that need no engine: the config union, bucketing, the report, NoSync and disk exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field

from broker.memory import MemoryBroker
from common.config import BaseConfig, ConfigError, load_config
from learner.weight_sync.base import NoSync, PushReport
from learner.weight_sync.config import (
    DiskSyncConfig,
    DistributedSyncConfig,
    NoSyncConfig,
    WeightSyncConfig,
)
from learner.weight_sync.disk import write_export
from learner.weight_sync.distributed import iter_buckets
from learner.weight_sync.factory import build_weight_sync
from learner.weight_sync.sources import HFModelSource
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
    sync = build_weight_sync(NoSyncConfig(), HFModelSource(), broker, initial_version=3)
    assert isinstance(sync, NoSync) and broker.policy_version.get() == 3
    assert sync.maybe_push(4, None) == PushReport(version=4)
    assert broker.policy_version.get() == 4
    report = PushReport(version=7, bytes=2_000_000_000, transfer_s=0.5, failed={"u": "dead"})
    m = report.metrics()
    assert m["weight_sync/gb_per_s"] == 4.0 and m["weight_sync/num_failed"] == 1.0
    assert PushReport(version=1).gb_per_s == 0.0
    broker.close()


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
