"""Synthetic world invariants: questions answerable from gold documents, unique answers, grounded rubrics,
the tiny world's closed vocabulary and the demo splits."""

from __future__ import annotations

import random
import re

import pytest

from datagen.config import SynthConfig
from datagen.docstore import Doc
from datagen.synth.bm25 import BM25
from datagen.synth.demo import demo_splits
from datagen.synth.pipeline import SynthResult, synthesize
from datagen.synth.tiny import TINY_ATTRIBUTES, TINY_RELATIONS, tiny_vocabulary
from datagen.synth.world import FACT_TEMPLATES, FullWorld
from datagen.text import norm


def _pattern(template: str, subject: str) -> re.Pattern[str]:
    parts = re.split(r"(\{s\}|\{o\})", template)
    body = "".join(
        re.escape(subject) if p == "{s}" else r"(?P<o>[^.\n]+?)" if p == "{o}" else re.escape(p) for p in parts
    )
    return re.compile(r"(?:^|(?<=\. )|(?<=\n))" + body)


def _follow(docs: list[Doc], subject: str, templates: tuple[str, ...]) -> set[str]:
    """Every object the texts state for (subject, relation): read from the documents, not from the world."""
    found = set()
    for template in templates:
        pat = _pattern(template, subject)
        for d in docs:
            found |= {m.group("o").strip() for m in pat.finditer(d.text)}
    return found


def _solve(docs: list[Doc], start: str, steps: list[tuple[str, ...]]) -> tuple[list[str], set[str]]:
    """Walk the question's relation chain over `docs`; assert each hop has exactly one reading."""
    path, current = [start], start
    for templates in steps[:-1]:
        nxt = _follow(docs, current, templates)
        assert len(nxt) == 1, (current, templates, nxt)
        current = nxt.pop()
        path.append(current)
    return path, _follow(docs, current, steps[-1])


def _check_world(result: SynthResult, templates: dict[str, tuple[str, ...]]) -> None:
    docs = {d.id: d for d in result.docs}
    assert result.rows and len(result.rows) == result.config.num_questions
    for q, row in zip(result.row_questions, result.rows, strict=True):
        steps = [templates[r] for r in (*q.relations, q.attribute)]
        world_docs = [d for d in result.docs if d.id.startswith(f"w{q.world}/")]
        gold = [docs[i] for i in q.gold_doc_ids]
        context = [docs[i] for i in row.metadata_extra["longtrace"]["doc_ids"]]
        assert set(q.gold_doc_ids) <= {d.id for d in context}
        # answerable from the gold documents alone, by following the relations from the named entity
        path, answers = _solve(gold, q.path[0], steps)
        assert path == q.path and answers == {q.answer} and row.label == q.answer
        # unique: neither the whole context nor the whole world offers another reading of the chain
        assert _solve(context, q.path[0], steps) == (q.path, {q.answer})
        assert _solve(world_docs, q.path[0], steps) == (q.path, {q.answer})
        # rubrics = path entities, each found (rubric test) in the gold documents
        assert row.rubrics == q.path and len(q.path) == result.config.hops
        gold_text = norm(" ".join(f"{d.title} {d.text}" for d in gold))
        assert all(norm(e) in gold_text for e in q.path)
        assert q.answer not in q.wrong_answers and q.path[0] in row.question


def test_full_world_questions_are_answerable_and_unique() -> None:
    """Guards against questions whose chain is not stated in the gold documents, has two readings in the
    context (a non-functional relation or a template matching another fact), or rubrics absent from gold."""
    cfg = SynthConfig(num_questions=25, num_entities=80, hops=3, confusability=0.6, context_tokens=800, seed=5)
    _check_world(synthesize(cfg), FACT_TEMPLATES)


def test_tiny_world_invariants_and_closed_vocabulary() -> None:
    """Guards against tiny prompts outside the word vocabulary (the demo tokenizer would map them to unk),
    contexts outside 30..120 words, and ambiguous or ungrounded tiny questions."""
    cfg = SynthConfig(style="tiny", num_questions=40, seed=2)
    result = synthesize(cfg)
    templates = {k: (v[0],) for k, v in (*TINY_RELATIONS.items(), *TINY_ATTRIBUTES.items())}
    _check_world(result, templates)
    vocab = set(tiny_vocabulary(cfg.num_entities, cfg.num_cities))
    for row in result.rows:
        words = row.prompt.split()
        assert 30 <= len(words) <= cfg.context_tokens <= 120
        assert set(words) <= vocab and row.label in vocab
        assert row.prompt.splitlines()[-1] == row.question
    stats = result.stats.to_dict()
    assert stats["context_docs"]["tier1"] > 0 and stats["context_docs"]["tier2"] > 0


def test_tiny_vocabulary_lists_names_and_words() -> None:
    """Guards against a vocabulary missing think tags or names, or containing template placeholders."""
    vocab = tiny_vocabulary(10, 5)
    assert len(vocab) == len(set(vocab))
    assert {"E00", "E09", "C04", "<think>", "</think>", "?", ".", "founder"} <= set(vocab)
    assert "E10" not in vocab and not any("{" in w for w in vocab)


def test_full_world_names_never_contain_each_other() -> None:
    """Guards against names where one is a substring of another after norm: the rubric test has no word
    boundaries, so such a pair would credit one entity for mentioning the other."""
    world = FullWorld(0, 400, confusability=0.9, rng=random.Random(0))
    names = [norm(e.name) for e in world.entities]
    joined = "\n".join(names)
    assert len(set(names)) == len(names)
    assert all(joined.count(n) == 1 for n in names)
    assert len({n.split()[-1] for n in names}) < len(names) * 0.8  # confusability reuses name words


def test_bm25_ranks_rare_terms_and_own_documents_first() -> None:
    """Guards against a search that ignores idf or length normalisation (the agent would open nothing)."""
    index = BM25(["apple banana", "apple cherry cherry", "banana banana banana date", "zebra"])
    assert [i for i, _ in index.search("cherry", 5)] == [1]
    assert [i for i, _ in index.search("apple date", 2)][0] == 2
    assert index.search("unknown", 3) == []
    world = FullWorld(0, 120, confusability=0.5, rng=random.Random(1))
    index = BM25([world.search_text(d) for d in world.docs])
    assert all(index.search(e.name, 1)[0][0] == e.index for e in world.entities)


def test_demo_splits_are_deterministic_and_disjoint() -> None:
    """Guards against held-out (or validation) rows drawn from the training worlds, validation rows from the held-out
    worlds (settings tuned on what is reported), SFT targets that do not restate the
    chain in the content (the rubric scans only the content), and seed-dependent nondeterminism."""
    a = demo_splits(seed=0, num_train=32, num_heldout=16)
    b = demo_splits(seed=0, num_train=32, num_heldout=16)
    c = demo_splits(seed=1, num_train=32, num_heldout=16)
    assert [r.to_dict() for r in a.train] == [r.to_dict() for r in b.train] and a.sft == b.sft
    assert [r.prompt for r in a.train] != [r.prompt for r in c.train]
    assert len(a.train) == 32 and len(a.heldout) == 16 and len(a.sft) == 32
    train_facts = {line for r in a.train for line in r.prompt.splitlines()[:-1]}
    heldout_facts = {line for r in a.heldout for line in r.prompt.splitlines()[:-1]}
    assert len(train_facts & heldout_facts) < 0.2 * len(heldout_facts)  # fresh worlds, only chance overlaps
    v = demo_splits(seed=0, num_train=32, num_heldout=16, num_validation=16)
    assert [r.prompt for r in v.heldout] == [r.prompt for r in a.heldout] and a.validation == []
    validation_facts = {line for r in v.validation for line in r.prompt.splitlines()[:-1]}
    assert len(validation_facts & heldout_facts) < 0.2 * len(heldout_facts)  # tuned on other worlds than reported
    vocab = set(a.vocabulary)
    for ex, row in zip(a.sft, a.train, strict=True):
        assert ex["prompt"] == row.prompt and set(ex["response"].split()) <= vocab
        reasoning, content = ex["response"].split("</think>")
        assert reasoning.startswith("<think>") and content.split()[-2:] == ["answer", row.label]
        assert all(norm(str(e)) in norm(content) for e in row.rubrics)


@pytest.mark.parametrize("knob", [{"hops": 3}, {"tier1_ratio": 0.0}, {"context_tokens": 100}])
def test_tiny_knobs_take_effect(knob: dict[str, float]) -> None:
    """Guards against knobs that are accepted but ignored (hops, tier mix, budget)."""
    base = synthesize(SynthConfig(style="tiny", num_questions=24, seed=4)).stats.to_dict()
    stats = synthesize(SynthConfig(style="tiny", num_questions=24, seed=4, **knob))
    d = stats.stats.to_dict()
    if "hops" in knob:
        assert all(len(r.rubrics) == 3 for r in stats.rows)
        assert d["context_docs"]["gold"] == 3 * 24
    elif "tier1_ratio" in knob:
        assert d["context_docs"]["tier1"] < base["context_docs"]["tier1"]
    else:
        assert d["context_tokens"]["mean"] > base["context_tokens"]["mean"] + 10


def test_last_hop_demonstrations_join_the_sft_set_only() -> None:
    """Guards the SFT mix of the demo: one-hop demonstrations must be added to (and shuffled into) the SFT set
    only, never into the RL training rows or the evaluation splits, and must answer their own question."""
    plain = demo_splits(seed=0, num_train=32, num_heldout=8)
    mixed = demo_splits(seed=0, num_train=32, num_heldout=8, num_sft_last_hop=16)
    assert [r.prompt for r in mixed.train] == [r.prompt for r in plain.train]
    assert [r.prompt for r in mixed.heldout] == [r.prompt for r in plain.heldout]
    assert len(mixed.sft) == 48 and mixed.sft != plain.sft + mixed.sft[32:]  # shuffled in, not appended
    one_hop = [ex for ex in mixed.sft if len(ex["rubrics"]) == 1]
    assert len(one_hop) == 16
    for ex in one_hop:
        assert ex["prompt"].splitlines()[-1].count(" of ") == 1  # "home of E42 ?"
        assert ex["content"].split()[-2:] == ["answer", ex["label"]]
