"""The tiny-world prompt parser and the context heuristics (datagen/synth/heuristics.py) on hand-written prompts."""

from __future__ import annotations

import random

from datagen.synth.demo import demo_splits
from datagen.synth.heuristics import (
    CONTEXT_HEURISTICS,
    HEURISTICS,
    RANDOMIZED,
    Fact,
    Question,
    first_city,
    last_city,
    linked_city,
    most_frequent_city,
    nearest_city,
    oracle,
    parse_prompt,
    parse_question,
    random_city,
)
from reward_service.config import RuleJudgeConfig
from reward_service.judges.rule import rule_match

# Every heuristic has one known answer here: first C01 (line 0), last C08 (line 9), most frequent C09 (twice),
# nearest to E10's first line (2) is line 3 (C05), the only entity E10 is related to is E11 (born in C06), and
# the chain founder(E10) = E11, boss(E11) = E12, home(E12) = C07 is the label.
PROMPT = "\n".join(
    [
        "E20 home C01 .",
        "E20 boss E21 .",
        "E10 founder E11 .",
        "E30 home C05 .",
        "E11 boss E12 .",
        "E11 birthplace C06 .",
        "E12 home C07 .",
        "E40 home C09 .",
        "E41 home C09 .",
        "E42 birthplace C08 .",
        "home of boss of founder of E10 ?",
    ]
)
LABEL = "C07"


def _answers(heuristic: str, prompt: str, seeds: int = 50) -> set[str | None]:
    return {HEURISTICS[heuristic](prompt, random.Random(s)) for s in range(seeds)}


def test_parser_reads_facts_and_the_nested_question() -> None:
    """Guards against a parser that misreads a template (subject and object swapped, a key confused), reads the
    question line as a fact, or orders the relation chain from the outside in instead of from the start entity."""
    p = parse_prompt(PROMPT)
    assert len(p.facts) == 10
    assert p.facts[2] == Fact(subject="E10", key="founder", object="E11", line=2)
    assert p.facts[4] == Fact(subject="E11", key="boss", object="E12", line=4)
    assert p.facts[5] == Fact(subject="E11", key="birthplace", object="C06", line=5)
    assert p.facts[6] == Fact(subject="E12", key="home", object="C07", line=6)
    assert p.question == Question(start="E10", chain=("founder", "boss"), attribute="home")
    assert p.distinct_cities() == ["C01", "C05", "C06", "C07", "C08", "C09"]
    assert parse_question("birthplace of founder of boss of founder of E17 ?") == Question(
        "E17", ("founder", "boss", "founder"), "birthplace"
    )
    assert parse_question("home of E05 ?") == Question("E05", (), "home")
    assert parse_question("E17 home C07 .") is None
    assert parse_question("home of mayor of E17 ?") is None  # not a known phrase: no entity left


def test_parser_skips_lines_that_are_no_facts() -> None:
    """Guards against a header, an instruction or a blank line (a redesigned context) breaking the parser or
    being taken for a fact, and against a trailing newline hiding the question."""
    p = parse_prompt("Facts:\n\nE01 home C02 .\nsomething else\nhome of E01 ?\n")
    assert [(f.subject, f.key, f.object, f.line) for f in p.facts] == [("E01", "home", "C02", 2)]
    assert p.question == Question("E01", (), "home")
    assert oracle("Facts:\nE01 home C02 .\nhome of E01 ?\n", random.Random(0)) == "C02"


def test_each_heuristic_gives_its_known_answer() -> None:
    """Guards against a heuristic that answers something else than it claims (which would make the report's
    baselines meaningless): each has one right answer on PROMPT, whatever the seed."""
    assert _answers("first_city", PROMPT) == {"C01"}
    assert _answers("last_city", PROMPT) == {"C08"}
    assert _answers("most_frequent_city", PROMPT) == {"C09"}
    assert _answers("nearest_city", PROMPT) == {"C05"}
    assert _answers("linked_city", PROMPT) == {"C06"}
    assert _answers("oracle", PROMPT) == {LABEL}
    assert set(CONTEXT_HEURISTICS) == set(HEURISTICS) - {"oracle"}
    assert RANDOMIZED <= set(HEURISTICS)


def test_random_city_draws_every_context_city_reproducibly() -> None:
    """Guards against a random baseline that draws outside the context's cities, never reaches some of them
    (a biased chance level), or differs between two runs with the same seed."""
    assert _answers("random_city", PROMPT, seeds=200) == {"C01", "C05", "C06", "C07", "C08", "C09"}
    assert [random_city(PROMPT, random.Random(3)) for _ in range(5)] == [random_city(PROMPT, random.Random(3))] * 5


def test_ties_are_broken_at_random() -> None:
    """Guards against ties broken by position (which turns a tie-breaking baseline into first_city in disguise):
    both tied cities must come out over seeds."""
    tied = "E01 home C01 .\nE02 home C02 .\nE03 boss E01 .\nhome of E03 ?"
    assert _answers("most_frequent_city", tied) == {"C01", "C02"}
    # E03's first line is 2: C01 (line 0) and C04 (line 4) are both 2 lines away
    near = "E01 home C01 .\nE09 boss E08 .\nE03 boss E01 .\nE08 boss E07 .\nE05 home C04 .\n"
    assert _answers("nearest_city", near + "home of E03 ?") == {"C01", "C04"}
    # linked: E03 is related to E01 (its boss) and E06 (whose founder it is), both directions count
    linked = "E03 boss E01 .\nE06 founder E03 .\nE01 home C01 .\nE06 birthplace C06 .\nE03 home C03 ."
    assert _answers("linked_city", linked + "\nhome of E03 ?") == {"C01", "C06"}


def test_heuristics_answer_none_without_what_they_need() -> None:
    """Guards against a heuristic that crashes, or invents an answer, on a context without cities, without the
    question's entity, or with a missing link in the chain (the oracle must not guess)."""
    no_city = "E01 boss E02 .\nhome of E01 ?"
    rng = random.Random(0)
    for heuristic in (random_city, first_city, last_city, most_frequent_city, nearest_city, linked_city, oracle):
        assert heuristic(no_city, rng) is None, heuristic.__name__
    absent = "E01 home C01 .\nhome of boss of E09 ?"
    assert nearest_city(absent, rng) is None and linked_city(absent, rng) is None and oracle(absent, rng) is None
    assert oracle(PROMPT.replace("E11 boss E12 .", "E11 boss E13 ."), rng) is None  # E13 has no home
    assert oracle("E01 home C01 .", rng) is None  # no question line


def test_oracle_answers_every_demo_question_under_the_exact_judge() -> None:
    """Guards against a parser that drifts from the tiny world's templates or question phrases (the oracle would
    miss), and against demo questions that the context cannot answer: the ceiling must be 1.0."""
    splits = demo_splits(seed=0, num_train=8, num_heldout=64)
    judge = RuleJudgeConfig(mode="exact")
    for rows in (splits.heldout, splits.train):
        assert rows
        hits = [rule_match(judge, r.label, oracle(r.prompt, random.Random(0)) or "") for r in rows]
        assert sum(hits) == len(rows)
        assert all(parse_prompt(r.prompt).question is not None for r in rows)


def test_every_context_shortcut_stays_near_chance_on_the_demo_task() -> None:
    """Guards the demo task against shortcuts (issue 23: the last city in the context once scored 0.59 and a random
    context city 0.54, above the trained model): each context heuristic must stay near the chance of picking one of
    the context's several cities, while the oracle that follows the chain answers everything. Catches contexts that
    lose their distractors (the start entity's own city, the bridge entity's other city, the wrong branches)."""
    from deploy.launcher.baselines import distinct_cities_mean, score_heuristics

    rows = demo_splits(seed=0, num_train=8, num_heldout=256, context_tokens=60).heldout
    scores = score_heuristics(rows, RuleJudgeConfig(mode="exact", answer_marker="answer"))
    assert scores["oracle"] == 1.0
    assert distinct_cities_mean(rows) >= 4.0
    for name, accuracy in scores.items():
        if name != "oracle":
            assert accuracy <= 0.36, (name, accuracy)
    assert max(v for k, v in scores.items() if k != "oracle") >= 0.15  # the heuristics do run (not all None)
