"""The entity rubric reward and the text it reads, exactly as the LongTraceRL reference computes them (METHOD.md §2).

- `norm(s)`: lower-case, keep runs of ASCII word characters and single CJK characters, join with spaces
  (accented letters are dropped: "é" is not in [a-zA-Z]).
- rubric reward = fraction of rubrics whose norm is a substring of norm(text) (no word boundaries; 0 when
  there are no rubrics).
- `longrlvr`: F-beta (beta=2) of the chunk ids in the last <useful_chunks> block against the gold ids.
- The scanned text is "\\n\\n" + turn.strip() of each assistant turn's reasoning and/or content.

Speed: the text is normalised once per response (for ASCII text a byte translation and a numpy pass that
collapses the separators, the same result as `norm` at a sixth of its cost on a 32 KB answer; shared with the
rule judge through a small cache; a long text in pieces, each a short C call), each rubric once per process
(cached). Every scan of model output is linear in its length: the reference's `<useful_chunks>(.*?)</useful_chunks>`
regex rescans to the end from every unclosed opening tag (quadratic: minutes at 1 MB of repeated tags), so the
last block is found by pairing the tags left to right instead, with the reference's result.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from common.text import norm

THINK_END = "</think>"
THINK_START = "<think>"
LONGRLVR = "longrlvr"
F_BETA = 2.0

# The reference's tags, matched as its regex matches them (IGNORECASE folds e.g. U+017F to "s", U+212A to "k").
_OPEN_RE = re.compile(r"<useful_chunks>", re.IGNORECASE)
_CLOSE_RE = re.compile(r"</useful_chunks>", re.IGNORECASE)
_CHUNK_RE = re.compile(r"<CHUNK[_\s]?(\d+)>", re.IGNORECASE)
# A text longer than this is normalised in pieces of about this many characters, cut at ASCII whitespace.
PIECE_CHARS = 1 << 20
_CUT_RE = re.compile(r"[ \n\t]")
# rubric_fraction looks at its deadline once per this many rubrics.
_RUBRICS_PER_DEADLINE_CHECK = 16
# Below this many characters norm's split/join is cheaper than the numpy pass's fixed cost.
_FAST_NORM_MIN_CHARS = 2048
_SPACE = 0x20
# ASCII bytes to what norm keeps of them: [a-z0-9_] as themselves, A-Z lower-cased, every other byte a separator.
_LOWER_OR_SPACE = bytes(
    c + 32 if 65 <= c <= 90 else c if chr(c) in "abcdefghijklmnopqrstuvwxyz0123456789_" else _SPACE for c in range(256)
)


def fast_norm(text: str) -> str:
    """`norm(text)`. For a long ASCII text without norm's split into thousands of word objects: lower-case and map
    every separator byte to a space in one translation, then drop each space that follows a space and strip (the
    tokens joined by single spaces, as norm). Other text goes to `norm`."""
    if len(text) < _FAST_NORM_MIN_CHARS or not text.isascii():
        return norm(text)
    codes = np.frombuffer(text.encode("ascii").translate(_LOWER_OR_SPACE), dtype=np.uint8)
    space = codes == _SPACE
    keep = np.ones(len(codes), dtype=bool)
    np.logical_not(space[1:] & space[:-1], out=keep[1:])
    return codes[keep].tobytes().strip(b" ").decode("ascii")


@functools.lru_cache(maxsize=64)
def norm_text(text: str) -> str:
    """norm() of a response text, cached for the few requests in flight: the rubric and the rule judge of one
    request read the same answer string (the lookup hashes the string once; a hit on the same object is free)."""
    return norm_in_pieces(text, PIECE_CHARS)


def norm_in_pieces(text: str, piece_chars: int) -> str:
    """norm(text), computed over pieces of about `piece_chars` cut at ASCII whitespace, so that each C call is
    short and a scoring thread lets the event loop run in between (norm of 64 MB is seconds in one call).

    Equal to norm(text): a token never spans whitespace, and lower() maps each character on its own except the
    final sigma, whose forms are not token characters either. A run without whitespace stays one piece.
    """
    if len(text) <= piece_chars:
        return fast_norm(text)
    pieces: list[str] = []
    start = 0
    while start < len(text):
        cut = _CUT_RE.search(text, start + piece_chars)
        end = len(text) if cut is None else cut.end()
        piece = fast_norm(text[start:end])
        if piece:
            pieces.append(piece)
        start = end
    return " ".join(pieces)


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


def rubric_fraction(text_norm: str, rubrics: Sequence[str], deadline_s: float = math.inf) -> float:
    """r̂_rb = (1/|E|) Σ_e 1[norm(e) ⊂ norm(text)] given `text_norm` = norm(text); 0 when E is empty. A rubric
    whose norm is "" always hits (the reference's substring test), e.g. "é" or "!!".

    Linear in the text per rubric; thousands of rubrics over a long text still take seconds, so the scan raises
    TimeoutError once `time.monotonic()` passes `deadline_s` (an abandoned request stops burning CPU)."""
    if not rubrics:
        return 0.0
    hits = 0
    for i, rubric in enumerate(rubrics):
        if i % _RUBRICS_PER_DEADLINE_CHECK == 0 and time.monotonic() > deadline_s:
            raise TimeoutError(f"rubric scan passed its deadline after {i} of {len(rubrics)} rubrics")
        hits += norm_rubric(rubric) in text_norm
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


def last_useful_block(text: str) -> str | None:
    """The text of the LAST <useful_chunks>…</useful_chunks> block (tags case-insensitive), None without one:
    what `re.findall(r"<useful_chunks>(.*?)</useful_chunks>", text, re.DOTALL | re.IGNORECASE)[-1]` returns, in
    one left-to-right pass. findall pairs each opening tag with the first closing tag after it and resumes after
    that; an opening tag with no closing tag after it ends the search (no later one has one either)."""
    block: tuple[int, int] | None = None
    pos = 0
    while (opening := _OPEN_RE.search(text, pos)) is not None:
        closing = _CLOSE_RE.search(text, opening.end())
        if closing is None:
            break
        block = (opening.end(), closing.start())
        pos = closing.end()
    return None if block is None else text[block[0] : block[1]]


def predicted_chunks(text: str) -> set[int]:
    """Chunk ids `<CHUNK_12>` / `<chunk 12>` / `<CHUNK12>` inside the LAST <useful_chunks>…</useful_chunks> block."""
    block = last_useful_block(text)
    if block is None:
        return set()
    return {int(x) for x in _CHUNK_RE.findall(block)}


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
    deadline_s: float = math.inf,
) -> float:
    """r̂_rb of one response: the entity fraction, or the chunk F-beta for `longrlvr`; 0 without rubrics.
    TimeoutError past `deadline_s` (time.monotonic())."""
    if not rubrics:
        return 0.0
    if dataset_name == LONGRLVR:
        return f_beta(predicted_chunks(scanned_text(turns, use_reasoning, use_content)), parse_chunk_ids(rubrics))
    text_norm = scanned_norm(turns, use_reasoning, use_content)
    return rubric_fraction(text_norm, [r if isinstance(r, str) else str(r) for r in rubrics], deadline_s)


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
