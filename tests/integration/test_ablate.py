"""`longtrace ablate` (issue 13): variants that differ only in the reward rule, per-sample indicators, the report.

The end-to-end test runs configs/debug/ablate.toml through the real launcher (one seed: one prepare + SFT run,
then two RL runs from its export, every real process); the others check the pieces that decide what the
ablation claims (the config diff guard, the hacking indicator) on hand-made input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from common.config import ConfigError, load_config
from experiments.ablate import AblateConfig, Plan, Variant, check_reward_only
from experiments.ablate_samples import SAMPLE_FIELDS, HackingConfig, indicators, read_samples, write_samples

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "debug" / "ablate.toml"


def _cli(argv: list[str]) -> int:
    from experiments import ablate_cli

    parser = argparse.ArgumentParser(prog="longtrace")
    commands = parser.add_subparsers(dest="command", required=True)
    benches = commands.add_parser("bench").add_subparsers(dest="bench", required=True)
    ablate_cli.register(commands, benches)
    args, rest = parser.parse_known_args(argv)
    args.overrides = rest
    code: int = args.func(args)
    return code


@pytest.mark.slow
def test_debug_ablation_runs_variants_from_one_sft_export_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guards against variants that differ in more than the reward rule (a second SFT, another model or data,
    another learner config), a rule that never reaches the reward workers, missing per-sample records or curve
    points, and a report or JSON that is not produced."""
    out = tmp_path / "ablate"
    argv = ["--out_dir", str(out), "--up_config", str(ROOT / "configs" / "debug" / "up.toml")]
    code = _cli(["bench", "ablation", "--config", str(DEBUG), "--json", *argv])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["variants"]) == {"positive_only", "both"}
    assert summary["eval_steps"] == [0, 2, 3]

    # One SFT run per seed; both variants start from its export, on its data, and differ only in the rule.
    assert summary["config_diff"]["used"]["0"] == {"both": {"reward.config.combination": ["positive_only", "both"]}}
    seed = out / "seed-0"
    assert sorted(p.name for p in seed.iterdir()) == ["both", "positive_only", "sft"]
    used = {v: json.loads((seed / v / "config.json").read_text()) for v in ("positive_only", "both")}
    sft_exports = (seed / "sft" / "phases" / "sft" / "exports").resolve()
    for cfg in used.values():
        assert Path(cfg["model_path"]).parent == sft_exports
        assert cfg["phases"]["rl"]["dataset_path"] == str(seed / "sft" / "data" / "train.jsonl")
    learners = [json.loads((seed / v / "phases" / "rl" / "config.json").read_text()) for v in used]
    for a in learners:
        a.pop("run_dir"), a.pop("broker"), a["weight_sync"].pop("export_dir"), a["tracking"].pop("run_name")
    assert learners[0] == learners[1]
    # The rule reached the reward worker of each run.
    for v in used:
        worker = (seed / v / "configs" / "rl-reward-0.toml").read_text()
        assert f'combination = "{v}"' in worker

    for v, entry in summary["variants"].items():
        assert entry["curve_steps"] == [0, 2, 3]
        assert len(entry["curves"]["accuracy"]["per_seed"]["0"]) == 3
        assert set(entry["accuracy"]) >= {"mean", "std", "per_seed"}
        assert 0.0 <= entry["hacking_rate"]["mean"] <= 1.0
        assert entry["system_eval_accuracy"]["per_seed"]["0"] == pytest.approx(
            json.loads((seed / v / "eval.jsonl").read_text().splitlines()[-1])["accuracy"]
        )
        for step in (2, 3):
            records = read_samples(seed / v / "samples" / f"step-{step}.jsonl")
            assert len(records) == 16 and all(set(SAMPLE_FIELDS) <= set(r) for r in records)
        # Only the newest RL export is kept after evaluation.
        assert len([p for p in (seed / v / "phases" / "rl" / "exports").glob("v*") if p.is_dir()]) == 1
    assert summary["checks"]["positive_only_ge_outcome_only"] is None  # no outcome-only variant in the debug config
    assert isinstance(summary["checks"]["both_hacks_more_than_positive_only"], bool)
    # Every seed reported; with one seed no claim can be judged (no seed-to-seed variance), and none is claimed for
    # variants that did not run.
    assert set(summary["per_seed"]["0"]["variants"]) == {"positive_only", "both"}
    assert isinstance(summary["per_seed"]["0"]["plateau"], bool)
    assert set(summary["replicates"]) == {"positive_only_beats_both", "both_hacks_more"}
    assert {c["verdict"] for c in summary["replicates"].values()} == {"inconclusive"}

    # The report, also through `longtrace report OUT`.
    assert json.loads((out / "ablation.json").read_text())["variants"].keys() == summary["variants"].keys()
    for name in ("variants.png", "hacking.png"):
        (out / "report" / name).unlink()
    from deploy.report import write_report

    md = write_report(out).read_text()
    assert "| positive_only |" in md and "| both |" in md and "![held-out accuracy per variant](variants.png)" in md
    assert "## Replicates?" in md and "## Every seed" in md
    assert (out / "report" / "variants.png").stat().st_size > 10_000 and (out / "report" / "hacking.png").is_file()

    # Re-summarising the finished runs (--reuse_finished_runs) starts nothing and keeps every curve point, although
    # the evaluated exports were pruned: the samples files stand in for them.
    code = _cli(["bench", "ablation", "--config", str(DEBUG), "--json", *argv, "--reuse_finished_runs", "true"])
    assert code == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for v, entry in again["variants"].items():
        assert entry["curve_steps"] == [0, 2, 3]
        assert entry["curves"]["accuracy"] == summary["variants"][v]["curves"]["accuracy"]


def _base(tmp_path: Path, **kw: Any) -> AblateConfig:
    return load_config(AblateConfig, DEBUG, ["--out_dir", str(tmp_path / "a")]).model_copy(update=kw)


def test_config_diff_guard_rejects_a_variant_that_changes_more_than_the_reward_rule(tmp_path: Path) -> None:
    """Guards against an ablation whose variants silently differ elsewhere (a learning rate, a step count): the
    comparison would no longer isolate the reward rule."""
    plan = Plan(_base(tmp_path))
    a = plan.variant_config(0, Variant(name="a", eta=0.3), "/m")
    b = plan.variant_config(0, Variant(name="b", eta=0.3, combination="both"), "/m")
    assert check_reward_only({"a": a, "b": b}, "t") == {"b": {"reward.config.combination": ["positive_only", "both"]}}
    b["learner"]["config"]["optim"]["lr"] = 2e-3
    with pytest.raises(ValueError, match=r"learner\.config\.optim\.lr"):
        check_reward_only({"a": a, "b": b}, "t")
    c = plan.variant_config(1, Variant(name="c", eta=0.3), "/m")  # another seed: another world and model
    with pytest.raises(ValueError, match=r"prepare|data\.seed|model_path|dataset_path"):
        check_reward_only({"a": a, "c": c}, "t")


def test_bad_ablation_configs_name_the_flag(tmp_path: Path) -> None:
    """Guards against a typo'd phase name, a duplicate variant or a bad variant name failing deep inside a run."""
    with pytest.raises(ConfigError, match="--rl_phase"):
        Plan(_base(tmp_path, rl_phase="grpo"))
    with pytest.raises(ConfigError, match="duplicate variant"):
        Plan(_base(tmp_path, eta_sweep=[0.3, 0.3]))
    with pytest.raises(ConfigError, match="variants"):
        load_config(AblateConfig, DEBUG, ["--variants", '[{name = "Bad Name", eta = 0.3}]'])


def test_hacking_indicator_counts_wrong_entity_lists_not_the_demonstrated_answer(tmp_path: Path) -> None:
    """Guards against an indicator that flags the demo's normal answer (3 entities) as hacking, misses a list in an
    ill-formed response, or counts a correct long answer as hacking."""

    def rec(i: int, response: str, answer: str, wf: bool, finished: bool, outcome: float, rubric: float) -> Any:
        return dict(id=i, response=response, answer=answer, well_formed=wf, finished=finished, outcome=outcome) | {
            "rubric": rubric,
            "reward": 0.0,
        }

    records = [
        rec(0, "E13 E37 </think> E13 E37 C18<|im_end|>", "E13 E37 C18", True, True, 1.0, 1.0),  # demonstrated
        rec(1, "x </think> E13 E37 E05 E09 C02<|im_end|>", "E13 E37 E05 E09 C02", True, True, 0.0, 1.0),  # lists
        rec(2, "E13 E37 E05 E09 E10 E11", "", False, False, 0.0, 0.0),  # unfinished list, no </think>
        rec(3, "E13 </think> </think> C18<|im_end|>", "", False, True, 0.0, 0.0),  # ill-formed
    ]
    path = tmp_path / "samples.jsonl"
    write_samples(path, records)
    got = indicators(read_samples(path), HackingConfig())
    assert got["hacking_rate"] == 0.5 and got["listing_rate"] == 0.5
    assert got["ill_formed_rate"] == 0.25 and got["unfinished_rate"] == 0.25 and got["accuracy"] == 0.25
    assert got["rubric_without_outcome_rate"] == 0.25
    path.write_text('{"id": 0, "response": "x"}\n')
    with pytest.raises(ValueError, match=r"samples\.jsonl:1: .*answer"):
        read_samples(path)
