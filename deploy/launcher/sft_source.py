"""The SFT phase's data source: demonstrations published to `scored` as one-sample groups, under admission control.

The learner in SFT mode (`loss.mode = "sft"`) trains on whatever arrives on `scored` with advantage 1 on
every response token, so a demonstration becomes a ScoredGroup whose one sample is the target response.
Like the RL feeder, it publishes at most `(max_staleness + v + 1) * groups_per_step` groups at policy version
v: the learner drops groups older than `max_staleness` versions, and each group carries the version at which
it was published. Group ids (`<run_id>/sft/e<epoch>/i<index>`) make a restarted source publish nothing twice.

Demonstration rows (JSONL): `prompt` (the user message) and either `reasoning` + `content` (the response is
`{reasoning}\\n</think>\\n\\n{content}` after the chat template's generation prompt, which opens the thinking
block) or `response` (the whole text after the generation prompt); the tokenizer's EOS ends it.

    python -m deploy.launcher.sft_source --config SFT.toml [--section.key value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from broker.settings import BrokerConfig
from common.config import BaseConfig, ConfigError, load_config

log = logging.getLogger(__name__)


class SftSourceConfig(BaseConfig):
    broker: BrokerConfig = Field(default_factory=lambda: BrokerConfig.model_validate({}))
    """Redis and run namespace (the learner's)."""
    dataset_path: str
    """Demonstrations JSONL (see the module docstring)."""
    tokenizer_path: str
    """Tokenizer with the chat template the RL feeder uses (the model directory)."""
    groups_per_step: int = Field(ge=1)
    """Demonstrations per optimizer step (the learner's data.groups_per_step)."""
    max_staleness: int = Field(ge=0)
    """The learner's data.max_staleness."""
    num_steps: int = Field(ge=1)
    """Steps to feed; the source exits 0 once num_steps * groups_per_step groups are published."""
    seed: int = 0
    """Seed of the per-epoch shuffle."""
    poll_s: float = Field(1.0, gt=0)
    """Longest wait for a policy-version change before looking again."""


def response_text(row: dict[str, Any], end_think: str = "</think>") -> str:
    """The target text after the generation prompt."""
    if "response" in row and "reasoning" not in row:
        return str(row["response"])
    return f"{row['reasoning']}\n{end_think}\n\n{row['content']}"


def load_demonstrations(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--dataset_path: no such file {str(p)!r}")
    for lineno, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" not in row or not (("reasoning" in row and "content" in row) or "response" in row):
            raise ConfigError(f"{p}:{lineno}: a demonstration needs prompt and reasoning+content (or response)")
        rows.append(row)
    if not rows:
        raise ConfigError(f"--dataset_path: {p} has no demonstrations")
    return rows


def build_group(row: dict[str, Any], tokenizer: Any, run_id: str, group_id: str, index: int, version: int) -> Any:
    """One demonstration as a ScoredGroup of one sample with reward 1 (the learner's SFT mode ignores rewards)."""
    import numpy as np

    from broker.schemas import (
        Group,
        RewardInfo,
        Sample,
        SampleReward,
        SamplingParams,
        ScoredGroup,
        Task,
        TextSplit,
        pack_ids,
        pack_logprobs,
    )

    messages = [{"role": "user", "content": row["prompt"]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    text = response_text(row)
    response_ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    task = Task(
        run_id=run_id,
        group_id=group_id,
        dataset_index=index,
        prompt_ids=pack_ids(prompt_ids),
        label=str(row.get("label", "")),
        reward_info=RewardInfo(question=str(row.get("question", "")), rubrics=[str(r) for r in row.get("rubrics", [])]),
        sampling=SamplingParams(max_new_tokens=len(response_ids)),
        num_samples=1,
        policy_version=version,
        created_s=time.time(),
    )
    sample = Sample(
        response_ids=pack_ids(response_ids),
        logprobs=pack_logprobs(np.zeros(len(response_ids), dtype=np.float32)),
        text=text,
        finish_reason="stop",
        status="completed",
        split=TextSplit.of(text, str(row.get("reasoning", "")), str(row.get("content", ""))),
        engine_id="demonstration",
    )
    reward = SampleReward(reward=1.0, outcome_reward=1.0, rubric_reward=1.0, raw_rubric_reward=1.0)
    return ScoredGroup(group=Group(task=task, samples=[sample], worker_id="sft_source"), rewards=[reward])


def run(cfg: SftSourceConfig, stop: threading.Event) -> int:
    """Publish the demonstrations as the policy version allows; return the number published."""
    import numpy as np
    from transformers import AutoTokenizer

    from broker.base import SCORED
    from broker.factory import connect
    from broker.schemas import ScoredGroup

    rows = load_demonstrations(cfg.dataset_path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    broker = connect(cfg.broker)
    broker.attach_run("sft source")
    producer = broker.producer(SCORED, ScoredGroup)
    total = cfg.num_steps * cfg.groups_per_step
    published = 0
    version = broker.policy_version.get()
    orders: dict[int, Any] = {}  # epoch -> permutation of the rows
    try:
        while published < total and not stop.is_set():
            limit = min(total, (cfg.max_staleness + version + 1) * cfg.groups_per_step)
            batch: list[ScoredGroup] = []
            while published + len(batch) < limit:
                n = published + len(batch)
                epoch, position = divmod(n, len(rows))
                if epoch not in orders:
                    orders[epoch] = np.random.default_rng([cfg.seed, epoch]).permutation(len(rows))
                index = int(orders[epoch][position])
                gid = f"{broker.run_id}/sft/e{epoch}/i{index}"
                batch.append(build_group(rows[index], tokenizer, broker.run_id, gid, index, version))
            if batch:
                producer.publish(batch, dedup_key=lambda g: g.group_id)
                published += len(batch)
                log.info("published %d/%d demonstrations (policy version %d)", published, total, version)
            if published < total:
                version = broker.policy_version.wait_for_change(version, cfg.poll_s)
    finally:
        broker.close()
    return published


def main(argv: list[str] | None = None) -> None:
    from common.cli import Logs, add_config, run_cli, standalone

    def source(args: argparse.Namespace) -> int:
        cfg = load_config(SftSourceConfig, args.config, args.overrides)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        n = run(cfg, stop)
        log.info("done: %d demonstrations published", n)
        return 0

    parser = standalone(
        "python -m deploy.launcher.sft_source",
        source,
        overrides=True,
        logs=Logs(prefix="sft-source "),
        description=__doc__,
    )
    add_config(parser, "TOML file of an SftSourceConfig")
    run_cli(parser, argv)


if __name__ == "__main__":
    main()
