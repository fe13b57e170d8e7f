"""Rule-based outcome judge for offline runs: normalised exact match, containment or token-F1 against the label.
With `answer_marker`, only the words after the marker's last occurrence (a whitespace-separated word, any case)
are the answer.

Answer normalisation (SQuAD-style, with the rubric's tokeniser): accents folded (NFKD, combining marks
dropped), lower-cased, tokens = runs of [a-z0-9_] and single CJK characters, articles a/an/the removed.
A label with no tokens at all (e.g. only punctuation or a non-Latin, non-CJK script) is compared as the
stripped, lower-cased raw strings instead.
"""

from __future__ import annotations

import time
import unicodedata
from collections import Counter

from reward_service.config import RuleJudgeConfig
from reward_service.deadline import INLINE_MAX_CHARS, off_loop
from reward_service.metrics import JUDGE_CALLS, JUDGE_SECONDS
from reward_service.rubric import norm_text

_ARTICLES = frozenset({"a", "an", "the"})


def fold_accents(s: str) -> str:
    """ "Café" -> "Cafe": NFKD, then drop combining marks (ASCII text is returned as is)."""
    if s.isascii():
        return s
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


def _without_articles(text_norm: str) -> str:
    return " ".join(t for t in text_norm.split(" ") if t and t not in _ARTICLES)


def answer_tokens(s: str) -> list[str]:
    return _without_articles(norm_text(fold_accents(s))).split()


def token_f1(pred: list[str], gold: list[str]) -> float:
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def rule_match(config: RuleJudgeConfig, label: str, response: str) -> bool:
    """The rule verdict; pure, so the benchmark's baseline server computes exactly the same outcome."""
    if config.answer_marker:
        words = response.split()
        marker = config.answer_marker.lower()
        last = max((i for i, w in enumerate(words) if w.lower() == marker), default=None)
        if last is None:
            return False  # no final answer given
        response = " ".join(words[last + 1 :])
    gold = answer_tokens(label)
    if not gold:
        return response.strip().lower() == label.strip().lower()
    if config.mode == "contains":
        gold_text = f" {' '.join(gold)} "
        pred_norm = norm_text(fold_accents(response))
        # gold has no articles, so an occurrence in the text with articles survives their removal: skip the
        # removal pass when the answer is there as is
        return gold_text in f" {pred_norm} " or gold_text in f" {_without_articles(pred_norm)} "
    pred = answer_tokens(response)
    if config.mode == "exact":
        return pred == gold
    assert config.mode == "f1", config.mode
    return token_f1(pred, gold) >= config.f1_threshold


class RuleJudge:
    kind = "rule"

    def __init__(self, config: RuleJudgeConfig) -> None:
        self.config = config

    async def judge(self, question: str, label: str, response: str) -> bool:
        start = time.perf_counter()
        # a long answer (normalised in seconds at 64 MB) is matched off the event loop
        verdict = await off_loop(len(response) > INLINE_MAX_CHARS, rule_match, self.config, label, response)
        JUDGE_SECONDS.labels(self.kind).observe(time.perf_counter() - start)
        JUDGE_CALLS.labels(self.kind, "yes" if verdict else "no").inc()
        return verdict

    async def aclose(self) -> None:
        return None
