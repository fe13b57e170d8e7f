"""Text normalisation shared by the builder's statistics and the answer check of trajectories.

`norm` is the entity rubric reward's normalisation (METHOD.md §2): lower-case, keep ASCII word runs and
CJK characters, join with single spaces. The rubric test is a plain substring test on normalised text,
with no word boundaries, so "E1" matches inside "E17": the synthetic worlds avoid such names.

This is a private copy: reward_service/rubric.py owns the canonical one; dedupe once it exists.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-zA-Z0-9_]+|[\u4e00-\u9fff]")


def norm(s: str) -> str:
    """The rubric reward's normalisation: `" ".join(re.findall(r"[a-zA-Z0-9_]+|[\u4e00-\u9fff]", s.lower().strip()))`."""
    return " ".join(_WORD.findall(s.lower().strip()))


def contains_entity(normed_text: str, entity: str) -> bool:
    """Whether the rubric test credits `entity` in a text already passed through `norm` (substring test)."""
    e = norm(entity)
    return bool(e) and e in normed_text


def answers_match(predicted: str, gold: str, aliases: list[str] | tuple[str, ...] = ()) -> bool:
    """Normalised exact match of a predicted answer against the gold answer or one of its aliases."""
    p = norm(predicted)
    return bool(p) and any(p == norm(g) for g in (gold, *aliases))
