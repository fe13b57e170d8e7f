"""The reward formulas of METHOD.md §2 on hand-computed cases: normalisation, text assembly, think splitting,
the entity rubric, the longrlvr F-beta, group normalisation, combination rules and ill-formed zeroing."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.schemas import Group, RewardInfo, Sample, Task, TextSplit, pack_ids
from common.text import norm, norm_reference
from reward_service.combine import SampleParts, combine_group, single_reward
from reward_service.config import RewardConfig, RuleJudgeConfig
from reward_service.judges.rule import RuleJudge
from reward_service.rubric import (
    Turn,
    f_beta,
    judged_text,
    last_useful_block,
    norm_in_pieces,
    norm_text,
    predicted_chunks,
    response_mode_turn,
    rubric_fraction,
    rubric_reward,
    scanned_text,
    split_think,
)
from reward_service.schemas import EvaluateRequest, HistoryMessage
from reward_service.scoring import Scorer, prepare_history


class _CountingJudge(RuleJudge):
    """The real rule judge, recording what it was asked."""

    def __init__(self) -> None:
        super().__init__(RuleJudgeConfig(mode="contains"))
        self.calls: list[str] = []

    async def judge(self, question: str, label: str, response: str) -> bool:
        self.calls.append(response)
        return await super().judge(question, label, response)


def _evaluate(body: dict[str, Any], judge: _CountingJudge | None = None) -> tuple[float, float, float]:
    scorer = Scorer(judge or _CountingJudge(), RewardConfig())
    r = asyncio.run(scorer.evaluate(EvaluateRequest.model_validate(body)))
    return r.reward, r.outcome_reward, r.rubric_reward


def _info(rubrics: list[str | int], **kw: object) -> dict[str, Any]:
    return {"question": "q?", "rubrics": rubrics, "dataset_name": "longqa", "rubric_reward_ratio": 0.3, **kw}


def test_norm_unicode_cjk_and_accents() -> None:
    """Guards against a normaliser that keeps accented letters, splits CJK runs wrongly or keeps punctuation:
    the reference keeps only [a-zA-Z0-9_] runs and single CJK characters."""
    assert norm("  Café Zürich!  ") == "caf z rich"
    assert norm("Lady-Gaga's 2nd_album") == "lady gaga s 2nd_album"
    assert norm("北京大学Peking Univ.") == "北 京 大 学 peking univ"
    assert norm("\u212a") == "k"  # the Kelvin sign lower-cases to ASCII k
    assert norm("éàü") == ""
    assert norm("") == ""


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.text(alphabet="aZ09_ -.,\n\té北", max_size=60))
def test_fast_norm_equals_reference(s: str) -> None:
    """Guards against the ASCII fast path of norm() drifting from the reference regex on any input."""
    assert norm(s) == norm_reference(s)


def test_rubric_substring_without_word_boundaries_and_accents() -> None:
    """Guards against word-boundary matching or accent folding: the reference is a plain substring test on
    normalised text, so "Gaga" hits "lagagaville", "Beyoncé" (norm "beyonc") hits "Beyonce", and a rubric
    that normalises to "" hits everything."""
    turns = [Turn(content="Lagagaville honours Beyonce.")]
    assert rubric_reward(turns, ["Gaga"], "longqa", False, True) == 1.0
    assert rubric_reward(turns, ["Beyoncé", "Rihanna"], "longqa", False, True) == 0.5
    assert rubric_reward(turns, ["é", "!!", "Madonna"], "longqa", False, True) == pytest.approx(2 / 3)
    assert rubric_reward([Turn(content="北京大学 is old")], ["北京", "大学", "京大", "清华"], "x", False, True) == 0.75


def test_empty_rubrics_score_zero() -> None:
    """Guards against a division by zero or a reward of 1 when a sample has no gold entities."""
    assert rubric_reward([Turn(content="anything")], [], "longqa", True, True) == 0.0
    assert rubric_reward([Turn(content="<useful_chunks><CHUNK_1></useful_chunks>")], [], "longrlvr", True, True) == 0.0


def test_scanned_text_reasoning_vs_content_flags() -> None:
    """Guards against scanning the thinking when only the answer should be (the paper's recipe) or the reverse."""
    turns = [Turn(reasoning="  Alpha \n", content=" Beta "), Turn(content="Gamma")]
    assert scanned_text(turns, use_reasoning=False, use_content=True) == "\n\nBeta\n\nGamma"
    assert scanned_text(turns, use_reasoning=True, use_content=True) == "\n\nAlpha\n\nBeta\n\nGamma"
    assert scanned_text(turns, use_reasoning=True, use_content=False) == "\n\nAlpha"
    rubrics = ["Alpha", "Beta", "Gamma", "Delta"]
    assert rubric_reward(turns, rubrics, "longqa", False, True) == 0.5
    assert rubric_reward(turns, rubrics, "longqa", True, True) == 0.75
    assert rubric_reward(turns, rubrics, "longqa", True, False) == 0.25
    assert rubric_reward(turns, rubrics, "longqa", False, False) == 0.0


def test_think_splitting_none_one_two() -> None:
    """Guards against splitting at the wrong </think>: response mode splits at the FIRST (reference server),
    the judge reads after the LAST, the message processor rsplits at the last."""
    assert response_mode_turn("no think here") == (Turn(content="no think here"), "no think here")
    assert response_mode_turn("<think>\nR\n</think>\n\nA ") == (Turn(reasoning="R", content="A"), "A")
    two = "<think>think about Alpha</think>Beta draft</think>\n\nGamma answer"
    turn, answer = response_mode_turn(two)
    assert turn == Turn(reasoning="think about Alpha", content="Beta draft</think>\n\nGamma answer")
    assert judged_text(answer) == "Gamma answer"
    assert judged_text("  no think  ") == "  no think  "
    assert judged_text("a</think>  ") == ""
    assert split_think("R\n</think>\n\nA") == ("R", "A")
    assert split_think(two) == ("<think>think about Alpha</think>Beta draft", "Gamma answer")
    assert split_think("no end tag") == ("no end tag", "")


def test_evaluate_two_think_tags_response_mode() -> None:
    """Guards against the two-</think> case: the rubric scans everything after the first </think> (content)
    while the judge sees only the text after the last one."""
    judge = _CountingJudge()
    body: dict[str, Any] = {
        "label": "Gamma answer",
        "extra_reward_info": _info(["Alpha", "Beta", "Gamma"], rubric_use_content=True),
        "response": "<think>think about Alpha</think>Beta draft</think>\n\nGamma answer",
    }
    reward, outcome, rubric = _evaluate(body, judge)
    assert judge.calls == ["Gamma answer"]
    assert outcome == 1.0 and rubric == pytest.approx(2 / 3)
    assert reward == pytest.approx(0.7 + 0.3 * 2 / 3)
    body["extra_reward_info"] = _info(["Alpha", "Beta", "Gamma"], rubric_use_reasoning_content=True)
    assert _evaluate(body)[2] == 1.0


def test_evaluate_no_think_tag_judges_whole_response() -> None:
    """Guards against dropping a response without </think>: it is content as a whole and judged as is."""
    judge = _CountingJudge()
    body: dict[str, Any] = {
        "label": "Paris",
        "extra_reward_info": _info(["France"]),
        "response": "France's capital: Paris",
    }
    assert _evaluate(body, judge) == pytest.approx((1.0, 1.0, 1.0))
    assert judge.calls == ["France's capital: Paris"]


def test_evaluate_empty_answer_scores_zero_without_judge() -> None:
    """Guards against asking the judge about an empty answer (the reference returns 0 for it)."""
    judge = _CountingJudge()
    body: dict[str, Any] = {
        "label": "Paris",
        "extra_reward_info": _info(["Paris"]),
        "response": "<think>Paris</think>   ",
    }
    assert _evaluate(body, judge) == (0.0, 0.0, 0.0)
    assert judge.calls == []


def test_history_mode_reads_all_assistant_turns_and_judges_the_last() -> None:
    """Guards against history mode judging the wrong message, scanning user turns, or scoring a history whose
    last message is not an assistant answer (the reference returns zeros for that)."""
    judge = _CountingJudge()
    history = [
        {"role": "user", "content": "Docs about Alpha, Beta, Gamma and Delta. Question?"},
        {"role": "assistant", "reasoning_content": "Alpha leads to Beta", "content": "Beta, then"},
        {"role": "tool", "content": [{"type": "text", "text": "Delta"}]},
        {"role": "assistant", "content": "Gamma is the answer", "ill_formed_reasons": []},
    ]
    body: dict[str, Any] = {
        "label": "Gamma",
        "extra_reward_info": _info(["Alpha", "Beta", "Gamma", "Delta"]),
        "history": history,
    }
    reward, outcome, rubric = _evaluate(body, judge)
    assert judge.calls == ["Gamma is the answer"]
    assert (outcome, rubric) == (1.0, 0.5)
    assert reward == pytest.approx(0.7 + 0.15)
    body["extra_reward_info"] = _info(["Alpha", "Beta", "Gamma", "Delta"], rubric_use_reasoning_content=True)
    assert _evaluate(body)[2] == 0.75
    for last in ({"role": "user", "content": "Gamma"}, {"role": "assistant", "reasoning_content": "Gamma"}):
        body["history"] = history + [last]
        assert _evaluate(body) == (0.0, 0.0, 0.0)
    prepared = prepare_history([HistoryMessage(role="assistant", content=None)])
    assert prepared.answer is None


def test_eta_zero_skips_rubric_and_eta_one_skips_judge() -> None:
    """Guards against computing (or requiring) parts the ratio switches off: evaluation sets use η=0."""
    judge = _CountingJudge()
    body: dict[str, Any] = {
        "label": "Paris",
        "extra_reward_info": _info(["Paris"], rubric_reward_ratio=0.0),
        "response": "Paris",
    }
    assert _evaluate(body, judge) == (1.0, 1.0, 0.0)
    info = {"rubrics": ["Paris", "Rome"], "rubric_reward_ratio": 1.0}  # no question needed without a judge
    assert _evaluate({"label": "Paris", "extra_reward_info": info, "response": "Paris"}, judge) == (0.5, 0.0, 0.5)
    assert len(judge.calls) == 1


def test_f_beta_hand_computed() -> None:
    """Guards against the F-beta formula (beta=2) or its empty-set conventions drifting from the reference."""
    assert f_beta({1, 2, 3}, {2, 3, 4, 5}) == pytest.approx(10 / 19)  # P=2/3, R=1/2: 5PR/(4P+R)
    assert f_beta(set(), {1, 2}) == 0.0
    assert f_beta({1, 2}, set()) == 0.0
    assert f_beta(set(), set()) == 0.0
    assert f_beta({7}, {7}) == 1.0


def test_longrlvr_last_block_only_and_combined_formula() -> None:
    """Guards against reading chunk ids outside the LAST <useful_chunks> block, missing an id spelling, or the
    longrlvr reward r_ans + η·F + (1−η)·r_ans·F."""
    text = (
        "<useful_chunks><CHUNK_9></useful_chunks> later: <USEFUL_CHUNKS>\n<CHUNK_1> <chunk 2>\n<CHUNK3> <CHUNK-4>"
        "</useful_chunks> <CHUNK_5>"
    )
    assert predicted_chunks(text) == {1, 2, 3}
    assert predicted_chunks("no block <CHUNK_1>") == set()
    f = rubric_reward([Turn(content=text)], [2, "3", 4, 5], "longrlvr", False, True)
    assert f == pytest.approx(10 / 19)
    assert single_reward(1.0, f, 0.3, "longrlvr") == pytest.approx(1 + f)
    assert single_reward(0.0, f, 0.3, "longrlvr") == pytest.approx(0.3 * f)
    with pytest.raises(ValueError, match="chunk ids"):
        rubric_reward([Turn(content=text)], ["two"], "longrlvr", False, True)


# The reference's scan, verbatim (quadratic on unclosed opening tags): the linear scan must agree with it.
_REFERENCE_USEFUL_RE = re.compile(r"<useful_chunks>(.*?)</useful_chunks>", re.DOTALL | re.IGNORECASE)
_REFERENCE_CHUNK_RE = re.compile(r"<CHUNK[_\s]?(\d+)>", re.IGNORECASE)


def _reference_block(text: str) -> str | None:
    blocks = _REFERENCE_USEFUL_RE.findall(text)
    return blocks[-1] if blocks else None


def _reference_chunks(text: str) -> set[int]:
    block = _reference_block(text)
    return set() if block is None else {int(x) for x in _REFERENCE_CHUNK_RE.findall(block)}


# Tag spellings (case, the long s and the Kelvin sign that IGNORECASE folds to s and k, broken halves) and chunk ids.
_TAG_PIECES = st.sampled_from(
    ["<useful_chunks>", "</useful_chunks>", "<USEFUL_CHUNKS>", "</Useful_Chunks>", "<u\u017feful_chun\u212as>",
     "</useful_chunk\u017f>", "<useful_chunks", "/useful_chunks>", "<", "</", ">", "<CHUNK_1>", "<chunk 22>",
     "<CHUNK3>", "<CHUNK-4>", "<chunk\n5>", "<CHUNK_", "x", " ", "\n", "\u0130", "\u4e2d"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(_TAG_PIECES | st.text(max_size=4), max_size=40).map("".join))
def test_useful_chunks_scan_equals_the_reference_regex(text: str) -> None:
    """Guards against the linear <useful_chunks> scan drifting from the reference's regex (findall with DOTALL
    and IGNORECASE, last block) on any input: pairing, unclosed tags, case folding, nesting."""
    assert last_useful_block(text) == _reference_block(text)
    assert predicted_chunks(text) == _reference_chunks(text)


def test_useful_chunks_scan_is_linear() -> None:
    """Guards against defect 5 (issue 19): the reference regex scans to the end from every unclosed opening tag,
    1.6 s at 60 KB and minutes at 1 MB, blocking the reward service; the scan must stay linear."""
    for copies in (8_000, 70_000):  # 120 KB, then 1 MB of opening tags after one closed block
        text = "<useful_chunks><CHUNK_1></useful_chunks>" + "<useful_chunks>" * copies
        start = time.perf_counter()
        assert predicted_chunks(text) == {1}
        assert time.perf_counter() - start < 1.0, copies


_NORM_ALPHABET = "aZ09_ -.,\n\t\u00e9\u4e2d\u03a3\u0130\u212a\u017f\u00a0"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_NORM_ALPHABET, max_size=80), st.integers(min_value=1, max_value=9))
def test_norm_in_pieces_equals_norm(s: str, piece_chars: int) -> None:
    """Guards against the piecewise norm of long texts (short C calls, so a scoring thread yields the GIL to
    the event loop) giving other tokens than norm() of the whole: a split inside a token, a context-sensitive
    lower-casing (final sigma, dotted I, Kelvin sign) or a lost separator."""
    assert norm_in_pieces(s, piece_chars) == norm(s)


def test_norm_text_of_a_long_text_is_norm() -> None:
    """Guards against the cached norm of a text longer than one piece differing from norm()."""
    text = ("Alpha-beta \u4e2d\u6587 Caf\u00e9 " * 100_000) + "tail"
    assert norm_text(text) == norm(text)


def test_rubric_fraction_stops_at_its_deadline() -> None:
    """Guards against CPU-heavy rubric scoring (many rubrics over a long text) running on after the request's
    deadline: the scan checks the deadline and raises TimeoutError."""
    with pytest.raises(TimeoutError):
        rubric_fraction("a b c", ["x"] * 100, deadline_s=time.monotonic() - 1)
    assert rubric_fraction("a b c", ["b", "x"], deadline_s=time.monotonic() + 60) == 0.5


def _parts(outcomes: list[float], raws: list[float]) -> list[SampleParts]:
    return [SampleParts(outcome=o, raw_rubric=r) for o, r in zip(outcomes, raws, strict=True)]


def test_combination_rules_with_group_normalisation() -> None:
    """Guards against each combination rule's formula, and against normalising by anything but the group max."""
    parts = _parts([1, 0, 1, 0], [0.5, 0.25, 0.0, 0.0])
    rules = {
        "positive_only": [1.0, 0.0, 0.7, 0.0],
        "negative_only": [1.0, 0.15, 1.0, 0.0],
        "both": [1.0, 0.15, 0.7, 0.0],
    }
    for rule, expected in rules.items():
        out = combine_group(parts, 0.3, rule, "longqa")  # type: ignore[arg-type]
        assert [r.reward for r in out] == pytest.approx(expected), rule
        assert [r.rubric_reward for r in out] == [1.0, 0.5, 0.0, 0.0]
        assert [r.raw_rubric_reward for r in out] == [0.5, 0.25, 0.0, 0.0]
    raw = combine_group(parts, 0.3, "positive_only", "longqa", normalize=False)
    assert [r.reward for r in raw] == pytest.approx([0.85, 0.0, 0.7, 0.0])


def test_group_normalisation_when_max_is_zero() -> None:
    """Guards against dividing by a zero maximum (NaN rewards) when no sample hits any rubric."""
    out = combine_group(_parts([1, 0, 1], [0.0, 0.0, 0.0]), 0.3, "positive_only", "longqa")
    assert [r.reward for r in out] == pytest.approx([0.7, 0.0, 0.7])
    assert [r.rubric_reward for r in out] == [0.0, 0.0, 0.0]


def test_longrlvr_group_uses_its_formula_whatever_the_rule() -> None:
    """Guards against applying positive-only to longrlvr groups (slime uses the paper formula for them)."""
    out = combine_group(_parts([0, 1], [0.4, 0.8]), 0.3, "positive_only", "longrlvr")
    assert [r.reward for r in out] == pytest.approx([0.3 * 0.5, 1 + 1.0])


def _sample(content: str, **kw: object) -> Sample:
    text = f"R\n</think>\n\n{content}<|im_end|>"
    fields: dict[str, object] = {
        "response_ids": pack_ids([1, 2]),
        "logprobs": b"",
        "text": text,
        "finish_reason": "stop",
        "status": "completed",
        "split": TextSplit.of(text, "R", content),  # the reasoning and content a processor would split off
    }
    fields.update(kw)
    return Sample(**fields)  # type: ignore[arg-type]


def _group(samples: list[Sample]) -> Group:
    info = RewardInfo(question="Who?", rubrics=["Alpha", "Beta"], dataset_name="longqa")
    task = Task(run_id="r", group_id="g1", dataset_index=0, prompt_ids=pack_ids([1]), label="Beta", reward_info=info,
                policy_version=0)  # fmt: skip
    return Group(task=task, samples=samples)


def test_ill_formed_truncated_unfinished_are_zeroed_without_judging() -> None:
    """Guards against judging (or rewarding) samples the rollout marked bad in training mode, and against
    dropping them from the group maximum; in evaluation mode they are scored."""
    samples = [
        _sample("Alpha then Beta"),
        _sample("Beta", status="truncated", finish_reason="length"),
        _sample("Alpha Beta", ill_formed=True),
        _sample("Alpha Beta", task_unfinished=True),
        _sample("Beta", status="aborted", finish_reason="abort"),
        _sample("Alpha only"),
    ]
    judge = _CountingJudge()
    rewards = asyncio.run(Scorer(judge, RewardConfig()).score_group(_group(samples)))
    assert judge.calls == ["Alpha then Beta", "Alpha only"]
    assert [r.zeroed_reason for r in rewards] == ["", "truncated", "ill_formed", "task_unfinished", "aborted", ""]
    assert [r.reward for r in rewards] == pytest.approx([1.0, 0, 0, 0, 0, 0])
    assert [r.rubric_reward for r in rewards] == [1.0, 0, 0, 0, 0, 0.5]
    judge = _CountingJudge()
    rewards = asyncio.run(Scorer(judge, RewardConfig()).score_group(_group(samples), evaluation=True))
    assert len(judge.calls) == 4  # ill-formed and unfinished are judged; truncated/aborted have no answer
    assert [r.reward for r in rewards] == pytest.approx([1.0, 0, 1.0, 1.0, 0, 0])
