"""The TRL and verl reward adapters, called as those trainers call them: TRL's GRPOTrainer passes `prompts`,
`completions` and every dataset column as keyword lists; verl's reward manager passes `data_source`,
`solution_str`, `ground_truth`, `extra_info` (plus its own keywords). No trainer is installed; the HTTP path runs
against a real `longtrace reward serve` process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.net import free_port
from reward_service.adapters import RemoteRewardError, trl_reward_func, verl_compute_score
from reward_service.judges import JudgeError
from tests.helpers.reward_server import reward_server

ETA = 0.3
RUBRICS = ["Eiffel Tower", "Seine", "Louvre", "Montmartre"]


def _dead_llm_judge() -> dict[str, Any]:
    """An LLM judge config whose API is a closed port, tried once: every verdict fails."""
    return {"kind": "llm", "base_url": f"http://127.0.0.1:{free_port()}/v1", "retry": {"max_attempts": 1}}


def _group() -> tuple[list[str], list[str]]:
    """One prompt, four samples: only the first answers right (with 2 of 4 rubric entities); the third is wrong
    but names all four entities, so it holds the group's rubric maximum."""
    completions = [
        "<think>The tower by the Seine</think>It is Paris, near the Eiffel Tower and the Seine.",
        "<think>hmm</think>London.",
        "<think>Eiffel Tower, Seine, Louvre, Montmartre</think>Lyon: Eiffel Tower, Seine, Louvre, Montmartre.",
        "Berlin",
    ]
    return ["Which city? (documents ...)"] * 4, completions


def test_trl_group_is_positive_only_with_the_group_max_normalised_rubric() -> None:
    """Guards against the adapter computing a per-sample reward (no group step) or the linear one: with the paper's
    positive_only rule the right sample gets (1-η)·1 + η·r_rb with r_rb divided by the group's maximum (here held
    by a wrong sample), and wrong samples get 0 whatever their rubric hits."""
    prompts, completions = _group()
    reward = trl_reward_func(eta=ETA, combination="positive_only")
    out = reward(prompts=prompts, completions=completions, label=["Paris"] * 4, rubrics=[RUBRICS] * 4)
    assert out == pytest.approx([(1 - ETA) * 1 + ETA * (2 / 4) / (4 / 4), 0.0, 0.0, 0.0])

    # without the all-entities wrong sample the right one holds the maximum: r_rb = 0.5 / 0.5 = 1, visible in
    # the reward (a raw r̂_rb would give 0.85)
    out = reward(prompts=prompts[:2], completions=completions[:2], label=["Paris"] * 2, rubrics=[RUBRICS] * 2)
    assert out == pytest.approx([(1 - ETA) * 1 + ETA * 1.0, 0.0])


def test_trl_groups_are_per_prompt_and_chat_completions_score_as_strings() -> None:
    """Guards against normalising over the whole batch instead of per prompt, and against chat-format completions
    being scored differently from the same text as a string (e.g. the thinking inside the content scanned for
    rubric entities, or the judge reading it). Prompts in chat form, `answer` as the label column, interleaved
    the way TRL never orders them, and the extra keywords TRL passes are ignored."""
    _, completions = _group()
    reward = trl_reward_func(eta=ETA)
    assert reward.__name__ == "longtrace_rubric_reward"  # TRL logs each reward function under its __name__
    chat = [[{"role": "assistant", "content": c}] for c in completions]
    p1 = [{"role": "user", "content": "Which city? (documents ...)"}]
    p2 = [{"role": "user", "content": "Another question"}]
    # prompt 2's samples: the first right with only the Seine (1/4); alone in its group it is normalised to 1
    p2_right = [{"role": "assistant", "content": "<think>Eiffel Tower, Louvre</think>Paris, on the Seine."}]
    prompts = [p1, p2, p1, p1, p2, p1]
    completions_mixed = [chat[0], p2_right, chat[1], chat[2], chat[3], chat[3]]
    out = reward(
        prompts=prompts,
        completions=completions_mixed,
        answer=["Paris"] * 6,
        rubrics=[RUBRICS] * 6,
        completion_ids=[[1, 2]] * 6,
        trainer_state=None,
    )
    right_p1 = (1 - ETA) + ETA * (2 / 4) / (4 / 4)
    assert out == pytest.approx([right_p1, (1 - ETA) + ETA * 1.0, 0.0, 0.0, 0.0, 0.0])
    as_strings = reward(prompts=[p1] * 4, completions=completions, answer=["Paris"] * 4, rubrics=[RUBRICS] * 4)
    as_chat = reward(prompts=[p1] * 4, completions=chat, answer=["Paris"] * 4, rubrics=[RUBRICS] * 4)
    assert as_chat == as_strings


def test_trl_missing_or_ill_formed_columns_are_clear_errors() -> None:
    """Guards against a dataset without the expected columns silently training on rewards of 0 (a KeyError deep in
    the scorer, or no rubric at all): each mistake is an error naming the column or the sample."""
    prompts, completions = _group()
    reward = trl_reward_func(eta=ETA)
    with pytest.raises(ValueError, match=r"no 'label' or 'answer' column among the dataset columns \['rubrics'\]"):
        reward(prompts=prompts, completions=completions, rubrics=[RUBRICS] * 4)
    with pytest.raises(ValueError, match="completion 1: the label must be a string or a number, got None"):
        reward(prompts=prompts, completions=completions, label=["Paris", None, "Paris", "Paris"], rubrics=[RUBRICS] * 4)
    with pytest.raises(ValueError, match="completion 0: the label is empty"):
        reward(prompts=prompts, completions=completions, label=[" "] * 4, rubrics=[RUBRICS] * 4)
    with pytest.raises(ValueError, match="no 'rubrics' column"):
        reward(prompts=prompts, completions=completions, label=["Paris"] * 4)
    with pytest.raises(ValueError, match="completion 0: rubrics must be a list of strings"):
        reward(prompts=prompts, completions=completions, label=["Paris"] * 4, rubrics=['["Seine"]'] * 4)
    with pytest.raises(TypeError, match="completion 2: expected a string or a non-empty list of chat messages"):
        reward(prompts=prompts, completions=[*completions[:2], {"text": "x"}, "y"], label=["P"] * 4, rubrics=[[]] * 4)
    # eta = 0: the rubric is not computed, so no rubrics column is needed
    assert trl_reward_func(eta=0)(prompts=prompts, completions=completions, label=["Paris"] * 4) == [1.0, 0, 0, 0]


def test_a_failing_judge_raises_instead_of_scoring_zero() -> None:
    """Guards against a judge outage turning into rewards of 0 (which trains the policy on a dead API): the
    in-process LLM judge's error reaches the trainer, for TRL and for verl."""
    prompts, completions = _group()
    reward = trl_reward_func(eta=ETA, judge=_dead_llm_judge())
    with pytest.raises(JudgeError, match="judge API failed"):
        reward(prompts=prompts, completions=completions, label=["Paris"] * 4, rubrics=[RUBRICS] * 4)
    with pytest.raises(JudgeError):
        verl_compute_score("longqa", completions[0], "Paris", {"rubrics": RUBRICS}, judge=_dead_llm_judge())


def test_verl_scores_one_sample_without_a_group_step() -> None:
    """Guards against verl's per-sample call being normalised as a group of one (any rubric hit would become
    r_rb = 1) or the linear reward giving wrong answers credit: score = positive_only on r_oc and the raw r̂_rb.
    Rubrics arrive as a numpy array (a parquet row's list), the label as a numpy string, and the reward-loop
    keywords verl passes are accepted."""
    _, completions = _group()
    extra = {"rubrics": np.array(RUBRICS, dtype=object), "question": "Which city?"}
    right = verl_compute_score("longqa", completions[0], np.str_("Paris"), extra, eta=ETA, reward_router_address=None)
    assert right == pytest.approx({"score": (1 - ETA) + ETA * 0.5, "outcome": 1.0, "rubric": 0.5})
    wrong = verl_compute_score(
        data_source="longqa", solution_str=completions[2], ground_truth="Paris", extra_info=extra
    )
    assert wrong == {"score": 0.0, "outcome": 0.0, "rubric": 1.0}
    with pytest.raises(ValueError, match=r"extra_info\['rubrics'\] is missing"):
        verl_compute_score("longqa", completions[0], "Paris", {"question": "Which city?"})
    with pytest.raises(ValueError, match="ground_truth: the label is empty"):
        verl_compute_score("longqa", completions[0], "", extra)
    assert verl_compute_score("longqa", completions[0], "Paris", None, eta=0)["score"] == 1.0


def test_the_http_path_scores_as_in_process_and_a_judge_failure_raises(tmp_path: Path) -> None:
    """Guards against the url= path drifting from the in-process one (another endpoint, body or defaults) and
    against a 502 from the service's failing judge becoming a reward: a real `longtrace reward serve`."""
    prompts, completions = _group()
    cols: dict[str, Any] = {"label": ["Paris"] * 4, "rubrics": [RUBRICS] * 4}
    extra = {"rubrics": RUBRICS}
    with reward_server(tmp_path / "serve.log") as url:
        remote = trl_reward_func(eta=ETA, url=url, timeout_s=30)(prompts=prompts, completions=completions, **cols)
        remote_verl = verl_compute_score("longqa", completions[0], "Paris", extra, url=url, timeout_s=30)
    assert remote == pytest.approx(trl_reward_func(eta=ETA)(prompts=prompts, completions=completions, **cols))
    assert remote_verl == pytest.approx(verl_compute_score("longqa", completions[0], "Paris", extra))
    judge = _dead_llm_judge()
    flags = ("--judge.kind", "llm", "--judge.base_url", judge["base_url"], "--judge.retry.max_attempts", "1")
    with reward_server(tmp_path / "dead-judge.log", *flags) as url:
        with pytest.raises(RemoteRewardError, match="answered 502: .*judge failed"):
            trl_reward_func(url=url, timeout_s=30)(prompts=prompts, completions=completions, **cols)
