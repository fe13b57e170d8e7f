"""Okapi BM25 over a small in-memory corpus (the synthetic world's search engine), pure Python."""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter
from collections.abc import Sequence

_TOKEN = re.compile(r"[a-z0-9_]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased ASCII word runs (the same alphabet as the rubric's norm, without CJK)."""
    return _TOKEN.findall(text.lower())


class BM25:
    """Scores documents for a query: sum over query terms of idf(t) * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))."""

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.doc_len: list[int] = []
        self.postings: dict[str, list[tuple[int, int]]] = {}
        for i, text in enumerate(texts):
            terms = tokenize(text)
            self.doc_len.append(len(terms))
            for term, tf in Counter(terms).items():
                self.postings.setdefault(term, []).append((i, tf))
        n = len(self.doc_len)
        self.avgdl = sum(self.doc_len) / n if n else 0.0
        # The +1 inside the log keeps idf positive for terms in more than half of the documents (Lucene's form).
        self.idf = {t: math.log(1.0 + (n - len(p) + 0.5) / (len(p) + 0.5)) for t, p in self.postings.items()}

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The k best (document index, score) with a positive score; ties go to the lower index."""
        scores: dict[int, float] = {}
        k1, b, avgdl = self.k1, self.b, self.avgdl
        for term in dict.fromkeys(tokenize(query)):
            idf = self.idf.get(term)
            if idf is None:
                continue
            for i, tf in self.postings[term]:
                denom = tf + k1 * (1.0 - b + b * self.doc_len[i] / avgdl)
                scores[i] = scores.get(i, 0.0) + idf * tf * (k1 + 1.0) / denom
        return heapq.nlargest(k, scores.items(), key=lambda x: (x[1], -x[0]))
