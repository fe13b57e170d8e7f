"""`longtrace bench learner-memory`: one small end-to-end run (real workers, real train steps, an 8192-token
vocabulary so it takes seconds), the config's flags, the fits and ratios, and how a failed worker is reported."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from common.cli import parse, root_parser
from common.config import ConfigError, load_config
from learner import cli as learner_cli
from learner.bench_memory import Bench, BenchMemoryConfig, fit, predict_rss_mb
from learner.bench_memory_worker import run_worker

# The longer length must not use less than the shorter minus this (MiB). At these sizes the step's growth from
# From 512 to 2048 tokens at an 8192 vocabulary the baseline's logits copies grow by ~300 MiB and the new path's
# logprob chunks (one per 2048 rows here) by ~100 MiB; the allocator's noise (glibc arenas, its mmap threshold, RSS
# pages) is ~10 MiB. A path whose peak stops growing with the sequence (it no longer runs the tokens) fails.
GROWTH_MB = 30.0


@pytest.mark.slow
def test_small_vocab_run_measures_two_lengths_and_the_guard_skips_the_third(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Guards against a bench whose JSON misses a key, whose peaks are not the step's (zero, negative, shrinking
    with length), or whose memory guard launches a point predicted over --max_rss_mb instead of reporting it."""
    argv = ["bench", "learner-memory", "--json", "--vocab_size", "8192", "--hidden_size", "64", "--num_layers", "1"]
    argv += ["--seq_lens", "512,2048,8192", "--skip_cp", "--max_rss_mb", "1", "--timeout_s", "600"]
    args = parse(root_parser([learner_cli.register]), argv)
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    for key in ("seq_lens", "baseline_peak_mb", "peak_mb", "fit", "ratio_at_max", "ratio_at_max_basis"):
        assert key in result, key
    for key in ("ratio_at_longest_measured", "cp2_over_cp1", "environment", "wall_s", "skipped", "points"):
        assert key in result, key
    assert result["seq_lens"] == [512, 2048, 8192]
    for peaks in (result["baseline_peak_mb"], result["peak_mb"]):
        short, long, skipped = peaks
        assert short > 0 and long > 0, peaks
        assert long >= short + GROWTH_MB, peaks
        assert skipped is None  # two measured lengths predict the third, far above 1 MiB
    for path in ("baseline", "new"):
        assert "predicted peak RSS" in result["skipped"][path]["8192"]
        assert result["fit"][path]["measured_lengths"] == 2
    for point in result["points"]:
        for rank in point.get("ranks", []):
            assert rank["high_water_mark_reset"] and not rank["build_peak_masks_step"], rank
    assert result["ratio_at_max_seq_len"] == 2048 and result["ratio_at_max_basis"] == "measured"
    assert result["cp2_over_cp1"] is None
    env = result["environment"]
    assert env["vocab_size"] == 8192 and env["torch_threads"] == [2] and env["dtype"] == "fp32"


@pytest.mark.slow
def test_small_cp_run_holds_about_half_the_activations_per_rank(capsys: pytest.CaptureFixture[str]) -> None:
    """Guards against context parallelism that does not shard the sequence's activations (every rank running
    the whole of it reads ~1.0; measured 0.52 here, RSS 0.78), a CP result missing a rank or a measure, and a
    ratio read from a peak that was never recorded."""
    argv = ["bench", "learner-memory", "--json", "--vocab_size", "8192", "--hidden_size", "64", "--num_layers", "1"]
    argv += ["--seq_lens", "4096", "--only_cp", "--timeout_s", "600"]
    args = parse(root_parser([learner_cli.register]), argv)
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    cp = result["cp"]
    assert cp["cp_size"] == 2 and cp["cp1_dp_size"] == 2 and cp["seq_len"] == 4096, cp
    for key in ("activation_peak_mb", "allocated_peak_mb", "peak_mb"):
        assert cp[key]["cp1"] > 0 and len(cp[key]["cp_per_rank"]) == 2 and min(cp[key]["cp_per_rank"]) > 0, cp
    assert result["cp2_over_cp1"] == cp["activation_peak_mb"]["ratio"]
    assert 0.3 < result["cp2_over_cp1"] < 0.7, cp


def test_config_reads_comma_lists_and_rejects_unknown_keys() -> None:
    """Guards against `--seq_lens 1024,2048` not parsing (it is not TOML: it arrives as a string), lengths left
    unsorted, and a typo'd flag or path name silently ignored."""
    cfg = load_config(BenchMemoryConfig, None, ["--seq_lens", "2048,1024", "--skip_cp"])
    assert cfg.seq_lens == [1024, 2048] and cfg.skip_cp
    with pytest.raises(ConfigError, match="seq_len"):
        load_config(BenchMemoryConfig, None, ["--seq_len", "1024"])
    with pytest.raises(ConfigError, match="unknown paths"):
        load_config(BenchMemoryConfig, None, ["--path_overrides.newer.model.recompute", "full"])


def _point(path: str, seq_len: int, peak: float | None) -> dict[str, Any]:
    ranks = [{"rss_before_mb": 1000.0}] if peak is not None else []
    return {"path": path, "seq_len": seq_len, "cp_size": 1, "peak_mb": peak, "ranks": ranks}


def test_fits_and_the_extrapolated_ratio(tmp_path: Path) -> None:
    """Guards against a fit that is not the least-squares line / power law, a guard that ignores the RSS before
    the step, and a ratio at the longest length that silently compares with nothing when the baseline was
    skipped there (it must use the baseline's linear fit and say so)."""
    cfg = BenchMemoryConfig(seq_lens=[1000, 2000, 4000], skip_cp=True)
    bench = Bench(cfg, tmp_path, max_rss_mb=1e9, progress=None)
    bench.points["baseline"] = [_point("baseline", 1000, 600.0), _point("baseline", 2000, 1100.0)]
    bench.points["baseline"].append(_point("baseline", 4000, None) | {"reason": "skipped"})
    bench.points["new"] = [_point("new", n, 0.25 * n) for n in (1000, 2000, 4000)]
    f = fit(bench.points["baseline"])
    assert f is not None and f["c0_mb"] == 100.0 and f["bytes_per_token"] == round(0.5 * 2**20)
    g = fit(bench.points["new"])
    assert g is not None and g["exponent"] == 1.0 and g["a"] == 0.25
    assert predict_rss_mb(bench.points["new"], 8000) == pytest.approx(1000 + 2000)
    ratios = bench.ratios()
    assert ratios["ratio_at_max_seq_len"] == 4000
    assert ratios["ratio_at_max"] == pytest.approx(1000 / 2100, abs=1e-3)
    assert ratios["ratio_at_max_basis"] == "baseline extrapolated from its linear fit over 2 measured lengths"
    assert ratios["ratio_at_longest_measured"] == pytest.approx(500 / 1100, abs=1e-3)
    assert ratios["ratio_at_longest_measured_seq_len"] == 2000


def test_a_killed_or_hung_worker_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    """Guards against a worker killed by the OOM killer (SIGKILL) or hanging taking the bench down or hanging it."""
    kill = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert "out of memory" in (run_worker(kill, tmp_path / "kill.log", 30, 1) or "")
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    assert "timed out" in (run_worker(hang, tmp_path / "hang.log", 1, 1) or "")
    fail = [sys.executable, "-c", "raise ValueError('no such model')"]
    assert run_worker(fail, tmp_path / "fail.log", 30, 1) == "exit 1: ValueError: no such model"
