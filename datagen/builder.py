"""The tiered-distractor builder (`longtrace data build`): search-agent logs -> LongTraceRL rows (METHOD.md §1).

Inputs: questions and search-agent trajectories (datagen/agent_logs.py: their format and checks), and documents
`{"id": str, "title": str, "text": str}` (datagen/docstore.py; read by byte offset).

Tiers, over the correct trajectories of a question (gold documents are never distractors):
Tier-1 = documents a trajectory opened but did not cite; Tier-2 = documents some trajectory retrieved that
no correct trajectory opened. Within a tier the trajectories are merged round-robin (first trajectory's
first document, second trajectory's first document, ...), duplicates dropped, so no single trajectory
dominates a truncated tier.

Context: the gold documents, then Tier-1, then Tier-2 (or a `tier1_ratio` mix), then optionally random
corpus documents, each taken if it still fits the token budget and skipped otherwise; then all documents are
shuffled with a per-question RNG seeded by (seed, question id). The budget covers the whole user message:
`instruction + documents_header + doc_1 + doc_separator + ... + doc_n + question_prefix + question`, each
document rendered with `doc_template` (default `<section id="..." title="...">\\ntext\\n</section>`).
Token counts are summed per piece, then the rendered message is counted once more and the last-taken
distractors are dropped until it fits (tokenizers may merge across piece boundaries).

Rows keep their provenance in `metadata.longtrace` (question id, document ids in context order, the ids of
each tier, context tokens). Statistics: the tier mix and how often a distractor contains a rubric entity
under the rubric reward's substring test (the paper's Table 4 measure, macro over rows and per document).
"""

from __future__ import annotations

import html
import logging
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen.agent_logs import (
    OpenStep,
    Question,
    SearchStep,
    Trajectory,
    check_question,
    iter_trajectories,
    load_questions,
)
from datagen.config import BuildConfig
from datagen.dataset import DatasetError, DatasetWriter, Row, make_row
from datagen.docstore import Doc, DocLookup, DocStore
from datagen.progress import Progress
from datagen.stats import summarize
from datagen.text import answers_match, norm
from datagen.tokens import TokenCounter

logger = logging.getLogger(__name__)

TIERS = ("gold", "tier1", "tier2", "random")
_COST_CACHE_SIZE = 65536


def trajectory_tiers(t: Trajectory) -> tuple[list[str], list[str], set[str]]:
    """(opened-not-cited, retrieved-not-opened, opened) document ids of one trajectory, in first-seen order."""
    final = t.final
    cited = set(final.cited) if final else set()
    opened = list(dict.fromkeys(s.doc_id for s in t.steps if isinstance(s, OpenStep)))
    opened_set = set(opened)
    retrieved = dict.fromkeys(d for s in t.steps if isinstance(s, SearchStep) for d in s.results)
    return [d for d in opened if d not in cited], [d for d in retrieved if d not in opened_set], opened_set


def round_robin(lists: list[list[str]]) -> list[str]:
    """Interleave lists (first of each, then second of each, ...), keeping the first occurrence of an id."""
    out: dict[str, None] = {}
    for i in range(max((len(x) for x in lists), default=0)):
        for x in lists:
            if i < len(x):
                out.setdefault(x[i], None)
    return list(out)


def question_tiers(trajectories: list[Trajectory], gold: set[str]) -> tuple[list[str], list[str]]:
    """Tier-1 and Tier-2 of a question from its correct trajectories (see the module docstring)."""
    per = [trajectory_tiers(t) for t in trajectories]
    opened_any = set().union(*(o for _, _, o in per)) if per else set()
    tier1 = [d for d in round_robin([t1 for t1, _, _ in per]) if d not in gold]
    tier1_set = set(tier1)
    tier2 = [d for d in round_robin([t2 for _, t2, _ in per]) if d not in gold and d not in opened_any]
    return tier1, [d for d in tier2 if d not in tier1_set]


def merge_tiers(tier1: list[str], tier2: list[str], ratio: float | None) -> list[tuple[str, str]]:
    """Candidate order of distractors: Tier-1 then Tier-2, or a `ratio` share of Tier-1 while both last."""
    if ratio is None:
        return [(d, "tier1") for d in tier1] + [(d, "tier2") for d in tier2]
    out: list[tuple[str, str]] = []
    i = j = n1 = 0
    while i < len(tier1) or j < len(tier2):
        take1 = j >= len(tier2) or (i < len(tier1) and n1 + 1 <= ratio * (len(out) + 1) + 1e-9)
        if take1:
            out.append((tier1[i], "tier1"))
            i += 1
            n1 += 1
        else:
            out.append((tier2[j], "tier2"))
            j += 1
    return out


@dataclass
class BuildStats:
    """What the builder did; `to_dict` is the JSON the CLI prints."""

    num_questions: int = 0
    num_rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    trajectories: Counter[str] = field(default_factory=Counter)
    missing_doc_ids: int = 0
    pool_docs: Counter[str] = field(default_factory=Counter)
    context_docs: Counter[str] = field(default_factory=Counter)
    context_doc_tokens: Counter[str] = field(default_factory=Counter)
    rubric_docs: Counter[str] = field(default_factory=Counter)
    rubric_row_fractions: dict[str, list[float]] = field(default_factory=dict)
    context_tokens: list[int] = field(default_factory=list)
    budget: int = 0

    def to_dict(self) -> dict[str, Any]:
        distractors = ("tier1", "tier2", "random")
        n_docs = sum(self.context_docs.values())
        hit: dict[str, Any] = {}
        for tier in (*distractors, "all"):
            docs = sum(self.context_docs[t] for t in distractors) if tier == "all" else self.context_docs[tier]
            hits = sum(self.rubric_docs[t] for t in distractors) if tier == "all" else self.rubric_docs[tier]
            fr = self.rubric_row_fractions.get(tier, [])
            hit[tier] = {
                "macro_pct": round(100 * sum(fr) / len(fr), 2) if fr else None,
                "micro_pct": round(100 * hits / docs, 2) if docs else None,
                "docs": docs,
            }
        return {
            "num_questions": self.num_questions,
            "num_rows": self.num_rows,
            "skipped": dict(self.skipped),
            "trajectories": dict(self.trajectories),
            "missing_doc_ids": self.missing_doc_ids,
            "pool_docs": {t: self.pool_docs[t] for t in ("tier1", "tier2")},
            "context_docs": {t: self.context_docs[t] for t in TIERS},
            "context_doc_share_pct": {
                t: round(100 * self.context_docs[t] / n_docs, 2) if n_docs else 0.0 for t in TIERS
            },
            "context_doc_tokens": {t: self.context_doc_tokens[t] for t in TIERS},
            "context_tokens": summarize(self.context_tokens),
            "budget": self.budget,
            "budget_fill_pct": round(100 * sum(self.context_tokens) / (self.budget * len(self.context_tokens)), 2)
            if self.context_tokens
            else 0.0,
            "distractors_with_rubric_entity": hit,
        }


def _unlocated(qid: str) -> tuple[str, int]:
    return (f"<question {qid}>", 0)


class Builder:
    """Assembles one row per question; see the module docstring for the algorithm."""

    def __init__(self, store: DocLookup, counter: TokenCounter, config: BuildConfig) -> None:
        self.store = store
        self.counter = counter
        self.cfg = config
        self.stats = BuildStats(budget=config.context_tokens)
        # Token counts of rendered documents by id, bounded (FIFO) so memory stays constant in the corpus size.
        self._costs: OrderedDict[str, int] = OrderedDict()

    def render_doc(self, doc: Doc) -> str:
        return self.cfg.doc_template.format(
            id=html.escape(doc.id, quote=True), title=html.escape(doc.title, quote=True), text=doc.text
        )

    def render(self, docs: list[Doc], question: str) -> str:
        c = self.cfg
        body = c.doc_separator.join(self.render_doc(d) for d in docs)
        return f"{c.instruction}{c.documents_header}{body}{c.question_prefix}{question}"

    def _doc_cost(self, doc: Doc) -> int:
        cost = self._costs.get(doc.id)
        if cost is None:
            cost = self._costs[doc.id] = self.counter.count(self.render_doc(doc) + self.cfg.doc_separator)
            if len(self._costs) > _COST_CACHE_SIZE:
                self._costs.popitem(last=False)
        return cost

    def build(
        self,
        q: Question,
        trajectories: list[Trajectory],
        locate: Callable[[str], tuple[str, int]] = _unlocated,
        store: DocLookup | None = None,
    ) -> Row | None:
        """The row of one question from its correct trajectories, or None (reason counted in stats.skipped).

        `store` overrides the builder's corpus for this question (the synthetic worlds: one corpus each).
        """
        cfg, st = self.cfg, self.stats
        store = self.store if store is None else store
        st.num_questions += 1
        if not trajectories:
            st.skipped["no_correct_trajectory"] += 1
            return None
        gold_ids = list(dict.fromkeys(q.gold_doc_ids))
        gold: list[Doc] = []
        for doc_id in gold_ids:
            doc = store.get(doc_id)
            if doc is None:
                raise DatasetError(*locate(q.id), f"gold document {doc_id!r} is not in the document store")
            gold.append(doc)
        tier1, tier2 = question_tiers(trajectories, set(gold_ids))
        st.pool_docs["tier1"] += len(tier1)
        st.pool_docs["tier2"] += len(tier2)

        budget = cfg.context_tokens
        used = self.counter.count(cfg.instruction + cfg.documents_header + cfg.question_prefix + q.question)
        used += sum(self._doc_cost(d) for d in gold)
        if used > budget:
            st.skipped["gold_over_budget"] += 1
            return None
        rng = random.Random(f"{cfg.seed}:{q.id}")
        taken: list[tuple[Doc, str]] = [(d, "gold") for d in gold]
        seen = set(gold_ids)
        for doc_id, tier in merge_tiers(tier1, tier2, cfg.tier1_ratio):
            doc = store.get(doc_id)
            if doc is None:
                st.missing_doc_ids += 1
                continue
            cost = self._doc_cost(doc)
            if used + cost <= budget:
                taken.append((doc, tier))
                seen.add(doc_id)
                used += cost
        if cfg.random_fill and len(store) > len(seen):
            misses = 0
            while misses < cfg.random_fill_max_misses and len(store) > len(seen):
                doc_id = store.random_id(rng)
                doc = None if doc_id in seen else store.get(doc_id)
                if doc is None or used + self._doc_cost(doc) > budget:
                    misses += 1
                    continue
                misses = 0
                taken.append((doc, "random"))
                seen.add(doc_id)
                used += self._doc_cost(doc)

        order = list(range(len(taken)))
        rng.shuffle(order)
        prompt = self.render([taken[i][0] for i in order], q.question)
        num_tokens = self.counter.count(prompt)
        while num_tokens > budget:
            # Boundary merges made the sum of piece counts optimistic: drop the last-taken distractor.
            last = len(taken) - 1
            if taken[last][1] == "gold":
                st.skipped["gold_over_budget"] += 1
                return None
            order.remove(last)
            taken.pop()
            prompt = self.render([taken[i][0] for i in order], q.question)
            num_tokens = self.counter.count(prompt)

        tiers: dict[str, list[str]] = {t: [] for t in TIERS}
        normed_entities = [norm(e) for e in q.gold_entities]
        hits: Counter[str] = Counter()
        for doc, tier in taken:
            tiers[tier].append(doc.id)
            st.context_docs[tier] += 1
            st.context_doc_tokens[tier] += self._doc_cost(doc)
            if tier != "gold":
                text = norm(f"{doc.title} {doc.text}")
                if any(e in text for e in normed_entities):
                    hits[tier] += 1
        for tier in ("tier1", "tier2", "random"):
            st.rubric_docs[tier] += hits[tier]
            if tiers[tier]:
                st.rubric_row_fractions.setdefault(tier, []).append(hits[tier] / len(tiers[tier]))
        n_distractors = sum(len(tiers[t]) for t in ("tier1", "tier2", "random"))
        if n_distractors:
            st.rubric_row_fractions.setdefault("all", []).append(sum(hits.values()) / n_distractors)
        st.context_tokens.append(num_tokens)
        st.num_rows += 1
        return make_row(
            prompt,
            label=q.answer,
            question=q.question,
            rubrics=q.gold_entities,
            dataset_name=q.dataset_name or cfg.dataset_name,
            source=cfg.source,
            metadata_extra={
                "longtrace": {
                    "question_id": q.id,
                    "doc_ids": [taken[i][0].id for i in order],
                    "tiers": tiers,
                    "context_tokens": num_tokens,
                    "tokenizer": self.counter.name,
                    "seed": cfg.seed,
                }
            },
        )


def build_rows(
    questions: Iterable[Question],
    trajectories: Iterable[Trajectory],
    store: DocLookup,
    counter: TokenCounter,
    config: BuildConfig,
    stats_out: list[BuildStats] | None = None,
) -> Iterator[Row]:
    """In-memory building (the synthetic world): rows in question order. Appends the stats to `stats_out`."""
    qs = list(questions)
    for q in qs:
        check_question(q)
    known = {q.id for q in qs}
    builder = Builder(store, counter, config)
    by_q = correct_by_question(qs, trajectories, builder.stats, known)
    if stats_out is not None:
        stats_out.append(builder.stats)
    for q in qs:
        row = builder.build(q, by_q.get(q.id, []), _unlocated)
        if row is not None:
            yield row


def correct_by_question(
    questions: list[Question], trajectories: Iterable[Trajectory], stats: BuildStats, known: set[str]
) -> dict[str, list[Trajectory]]:
    answers = {q.id: q for q in questions}
    out: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        stats.trajectories["total"] += 1
        if t.question_id not in known:
            stats.trajectories["unknown_question"] += 1
            continue
        q = answers[t.question_id]
        final = t.final
        if final is None:
            stats.trajectories["unfinished"] += 1
        elif answers_match(final.answer, q.answer, q.aliases):
            stats.trajectories["correct"] += 1
            out.setdefault(t.question_id, []).append(t)
        else:
            stats.trajectories["incorrect"] += 1
    if stats.trajectories["unknown_question"]:
        logger.warning("%d trajectories name unknown question ids", stats.trajectories["unknown_question"])
    return out


def build_files(
    questions_path: str | Path,
    trajectories_path: str | Path,
    docs_path: str | Path,
    out_path: str | Path,
    counter: TokenCounter,
    config: BuildConfig,
    quiet: bool = False,
    docs_index: str | Path | None = None,
) -> BuildStats:
    """`longtrace data build`: read the three inputs, write the rows (atomically), return the statistics."""
    questions, lines = load_questions(questions_path)
    with DocStore(docs_path, index_path=docs_index) as store:
        builder = Builder(store, counter, config)
        by_q = correct_by_question(questions, iter_trajectories(trajectories_path), builder.stats, set(lines))

        def locate(qid: str) -> tuple[str, int]:
            return (str(questions_path), lines[qid])

        progress = Progress("build", total=len(questions), quiet=quiet)
        with DatasetWriter(out_path) as writer:
            for q in questions:
                row = builder.build(q, by_q.pop(q.id, []), locate)
                if row is not None:
                    writer.write(row)
                progress.update(note=f"{writer.num_rows} rows")
        progress.close(note=f"{writer.num_rows} rows -> {out_path}")
    if builder.stats.missing_doc_ids:
        logger.warning("%d distractor ids were not in the document store", builder.stats.missing_doc_ids)
    return builder.stats
