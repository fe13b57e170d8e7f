"""Context heuristics for tiny-world prompts: the shortcuts a skeptic tries before believing a model reasons.

A tiny-world prompt (datagen/synth/tiny.py) is facts, one per line, each made from a TINY_RELATIONS or
TINY_ATTRIBUTES template ("E17 founder E42 .", "E42 home C07 ."), and the question on its last line
built from the question phrases ("birthplace of boss of founder of E17 ?"). `parse_prompt` reads it
back: facts as (subject, relation-or-attribute key, object), the question as (start entity, relations in order
from the start entity, attribute). The patterns are built from the templates themselves, so the parser follows
them if they change; a line that matches no template (a header, an instruction) is skipped.

Cities are the objects of attribute facts. Every heuristic is `(prompt, rng) -> city or None` (None: no
answer, graded wrong), deterministic given the `random.Random`:

- `random_city`: a city drawn uniformly from the distinct cities in the context (chance level of the context).
- `first_city` / `last_city`: the first / last city mentioned (a position bias: answer at the edges).
- `most_frequent_city`: the city mentioned most often, ties at random (a frequency prior).
- `nearest_city`: the city on the line nearest to the first line that mentions the question's start entity,
  ties at random (locality: "the answer is written next to the entity asked about").
- `linked_city`: a random city that is an attribute of any entity directly related to the start entity (any
  relation, either direction, any attribute): one hop of reading without following the asked chain.
- `oracle`: follows the question's chain through the parsed facts (None when a link is missing): the ceiling
  a reader of the context reaches, and a check that every question is answerable from its context.

`HEURISTICS` names them in report order; `RANDOMIZED` names those whose answer depends on the rng.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from datagen.synth.tiny import TINY_ATTRIBUTES, TINY_RELATIONS

_NAME = r"(\S+)"


def _template_regex(template: str, slots: dict[str, str]) -> re.Pattern[str]:
    """A full-match regex of a template: literal words escaped, each `{slot}` replaced by its group."""
    parts = re.split(r"(\{\w+\})", template)
    body = "".join(slots[p[1:-1]] if p.startswith("{") and p[1:-1] in slots else re.escape(p) for p in parts)
    return re.compile(body)


# key -> regex of its fact line; relation keys first, then attribute keys
_FACT_PATTERNS: dict[str, re.Pattern[str]] = {
    key: _template_regex(spec[0], {"s": _NAME, "o": _NAME})
    for key, spec in {**TINY_RELATIONS, **TINY_ATTRIBUTES}.items()
}
# attribute -> regex of its question, relation -> regex of its noun phrase (x is anything: phrases nest)
_QUESTION_PATTERNS: dict[str, re.Pattern[str]] = {
    key: _template_regex(spec[1], {"x": r"(.+)"}) for key, spec in TINY_ATTRIBUTES.items()
}
_PHRASE_PATTERNS: dict[str, re.Pattern[str]] = {
    key: _template_regex(spec[1], {"x": r"(.+)"}) for key, spec in TINY_RELATIONS.items()
}


@dataclass(frozen=True)
class Fact:
    subject: str
    key: str
    """A TINY_RELATIONS key (the object is an entity) or a TINY_ATTRIBUTES key (the object is a city)."""
    object: str
    line: int
    """Index of the prompt line it was read from."""

    @property
    def is_attribute(self) -> bool:
        return self.key in TINY_ATTRIBUTES


@dataclass(frozen=True)
class Question:
    start: str
    """The entity the question names."""
    chain: tuple[str, ...]
    """Relation keys in order from the start entity ("the boss of the founder of E17": founder, boss)."""
    attribute: str


@dataclass(frozen=True)
class TinyPrompt:
    facts: tuple[Fact, ...]
    question: Question | None
    """None when the last line is no tiny-world question."""

    @property
    def cities(self) -> list[str]:
        """Every city mention, in prompt order (with repeats)."""
        return [f.object for f in self.facts if f.is_attribute]

    def distinct_cities(self) -> list[str]:
        return sorted(set(self.cities))


def parse_fact(line: str, index: int = 0) -> Fact | None:
    text = line.strip()
    for key, pattern in _FACT_PATTERNS.items():
        m = pattern.fullmatch(text)
        if m:
            return Fact(subject=m.group(1), key=key, object=m.group(2), line=index)
    return None


def parse_question(line: str) -> Question | None:
    text = line.strip()
    for attribute, pattern in _QUESTION_PATTERNS.items():
        m = pattern.fullmatch(text)
        if m is None:
            continue
        x, outer_first = m.group(1).strip(), []
        while True:
            for relation, phrase in _PHRASE_PATTERNS.items():
                inner = phrase.fullmatch(x)
                if inner:
                    outer_first.append(relation)
                    x = inner.group(1).strip()
                    break
            else:
                break
        if len(x.split()) != 1:
            return None  # what is left is no entity name
        return Question(start=x, chain=tuple(reversed(outer_first)), attribute=attribute)
    return None


def parse_prompt(prompt: str) -> TinyPrompt:
    """Facts of every line but the last that matches a template; the question from the last non-empty line."""
    lines = prompt.split("\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    facts = tuple(f for i, ln in enumerate(lines[:last]) if (f := parse_fact(ln, i)) is not None)
    question = parse_question(lines[last]) if last >= 0 else None
    return TinyPrompt(facts=facts, question=question)


def _pick(options: list[str], rng: random.Random) -> str | None:
    """A uniform choice among sorted options (order-free given the rng); None when there are none."""
    return rng.choice(sorted(options)) if options else None


def random_city(prompt: str, rng: random.Random) -> str | None:
    return _pick(parse_prompt(prompt).distinct_cities(), rng)


def first_city(prompt: str, rng: random.Random) -> str | None:
    cities = parse_prompt(prompt).cities
    return cities[0] if cities else None


def last_city(prompt: str, rng: random.Random) -> str | None:
    cities = parse_prompt(prompt).cities
    return cities[-1] if cities else None


def most_frequent_city(prompt: str, rng: random.Random) -> str | None:
    counts = Counter(parse_prompt(prompt).cities)
    top = max(counts.values(), default=0)
    return _pick([c for c, n in counts.items() if n == top], rng)


def _mentions(fact: Fact, entity: str) -> bool:
    return fact.subject == entity or (not fact.is_attribute and fact.object == entity)


def nearest_city(prompt: str, rng: random.Random) -> str | None:
    p = parse_prompt(prompt)
    if p.question is None:
        return None
    anchor = next((f.line for f in p.facts if _mentions(f, p.question.start)), None)
    city_facts = [f for f in p.facts if f.is_attribute]
    if anchor is None or not city_facts:
        return None
    best = min(abs(f.line - anchor) for f in city_facts)
    return _pick(list({f.object for f in city_facts if abs(f.line - anchor) == best}), rng)


def linked_city(prompt: str, rng: random.Random) -> str | None:
    p = parse_prompt(prompt)
    if p.question is None:
        return None
    start = p.question.start
    neighbours = {f.object for f in p.facts if not f.is_attribute and f.subject == start}
    neighbours |= {f.subject for f in p.facts if not f.is_attribute and f.object == start}
    neighbours.discard(start)
    return _pick(list({f.object for f in p.facts if f.is_attribute and f.subject in neighbours}), rng)


def follow_chain(p: TinyPrompt) -> str | None:
    """The answer the facts give to the question: each relation of the chain, then the attribute."""
    if p.question is None:
        return None
    table: dict[tuple[str, str], str] = {}
    for f in p.facts:
        table.setdefault((f.subject, f.key), f.object)
    entity: str | None = p.question.start
    for key in (*p.question.chain, p.question.attribute):
        entity = table.get((entity, key)) if entity is not None else None
    return entity


def oracle(prompt: str, rng: random.Random) -> str | None:
    return follow_chain(parse_prompt(prompt))


Heuristic = Callable[[str, random.Random], str | None]

HEURISTICS: dict[str, Heuristic] = {
    "random_city": random_city,
    "first_city": first_city,
    "last_city": last_city,
    "most_frequent_city": most_frequent_city,
    "nearest_city": nearest_city,
    "linked_city": linked_city,
    "oracle": oracle,
}
"""Every heuristic by name; `oracle` last (it is the ceiling, not a shortcut)."""
RANDOMIZED = frozenset({"random_city", "most_frequent_city", "nearest_city", "linked_city"})
"""Heuristics whose answer can depend on the rng (a draw or a tie broken at random)."""
CONTEXT_HEURISTICS = tuple(n for n in HEURISTICS if n != "oracle")
"""The shortcuts a model must beat (the oracle excluded)."""
