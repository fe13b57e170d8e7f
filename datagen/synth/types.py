"""What every synthetic world hands to the search agent and the builder."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

from datagen.agent_logs import Question
from datagen.docstore import Doc


@dataclass(frozen=True)
class Hop:
    """One step of the agent's plan: search, find the document that states this hop's fact, open it."""

    query: str
    """The first search query."""
    fallback_query: str
    """The second query, when the first did not retrieve `doc_id`."""
    doc_id: str
    """The gold document stating the fact of this hop."""
    detours: tuple[str, ...] = ()
    """Documents of the branches not taken here that an exploring agent opens (the world's hard distractors:
    the same entity's other facts, the next fact of an entity on a wrong branch)."""


@dataclass(frozen=True)
class SynthQuestion:
    """A k-hop question: v0 -r1-> v1 ... -r_{k-1}-> v_{k-1} -attribute-> answer."""

    id: str
    world: int
    question: str
    answer: str
    path: list[str]
    """Entity names v0..v_{k-1}: the gold entities, i.e. the rubrics."""
    relations: list[str]
    """The k-1 entity-to-entity relations of the chain."""
    attribute: str
    """The final attribute; the answer is its (unique) value on v_{k-1}."""
    hops: list[Hop]
    wrong_answers: list[str]
    """Plausible wrong answers the agent gives when it errs (never equal to the answer)."""

    @property
    def gold_doc_ids(self) -> list[str]:
        return list(dict.fromkeys(h.doc_id for h in self.hops))

    def to_question(self, dataset_name: str) -> Question:
        return Question(
            id=self.id,
            question=self.question,
            answer=self.answer,
            gold_entities=list(self.path),
            gold_doc_ids=self.gold_doc_ids,
            dataset_name=dataset_name,
        )

    def to_json(self, dataset_name: str) -> dict[str, Any]:
        """The builder's question format plus the chain (ignored by the builder, kept for inspection)."""
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "gold_entities": list(self.path),
            "gold_doc_ids": self.gold_doc_ids,
            "dataset_name": dataset_name,
            "world": self.world,
            "relations": list(self.relations),
            "attribute": self.attribute,
        }


class World(Protocol):
    """A generated knowledge graph written as documents."""

    index: int
    docs: list[Doc]

    def search_text(self, doc: Doc) -> str:
        """The text the search engine indexes for a document."""
        ...

    def sample_question(self, rng: random.Random, hops: int, qid: str) -> SynthQuestion | None:
        """A new question (not asked before in this world), or None when none could be found."""
        ...
