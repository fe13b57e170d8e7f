"""A scripted search agent over a synthetic world: it produces trajectories in the builder's format.

For each hop of a question's plan it searches (BM25, top-k), falls back to searching the entity's name
alone when the first query missed the hop's document, and gives up (no answer step: an unfinished
trajectory) when that misses too. Before opening the right result it sometimes opens wrong ones, drawn
from the three best-ranked wrong results (near-namesakes and neighbours: the confusable documents that
become Tier-1), and each of the hop's detours (documents of the branches not taken, where the world names them)
with the same probability. It cites exactly the documents of the hops, and answers wrongly with `error_prob`.
"""

from __future__ import annotations

import random

from datagen.agent_logs import AnswerStep, OpenStep, SearchStep, Step, Trajectory
from datagen.synth.bm25 import BM25
from datagen.synth.types import SynthQuestion, World

MAX_WRONG_OPENS_PER_HOP = 2


class ScriptedAgent:
    def __init__(self, world: World, top_k: int, wrong_open_prob: float, error_prob: float) -> None:
        self.doc_ids = [d.id for d in world.docs]
        self.index = BM25([world.search_text(d) for d in world.docs])
        self.top_k = top_k
        self.wrong_open_prob = wrong_open_prob
        self.error_prob = error_prob
        self._cache: dict[str, list[str]] = {}  # the trajectories of a question repeat their queries

    def search(self, query: str) -> list[str]:
        results = self._cache.get(query)
        if results is None:
            results = self._cache[query] = [self.doc_ids[i] for i, _ in self.index.search(query, self.top_k)]
        return list(results)

    def run(self, q: SynthQuestion, rng: random.Random) -> Trajectory:
        steps: list[Step] = []
        gold = set(q.gold_doc_ids)
        for hop in q.hops:
            results = self.search(hop.query)
            steps.append(SearchStep(query=hop.query, results=results))
            if hop.doc_id not in results:
                results = self.search(hop.fallback_query)
                steps.append(SearchStep(query=hop.fallback_query, results=results))
                if hop.doc_id not in results:
                    return Trajectory(question_id=q.id, steps=steps)
            for detour in rng.sample(hop.detours, len(hop.detours)):  # the branches it looked at and left
                if detour not in gold and rng.random() < self.wrong_open_prob:
                    steps.append(OpenStep(doc_id=detour))
            wrong = [d for d in results if d not in gold]
            for _ in range(MAX_WRONG_OPENS_PER_HOP):
                if not wrong or rng.random() >= self.wrong_open_prob:
                    break
                steps.append(OpenStep(doc_id=wrong.pop(rng.randrange(min(3, len(wrong))))))
            steps.append(OpenStep(doc_id=hop.doc_id))
        wrong_answer = q.wrong_answers and rng.random() < self.error_prob
        answer = rng.choice(q.wrong_answers) if wrong_answer else q.answer
        steps.append(AnswerStep(answer=answer, cited=q.gold_doc_ids))
        return Trajectory(question_id=q.id, steps=steps)
