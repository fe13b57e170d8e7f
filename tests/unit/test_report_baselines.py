"""Context-heuristic baselines in `longtrace report` (deploy/launcher/baselines.py, summary.json, report.md), on a
run directory written the way `longtrace up` writes it: config.json, data/heldout.jsonl, phases, metrics, evals."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from common.config import dump_config, load_config
from datagen.dataset import iter_rows, write_rows
from datagen.synth.demo import demo_splits
from datagen.synth.heuristics import HEURISTICS, parse_prompt
from deploy.launcher.baselines import NUM_SEEDS, judge_response, run_baselines, score_heuristics
from deploy.launcher.config import UpConfig
from deploy.launcher.rundir import RunDir
from deploy.report import render_markdown, rl_segments, write_report
from reward_service.config import RuleJudgeConfig
from reward_service.judges.rule import rule_match

REPO = Path(__file__).resolve().parents[2]
NUM_EVAL = 32


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _steps(n: int, reward: float) -> list[dict[str, Any]]:
    return [{"step": s, "time_s": 100.0 + 6 * s, "reward_mean": reward, "accuracy": reward, "num_samples": 4.0}
            for s in range(1, n + 1)]  # fmt: skip


@pytest.fixture
def run_dir(tmp_path: Path) -> RunDir:
    run = RunDir.at(tmp_path / "run")
    cfg = load_config(
        UpConfig,
        REPO / "configs" / "demo.toml",
        ["--run_dir", str(run.root), "--reward.config.judge.mode", "exact",
         "--reward.config.judge.answer_marker", "answer", "--eval.max_questions", str(NUM_EVAL)],
    )  # fmt: skip
    run.root.mkdir(parents=True)
    dump_config(cfg, run.config)
    write_rows(run.root / "data" / "heldout.jsonl", demo_splits(seed=0, num_train=8, num_heldout=64).heldout)
    _jsonl(
        run.phases_file,
        [
            {"time_s": 100.0, "phase": "sft", "kind": "sft", "event": "start", "steps": 4, "index": 0},
            {"time_s": 130.0, "phase": "sft", "kind": "sft", "event": "end", "status": "ok", "index": 0},
            {"time_s": 131.0, "phase": "rl", "kind": "rl", "event": "start", "steps": 6, "index": 1},
            {"time_s": 261.0, "phase": "rl", "kind": "rl", "event": "end", "status": "ok", "index": 1},
        ],
    )
    _jsonl(run.metrics_file("sft"), _steps(4, 0.0))
    _jsonl(run.metrics_file("rl"), _steps(6, 0.5))
    ev = {"rubric_hit_rate": 0.5, "well_formed_rate": 1.0, "num_questions": NUM_EVAL}
    _jsonl(
        run.eval_file,
        [
            {"phase": "sft", "when": "before", "step": 0, "accuracy": 0.03125, **ev},
            {"phase": "sft", "when": "after", "step": 4, "accuracy": 0.25, **ev},
            {"phase": "rl", "when": "after", "step": 10, "accuracy": 0.875, **ev},
        ],
    )
    return run


def test_summary_json_holds_heldout_accuracies_baselines_and_judge(run_dir: RunDir) -> None:
    """Guards against a report that shows the model's held-out accuracy without the baselines a skeptic tries first
    (or with them graded by another judge, on other questions, or with before/after evals mixed up)."""
    md = write_report(run_dir.root).read_text()
    summary = json.loads((run_dir.report_dir / "summary.json").read_text())
    assert summary["heldout"] == {"before": 0.03125, "after_sft": 0.25, "after_rl": 0.875, "during_rl": []}
    base = summary["baselines"]
    assert set(base) == set(HEURISTICS) | {"untrained", "sft_only"}
    assert base["untrained"] == 0.03125 and base["sft_only"] == 0.25
    assert base["oracle"] == 1.0  # graded through the answer marker: without it the exact judge rejects all
    for name in HEURISTICS:
        assert 0.0 <= base[name] <= 1.0, name
    rows = list(iter_rows(run_dir.root / "data" / "heldout.jsonl"))[:NUM_EVAL]  # the rows the eval answered
    assert summary["baseline_questions"] == NUM_EVAL
    assert summary["distinct_cities_mean"] == pytest.approx(
        sum(len(parse_prompt(r.prompt).distinct_cities()) for r in rows) / NUM_EVAL
    )
    judge = RuleJudgeConfig(mode="exact", answer_marker="answer")
    hits = [rule_match(judge, r.label, f"answer {HEURISTICS['first_city'](r.prompt, random.Random(0))}") for r in rows]
    assert base["first_city"] == pytest.approx(sum(hits) / NUM_EVAL)
    assert summary["judge"]["kind"] == "rule" and summary["judge"]["mode"] == "exact"
    assert summary["judge"]["answer_marker"] == "answer"
    assert summary["baselines_skipped"] is None
    assert [p["phase"] for p in summary["phases"]] == ["sft", "rl"]
    best = summary["best_heuristic"]
    assert best != "oracle" and base[best] == max(v for k, v in base.items() if k in HEURISTICS and k != "oracle")
    assert summary["rl_minus_sft"] == pytest.approx(0.625)
    assert summary["rl_minus_best_heuristic"] == pytest.approx(0.875 - base[best])
    assert "## Held-out accuracy and baselines" in md
    assert "| untrained | 0.031 |" in md and "| SFT only | 0.250 |" in md and "| RL | 0.875 |" in md
    assert "| oracle (follows the chain) | 1.000 |" in md and f"| {best} | {base[best]:.3f} |" in md
    assert "minus after SFT (0.250): **+0.625**" in md
    assert f"minus the best context heuristic ({best}, {base[best]:.3f}): **{0.875 - base[best]:+.3f}**" in md


def test_randomized_baselines_are_seeded_and_averaged(run_dir: RunDir) -> None:
    """Guards against baselines that change between two reports of the same run, or that rest on one noisy draw
    instead of the mean over NUM_SEEDS seeds."""
    rows = list(iter_rows(run_dir.root / "data" / "heldout.jsonl"))[:NUM_EVAL]
    judge = RuleJudgeConfig(mode="exact")
    scores = score_heuristics(rows, judge)
    assert scores == score_heuristics(rows, judge)
    per_seed = []
    for seed in range(NUM_SEEDS):
        rng = random.Random(seed)
        per_seed.append(sum(rule_match(judge, r.label, HEURISTICS["random_city"](r.prompt, rng) or "") for r in rows))
    assert scores["random_city"] == pytest.approx(sum(per_seed) / NUM_SEEDS / len(rows))
    assert judge_response(judge, "C07") == "C07"
    assert judge_response(RuleJudgeConfig(mode="exact", answer_marker="answer"), "C07") == "answer C07"


def test_baselines_are_skipped_for_a_judge_that_is_not_a_rule(run_dir: RunDir) -> None:
    """Guards against grading baselines with a rule when the run's reward used an LLM judge (numbers that do not
    compare with the model's): the summary must say they were skipped and why."""
    raw = json.loads(run_dir.config.read_text())
    raw["reward"]["config"]["judge"] = {"kind": "llm"}
    run_dir.config.write_text(json.dumps(raw))
    b = run_baselines(run_dir)
    assert b["baselines"] == {} and b["judge"]["kind"] == "llm"
    assert "not a rule judge" in b["skipped"]
    write_report(run_dir.root)
    summary = json.loads((run_dir.report_dir / "summary.json").read_text())
    assert summary["baselines"] == {"untrained": 0.03125, "sft_only": 0.25}
    assert "not a rule judge" in summary["baselines_skipped"]
    assert "Context heuristics skipped: the judge is 'llm'" in render_markdown(run_dir)


def test_reward_curves_skip_sft_steps(run_dir: RunDir) -> None:
    """Guards against the reward plot drawing SFT steps (which have no reward, accuracy or rubric hits) as
    zeros, or joining two RL phases across an SFT phase with one line."""
    segments = rl_segments(run_dir.all_metrics())
    assert [[m["global_step"] for m in s] for s in segments] == [list(range(5, 11))]
    metrics = [{"phase": p, "phase_kind": k, "global_step": i} for i, (p, k) in enumerate(
        [("rl1", "rl"), ("rl1", "rl"), ("sft", "sft"), ("rl2", "rl")])]  # fmt: skip
    assert [[m["global_step"] for m in s] for s in rl_segments(metrics)] == [[0, 1], [3]]
