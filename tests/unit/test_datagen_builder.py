"""The tiered-distractor builder on a hand-made case, its token budget, determinism and the document store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from datagen.builder import build_files, merge_tiers
from datagen.config import BuildConfig
from datagen.dataset import DatasetError, iter_rows
from datagen.docstore import DocStore
from datagen.tokens import WhitespaceCounter


def _jsonl(path: Path, objs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def _words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


# Whitespace cost of a rendered document: `<section`, `id=".."`, `title="..">`, text words, `</section>`.
DOCS = [
    {"id": "g1", "title": "G1", "text": "Ann founded Acme . " + _words(2, "g")},  # 6 words -> 10
    {"id": "g2", "title": "G2", "text": "Acme is in Paris " + _words(2, "h")},  # 6 -> 10
    {"id": "a", "title": "A", "text": "Ann visited Lyon " + _words(7, "a")},  # 10 -> 14
    {"id": "b", "title": "B", "text": _words(4, "b")},
    {"id": "c", "title": "C", "text": _words(20, "c")},  # -> 24
    {"id": "x", "title": "X", "text": _words(6, "x")},  # -> 10
    {"id": "y", "title": "Y", "text": _words(2, "y")},  # -> 6
    {"id": "z", "title": "Z", "text": _words(30, "z")},  # -> 34
    {"id": "r1", "title": "R1", "text": "one"},  # -> 5
    {"id": "r2", "title": "R2", "text": "two words"},
    {"id": "r3", "title": "R3", "text": "three more words"},
]
QUESTIONS = [
    {
        "id": "q1",
        "question": "Where is it?",
        "answer": "Paris",
        "gold_entities": ["Ann", "Acme"],
        "gold_doc_ids": ["g1", "g2"],
    },
    {"id": "q2", "question": "Who?", "answer": "Bo", "gold_entities": ["Bo"], "gold_doc_ids": ["g1"]},
]
TRAJECTORIES = [
    {  # correct: Tier-1 {a}, retrieved-not-opened [x, b, y, c]
        "question_id": "q1",
        "steps": [
            {"action": "search", "query": "ann", "results": ["g1", "a", "x", "b"]},
            {"action": "open", "doc_id": "a"},
            {"action": "open", "doc_id": "g1"},
            {"action": "search", "query": "acme", "results": ["g2", "y", "c"]},
            {"action": "open", "doc_id": "g2"},
            {"action": "answer", "answer": "paris.", "cited": ["g1", "g2"]},
        ],
    },
    {"question_id": "q1", "steps": [{"action": "open", "doc_id": "y"}]},  # unfinished: ignored
    {  # correct after normalisation: Tier-1 {c} (b was opened and cited), retrieved-not-opened [z]
        "question_id": "q1",
        "steps": [
            {"action": "search", "query": "ann", "results": ["g1", "c", "z"]},
            {"action": "open", "doc_id": "c"},
            {"action": "open", "doc_id": "b"},
            {"action": "open", "doc_id": "g1"},
            {"action": "open", "doc_id": "g2"},
            {"action": "answer", "answer": " PARIS ", "cited": ["g1", "g2", "b"]},
        ],
    },
    {  # wrong answer: its opened doc x must not become Tier-1
        "question_id": "q1",
        "steps": [{"action": "open", "doc_id": "x"}, {"action": "answer", "answer": "Lyon", "cited": ["x"]}],
    },
    {"question_id": "q2", "steps": [{"action": "answer", "answer": "Al", "cited": []}]},  # q2: nothing correct
]
# Fixed part: "Use the documents." (3) + "Documents:" (1) + "Question:" (1) + "Where is it?" (3) = 8 words.
CFG = {"instruction": "Use the documents.", "seed": 0}


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    return {
        "questions": _jsonl(tmp_path / "q.jsonl", QUESTIONS),
        "trajectories": _jsonl(tmp_path / "t.jsonl", TRAJECTORIES),
        "docs": _jsonl(tmp_path / "d.jsonl", DOCS),
    }


def _build(inputs: dict[str, Path], out: Path, **cfg: Any) -> tuple[list[Any], dict[str, Any]]:
    stats = build_files(
        inputs["questions"],
        inputs["trajectories"],
        inputs["docs"],
        out,
        WhitespaceCounter(),
        BuildConfig(**(CFG | cfg)),
        quiet=True,
    )
    return list(iter_rows(out)), stats.to_dict()


def test_hand_made_case_exact_tiers_under_budget(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Guards against wrong tier rules (wrong-answer or unfinished trajectories used, cited docs as Tier-1,
    opened docs as Tier-2), Tier-2 before Tier-1, and a budget that is overrun or not filled greedily."""
    # gold 8+20=28; a -> 42; c (24) would make 66 > 60: skipped; x -> 52; z (34) skipped; y -> 58.
    rows, stats = _build(inputs, tmp_path / "out.jsonl", context_tokens=60)
    (row,) = rows
    meta = row.metadata_extra["longtrace"]
    assert meta["tiers"] == {"gold": ["g1", "g2"], "tier1": ["a"], "tier2": ["x", "y"], "random": []}
    assert sorted(meta["doc_ids"]) == ["a", "g1", "g2", "x", "y"]
    assert meta["context_tokens"] == 58 == len(row.prompt.split())
    assert row.label == "Paris" and row.rubrics == ["Ann", "Acme"] and row.source == "longqa"
    assert row.prompt.startswith("Use the documents.\n\nDocuments:\n<section id=")
    assert row.prompt.endswith("</section>\n\nQuestion: Where is it?")
    positions = [row.prompt.index(f'<section id="{d}" ') for d in meta["doc_ids"]]
    assert positions == sorted(positions)  # doc_ids is the order in the context
    assert stats["skipped"] == {"no_correct_trajectory": 1}
    assert stats["trajectories"] == {"total": 5, "correct": 2, "unfinished": 1, "incorrect": 2}
    assert stats["pool_docs"] == {"tier1": 2, "tier2": 3}  # tier1 [a, c], tier2 [x, z, y]
    # a mentions "Ann": 1 of 1 Tier-1 distractors; x and y mention no rubric entity.
    hit = stats["distractors_with_rubric_entity"]
    assert hit["tier1"]["macro_pct"] == 100.0 and hit["tier2"]["micro_pct"] == 0.0


def test_bigger_budget_takes_all_tiers_then_random_fill(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Guards against the random fill taking gold/tier documents again or overrunning the budget."""
    rows, _ = _build(inputs, tmp_path / "a.jsonl", context_tokens=200)
    tiers = rows[0].metadata_extra["longtrace"]["tiers"]
    assert tiers["tier1"] == ["a", "c"] and tiers["tier2"] == ["x", "z", "y"]
    # 28 + 14 + 24 + 10 + 34 + 6 = 116 used; the random fill may add only b or r1..r3.
    rows, _ = _build(inputs, tmp_path / "b.jsonl", context_tokens=130, random_fill=True)
    meta = rows[0].metadata_extra["longtrace"]
    assert meta["tiers"]["random"] and set(meta["tiers"]["random"]) <= {"b", "r1", "r2", "r3"}
    assert meta["context_tokens"] <= 130


def test_gold_over_budget_is_skipped_and_counted(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Guards against emitting a row without all its gold documents when the budget is too small."""
    rows, stats = _build(inputs, tmp_path / "out.jsonl", context_tokens=27)
    assert rows == [] and stats["skipped"] == {"gold_over_budget": 1, "no_correct_trajectory": 1}


def test_tier1_ratio_interleaves_tiers() -> None:
    """Guards against the ratio knob being ignored or starving a tier that still has documents."""
    t1, t2 = ["a", "c"], ["x", "z", "y"]
    assert [d for d, _ in merge_tiers(t1, t2, None)] == ["a", "c", "x", "z", "y"]
    assert [d for d, _ in merge_tiers(t1, t2, 0.5)] == ["x", "a", "z", "c", "y"]
    assert [d for d, _ in merge_tiers(t1, t2, 0.0)] == ["x", "z", "y", "a", "c"]


def test_same_seed_same_bytes_other_seed_other_order(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Guards against nondeterminism (set/dict order, global RNG) and against a seed that is ignored."""
    _build(inputs, tmp_path / "s0a.jsonl", context_tokens=200)
    _build(inputs, tmp_path / "s0b.jsonl", context_tokens=200)
    assert (tmp_path / "s0a.jsonl").read_bytes() == (tmp_path / "s0b.jsonl").read_bytes()
    orders = set()
    for seed in range(4):
        rows, _ = _build(inputs, tmp_path / f"s{seed}.jsonl", context_tokens=200, seed=seed)
        orders.add(tuple(rows[0].metadata_extra["longtrace"]["doc_ids"]))
        assert sorted(rows[0].metadata_extra["longtrace"]["doc_ids"]) == sorted(["g1", "g2", "a", "c", "x", "z", "y"])
    assert len(orders) > 1


def test_bad_inputs_name_file_and_line(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Guards against cryptic failures on malformed questions, trajectories or missing gold documents."""
    bad_q = _jsonl(tmp_path / "bad_q.jsonl", [QUESTIONS[0], QUESTIONS[0]])
    with pytest.raises(DatasetError, match=r"bad_q\.jsonl:2: duplicate question id 'q1' \(first on line 1\)"):
        _build(inputs | {"questions": bad_q}, tmp_path / "o.jsonl")
    bad_t = _jsonl(tmp_path / "bad_t.jsonl", [TRAJECTORIES[0], {"question_id": "q1", "steps": [{"action": "fly"}]}])
    with pytest.raises(DatasetError, match=r"bad_t\.jsonl:2: invalid trajectory"):
        _build(inputs | {"trajectories": bad_t}, tmp_path / "o.jsonl")
    late = {"question_id": "q1", "steps": [{"action": "answer", "answer": "x"}, {"action": "open", "doc_id": "a"}]}
    with pytest.raises(DatasetError, match=r"bad_t2\.jsonl:1: .*must be the last step"):
        _build(inputs | {"trajectories": _jsonl(tmp_path / "bad_t2.jsonl", [late])}, tmp_path / "o.jsonl")
    docs = _jsonl(tmp_path / "d2.jsonl", [d for d in DOCS if d["id"] != "g2"])
    with pytest.raises(DatasetError, match=r"q\.jsonl:1: gold document 'g2' is not in the document store"):
        _build(inputs | {"docs": docs}, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_docstore_reads_by_offset_and_rejects_duplicates(tmp_path: Path) -> None:
    """Guards against offset bugs (multi-byte UTF-8, blank lines), duplicate ids, and a stale reused index."""
    docs = [{"id": "1", "title": "Zoë", "text": "naïve café ✓"}, {"id": "2", "title": "B", "text": "plain"}]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(docs[0], ensure_ascii=False) + "\n\n" + json.dumps(docs[1]) + "\n")
    index = tmp_path / "idx.sqlite"
    with DocStore(path, index_path=index) as store:
        assert len(store) == 2
        got = store.get("1")
        assert got is not None and got.text == "naïve café ✓" and got.title == "Zoë"
        assert store.get("2") is not None and store.get("3") is None
    with path.open("a") as f:
        f.write(json.dumps({"id": "3", "title": "C", "text": "new"}) + "\n")
    with DocStore(path, index_path=index) as store:  # the corpus changed: the index is rebuilt
        got = store.get("3")
        assert got is not None and got.text == "new" and len(store) == 3
    with path.open("a") as f:
        f.write(json.dumps({"id": "2", "title": "dup", "text": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"d\.jsonl:5: duplicate id '2' \(first on line 3\)"):
        DocStore(path)


def test_budget_respected_with_a_real_tokenizer(tmp_path: Path) -> None:
    """Guards against budgets counted in words (or per piece only) when a model tokenizer is given: every
    built prompt, re-tokenized by the saved tokenizer, must fit, and the budget must actually bind."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from datagen.config import SynthConfig
    from datagen.synth.pipeline import synthesize, write_synth
    from datagen.tokens import load_counter

    synth = synthesize(SynthConfig(num_questions=12, num_entities=60, context_tokens=100000, seed=3))
    paths = write_synth(synth, tmp_path / "synth")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([d.text for d in synth.docs], trainer)
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>").save_pretrained(tok_dir)

    budget = 700
    out = tmp_path / "out.jsonl"
    stats = build_files(
        paths["questions"],
        paths["trajectories"],
        paths["docs"],
        out,
        load_counter(tok_dir),
        BuildConfig(context_tokens=budget),
        quiet=True,
    )
    reloaded = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    rows = list(iter_rows(out))
    assert len(rows) == 12
    counts = [len(reloaded(r.prompt, add_special_tokens=False)["input_ids"]) for r in rows]
    assert max(counts) <= budget
    assert min(counts) > budget - 150  # distractors were available, so the budget binds
    assert [r.metadata_extra["longtrace"]["context_tokens"] for r in rows] == counts
    assert counts != [len(r.prompt.split()) for r in rows]  # the tokenizer, not words, was used
    assert stats.to_dict()["context_docs"]["tier1"] > 0
