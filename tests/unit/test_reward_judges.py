"""Rule judge modes, LLM verdict parsing and the reward config: the offline parts of the outcome judge."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from reward_service.config import LlmJudgeConfig, RewardConfig, RuleJudgeConfig
from reward_service.judges.llm import judge_prompt, parse_verdict
from reward_service.judges.rule import RuleJudge, answer_tokens, rule_match, token_f1


def test_rule_normalisation_folds_accents_and_drops_articles() -> None:
    """Guards against "Café" failing to match "cafe" or "The Beatles" failing to match "Beatles"."""
    assert answer_tokens("The Café, Zürich!") == ["cafe", "zurich"]
    assert answer_tokens("an 北京 apple") == ["北", "京", "apple"]


def test_rule_judge_of_a_long_answer_gives_the_inline_verdict() -> None:
    """Guards against the scoring-thread path of the rule judge (answers over INLINE_MAX_CHARS, matched off the
    event loop) giving another verdict than the inline path, or failing to run."""
    judge = RuleJudge(RuleJudgeConfig(mode="contains"))
    long_yes, long_no = "filler words " * 20_000 + "the Gulf of Tonkin", "filler words " * 20_000

    async def verdicts() -> list[bool]:
        return [await judge.judge("q", "Gulf of Tonkin", a) for a in (long_yes, long_no, "Gulf of Tonkin")]

    assert asyncio.run(verdicts()) == [True, False, True]


def test_rule_modes() -> None:
    """Guards against each rule mode's semantics: exact needs equal tokens, contains a contiguous token run
    (not a substring of a longer word), f1 a token-F1 threshold."""
    exact, contains = RuleJudgeConfig(mode="exact"), RuleJudgeConfig(mode="contains")
    f1 = RuleJudgeConfig(mode="f1", f1_threshold=0.6)
    assert rule_match(exact, "Gulf of Tonkin", "the gulf of tonkin.")
    assert not rule_match(exact, "Gulf of Tonkin", "It is the Gulf of Tonkin")
    assert rule_match(contains, "Gulf of Tonkin", "It is the Gulf of Tonkin Resolution")
    assert rule_match(contains, "Gulf of Tonkin", "the gulf of the tonkin")  # articles dropped on both sides
    assert not rule_match(contains, "nucleus", "the nucleolus")
    assert not rule_match(contains, "EC 6", "EC 60")
    assert token_f1(["gulf", "tonkin"], ["gulf", "of", "tonkin"]) == pytest.approx(0.8)
    assert rule_match(f1, "Gulf of Tonkin", "gulf tonkin")
    assert not rule_match(f1, "Gulf of Tonkin", "gulf of mexico region")
    assert rule_match(contains, "!!!", " !!! ")  # no tokens: raw comparison
    assert not rule_match(contains, "!!!", "!!")


@pytest.mark.parametrize(
    ("response", "verdict"),
    [
        ("E17 E42 answer C07", True),  # the chain, then the final answer
        ("E17 E42 Answer c07", True),  # any case
        ("E17 E42 C07", False),  # no final answer given
        ("E17 E42 answer C07 C03", False),  # a list of candidates
        ("answer C03 answer C07", True),  # the last final answer counts
        ("answer C07 answer C03", False),
        ("E17 answer", False),  # an empty final answer
        ("C07 answered C07", False),  # the marker is a whole word
    ],
)
def test_answer_marker_judges_only_the_final_answer(response: str, verdict: bool) -> None:
    """Guards the demo's strict grading: without a marker the rule judge cannot tell the answer from the chain the
    response restates, so F1 accepted lists of cities (a hedger listing every city in the context passed)."""
    cfg = RuleJudgeConfig(mode="exact", answer_marker="answer")
    assert rule_match(cfg, "C07", response) is verdict
    with pytest.raises(ValueError, match="one word"):
        RuleJudgeConfig(answer_marker="final answer")


def test_parse_verdict_reference_regexes() -> None:
    """Guards against verdict parsing drifting from the reference: both fields required, markdown bold and
    any case accepted; a garbled reply is None (re-asked), never False."""
    assert parse_verdict("extracted_final_answer: Paris\nreasoning: same\ncorrect: yes") is True
    assert parse_verdict("**extracted_final_answer**: None\n**correct**: No") is False
    assert parse_verdict("Extracted_Final_Answer : x\nCORRECT:YES") is True
    assert parse_verdict("correct: yes") is None
    assert parse_verdict("extracted_final_answer: Paris") is None
    assert parse_verdict("I think it is right.") is None
    prompt = judge_prompt("Q?", "Paris", "It is Paris")
    assert "[question]: Q?" in prompt and "[correct_answer]: Paris" in prompt and "[response]: It is Paris" in prompt


def test_reward_config_judge_union_and_errors(tmp_path: Path) -> None:
    """Guards against the judge backend not switching with `--judge.kind`, unknown keys being accepted, or
    an out-of-range η."""
    cfg = load_config(RewardConfig, None, ["--judge.kind", "llm", "--judge.base_url", "http://j:1/v1", "--eta", "0.5"])
    assert isinstance(cfg.judge, LlmJudgeConfig) and cfg.judge.base_url == "http://j:1/v1" and cfg.eta == 0.5
    assert isinstance(RewardConfig().judge, RuleJudgeConfig) and RewardConfig().host == "127.0.0.1"
    toml = tmp_path / "reward.toml"
    toml.write_text('combination = "both"\n[judge]\nkind = "rule"\nmode = "f1"\n[worker]\nconcurrency = 4\n')
    cfg = load_config(RewardConfig, toml, ["--worker.batch_size", "2"])
    assert cfg.combination == "both" and cfg.worker.concurrency == 4 and cfg.worker.batch_size == 2
    with pytest.raises(ConfigError, match="judge"):
        load_config(RewardConfig, None, ["--judge.base_url", "http://x"])  # rule judge has no base_url
    with pytest.raises(ConfigError, match="--eta"):
        load_config(RewardConfig, None, ["--eta", "1.5"])
    with pytest.raises(ConfigError, match="--combination"):
        load_config(RewardConfig, None, ["--combination", "positive"])


def test_auth_token_env_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against a service configured for auth silently running open when its token variable is unset."""
    cfg = load_config(RewardConfig, None, ["--auth_token_env", "LT_TEST_REWARD_TOKEN"])
    monkeypatch.delenv("LT_TEST_REWARD_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="LT_TEST_REWARD_TOKEN"):
        cfg.auth_token()
    monkeypatch.setenv("LT_TEST_REWARD_TOKEN", "s3cret")
    assert cfg.auth_token() == "s3cret"
    assert RewardConfig().auth_token() is None
