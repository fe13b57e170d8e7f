"""`longtrace data fit` (datagen/fit.py) on rows built by `longtrace data synth` (the builder of `data build`) with a
4x larger budget: every written row fits, keeps its instruction, question, gold and rubric-entity documents and
their order, drops random, then Tier-2, then Tier-1, records what it dropped; rows that cannot fit are named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from common.text import norm
from datagen.dataset import DatasetError, iter_rows, make_row, write_rows
from datagen.fit import fit_file, split_context
from datagen.tokens import WhitespaceCounter

BUDGET = 500


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    subprocess.run(
        [sys.executable, "-m", "deploy.cli", "data", "synth", "--out", str(out), "--num-questions", "20",
         "--context-tokens", str(4 * BUDGET), "--confusability", "0", "--quiet"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out / "dataset.jsonl"


def _sections(row: Any) -> dict[str, str]:
    meta = row.metadata_extra["longtrace"]
    ctx = split_context(row.prompt, meta["doc_ids"], "\n")
    return dict(zip(meta["doc_ids"], ctx.sections, strict=True))


def test_fit_trims_to_the_budget_keeping_what_the_reward_needs(built: Path, tmp_path: Path) -> None:
    """Guards against a trim that leaves rows over the budget, drops a gold or rubric-entity document (the reward
    would then score against a context without the evidence), reorders documents, drops Tier-1 while a droppable
    Tier-2 document stays, or loses track of what it dropped."""
    counter = WhitespaceCounter()
    before = {r.metadata_extra["longtrace"]["question_id"]: r for r in iter_rows(built)}
    assert min(counter.count(r.prompt) for r in before.values()) > BUDGET  # every row needs trimming
    summary = fit_file(built, tmp_path / "fit.jsonl", BUDGET, counter)
    after = list(iter_rows(tmp_path / "fit.jsonl"))
    assert summary.rows_in == 20 and summary.rows_out == len(after) > 0 and summary.rows_trimmed == len(after)
    assert len(summary.cannot_fit) == 20 - len(after) > 0  # the synthetic world's rubric documents do not all fit
    for row in after:
        meta = row.metadata_extra["longtrace"]
        old = before[meta["question_id"]]
        old_meta, old_sections = old.metadata_extra["longtrace"], _sections(old)
        tokens = counter.count(row.prompt)
        assert tokens <= BUDGET and meta["context_tokens"] == tokens
        assert meta["fit"]["context_tokens_before"] == counter.count(old.prompt)
        kept = meta["doc_ids"]
        assert kept == [d for d in old_meta["doc_ids"] if d in set(kept)]  # the row's order, a subsequence
        dropped = {d for ids in meta["fit"]["dropped"].values() for d in ids}
        assert dropped == set(old_meta["doc_ids"]) - set(kept) and dropped
        assert set(old_meta["tiers"]["gold"]) <= set(kept)
        entities = [norm(str(e)) for e in old.rubrics]
        for d, text in old_sections.items():
            if any(e in norm(text) for e in entities):
                assert d in kept, f"{meta['question_id']}: dropped {d}, which holds a rubric entity"
        droppable_left = [d for d in kept if d in old_meta["tiers"]["tier2"] and not any(
            e in norm(old_sections[d]) for e in entities)]  # fmt: skip
        assert not (meta["fit"]["dropped"].get("tier1") and droppable_left), "Tier-1 dropped before Tier-2"
        # The message is the old one without the dropped sections: same head (instruction) and tail (question).
        assert row.prompt == split_context(old.prompt, old_meta["doc_ids"], "\n").render(
            [d in set(kept) for d in old_meta["doc_ids"]]
        )
        assert row.prompt.endswith(old.question) and row.label == old.label and row.rubrics == old.rubrics
    for miss in summary.cannot_fit:
        assert miss["kept_tokens"] > BUDGET and miss["question_id"] in before


def test_rows_within_the_budget_are_unchanged_and_foreign_rows_are_named(built: Path, tmp_path: Path) -> None:
    """Guards against a fit that rewrites rows it need not touch, and against a row of another shape (no builder
    provenance) trimmed blindly instead of an error naming its line; the CLI exits non-zero naming the flag when
    no row fits."""
    summary = fit_file(built, tmp_path / "same.jsonl", 100_000, WhitespaceCounter())
    assert summary.rows_out == 20 and summary.rows_trimmed == 0
    assert [r.to_dict() for r in iter_rows(tmp_path / "same.jsonl")] == [r.to_dict() for r in iter_rows(built)]

    write_rows(tmp_path / "foreign.jsonl", [make_row("Documents: a b c. Question?", "x", "q?", ["e"], "longqa")])
    with pytest.raises(DatasetError, match=r"foreign.jsonl:1: .*metadata.longtrace"):
        fit_file(tmp_path / "foreign.jsonl", tmp_path / "out.jsonl", 2, WhitespaceCounter())

    cli = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "data", "fit", str(built), str(tmp_path / "none.jsonl"),
         "--max_tokens", "50", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 1 and "--max_tokens 50" in cli.stderr
    assert len(json.loads(cli.stdout)["cannot_fit"]) == 20
