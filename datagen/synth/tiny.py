"""The tiny demo world: a closed word vocabulary, one-line facts, contexts of tens of words.

Entities are named E00..E99 and cities C00..C99 (fixed width: the rubric test is a substring test without
word boundaries, and "e1" would be found inside "e17"). Every entity has a founder and a boss (other
entities), a home city and a birthplace (another city), so chains are functional and the answer unique. Facts
are terse, four words each (a tiny model reads 10 of them in 44 tokens):

    E17 founder E42 .        E42 home C07 .        E42 birthplace C03 .      E17 boss E05 .

A k-hop question names v0 and follows k-1 relations to ask a city of v_{k-1}: "home of founder of E17 ?" (2 hops,
rubrics E17 and E42, answer C07). Each fact is one document; the context is facts, one per line, then the
question on the last line (no instruction, no tags), so every word of a prompt is in `tiny_vocabulary()`, from
which the demo builds its word-level tokenizer.

Contexts are built against shortcuts (issue 23; `_detours`): beside the gold facts they hold the branches a
shortcut would take (the start entity's other relation, entities related to it the other way round, each with
its city, and the start entity's own city), so the answer is neither the first, last, most frequent or nearest
city nor a city of just any entity linked to the start (datagen/synth/heuristics.py scores these shortcuts).

SFT demonstrations (`sft_example`): reasoning = the path entities and the answer, content = the path entities,
then the ANSWER_MARKER and the answer ("<think> E17 E42 C07 </think> E17 E42 answer C07"). The rubric reward
scans only the content after </think> (METHOD.md §2), so the content restates the chain; the demo's judge reads
only the word after the marker.
"""

from __future__ import annotations

import random
from typing import Any

from datagen.dataset import Row
from datagen.docstore import Doc
from datagen.synth.types import Hop, SynthQuestion

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_MARKER = "answer"  # the demo judge's answer_marker: the final answer follows it
# relation -> (fact template, question phrase, search keyword)
TINY_RELATIONS: dict[str, tuple[str, str, str]] = {
    "founder": ("{s} founder {o} .", "founder of {x}", "founder"),
    "boss": ("{s} boss {o} .", "boss of {x}", "boss"),
}
# attribute -> (fact template, question, search keyword); the values are cities
TINY_ATTRIBUTES: dict[str, tuple[str, str, str]] = {
    "home": ("{s} home {o} .", "home of {x} ?", "home"),
    "birthplace": ("{s} birthplace {o} .", "birthplace of {x} ?", "birthplace"),
}
TINY_FORMAT: dict[str, str] = {
    "instruction": "",
    "documents_header": "",
    "doc_template": "{text}",
    "doc_separator": "\n",
    "question_prefix": "\n",
}
"""BuildConfig fields of the tiny prompt: facts one per line, then the question."""


def entity_name(i: int) -> str:
    return f"E{i:02d}"


def city_name(j: int) -> str:
    return f"C{j:02d}"


def tiny_vocabulary(num_entities: int = 64, num_cities: int = 32) -> list[str]:
    """Every whitespace-separated word a tiny world of this size can put in a prompt, label or SFT response."""
    assert 0 < num_entities <= 100 and 0 < num_cities <= 100, "tiny names have two digits"
    words: set[str] = {THINK_OPEN, THINK_CLOSE, ANSWER_MARKER}
    for template, phrase, _ in (*TINY_RELATIONS.values(), *TINY_ATTRIBUTES.values()):
        words.update(w for w in f"{template} {phrase}".split() if w not in ("{s}", "{o}", "{x}"))
    return sorted(words) + [entity_name(i) for i in range(num_entities)] + [city_name(j) for j in range(num_cities)]


class TinyWorld:
    """One random assignment of facts over E00..E{n-1} and C00..C{m-1}; one document per fact."""

    def __init__(self, index: int, num_entities: int, num_cities: int, rng: random.Random) -> None:
        self.index = index
        self.num_entities = num_entities
        self.relations: list[dict[str, int]] = []
        self.attributes: list[dict[str, int]] = []
        for i in range(num_entities):
            self.relations.append({r: rng.choice([j for j in range(num_entities) if j != i]) for r in TINY_RELATIONS})
            home, born = rng.sample(range(num_cities), 2)  # distinct: the other attribute is a wrong answer
            self.attributes.append({"home": home, "birthplace": born})
        facts: list[tuple[int, str, str]] = []
        for i in range(num_entities):
            facts += [(i, r, entity_name(j)) for r, j in self.relations[i].items()]
            facts += [(i, a, city_name(c)) for a, c in self.attributes[i].items()]
        rng.shuffle(facts)
        self.docs: list[Doc] = []
        self.fact_doc: dict[tuple[int, str], str] = {}
        for k, (i, key, obj) in enumerate(facts):
            template = (TINY_RELATIONS.get(key) or TINY_ATTRIBUTES[key])[0]
            doc = Doc(id=f"w{index}/f{k}", title=entity_name(i), text=template.format(s=entity_name(i), o=obj))
            self.docs.append(doc)
            self.fact_doc[(i, key)] = doc.id
        self._asked: set[tuple[int, tuple[str, ...], str]] = set()

    def search_text(self, doc: Doc) -> str:
        return doc.text

    def sample_question(self, rng: random.Random, hops: int, qid: str) -> SynthQuestion | None:
        for _ in range(200):
            path = [rng.randrange(self.num_entities)]
            relations: list[str] = []
            while len(path) < hops:
                options = [r for r in sorted(TINY_RELATIONS) if self.relations[path[-1]][r] not in path]
                if not options:
                    break
                r = rng.choice(options)
                relations.append(r)
                path.append(self.relations[path[-1]][r])
            if len(path) < hops:
                continue
            attribute = rng.choice(sorted(TINY_ATTRIBUTES))
            key = (path[0], tuple(relations), attribute)
            if key in self._asked:
                continue
            self._asked.add(key)
            x = entity_name(path[0])
            for r in relations:
                x = TINY_RELATIONS[r][1].format(x=x)
            last = path[-1]
            answer = city_name(self.attributes[last][attribute])
            wrong = {city_name(c) for i in path for c in self.attributes[i].values()} - {answer}
            keys = [*relations, attribute]
            plan = [
                Hop(
                    query=f"{entity_name(i)} {(TINY_RELATIONS.get(s) or TINY_ATTRIBUTES[s])[2]}",
                    fallback_query=entity_name(i),
                    doc_id=self.fact_doc[(i, s)],
                    detours=self._detours(path, keys, k, rng),
                )
                for k, (i, s) in enumerate(zip(path, keys, strict=True))
            ]
            return SynthQuestion(
                id=qid,
                world=self.index,
                question=TINY_ATTRIBUTES[attribute][1].format(x=x),
                answer=answer,
                path=[entity_name(i) for i in path],
                relations=relations,
                attribute=attribute,
                hops=plan,
                wrong_answers=sorted(wrong),
            )
        return None

    def _detours(self, path: list[int], keys: list[str], k: int, rng: random.Random) -> tuple[str, ...]:
        """The facts that make hop k's shortcuts wrong. For a relation hop from entity i: i's other relations, and
        for every relation one entity related to i the other way round ("E50 founder E17" beside "founder of
        E17"), each of these wrong branches with its next fact (its city, for the last relation hop); at the
        start, the start entity's own city of the asked attribute. Several entities one fact away from the start
        then have a city each (search fill may add an entity's other city): no position, frequency or one-hop
        shortcut points at the answer, only the asked chain does."""
        i, key = path[k], keys[k]
        docs: list[str] = []
        if key in TINY_RELATIONS:
            branches = [self.relations[i][r] for r in sorted(TINY_RELATIONS) if r != key]
            docs += [self.fact_doc[(i, r)] for r in sorted(TINY_RELATIONS) if r != key]
            for r in sorted(TINY_RELATIONS):
                reverse = [z for z in range(self.num_entities) if self.relations[z][r] == i and z not in path]
                if reverse:
                    z = rng.choice(reverse)
                    docs.append(self.fact_doc[(z, r)])
                    branches.append(z)
            docs += [self.fact_doc[(w, keys[k + 1])] for w in branches if w not in path]
        if k == 0 and len(keys) > 1:
            docs.append(self.fact_doc[(i, keys[-1])])
        return tuple(dict.fromkeys(docs))


def tiny_response(q: SynthQuestion) -> tuple[str, str]:
    """(reasoning, content) of the demonstration: the chain down to the answer ("E17 E42 C07"), then the chain again
    and the final answer after the ANSWER_MARKER (the demo's judge reads only what follows it; the rubric reward
    scans the whole content). Each step of the reasoning is one lookup keyed by the token before it."""
    chain = " ".join(q.path)
    return f"{chain} {q.answer}", f"{chain} {ANSWER_MARKER} {q.answer}"


def sft_example(q: SynthQuestion, row: Row) -> dict[str, Any]:
    """One SFT demonstration for a built row; `response` is the whole target text."""
    reasoning, content = tiny_response(q)
    return {
        "id": q.id,
        "prompt": row.prompt,
        "reasoning": reasoning,
        "content": content,
        "response": f"{THINK_OPEN} {reasoning} {THINK_CLOSE} {content}",
        "label": row.label,
        "rubrics": list(q.path),
    }
