"""experiments/demo_seeds.py: the README's demo numbers come from merging per-seed report summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.demo_seeds import main, merge


def _run(root: Path, seed: int, sft: float, rl: float) -> Path:
    run = root / f"seed{seed}"
    (run / "report").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"prepare": {"seed": seed}}))
    summary = {
        "heldout": {"before": 0.0, "after_sft": sft, "after_rl": rl},
        "baselines": {"last_city": 0.25, "oracle": 1.0, "untrained": 0.0, "sft_only": sft},
        "best_heuristic": "last_city",
        "rl_minus_sft": rl - sft,
        "rl_minus_best_heuristic": rl - 0.25,
        "distinct_cities_mean": 4.4,
        "phases": [{"phase": "sft", "wall_s": 300.0}, {"phase": "rl", "wall_s": 200.0}],
    }
    (run / "report" / "summary.json").write_text(json.dumps(summary))
    return run


def test_seeds_are_kept_and_gains_are_paired(tmp_path: Path) -> None:
    """Guards against a results file that averages away the seeds (every seed must stay in it) or computes the
    gain from unpaired means; and against a missing summary passing silently."""
    runs = [_run(tmp_path, 0, 0.2, 0.4), _run(tmp_path, 1, 0.3, 0.3), _run(tmp_path, 2, 0.1, 0.2)]
    out = merge(runs)
    assert sorted(out["seeds"]) == ["0", "1", "2"]
    assert out["rl_minus_sft"]["mean"] == pytest.approx((0.2 + 0.0 + 0.1) / 3)
    assert out["rl_minus_sft"]["min"] == pytest.approx(0.0) and out["rl_minus_sft"]["n"] == 3
    assert out["heldout"]["after_rl"]["std"] == pytest.approx(0.1)
    assert out["baselines"]["oracle"]["mean"] == 1.0
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")])
