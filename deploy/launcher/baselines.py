"""Context-heuristic baselines of a `longtrace up` run: what the shortcuts of datagen/synth/heuristics.py score on
the run's held-out questions, graded by the very judge the run's reward service used.

The judge is the run's `[reward.config.judge]` (RUN_DIR/config.json, read as UpConfig reads it) and its verdict
`reward_service.judges.rule.rule_match`; a heuristic's answer `C07` is handed to it as `"<marker> C07"` when the
judge has an `answer_marker`, else as `C07`. No answer (None) counts as wrong. A judge that is not a rule judge
(an LLM) is not called: the baselines are skipped and the summary says why.

The rows are the first `eval.max_questions` of the held-out file the evaluation read (RUN_DIR/data/heldout.jsonl
unless `--eval.dataset_path` named another), so a baseline and the model answer the same questions. The
heuristics whose answer is random (`RANDOMIZED`: a draw or a tie broken at random) are averaged over
`NUM_SEEDS` seeds 0, 1, ... (one `random.Random(seed)` per heuristic and seed, over the rows in file order) to
lower the noise; the others are scored once with seed 0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from datagen.dataset import Row, iter_rows
from datagen.synth.heuristics import HEURISTICS, RANDOMIZED, parse_prompt
from deploy.launcher.rundir import RunDir

NUM_SEEDS = 5
"""Seeds the randomized heuristics are averaged over."""


def judge_response(judge: Any, answer: str) -> str:
    """The response the judge reads for a bare answer: after the answer marker when the judge has one."""
    marker = getattr(judge, "answer_marker", None)
    return f"{marker} {answer}" if marker else answer


def score_heuristics(rows: list[Row], judge: Any, num_seeds: int = NUM_SEEDS) -> dict[str, float]:
    """Accuracy of every heuristic on `rows` under the rule judge `judge` (a RuleJudgeConfig); NaN without rows."""
    from reward_service.judges.rule import rule_match

    out: dict[str, float] = {}
    for name, heuristic in HEURISTICS.items():
        seeds = range(num_seeds) if name in RANDOMIZED else range(1)
        per_seed = []
        for seed in seeds:
            rng = random.Random(seed)
            hits = 0
            for row in rows:
                answer = heuristic(row.prompt, rng)
                hits += answer is not None and rule_match(judge, row.label, judge_response(judge, answer))
            per_seed.append(hits / len(rows) if rows else float("nan"))
        out[name] = sum(per_seed) / len(per_seed)
    return out


def distinct_cities_mean(rows: list[Row]) -> float:
    """Mean number of distinct cities per context (`random_city` scores the mean of its inverse)."""
    counts = [len(parse_prompt(r.prompt).distinct_cities()) for r in rows]
    return sum(counts) / len(counts) if counts else float("nan")


def run_baselines(run: RunDir) -> dict[str, Any]:
    """The baselines of a run directory: {`baselines`: name -> accuracy ({} when skipped), `distinct_cities_mean`,
    `judge` (the judge config dict, or None), `num_questions`, `skipped` (why there are none, or None), `eval_split`
    (the split evaluated: heldout, validation, or the --eval.dataset_path given)}."""
    out: dict[str, Any] = {
        "baselines": {},
        "distinct_cities_mean": None,
        "judge": None,
        "num_questions": 0,
        "skipped": None,
        "eval_split": None,
    }
    if not run.config.is_file():
        return out | {"skipped": f"no {run.config.name} in the run directory"}
    from deploy.launcher.config import UpConfig
    from reward_service.config import RuleJudgeConfig

    try:
        cfg = UpConfig.model_validate(json.loads(run.config.read_text()))
    except ValueError as e:  # pydantic's ValidationError and JSONDecodeError are ValueErrors
        return out | {"skipped": f"{run.config.name} does not load as an UpConfig: {str(e).splitlines()[0]}"}
    judge = cfg.reward.config.judge
    out["judge"] = judge.model_dump(mode="json")
    if not isinstance(judge, RuleJudgeConfig):
        return out | {"skipped": f"the judge is {judge.kind!r}, not a rule judge: baselines are not graded"}
    # The file the run's evaluation read, with its data directory where the run directory is now.
    path = Path(cfg.model_copy(update={"run_dir": str(run.root)}).eval_dataset_path())
    out["eval_split"] = cfg.eval.dataset_path or cfg.eval.split
    if not path.is_file():
        return out | {"skipped": f"no held-out file {path}"}
    rows: list[Row] = []
    try:
        for row in iter_rows(path):
            if len(rows) >= cfg.eval.max_questions:
                break
            rows.append(row)
    except (OSError, ValueError) as e:  # DatasetError is a ValueError naming file:line
        return out | {"skipped": f"the held-out file does not read: {e}"}
    if not any(parse_prompt(r.prompt).question for r in rows):
        return out | {"skipped": f"no row of {path} holds a tiny-world question", "num_questions": len(rows)}
    return out | {
        "baselines": score_heuristics(rows, judge),
        "distinct_cities_mean": distinct_cities_mean(rows),
        "num_questions": len(rows),
    }
