"""The full-style synthetic world: a typed knowledge graph written as short encyclopedia-style documents.

Entities are persons, organizations and places. Each entity has every attribute of its type (one value)
and every relation of its type (one target, never itself), so following a chain of relations from an
entity reaches exactly one entity, and the question's answer, an attribute of that last entity, is unique.
Each entity has one document: its title is its name and its text states all of its attributes and outgoing
relations (sentence templates in FACT_TEMPLATES, one variant drawn per fact) plus a filler sentence.

Names are made of five-letter consonant-vowel words ("Virok Talem", "Talem Guild", "Dunel Harbour"); no
entity name is a substring of another after `norm`, so the rubric's substring test never credits one
entity for another. `confusability` is the probability that a new name reuses a word of an existing name:
searches then return near-namesakes, which the agent sometimes opens (Tier-1).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from datagen.docstore import Doc
from datagen.synth.types import Hop, SynthQuestion
from datagen.text import norm

PERSON, ORG, PLACE = "person", "organization", "place"
TYPE_SHARES = ((PERSON, 0.5), (ORG, 0.25), (PLACE, 0.25))

RELATIONS: dict[str, tuple[str, str]] = {
    "mentor": (PERSON, PERSON),
    "employer": (PERSON, ORG),
    "birthplace": (PERSON, PLACE),
    "founder": (ORG, PERSON),
    "headquarters": (ORG, PLACE),
    "parent": (ORG, ORG),
    "mayor": (PLACE, PERSON),
    "sister_city": (PLACE, PLACE),
}
ATTRIBUTES: dict[str, str] = {
    "birth_year": PERSON,
    "occupation": PERSON,
    "founding_year": ORG,
    "industry": ORG,
    "country": PLACE,
    "elevation": PLACE,
}
# {s} = the subject's name, {o} = the object (entity name or attribute value). Every sentence ends in "."
# right after {o} or after fixed words, and no template of one fact matches a sentence of another.
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "mentor": ("{s} was a student of {o}.", "{s} trained under {o}."),
    "employer": ("{s} was employed by {o}.", "{s} spent most of a career at {o}."),
    "birthplace": ("{s} is a native of {o}.", "{s} grew up in {o}."),
    "founder": ("{s} was founded by {o}.", "The founder of {s} was {o}."),
    "headquarters": ("{s} is headquartered in {o}.", "{s} has its head office in {o}."),
    "parent": ("{s} is a subsidiary of {o}.", "{s} is owned by {o}."),
    "mayor": ("The mayor of {s} is {o}.", "{s} is governed by mayor {o}."),
    "sister_city": ("{s} is twinned with {o}.", "{s} has a partnership with the town of {o}."),
    "birth_year": ("{s} was born in the year {o}.", "The birth of {s} is recorded in {o}."),
    "occupation": ("{s} held the occupation of {o}.", "The trade of {s} was {o}."),
    "founding_year": ("{s} was established in {o}.", "{s} dates back to {o}."),
    "industry": ("{s} operates in the {o} sector.", "The business of {s} is {o}."),
    "country": ("{s} is a town in {o}.", "{s} lies within the borders of {o}."),
    "elevation": ("{s} sits at an elevation of {o}.", "The altitude of {s} is {o}."),
}
RELATION_PHRASES: dict[str, str] = {
    "mentor": "the mentor of {x}",
    "employer": "the employer of {x}",
    "birthplace": "the home town of {x}",
    "founder": "the founder of {x}",
    "headquarters": "the headquarters town of {x}",
    "parent": "the parent company of {x}",
    "mayor": "the mayor of {x}",
    "sister_city": "the twin town of {x}",
}
ATTRIBUTE_QUESTIONS: dict[str, str] = {
    "birth_year": "In which year was {x} born?",
    "occupation": "What was the occupation of {x}?",
    "founding_year": "In which year was {x} established?",
    "industry": "In which sector does {x} operate?",
    "country": "In which country is {x}?",
    "elevation": "What is the elevation of {x}?",
}
# What the agent adds to an entity's name to search for a fact.
SEARCH_KEYWORDS: dict[str, str] = {
    "mentor": "student mentor",
    "employer": "employed career",
    "birthplace": "native grew",
    "founder": "founded founder",
    "headquarters": "headquartered office",
    "parent": "subsidiary owned",
    "mayor": "mayor",
    "sister_city": "twinned partnership",
    "birth_year": "born birth",
    "occupation": "occupation trade",
    "founding_year": "established dates",
    "industry": "sector business",
    "country": "town borders",
    "elevation": "elevation altitude",
}
FILLERS = (
    "{s} is mentioned in several regional chronicles.",
    "Little else is documented about {s}.",
    "Records about {s} were collected by local archivists.",
    "{s} appears in a number of later accounts.",
)
OCCUPATIONS = (
    "cartographer", "glassblower", "astronomer", "bookbinder", "shipwright", "botanist", "surveyor",
    "clockmaker", "linguist", "engraver", "apothecary", "architect", "composer", "weaver", "chemist",
    "archivist", "sculptor", "navigator", "printer", "mason", "geologist", "violinist", "tanner", "potter",
)  # fmt: skip
INDUSTRIES = (
    "shipping", "textile", "mining", "publishing", "brewing", "banking", "glassmaking", "timber",
    "insurance", "railway", "pharmaceutical", "ceramics", "salt", "telegraph", "dyeworks", "canning",
)  # fmt: skip
ORG_SUFFIXES = ("Company", "Guild", "Press", "Trust", "Foundry", "Institute", "Society")
PLACE_SUFFIXES = ("Harbour", "Falls", "Ridge", "Crossing", "Hollow", "Springs")
_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"


def core_word(rng: random.Random) -> str:
    """A five-letter consonant-vowel-consonant-vowel-consonant word, capitalised ("Talem")."""
    c, v = _CONSONANTS, _VOWELS
    return (rng.choice(c) + rng.choice(v) + rng.choice(c) + rng.choice(v) + rng.choice(c)).capitalize()


@dataclass
class Entity:
    index: int
    type: str
    name: str
    attributes: dict[str, str] = field(default_factory=dict)
    relations: dict[str, int] = field(default_factory=dict)

    @property
    def doc_id(self) -> str:
        return f"e{self.index}"


class _Names:
    """Unique names with no norm-substring relation between any two of them."""

    def __init__(self) -> None:
        self.normed: set[str] = set()

    def acceptable(self, name: str) -> bool:
        n = norm(name)
        if n in self.normed:
            return False
        # Is an existing name inside the new one? Every substring of the new name against the set.
        if any(n[i:j] in self.normed for i in range(len(n)) for j in range(i + 1, len(n) + 1)):
            return False
        # Is the new one inside an existing one? Names are short; a linear scan is cheap at this scale.
        return not any(n in other for other in self.normed)

    def add(self, name: str) -> None:
        self.normed.add(norm(name))


class FullWorld:
    """A generated knowledge graph; `docs` are the entity documents in index order."""

    def __init__(self, index: int, num_entities: int, confusability: float, rng: random.Random) -> None:
        self.index = index
        self.rng = rng
        counts = {t: max(2, int(share * num_entities)) for t, share in TYPE_SHARES}
        types = [t for t, n in counts.items() for _ in range(n)]
        names = _Names()
        given: list[str] = []
        cores: list[str] = []
        self.entities: list[Entity] = []
        for i, etype in enumerate(types):
            name = self._new_name(etype, names, given, cores, confusability)
            names.add(name)
            self.entities.append(Entity(index=i, type=etype, name=name))
        countries = [core_word(rng) + "ia" for _ in range(12)]
        by_type: dict[str, list[int]] = {t: [e.index for e in self.entities if e.type == t] for t in counts}
        for e in self.entities:
            for attr, etype in ATTRIBUTES.items():
                if etype == e.type:
                    e.attributes[attr] = self._value(attr, countries)
            for rel, (src, dst) in RELATIONS.items():
                if src == e.type:
                    e.relations[rel] = rng.choice([j for j in by_type[dst] if j != e.index])
        self.docs = [self._document(e) for e in self.entities]
        self._by_doc = {e.doc_id: e for e in self.entities}
        self._asked: set[tuple[int, tuple[str, ...], str]] = set()

    def _new_name(self, etype: str, names: _Names, given: list[str], cores: list[str], confusability: float) -> str:
        rng = self.rng
        for _ in range(1000):
            core = rng.choice(cores) if cores and rng.random() < confusability else core_word(rng)
            if etype == PERSON:
                first = rng.choice(given) if given and rng.random() < confusability else core_word(rng)
                name = f"{first} {core}"
            elif etype == ORG:
                name = f"{core} {rng.choice(ORG_SUFFIXES)}"
            else:
                name = f"{core} {rng.choice(PLACE_SUFFIXES)}"
            if names.acceptable(name):
                if etype == PERSON:
                    given.append(first)
                cores.append(core)
                return name
        raise AssertionError("could not draw a unique entity name")

    def _value(self, attr: str, countries: list[str]) -> str:
        rng = self.rng
        if attr == "birth_year":
            return str(rng.randint(1650, 1989))
        if attr == "founding_year":
            return str(rng.randint(1600, 1999))
        if attr == "occupation":
            return rng.choice(OCCUPATIONS)
        if attr == "industry":
            return rng.choice(INDUSTRIES)
        if attr == "country":
            return rng.choice(countries)
        assert attr == "elevation", attr
        return f"{rng.randint(3, 2900)} metres"

    def _document(self, e: Entity) -> Doc:
        rng = self.rng
        sentences = [rng.choice(FACT_TEMPLATES[a]).format(s=e.name, o=v) for a, v in e.attributes.items()]
        sentences += [
            rng.choice(FACT_TEMPLATES[r]).format(s=e.name, o=self.entities[j].name) for r, j in e.relations.items()
        ]
        rng.shuffle(sentences)
        sentences.append(rng.choice(FILLERS).format(s=e.name))
        return Doc(id=f"w{self.index}/{e.doc_id}", title=e.name, text=" ".join(sentences))

    def search_text(self, doc: Doc) -> str:
        return f"{doc.title} {doc.text}"

    def entity_of(self, doc_id: str) -> Entity:
        return self._by_doc[doc_id.split("/", 1)[1]]

    def sample_question(self, rng: random.Random, hops: int, qid: str) -> SynthQuestion | None:
        for _ in range(200):
            path = [rng.choice(self.entities)]
            relations: list[str] = []
            while len(path) < hops:
                options = [r for r, j in path[-1].relations.items() if self.entities[j] not in path]
                if not options:
                    break
                r = rng.choice(sorted(options))
                relations.append(r)
                path.append(self.entities[path[-1].relations[r]])
            if len(path) < hops:
                continue
            last = path[-1]
            attribute = rng.choice(sorted(last.attributes))
            key = (path[0].index, tuple(relations), attribute)
            if key in self._asked:
                continue
            self._asked.add(key)
            x = path[0].name
            for r in relations:
                x = RELATION_PHRASES[r].format(x=x)
            question = ATTRIBUTE_QUESTIONS[attribute].format(x=x)
            question = question[0].upper() + question[1:]
            steps = [*relations, attribute]
            plan = [
                Hop(query=f"{e.name} {SEARCH_KEYWORDS[s]}", fallback_query=e.name, doc_id=f"w{self.index}/{e.doc_id}")
                for e, s in zip(path, steps, strict=True)
            ]
            answer = last.attributes[attribute]
            others = sorted({e.attributes[attribute] for e in self.entities if attribute in e.attributes} - {answer})
            return SynthQuestion(
                id=qid,
                world=self.index,
                question=question,
                answer=answer,
                path=[e.name for e in path],
                relations=relations,
                attribute=attribute,
                hops=plan,
                wrong_answers=rng.sample(others, min(3, len(others))),
            )
        return None
