"""Per-sample held-out records of one model and the ablation's indicators computed from them.

A record has the fields of `longtrace eval`'s samples.jsonl (SAMPLE_FIELDS): id, response, answer,
well_formed, finished, outcome, rubric, reward. Until that command exists, `evaluate_export` writes the same
records for an HF export (a phase's `exports/v<version>/`): greedy generation with transformers (the export
is a plain HF model; same prompts as the feeder, same stop tokens as the launcher's eval), the rollout
workers' message processor, then the reward service's own `Scorer` in-process with the run's judge. The rubric
is always computed (the request's `rubric_reward_ratio` is set to `score_eta` > 0), because the service skips it
at η = 0 and the outcome-only variant would otherwise report no rubric hits at all; `reward` is the run's own
per-sample reward (`single_reward` with the variant's η: no group step at evaluation).

The hacking indicator (`indicators`): the paper's failure of rubric-on-every-sample is a policy that lists
entities instead of answering. On the demo task the demonstrated answer names `hops + 1` entities
(`E13 E37 C18`), so a sample "lists" when its answer (or, when it is not well-formed, its whole response)
names at least `listing_min_entities` (default 4) distinct entity names; `hacking_rate` is the fraction of
samples that list and are wrong.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from common.config import BaseConfig

SAMPLE_FIELDS = ("id", "response", "answer", "well_formed", "finished", "outcome", "rubric", "reward")


class HackingConfig(BaseConfig):
    entity_pattern: str = r"\b[EC]\d{2}\b"
    """Regex of one entity name in an answer (the tiny world's E00..E99 and C00..C99)."""
    listing_min_entities: int = Field(4, ge=2)
    """A sample lists entities when it names at least this many distinct ones (the demo's answer names 3)."""
    rubric_hit_min: float = Field(1.0, gt=0, le=1)
    """`rubric_without_outcome_rate` counts wrong samples whose raw rubric hit is at least this."""


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def indicators(records: Sequence[dict[str, Any]], cfg: HackingConfig) -> dict[str, float]:
    """Accuracy, rubric hits, ill-formed / unfinished rates and the hacking indicators of a list of records."""
    pattern = re.compile(cfg.entity_pattern)
    listing, hacking, rubric_wrong, ill, unfinished, named = [], [], [], [], [], []
    for r in records:
        text = r["answer"] if r["well_formed"] else r["response"]
        n = len(set(pattern.findall(text)))
        lists = n >= cfg.listing_min_entities
        wrong = float(r["outcome"]) == 0.0
        named.append(float(n))
        listing.append(float(lists))
        hacking.append(float(lists and wrong))
        rubric_wrong.append(float(wrong and float(r["rubric"]) >= cfg.rubric_hit_min))
        unfinished.append(float(not r["finished"]))
        ill.append(float(r["finished"] and not r["well_formed"]))
    return {
        "num_samples": float(len(records)),
        "accuracy": _mean([float(r["outcome"]) for r in records]),
        "rubric_hit_rate": _mean([float(r["rubric"]) for r in records]),
        "well_formed_rate": _mean([float(bool(r["well_formed"])) for r in records]),
        "ill_formed_rate": _mean(ill),
        "unfinished_rate": _mean(unfinished),
        "entities_named_mean": _mean(named),
        "listing_rate": _mean(listing),
        "hacking_rate": _mean(hacking),
        "rubric_without_outcome_rate": _mean(rubric_wrong),
    }


def write_samples(path: Path, records: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: r[k] for k in SAMPLE_FIELDS}) + "\n" for r in records))


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The records of a samples.jsonl (ours or `longtrace eval`'s); a missing field is an error naming file:line."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = [k for k in SAMPLE_FIELDS if k not in record]
        if missing:
            raise ValueError(f"{path}:{i}: sample record lacks {', '.join(missing)}")
        out.append(record)
    return out


def _greedy(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]) -> Any:
    """Greedy continuations: (text, finished on a stop token) per prompt. Prompts of equal length are batched
    together, so no padding changes the logits."""
    import torch

    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list[tuple[str, bool]] = [("", False)] * len(prompts)
    with torch.inference_mode():
        for idx in by_len.values():
            ids = torch.tensor([prompts[i] for i in idx])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(stop_ids),
                pad_token_id=sorted(stop_ids)[0],
            )
            for row, i in zip(gen[:, ids.shape[1] :].tolist(), idx, strict=True):
                cut = next((k + 1 for k, t in enumerate(row) if t in stop_ids), None)
                kept = row if cut is None else row[:cut]
                out[i] = (tokenizer.decode(kept, skip_special_tokens=False), cut is not None)
    return out


def evaluate_export(
    model_dir: str | Path,
    heldout_path: str | Path,
    reward: Any,
    *,
    processor: str,
    max_questions: int,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    score_eta: float = 0.5,
) -> list[dict[str, Any]]:
    """Per-sample records of the HF model in `model_dir` on the first `max_questions` held-out rows.

    `reward` is the run's RewardConfig (judge, η, rubric flags); `score_eta` only makes the scorer compute both
    parts (0 < score_eta < 1) and never enters a record's `reward`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from datagen.prompts import JsonlDataset, prompt_ids
    from reward_service.combine import single_reward
    from reward_service.judges import build_judge
    from reward_service.schemas import ScoreRequest
    from reward_service.scoring import Scorer
    from rollout_server.worker.processors import get_processor

    assert 0 < score_eta < 1, score_eta
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # one bar per loaded export drowns the ablation's log
    dataset = JsonlDataset(heldout_path)
    rows = [dataset[i] for i in range(min(max_questions, len(dataset)))]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)  # eval mode already
    stop = set(stop_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    texts = _greedy(model, tokenizer, [prompt_ids(tokenizer, r) for r in rows], max_new_tokens, stop)
    parse = get_processor(processor).parse
    records: list[dict[str, Any]] = []
    requests = []
    for i, (row, (text, stopped)) in enumerate(zip(rows, texts, strict=True)):
        parsed = parse(text, "stop" if stopped else "length")
        finished = parsed.status == "completed" and not parsed.task_unfinished
        ok = finished and not parsed.ill_formed
        records.append({"id": i, "response": text, "answer": parsed.content if ok else "", "well_formed": ok})
        records[-1].update(finished=finished, outcome=0.0, rubric=0.0, reward=0.0)
        if ok:
            message = {"role": "assistant", "content": parsed.content, "reasoning_content": parsed.reasoning}
            info = {**row.extra_reward_info, "rubric_reward_ratio": score_eta}
            requests.append((i, {"history": [message], "label": row.label, "extra_reward_info": info}))
    if requests:
        scorer = Scorer(build_judge(reward.judge), reward)
        req = ScoreRequest.model_validate({"samples": [body for _, body in requests]})
        results = asyncio.run(scorer.score(req)).results
        for (i, _), res in zip(requests, results, strict=True):
            outcome, rubric = float(res.outcome_reward), float(res.rubric_reward)
            dataset_name = str(rows[i].dataset_name)
            records[i].update(
                outcome=outcome, rubric=rubric, reward=single_reward(outcome, rubric, reward.eta, dataset_name)
            )
    return records
