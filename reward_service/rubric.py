"""The entity rubric reward and the text it reads, exactly as the LongTraceRL reference computes them (METHOD.md §2).

- `norm(s)`: lower-case, keep runs of ASCII word characters and single CJK characters, join with spaces
  (accented letters are dropped: "é" is not in [a-zA-Z]).
- rubric reward = fraction of rubrics whose norm is a substring of norm(text) (no word boundaries; 0 when
  there are no rubrics).
- `longrlvr`: F-beta (beta=2) of the chunk ids in the last <useful_chunks> block against the gold ids.
- The scanned text is "\\n\\n" + turn.strip() of each assistant turn's reasoning and/or content.

Speed: the text is normalised once per response (an ASCII fast path with the same result, shared with
the rule judge through a small cache), each rubric once per process (cached).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.text import norm

THINK_END = "</think>"
THINK_START = "<think>"
LONGRLVR = "longrlvr"
F_BETA = 2.0

_USEFUL_RE = re.compile(r"<useful_chunks>(.*?)</useful_chunks>", re.DOTALL | re.IGNORECASE)
_CHUNK_RE = re.compile(r"<CHUNK[_\s]?(\d+)>", re.IGNORECASE)


@functools.lru_cache(maxsize=64)
def norm_text(text: str) -> str:
    """norm() of a response text, cached for the few requests in flight: the rubric and the rule judge of one
    request read the same answer string (the lookup hashes the string once; a hit on the same object is free)."""
    return norm(text)


@functools.lru_cache(maxsize=1 << 16)
def norm_rubric(rubric: str) -> str:
    """norm() of a rubric entity; rubrics repeat across the samples of a group and across epochs."""
    return norm(rubric)


@dataclass(frozen=True, slots=True)
class Turn:
    """One assistant message: its reasoning (thinking) and content (answer); None where the message lacks the key."""

    reasoning: str | None = None
    content: str | None = None


def scanned_text(turns: Iterable[Turn], use_reasoning: bool, use_content: bool) -> str:
    """The text the rubric scans: per assistant turn, "\\n\\n"+reasoning.strip() then "\\n\\n"+content.strip()."""
    parts: list[str] = []
    for turn in turns:
        if use_reasoning and turn.reasoning is not None:
            parts.append("\n\n" + turn.reasoning.strip())
        if use_content and turn.content is not None:
            parts.append("\n\n" + turn.content.strip())
    return "".join(parts)


def scanned_norm(turns: Iterable[Turn], use_reasoning: bool, use_content: bool) -> str:
    """norm(scanned_text(...)), computed per piece: "\n\n" separates tokens, so the norm of the joined text is
    the non-empty piece norms joined by spaces, and each piece's norm can come from the cache."""
    pieces: list[str] = []
    for turn in turns:
        if use_reasoning and turn.reasoning is not None:
            pieces.append(norm_text(turn.reasoning.strip()))
        if use_content and turn.content is not None:
            pieces.append(norm_text(turn.content.strip()))
    return " ".join(p for p in pieces if p)


def rubric_fraction(text_norm: str, rubrics: Sequence[str]) -> float:
    """r̂_rb = (1/|E|) Σ_e 1[norm(e) ⊂ norm(text)] given `text_norm` = norm(text); 0 when E is empty. A rubric
    whose norm is "" always hits (the reference's substring test), e.g. "é" or "!!"."""
    if not rubrics:
        return 0.0
    hits = sum(1 for rubric in rubrics if norm_rubric(rubric) in text_norm)
    return hits / len(rubrics)


def parse_chunk_ids(rubrics: Sequence[str | int]) -> set[int]:
    """Gold chunk ids of a `longrlvr` sample; raise ValueError naming the first rubric that is not an integer."""
    ids: set[int] = set()
    for rubric in rubrics:
        if isinstance(rubric, bool):
            raise ValueError(f"longrlvr rubrics must be chunk ids (integers), got {rubric!r}")
        if isinstance(rubric, int):
            ids.add(rubric)
            continue
        try:
            ids.add(int(rubric))
        except ValueError:
            raise ValueError(f"longrlvr rubrics must be chunk ids (integers), got {rubric!r}") from None
    return ids


def predicted_chunks(text: str) -> set[int]:
    """Chunk ids `<CHUNK_12>` / `<chunk 12>` / `<CHUNK12>` inside the LAST <useful_chunks>…</useful_chunks> block."""
    blocks = _USEFUL_RE.findall(text)
    if not blocks:
        return set()
    return {int(x) for x in _CHUNK_RE.findall(blocks[-1])}


def f_beta(predicted: set[int], gold: set[int], beta: float = F_BETA) -> float:
    """F_β = (1+β²)PR/(β²P+R) with P = hits/|pred|, R = hits/|gold| (each 0 on an empty denominator)."""
    hits = len(predicted & gold)
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(gold) if gold else 0.0
    if precision + recall <= 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def rubric_reward(
    turns: Sequence[Turn],
    rubrics: Sequence[str | int],
    dataset_name: str,
    use_reasoning: bool,
    use_content: bool,
) -> float:
    """r̂_rb of one response: the entity fraction, or the chunk F-beta for `longrlvr`; 0 without rubrics."""
    if not rubrics:
        return 0.0
    if dataset_name == LONGRLVR:
        return f_beta(predicted_chunks(scanned_text(turns, use_reasoning, use_content)), parse_chunk_ids(rubrics))
    text_norm = scanned_norm(turns, use_reasoning, use_content)
    return rubric_fraction(text_norm, [r if isinstance(r, str) else str(r) for r in rubrics])


def judged_text(response: str) -> str:
    """What the outcome judge reads: the text after the last </think>, stripped; the response as is without one."""
    if THINK_END in response:
        return response.rpartition(THINK_END)[2].strip()
    return response


def response_mode_turn(response: str) -> tuple[Turn, str]:
    """The reference's `response` mode: split at the FIRST </think> into reasoning (minus a leading <think>)
    and content, both stripped; the content is what gets judged. Without </think> the whole text is content."""
    if THINK_END in response:
        reasoning, _, content = response.partition(THINK_END)
        content = content.strip()
        return Turn(reasoning=reasoning.removeprefix(THINK_START).strip(), content=content), content
    return Turn(content=response), response


def split_think(text: str) -> tuple[str, str]:
    """The message processors' split of a finished response (METHOD.md §3): reasoning, content =
    text.rsplit("</think>", 1), minus one trailing "\\n" of the reasoning and the leading "\\n\\n" of the
    content. Without </think> everything is reasoning and the content is empty (an ill-formed response)."""
    if THINK_END not in text:
        return text, ""
    reasoning, content = text.rsplit(THINK_END, 1)
    return reasoning.removesuffix("\n"), content.removeprefix("\n\n")
