"""LongTrace's rubric reward as a reward function of other trainers: TRL's GRPOTrainer and verl.

Both adapters score with this service's own code (`Scorer.score_group_request`, the body of POST /v1/score_group:
outcome judge, entity rubric, η, combination rule, group max-normalisation), in-process with a judge (the rule
judge unless `judge=` names another), or with `url=` through a running reward service's POST /v1/score_group.
A judge that fails raises (`JudgeError` in-process, `RemoteRewardError` over HTTP): never a reward of 0.

TRL: `GRPOTrainer(reward_funcs=[trl_reward_func(...)])`. The function gets `prompts`, `completions` (strings, or
chat lists `[{"role": "assistant", "content": ...}]`) and every dataset column as a keyword list:
- `label` (or `answer`): the gold answer, a non-empty string or a number; required.
- `rubrics`: the gold entities, a list of strings (chunk ids for `dataset_name` "longrlvr"); required unless η = 0.
- `question` (optional): what the judge is told was asked; default the prompt (a string prompt, or the last user
  message of a chat prompt).
- `dataset_name` (optional): "longrlvr" selects the chunk F-beta rubric; default "longqa".
The samples of one call with the same prompt (and the same label, rubrics, question and dataset_name) form a
group: the rubric reward is divided by the group's maximum and the combination rule applied, as for a rollout group
on our own stream. TRL may spread one prompt's generations over several processes; a group is what one call holds.

verl: `custom_reward_function.path=<this file>`, `custom_reward_function.name=verl_compute_score`; options through
`custom_reward_function.reward_kwargs` (eta, combination, judge, url, token, timeout_s). Per sample, no group step:
r = the combination rule on r_oc and the raw rubric reward r̂_rb. `extra_info` carries `rubrics` (list or numpy
array), optional `question` (default "") and `dataset_name` (default `data_source`). Returns
{"score", "outcome", "rubric"} (verl logs the keys besides "score").

A chat completion's assistant message without `reasoning_content` whose content holds `</think>` is split there as
a plain string completion is (the thinking is not scanned for rubric entities unless the config says so).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import httpx

from common.logs import warn_once
from reward_service.config import CombinationRule, JudgeConfig, RewardConfig, RuleJudgeConfig
from reward_service.judges import build_judge
from reward_service.rubric import THINK_END, response_mode_turn
from reward_service.schemas import ScoreGroupRequest
from reward_service.scoring import Scorer, gather_or_cancel

__all__ = ["RemoteRewardError", "RubricReward", "trl_reward_func", "verl_compute_score"]

log = logging.getLogger(__name__)
T = TypeVar("T")
LABEL_COLUMNS = ("label", "answer")
VERL_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})


class RemoteRewardError(RuntimeError):
    """The reward service at `url` could not score a group (its judge failed: 502, a bad body: 422, unreachable)."""


class _LoopThread:
    """One event loop on a daemon thread for every synchronous caller, so a judge's HTTP client stays on one loop
    and a caller inside a running loop (or in a worker thread) can still wait for a result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="longtrace-reward-adapter", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


_LOOP = _LoopThread()


class RubricReward:
    """Scores ScoreGroupRequest bodies (JSON objects) in-process or through POST `{url}/v1/score_group`."""

    def __init__(
        self,
        *,
        judge: JudgeConfig | Mapping[str, Any] | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        if url is not None and judge is not None:
            raise ValueError("judge= configures the in-process scorer; with url= the service's own judge decides")
        self.url = url.rstrip("/") if url else None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout_s = timeout_s
        self._http: httpx.AsyncClient | None = None
        self._scorer: Scorer | None = None
        if self.url is None:
            config = RewardConfig.model_validate({"judge": judge if judge is not None else RuleJudgeConfig()})
            self._scorer = Scorer(build_judge(config.judge), config)

    def score_groups(self, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """One ScoreGroupResponse (as a dict) per body, in order; the groups are scored concurrently."""
        return _LOOP.run(gather_or_cancel(self._score(b) for b in bodies))

    async def _score(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._scorer is not None:
            return (await self._scorer.score_group_request(ScoreGroupRequest.model_validate(body))).model_dump()
        if self._http is None:  # created on the adapter's loop, which it then stays on
            self._http = httpx.AsyncClient(timeout=self._timeout_s, headers=self._headers, trust_env=False)
        endpoint = f"{self.url}/v1/score_group"
        try:
            r = await self._http.post(endpoint, json=body)
        except httpx.HTTPError as e:
            raise RemoteRewardError(f"POST {endpoint}: {type(e).__name__}: {e}") from e
        if r.status_code != 200:
            raise RemoteRewardError(f"POST {endpoint} answered {r.status_code}: {r.text[:500]}")
        result: dict[str, Any] = r.json()
        return result


def group_body(
    label: Any,
    info: dict[str, Any],
    samples: list[dict[str, Any]],
    *,
    eta: float | None,
    combination: CombinationRule | None,
    normalize_rubric: bool,
) -> dict[str, Any]:
    """A POST /v1/score_group body; η and the rule left out (None) take the scorer's configured ones."""
    info = dict(info) if eta is None else {**info, "rubric_reward_ratio": eta}
    body: dict[str, Any] = {"label": label, "extra_reward_info": info, "samples": samples}
    body["normalize_rubric"] = normalize_rubric
    if combination is not None:
        body["combination"] = combination
    return body


def completion_sample(completion: Any, where: str) -> dict[str, Any]:
    """A /v1/score_group sample from a completion: a string (response mode) or a list of chat messages (history)."""
    if isinstance(completion, str):
        return {"response": completion}
    if not isinstance(completion, Sequence) or not completion or not all(isinstance(m, Mapping) for m in completion):
        raise TypeError(f"{where}: expected a string or a non-empty list of chat messages, got {completion!r:.200}")
    history: list[dict[str, Any]] = []
    for m in completion:
        role, content, reasoning = m.get("role", "assistant"), m.get("content"), m.get("reasoning_content")
        if role == "assistant" and reasoning is None and isinstance(content, str) and THINK_END in content:
            turn, content = response_mode_turn(content)
            reasoning = turn.reasoning
        msg = {"role": role, "content": content}
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        history.append(msg)
    return {"history": history}


def check_label(label: Any, where: str) -> str | int | float:
    if hasattr(label, "item") and not isinstance(label, str):  # a numpy scalar from a parquet row
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, str | int | float):
        raise ValueError(f"{where}: the label must be a string or a number, got {label!r:.200}")
    if isinstance(label, str) and not label.strip():
        raise ValueError(f"{where}: the label is empty")
    return label


def check_rubrics(rubrics: Any, where: str) -> list[str | int]:
    """The rubrics as a list (a numpy array from a parquet row is accepted); ValueError naming what is wrong."""
    if hasattr(rubrics, "tolist") and not isinstance(rubrics, str | bytes):
        rubrics = rubrics.tolist()
    if isinstance(rubrics, str | bytes) or not isinstance(rubrics, Sequence):
        raise ValueError(f"{where}: rubrics must be a list of strings, got {rubrics!r:.200}")
    bad = [r for r in rubrics if isinstance(r, bool) or not isinstance(r, str | int)]
    if bad:
        raise ValueError(f"{where}: rubrics must be strings (or chunk ids), got {bad[0]!r:.200}")
    return list(rubrics)


def _prompt_text(prompt: Any) -> str:
    """The question a prompt asks: a string prompt itself, or a chat prompt's last user message."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        for m in reversed(prompt):
            if isinstance(m, Mapping) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return str(m["content"])
    raise ValueError(f"no question column and no user message in the prompt {prompt!r:.200}")


def _column(kwargs: Mapping[str, Any], names: Sequence[str], n: int, required: bool) -> list[Any] | None:
    for name in names:
        if name in kwargs:
            values = kwargs[name]
            if values is None or len(values) != n:
                raise ValueError(f"column {name!r}: {n} completions but {values!r:.100} as its values")
            return list(values)
    if required:
        raise ValueError(f"no {' or '.join(map(repr, names))} column among the dataset columns {sorted(kwargs)}")
    return None


def trl_reward_func(
    *,
    eta: float | None = None,
    combination: CombinationRule | None = None,
    normalize_rubric: bool = True,
    judge: JudgeConfig | Mapping[str, Any] | None = None,
    url: str | None = None,
    token: str | None = None,
    timeout_s: float = 600.0,
) -> Callable[..., list[float]]:
    """A reward function for TRL's GRPOTrainer (`f(prompts, completions, **columns) -> list[float]`).

    eta / combination: None uses the scorer's (the in-process defaults: η 0.3, positive_only; with `url` the
    service's). judge: a judge config (e.g. `{"kind": "llm", "base_url": ...}`); the rule judge by default."""
    scorer = RubricReward(judge=judge, url=url, token=token, timeout_s=timeout_s)

    def longtrace_rubric_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        labels = _column(kwargs, LABEL_COLUMNS, n, required=True)
        rubrics = _column(kwargs, ("rubrics",), n, required=eta != 0)
        questions = _column(kwargs, ("question",), n, required=False)
        names = _column(kwargs, ("dataset_name",), n, required=False)
        assert labels is not None
        groups: dict[str, tuple[list[int], dict[str, Any]]] = {}
        for i in range(n):
            where = f"completion {i}"
            info = {
                "question": questions[i] if questions is not None else _prompt_text(prompts[i]),
                "rubrics": check_rubrics(rubrics[i], where) if rubrics is not None else [],
                "dataset_name": names[i] if names is not None else "longqa",
            }
            label = check_label(labels[i], where)
            key = json.dumps([prompts[i], label, info], sort_keys=True, default=str)
            members, _ = groups.setdefault(key, ([], {"label": label, "info": info}))
            members.append(i)
        bodies = [
            group_body(
                g["label"],
                g["info"],
                [completion_sample(completions[i], f"completion {i}") for i in members],
                eta=eta,
                combination=combination,
                normalize_rubric=normalize_rubric,
            )
            for members, g in groups.values()
        ]
        rewards = [0.0] * n
        for (members, _), result in zip(groups.values(), scorer.score_groups(bodies), strict=True):
            for i, r in zip(members, result["rewards"], strict=True):
                rewards[i] = float(r["reward"])
        return rewards

    return longtrace_rubric_reward


_VERL_SCORERS: dict[str, RubricReward] = {}
_VERL_LOCK = threading.Lock()


def verl_compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    *,
    eta: float | None = None,
    combination: CombinationRule | None = None,
    judge: JudgeConfig | Mapping[str, Any] | None = None,
    url: str | None = None,
    token: str | None = None,
    timeout_s: float = 600.0,
    **verl_kwargs: Any,
) -> dict[str, float]:
    """verl's custom reward function: one sample, no group step; {"score", "outcome", "rubric" (raw r̂_rb)}.

    Other keyword arguments verl passes (e.g. `reward_router_address`) are ignored."""
    unknown = sorted(set(verl_kwargs) - VERL_KWARGS)
    if unknown:
        warn_once(log, f"verl_compute_score ignores the keyword arguments {unknown}")
    info = dict(extra_info or {})
    body_info = {
        "question": str(info.get("question") or ""),
        "rubrics": check_rubrics(info.get("rubrics", []) if eta == 0 else _required(info, "rubrics"), "extra_info"),
        "dataset_name": str(info.get("dataset_name") or data_source),
    }
    key = json.dumps([judge, url, token, timeout_s], sort_keys=True, default=str)
    with _VERL_LOCK:  # one scorer (one judge client) per configuration, shared by verl's calls
        scorer = _VERL_SCORERS.get(key)
        if scorer is None:
            scorer = _VERL_SCORERS[key] = RubricReward(judge=judge, url=url, token=token, timeout_s=timeout_s)
    label = check_label(ground_truth, "ground_truth")
    body = group_body(
        label,
        body_info,
        [completion_sample(solution_str, "solution_str")],
        eta=eta,
        combination=combination,
        normalize_rubric=False,
    )
    r = scorer.score_groups([body])[0]["rewards"][0]
    return {"score": float(r["reward"]), "outcome": float(r["outcome_reward"]), "rubric": float(r["rubric_reward"])}


def _required(info: Mapping[str, Any], key: str) -> Any:
    if key not in info:
        raise ValueError(
            f"extra_info[{key!r}] is missing (the rubric reward needs it unless eta=0); has {sorted(info)}"
        )
    return info[key]
