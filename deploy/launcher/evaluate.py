"""Held-out evaluation through the running system: prompts to the engines, answers to the reward API.

The prompts are tokenized exactly as the RL feeder does (learner.feeder.prompt_ids), the responses are
parsed by the rollout worker's message processor, and well-formed answers are scored by the reward
service's `/v1/score` (the judge and rubric of training). An ill-formed, truncated or unfinished answer
counts as wrong. One JSON line per evaluation is appended to the output file: accuracy (outcome mean),
rubric hit rate (raw rubric reward mean), well-formed rate, mean response tokens, engine weight versions
and the first few responses.

Before generating it checks that every engine serves `expect_version` (the learner's last pushed version),
so an evaluation never silently measures stale weights.

    python -m deploy.launcher.evaluate --config EVAL.toml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field

from broker.config import BaseConfig, ConfigError, load_config

log = logging.getLogger(__name__)


class EvalJobConfig(BaseConfig):
    engine_urls: list[str] = Field(min_length=1)
    """Engines to generate with (base URLs)."""
    reward_url: str
    """Base URL of the reward API."""
    dataset_path: str
    """Held-out LongTraceRL JSONL."""
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
    max_questions: int = Field(256, ge=1)
    """Questions evaluated (the first ones of the file)."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature (0: greedy)."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest answer."""
    stop_token_ids: list[int] = []
    """Stop token ids (besides the tokenizer's EOS)."""
    batch_size: int = Field(32, ge=1)
    """Prompts per /generate request."""
    timeout_s: float = Field(600.0, gt=0)
    """Timeout of one HTTP request."""
    num_examples: int = Field(3, ge=0)
    """Questions whose response is kept in the result (for the report)."""


def _version(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None  # "default": the engine's start-up weights


def run(cfg: EvalJobConfig) -> dict[str, Any]:
    import httpx
    from transformers import AutoTokenizer

    from learner.feeder import JsonlDataset, prompt_ids
    from rollout_server.worker.processors import get_processor

    t0 = time.monotonic()
    dataset = JsonlDataset(cfg.dataset_path)
    rows = [dataset[i] for i in range(min(cfg.max_questions, len(dataset)))]
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    processor = get_processor(cfg.processor)
    client = httpx.Client(timeout=cfg.timeout_s)
    try:
        versions = []
        for url in cfg.engine_urls:
            r = client.get(f"{url}/weight_version")
            r.raise_for_status()
            versions.append(_version(str(r.json()["weight_version"])))
        if cfg.expect_version is not None and any((v or 0) != cfg.expect_version for v in versions):
            raise RuntimeError(
                f"engines serve weight versions {versions}, expected {cfg.expect_version}: "
                "the last weights did not reach them"
            )
        sampling = {
            "temperature": cfg.temperature,
            "max_new_tokens": cfg.max_new_tokens,
            "stop_token_ids": cfg.stop_token_ids,
            "skip_special_tokens": False,
            "no_stop_trim": True,
        }
        batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]

        def generate(k: int) -> list[dict[str, Any]]:
            url = cfg.engine_urls[k % len(cfg.engine_urls)]
            body = {"input_ids": [prompt_ids(tokenizer, row) for row in batches[k]], "sampling_params": sampling}
            r = client.post(f"{url}/generate", json=body)
            r.raise_for_status()
            out: list[dict[str, Any]] = r.json()
            return out

        with ThreadPoolExecutor(max_workers=len(cfg.engine_urls)) as pool:
            outputs = [o for batch in pool.map(generate, range(len(batches))) for o in batch]
        requests, lengths, well_formed = [], [], []
        for row, out in zip(rows, outputs, strict=True):
            finish = out["meta_info"]["finish_reason"]["type"]
            parsed = processor.parse(out["text"], finish)
            ok = parsed.status == "completed" and not parsed.ill_formed and not parsed.task_unfinished
            well_formed.append(ok)
            lengths.append(len(out.get("output_ids") or []))
            if ok:
                message = {"role": "assistant", "content": parsed.content, "reasoning_content": parsed.reasoning}
                requests.append({"history": [message], "label": row.label, "extra_reward_info": row.extra_reward_info})
        outcome, rubric = [0.0] * len(rows), [0.0] * len(rows)
        if requests:
            r = client.post(f"{cfg.reward_url}/v1/score", json={"samples": requests})
            r.raise_for_status()
            results = iter(r.json()["results"])
            for i, ok in enumerate(well_formed):
                if ok:
                    res = next(results)
                    outcome[i], rubric[i] = float(res["outcome_reward"]), float(res["rubric_reward"])
    finally:
        client.close()
    n = len(rows)
    result = {
        "phase": cfg.phase,
        "when": cfg.when,
        "step": cfg.step,
        "time_s": round(time.time(), 3),
        "num_questions": n,
        "accuracy": sum(outcome) / n,
        "rubric_hit_rate": sum(rubric) / n,
        "well_formed_rate": sum(well_formed) / n,
        "response_len_mean": sum(lengths) / n,
        "temperature": cfg.temperature,
        "weight_versions": versions,
        "eval_s": round(time.monotonic() - t0, 2),
        "examples": [
            {"question": row.question, "label": row.label, "response": out["text"], "accuracy": outcome[i]}
            for i, (row, out) in enumerate(zip(rows[: cfg.num_examples], outputs, strict=False))
        ],
    }
    out_path = Path(cfg.out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    from broker.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m deploy.launcher.evaluate", description=__doc__)
    parser.add_argument("--config", required=True, help="TOML file of an EvalJobConfig")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_config(EvalJobConfig, args.config, rest)
    except ConfigError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        sys.exit(2)
    setup_logging(prefix="eval ")
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


if __name__ == "__main__":
    main()
