"""Text normalisation shared by the builder's statistics and the answer check of trajectories.

`norm` is the entity rubric reward's normalisation (METHOD.md §2), imported from its one definition in
common/text.py so that the builder's statistics count exactly what the reward credits. The rubric
test is a plain substring test on normalised text, with no word boundaries, so "E1" matches inside "E17":
the synthetic worlds avoid such names.
"""

from __future__ import annotations

from common.text import norm

__all__ = ["answers_match", "contains_entity", "norm"]


def contains_entity(normed_text: str, entity: str) -> bool:
    """Whether the rubric test credits `entity` in a text already passed through `norm` (substring test)."""
    e = norm(entity)
    return bool(e) and e in normed_text


def answers_match(predicted: str, gold: str, aliases: list[str] | tuple[str, ...] = ()) -> bool:
    """Normalised exact match of a predicted answer against the gold answer or one of its aliases."""
    p = norm(predicted)
    return bool(p) and any(p == norm(g) for g in (gold, *aliases))
