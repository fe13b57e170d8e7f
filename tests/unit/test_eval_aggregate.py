"""`longtrace eval`'s aggregation (eval/aggregate.py) and its helpers in eval/run.py and outputs.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from eval.aggregate import summarize
from eval.outputs import SampleWriter
from eval.pipeline import sample_seed
from eval.run import (
    EngineInfo,
    EvalError,
    SampleRecord,
    check_versions,
    effective_context_len,
    question_ids,
    stop_token_ids,
)
from rollout_server.worker.processors import DEEPSEEK_R1, QWEN3


def _s(qid: str, j: int, outcome: float, **kw: Any) -> dict[str, Any]:
    base = {
        "id": qid,
        "sample_index": j,
        "outcome": outcome,
        "rubric": 0.0,
        "well_formed": True,
        "finished": True,
        "status": "completed",
        "response_tokens": 10,
        "dataset_name": "longqa",
    }
    return base | kw


def test_avg_pass_and_std_over_k() -> None:
    """Guards against avg@k, pass@k or the spread over k computed wrongly: q1 right twice, q2 once, q3 never."""
    samples = [
        _s("q1", 0, 1.0),
        _s("q1", 1, 1.0),
        _s("q2", 0, 1.0),
        _s("q2", 1, 0.0, status="truncated", finished=False, well_formed=False, response_tokens=30),
        _s("q3", 1, 0.0, rubric=1.0),  # out of order: grouping must not depend on it
        _s("q3", 0, 0.0, rubric=0.5),
    ]
    m = summarize(samples)
    assert (m["num_questions"], m["num_samples"], m["k"]) == (3, 6, 2)
    assert m["avg_at_k"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert m["pass_at_k"] == pytest.approx(2 / 3)
    assert m["accuracy_by_sample_index"] == pytest.approx([2 / 3, 1 / 3])
    assert m["accuracy_std_over_k"] == pytest.approx(math.sqrt(2 * (1 / 6) ** 2))  # ddof 1
    assert m["rubric_hit_rate"] == pytest.approx(0.75 / 3)
    assert m["well_formed_rate"] == pytest.approx(0.5 / 3 + 2 / 3)
    assert m["truncation_rate"] == pytest.approx(0.5 / 3)
    assert m["mean_response_tokens"] == pytest.approx((10 + 20 + 10) / 3)


def test_questions_weigh_the_same_and_datasets_break_down() -> None:
    """Guards against a sample-weighted mean (a question with more samples would count more) and against the
    per-dataset breakdown mixing datasets."""
    samples = [_s("a", 0, 1.0, dataset_name="x"), *(_s("b", j, 0.0, dataset_name="y") for j in range(3))]
    m = summarize(samples)
    assert m["avg_at_k"] == pytest.approx(0.5)
    assert m["k"] == 3 and m["accuracy_by_sample_index"] == pytest.approx([0.5, 0.0, 0.0])
    assert {name: d["avg_at_k"] for name, d in m["by_dataset"].items()} == {"x": 1.0, "y": 0.0}
    assert m["by_dataset"]["x"]["accuracy_std_over_k"] == 0.0  # k = 1 has no spread
    with pytest.raises(ValueError, match="no samples"):
        summarize([])


def test_question_ids_fall_back_to_row_index() -> None:
    """Guards against two questions sharing an id (compare would merge them) and against ids that change when
    some rows lack one."""
    assert question_ids(["q7", "q9"]) == ["q7", "q9"]
    assert question_ids(["q7", "q7"]) == ["0", "1"]
    assert question_ids(["q7", None]) == ["0", "1"]


def test_sampling_seeds_are_stable_and_distinct() -> None:
    """Guards against seeds that repeat across samples (k identical answers) or change between runs."""
    seeds = {sample_seed(0, q, j) for q in range(50) for j in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, 3, 1) == sample_seed(0, 3, 1) != sample_seed(1, 3, 1)


class _Vocab:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_stop_token_ids_follow_the_tokenizer() -> None:
    """Guards against Qwen3's hard-coded ids being sent to a model whose tokenizer spells <|im_end|> otherwise
    (it would never stop)."""
    tiny = _Vocab({"<|endoftext|>": 0, "<|im_end|>": 2})
    assert stop_token_ids(None, tiny, QWEN3) == [2, 0]
    assert stop_token_ids([7], tiny, QWEN3) == [7]
    assert stop_token_ids(None, _Vocab({}), DEEPSEEK_R1) == [151645]


def test_context_cap_and_version_check() -> None:
    """Guards against budgets the engine refuses (prompt + answer must stay under its context length) and
    against evaluating engines that do not serve the expected weights."""
    engines = [EngineInfo("a", "m", "default", 4096), EngineInfo("b", "m", "3", None)]
    assert effective_context_len(160000, engines) == 4095
    assert effective_context_len(1000, engines) == 1000
    check_versions([EngineInfo("a", "m", "default", None)], 0)
    with pytest.raises(EvalError, match=r"expected 3 \(--expect_version\)"):
        check_versions(engines, 3)


def _record(q: int, j: int) -> SampleRecord:
    return SampleRecord(
        id=str(q), question_index=q, question="?", label="x", dataset_name="d", sample_index=j, response="r",
        answer="a", well_formed=True, finished=True, status="completed", outcome=1.0, rubric=0.0, reward=1.0,
        prompt_tokens=3, response_tokens=2, weight_version=None, engine="e", gen_s=0.1,
    )  # fmt: skip


def test_sample_writer_orders_lines_and_removes_the_partial_file(tmp_path: Path) -> None:
    """Guards against samples.jsonl in completion order (questions finish out of order) and a stale partial file."""
    writer = SampleWriter(tmp_path)
    writer.write([_record(2, 0), _record(2, 1)])
    writer.write([_record(0, 1), _record(0, 0)])
    assert writer.partial.is_file()
    writer.finish()
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(x["question_index"], x["sample_index"]) for x in lines] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert not writer.partial.exists()
