"""Held-out evaluation through the running system: prompts to the engines, answers to the reward API.

A job of `longtrace up` on the core of `longtrace eval` (eval/run.py) with one sample per question:
the prompts are tokenized exactly as the RL feeder does (learner.feeder.prompt_ids), the responses are
generated and parsed as the rollout worker does, and well-formed answers are scored by the reward
service's `/v1/score` (the judge and rubric of training). An ill-formed, truncated or unfinished answer
counts as wrong. One JSON line per evaluation is appended to the output file: accuracy (outcome mean),
rubric hit rate (raw rubric reward mean), well-formed rate, mean response tokens, engine weight versions,
the oldest and newest policy version of the samples' tokens and the first few responses.

Before generating it checks that every engine serves `expect_version` (the learner's last pushed version),
so an evaluation never silently measures stale weights.

    python -m deploy.launcher.evaluate --config EVAL.toml
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from common.config import load_config
from deploy.launcher.sections import EvalSection
from eval.config import EvalConfig

log = logging.getLogger(__name__)


class EvalJobConfig(EvalSection):
    """One held-out evaluation: the launcher's `[eval]` section plus what the launcher knows at that moment."""

    dataset_path: str
    """Held-out LongTraceRL JSONL."""
    engine_urls: list[str] = Field(min_length=1)
    """Engines to generate with (base URLs)."""
    reward_url: str
    """Base URL of the reward API."""
    tokenizer_path: str
    """Tokenizer with the chat template (the model directory)."""
    out_path: str
    """JSONL file the result line is appended to."""
    phase: str
    """Phase name recorded with the result."""
    when: str
    """`before` or `after` the phase's steps (recorded with the result)."""
    step: int = 0
    """Global learner step recorded with the result (for plots)."""
    expect_version: int | None = None
    """Every engine must report this weight version; None: no check."""
    processor: str = "qwen3"
    """Message processor of the responses (the rollout workers')."""
    num_examples: int = Field(3, ge=0)
    """Questions whose response is kept in the result (for the report)."""


def eval_config(cfg: EvalJobConfig) -> EvalConfig:
    """The job as an EvalConfig of `longtrace eval`: one sample per question, no top-p / top-k cut, the answer
    budget `max_new_tokens` (the engines' context length caps prompt + answer)."""
    return EvalConfig(
        dataset_path=cfg.dataset_path,
        engine_urls=cfg.engine_urls,
        reward_url=cfg.reward_url,
        tokenizer_path=cfg.tokenizer_path,
        k=1,
        temperature=cfg.temperature,
        top_p=1.0,
        top_k=-1,
        max_context_len=2**31 - 1,
        max_response_len=cfg.max_new_tokens,
        max_questions=cfg.max_questions,
        concurrency=cfg.batch_size,
        timeout_s=cfg.timeout_s,
        processor=cfg.processor,
        stop_token_ids=cfg.stop_token_ids or None,
        expect_version=cfg.expect_version,
    )


def sample_versions(samples: list[Any]) -> dict[str, int | None]:
    """The oldest and newest policy version the engines reported for the samples' tokens (None: none generated):
    an eval on engines that take weight pushes meanwhile may span several."""
    oldest = [s.weight_version for s in samples if s.weight_version is not None]
    newest = [s.weight_version_newest for s in samples if s.weight_version_newest is not None]
    return {"policy_version_min": min(oldest, default=None), "policy_version_max": max(newest, default=None)}


def run(cfg: EvalJobConfig, inputs: Any = None) -> dict[str, Any]:
    """Evaluate, append the result line to `cfg.out_path` and return it; `inputs`: eval.run.prepare's (the
    dataset and tokenizer, loaded once by a process that evaluates several times), else loaded here."""
    from eval.aggregate import summarize
    from eval.run import run_eval

    t0 = time.monotonic()
    done = run_eval(eval_config(cfg), cfg.engine_urls, cfg.reward_url, inputs)
    metrics = summarize(s.to_dict() for s in done.samples)
    result = {
        "phase": cfg.phase,
        "when": cfg.when,
        "step": cfg.step,
        "time_s": round(time.time(), 3),
        "num_questions": done.num_questions,
        "accuracy": metrics["avg_at_k"],
        "rubric_hit_rate": metrics["rubric_hit_rate"],
        "well_formed_rate": metrics["well_formed_rate"],
        "response_len_mean": metrics["mean_response_tokens"],
        "temperature": cfg.temperature,
        "weight_versions": [e.policy_version for e in done.engines],
        **sample_versions(done.samples),
        "eval_s": round(time.monotonic() - t0, 2),
        "examples": [
            {"question": s.question, "label": s.label, "response": s.response, "accuracy": s.outcome}
            for s in done.samples[: cfg.num_examples]
        ],
    }
    out_path = Path(cfg.out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    from common.cli import Logs, add_config, run_cli, standalone

    def evaluate(args: argparse.Namespace) -> int:
        cfg = load_config(EvalJobConfig, args.config, args.overrides)
        result = run(cfg)
        log.info(
            "%s %s: accuracy %.3f rubric hits %.3f well-formed %.3f on %d questions",
            cfg.phase,
            cfg.when,
            result["accuracy"],
            result["rubric_hit_rate"],
            result["well_formed_rate"],
            result["num_questions"],
        )
        return 0

    parser = standalone(
        "python -m deploy.launcher.evaluate", evaluate, overrides=True, logs=Logs(prefix="eval "), description=__doc__
    )
    add_config(parser, "TOML file of an EvalJobConfig", required=True)
    run_cli(parser, argv)


if __name__ == "__main__":
    main()
