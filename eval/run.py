"""The evaluation core: k samples per question through the engines, scored by the reward API with η = 0.

Per question (a bounded number at once, so long prompts are not all held in memory):

    row (by byte offset) -> prompt ids (learner.feeder.prompt_ids: exactly the RL feeder's tokenization)
    -> token budget min(max_response_len, max_context_len - prompt_len) (the rollout worker's plan_group)
    -> k samples through the rollout worker's SampleGenerator (least-outstanding routing, retries on another
       engine, resumption after a pause) -> parsed by the worker's message processor
    -> well-formed answers to POST /v1/score -> SampleRecords, reward = outcome

An ill-formed, truncated or unfinished answer is not sent to the judge: it counts wrong (outcome 0, rubric 0).
A prompt that alone fills the context is not sent either; its k samples count wrong with `error` set.
Both `longtrace eval` (eval/cli.py) and the launcher's held-out eval (deploy/launcher/evaluate.py) run this.
This module sets an eval up and runs it; each question's generation is eval/pipeline.py, scoring eval/scoring.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from common.config import ConfigError
from eval.config import EvalConfig
from weights.version import INITIAL_POLICY_VERSION, WeightVersionError, parse_weight_version

log = logging.getLogger(__name__)


class EvalError(RuntimeError):
    """The evaluation cannot go on (an engine or the reward API refused or failed); the message says why."""


@dataclass
class SampleRecord:
    """One line of samples.jsonl. id, response, answer, well_formed, finished, outcome, rubric and reward are a
    contract (ablation tools read them): keep their names and meaning."""

    id: str
    question_index: int
    question: str
    label: str
    dataset_name: str
    sample_index: int
    response: str
    """The raw response text (stop token kept)."""
    answer: str
    """The parsed final answer (after </think>); empty when truncated or unfinished."""
    well_formed: bool
    """Completed with a stop token, exactly one </think>, non-empty reasoning and answer: the only ones judged."""
    finished: bool
    """Ended with a stop token (not cut at max tokens, not aborted)."""
    status: str
    """completed | truncated | aborted."""
    outcome: float
    """The judge's verdict, 1 or 0 (0 when not well-formed)."""
    rubric: float
    """Raw rubric hit fraction (0 when not well-formed)."""
    reward: float
    """The reward at η = 0: the outcome."""
    prompt_tokens: int
    response_tokens: int
    weight_version: int | None
    """The policy version the sample was generated under: the oldest among its tokens (Sample.oldest_policy_version,
    as Group.group_version takes the oldest among a group's samples; None: nothing generated). Named as
    samples.jsonl names it."""
    engine: str
    gen_s: float
    error: str = ""
    """Why the sample was not generated (prompt_too_long), else empty."""
    weight_version_newest: int | None = None
    """The newest policy version among its tokens (a weight push during the sample's generation makes it differ
    from `weight_version`); None: nothing generated."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EngineInfo:
    url: str
    model_path: str
    weight_version: str
    """SGLang's weight_version string, as the engine reports it ("default" before any update)."""
    context_length: int | None

    @property
    def policy_version(self) -> int | None:
        return version_number(self.weight_version)


@dataclass
class EvalRun:
    samples: list[SampleRecord]
    num_questions: int
    engines: list[EngineInfo]
    judge: str
    max_context_len: int
    """The context limit applied: --max_context_len capped by the engines' context length."""
    stop_token_ids: list[int]
    timings: dict[str, float]


@dataclass
class Inputs:
    """What an eval needs before it talks to any service (loaded while local services start)."""

    dataset: Any
    ids: list[str]
    tokenizer: Any
    processor: Any
    stop_token_ids: list[int]
    load_s: float


def version_number(raw: str) -> int | None:
    """The policy version an engine's weight_version string names (weights/version.py: "default" is 0, the
    start-up weights), or None when it names none (a string set by hand)."""
    try:
        return parse_weight_version(raw, INITIAL_POLICY_VERSION)
    except WeightVersionError:
        return None


def explicit_id(row: Any) -> str | None:
    """The row's own question id: the builder's metadata.longtrace.question_id, or a top-level / metadata "id"."""
    provenance = row.metadata_extra.get("longtrace")
    for value in (
        provenance.get("question_id") if isinstance(provenance, dict) else None,
        row.extra.get("id"),
        row.metadata_extra.get("id"),
    ):
        if isinstance(value, str | int) and str(value):
            return str(value)
    return None


def question_ids(rows: Sequence[str | None]) -> list[str]:
    """Each question's id: its own when the evaluated rows' ids are all present and unique, else its row index
    (so two runs over the same file always match question by question)."""
    if all(r is not None for r in rows) and len(set(rows)) == len(rows):
        return [str(r) for r in rows]
    if any(r is not None for r in rows):
        log.warning("question ids are missing or repeated in the dataset: questions are identified by row index")
    return [str(i) for i in range(len(rows))]


def stop_token_ids(configured: list[int] | None, tokenizer: Any, processor: Any) -> list[int]:
    """The configured ids, else the processor's stop tokens as this tokenizer spells them, else its defaults."""
    if configured is not None:
        return list(configured)
    vocab = tokenizer.get_vocab()
    found = [int(vocab[t]) for t in processor.stop_tokens if t in vocab]
    return found or list(processor.default_stop_token_ids)


def effective_context_len(configured: int, engines: Sequence[EngineInfo]) -> int:
    """--max_context_len capped so that prompt + budget < every engine's context length (else it answers 400)."""
    limits = [e.context_length - 1 for e in engines if e.context_length]
    cap = min(limits, default=configured)
    if cap < configured:
        log.info("max_context_len %d capped at %d by the engines' context length", configured, cap)
    return max(2, min(configured, cap))


async def engine_info(http: httpx.AsyncClient, url: str, timeout_s: float) -> EngineInfo:
    """Model path and weight version (/get_model_info) and context length (/get_server_info) of one engine."""
    try:
        info = await http.get(f"{url}/get_model_info", timeout=timeout_s)
        info.raise_for_status()
        server = await http.get(f"{url}/get_server_info", timeout=timeout_s)
    except httpx.HTTPError as e:
        raise EvalError(f"--engine_urls {url}: {type(e).__name__}: {e}") from e
    model = info.json()
    context = server.json().get("context_length") if server.status_code == 200 else None
    return EngineInfo(
        url=url,
        model_path=str(model.get("model_path", "")),
        weight_version=str(model.get("weight_version", "default")),
        context_length=context if isinstance(context, int) and context > 1 else None,
    )


def check_versions(engines: Sequence[EngineInfo], expect: int | None) -> None:
    if expect is None:
        return
    served = [e.policy_version for e in engines]
    if any(v != expect for v in served):
        raise EvalError(
            f"engines serve weight versions {[e.weight_version for e in engines]}, expected {expect} "
            "(--expect_version): the last weights did not reach them"
        )


def open_dataset(path: str, max_questions: int) -> tuple[Any, list[str]]:
    """The dataset (rows read by byte offset) and the ids of its first `max_questions` rows (0: all), every
    evaluated row parsed once up front so a bad row fails before any generation."""
    from pathlib import Path

    from datagen.prompts import JsonlDataset

    if not Path(path).is_file():
        raise ConfigError(f"--dataset_path: no such file {path!r}")
    try:
        dataset = JsonlDataset(path)
        n = min(max_questions or len(dataset), len(dataset))
        ids = question_ids([explicit_id(dataset[i]) for i in range(n)])
    except ValueError as e:
        raise ConfigError(f"--dataset_path: {e}".replace("--data.dataset_path: ", "")) from e
    return dataset, ids


def rollout_config(cfg: EvalConfig, engine_urls: list[str], stop_ids: list[int], max_context_len: int) -> Any:
    """The rollout worker's config for the eval's sampling: static engines, no registry, the builtin router."""
    from rollout_server.worker.config import RolloutConfig

    return RolloutConfig.model_validate(
        {
            "engines": {"urls": engine_urls, "use_registry": False},
            "router": {"type": "builtin", "max_inflight_per_engine": cfg.concurrency, "engine_wait_timeout_s": 120.0},
            "sampling": {
                "num_samples": cfg.k,
                "max_response_len": cfg.max_response_len,
                "max_context_len": max_context_len,
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
                "top_k": cfg.top_k,
                "stop_token_ids": stop_ids,
            },
            "processor": cfg.processor,
            "request_timeout_s": cfg.timeout_s,
            "connect_timeout_s": cfg.connect_timeout_s,
            "health_timeout_s": cfg.connect_timeout_s,
            "retry": cfg.engine_retry.model_dump(),
        }
    )


def prepare(cfg: EvalConfig) -> Inputs:
    """Parse the evaluated rows, load the tokenizer, resolve the stop token ids."""
    from transformers import AutoTokenizer

    from rollout_server.worker.processors import get_processor

    t0 = time.monotonic()
    dataset, ids = open_dataset(cfg.dataset_path, cfg.max_questions)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    processor = get_processor(cfg.processor)
    stop_ids = stop_token_ids(cfg.stop_token_ids, tokenizer, processor)
    return Inputs(dataset, ids, tokenizer, processor, stop_ids, round(time.monotonic() - t0, 3))


async def evaluate(
    cfg: EvalConfig,
    engine_urls: list[str],
    reward_url: str,
    inputs: Inputs | None = None,
    on_question: Callable[[list[SampleRecord]], None] | None = None,
    keep_responses: bool = True,
) -> EvalRun:
    """Evaluate `cfg.dataset_path` on `engine_urls` with the reward API at `reward_url`.

    `inputs`: from `prepare(cfg)` (done here when None). `on_question` gets each question's records as soon as
    they are scored (in completion order); `keep_responses=False` drops the texts from the returned records."""
    from eval.pipeline import Pipeline
    from eval.scoring import RewardClient
    from rollout_server.worker.client import make_http_client
    from rollout_server.worker.generation import SampleGenerator
    from rollout_server.worker.metrics import RolloutMetrics
    from rollout_server.worker.router import BuiltinRouter

    inputs = inputs or prepare(cfg)
    t0 = time.monotonic()
    urls = [u.rstrip("/") for u in engine_urls]
    engine_token, reward_token = cfg.engine_token(), cfg.reward_token()
    engine_http = make_http_client()
    if engine_token:
        engine_http.headers["Authorization"] = f"Bearer {engine_token}"
    reward_http = httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
        headers={"Authorization": f"Bearer {reward_token}"} if reward_token else None,
        trust_env=False,
    )
    try:
        engines = list(await asyncio.gather(*(engine_info(engine_http, u, cfg.connect_timeout_s) for u in urls)))
        check_versions(engines, cfg.expect_version)
        reward = RewardClient(reward_http, reward_url, cfg.timeout_s, cfg.reward_retry)
        judge = await reward.judge_kind()
        max_context_len = effective_context_len(cfg.max_context_len, engines)
        rcfg = rollout_config(cfg, urls, inputs.stop_token_ids, max_context_len)
        router = BuiltinRouter(rcfg, None, engine_http)
        await router.start()
        log.info(
            "evaluating %d questions x %d samples on %s (judge %s, stop ids %s)",
            len(inputs.ids),
            cfg.k,
            urls,
            judge,
            inputs.stop_token_ids,
        )
        t1 = time.monotonic()
        try:
            generator = SampleGenerator(rcfg, router, inputs.processor, RolloutMetrics())
            pipeline = Pipeline(cfg, inputs, rcfg, generator, reward, on_question, keep_responses)
            samples = await pipeline.run()
        finally:
            await router.close()
    finally:
        await engine_http.aclose()
        await reward_http.aclose()
    t2 = time.monotonic()
    return EvalRun(
        samples=samples,
        num_questions=len(inputs.ids),
        engines=engines,
        judge=judge,
        max_context_len=max_context_len,
        stop_token_ids=inputs.stop_token_ids,
        timings={"load_s": inputs.load_s, "setup_s": round(t1 - t0, 3), "eval_s": round(t2 - t1, 3)},
    )


def run_eval(
    cfg: EvalConfig,
    engine_urls: list[str],
    reward_url: str,
    inputs: Inputs | None = None,
    on_question: Callable[[list[SampleRecord]], None] | None = None,
    keep_responses: bool = True,
) -> EvalRun:
    """`evaluate` on a fresh event loop."""
    return asyncio.run(evaluate(cfg, engine_urls, reward_url, inputs, on_question, keep_responses))
