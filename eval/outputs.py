"""An eval's output directory: samples.jsonl (one line per question and sample), summary.json, logs/.

Samples are appended to samples.jsonl.partial as each question is scored (a crashed run keeps what it did),
then written to samples.jsonl in (question, sample) order when the run ends.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from eval.aggregate import summarize
from eval.config import EvalConfig
from eval.run import EvalRun, SampleRecord

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"


class SampleWriter:
    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / SAMPLES_FILE
        self.partial = out_dir / f"{SAMPLES_FILE}.partial"
        self._file = self.partial.open("wb")
        self._index: list[tuple[int, int, int, int]] = []  # (question, sample, offset, length)

    def write(self, records: list[SampleRecord]) -> None:
        for r in records:
            line = (json.dumps(r.to_dict(), ensure_ascii=False) + "\n").encode()
            self._index.append((r.question_index, r.sample_index, self._file.tell(), len(line)))
            self._file.write(line)
        self._file.flush()

    def finish(self) -> None:
        """Write samples.jsonl sorted by (question, sample) and drop the partial file."""
        self._file.close()
        with self.partial.open("rb") as src, self.path.open("wb") as dst:
            for _, _, offset, length in sorted(self._index):
                src.seek(offset)
                dst.write(src.read(length))
        self.partial.unlink()

    def close(self) -> None:
        self._file.close()


def build_summary(cfg: EvalConfig, run: EvalRun, local: bool, wall_s: float) -> dict[str, Any]:
    """Metrics (aggregate.summarize) plus what was evaluated how: engines, judge, limits, timings, the config.
    `wall_s`: the whole command, local service start-up included."""
    samples = [s.to_dict() for s in run.samples]
    summary = summarize(samples)
    tokens = sum(s["response_tokens"] for s in samples)
    eval_s = max(run.timings["eval_s"], 1e-9)
    versions = sorted({s["weight_version"] for s in samples if s["weight_version"] is not None})
    summary.update(
        {
            "dataset_path": cfg.dataset_path,
            "model_path": next((e.model_path for e in run.engines if e.model_path), cfg.model_path),
            "engines": [
                {"url": e.url, "model_path": e.model_path, "weight_version": e.weight_version, "local": local}
                for e in run.engines
            ],
            "engine_weight_versions": [e.policy_version or 0 for e in run.engines],  # a hand-set name: 0
            "sample_weight_versions": versions,
            "judge": run.judge,
            "eta": 0.0,
            "max_context_len": run.max_context_len,
            "stop_token_ids": run.stop_token_ids,
            "timings": {
                **run.timings,
                "wall_s": round(wall_s, 3),
                "samples_per_s": round(len(samples) / eval_s, 3),
                "response_tokens_per_s": round(tokens / eval_s, 1),
            },
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": cfg.model_dump(mode="json"),
        }
    )
    return summary


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    path = out_dir / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return path


def load_run(
    path: str | Path, keep: frozenset[str] = frozenset({"id", "question", "dataset_name", "sample_index", "outcome"})
) -> tuple[dict[str, Any], list[dict[str, Any]] | None, Path]:
    """(summary, samples with the fields in `keep` or None when there is no samples.jsonl, run directory) of an
    eval's out_dir or of its summary.json; ValueError naming the path when there is no summary."""
    p = Path(path)
    run_dir = p if p.is_dir() else p.parent
    summary_path = p / SUMMARY_FILE if p.is_dir() else p
    if not summary_path.is_file():
        raise ValueError(f"{path}: no {SUMMARY_FILE} (give an eval's out_dir or its summary.json)")
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    samples_path = run_dir / SAMPLES_FILE
    samples = None
    if samples_path.is_file():
        with samples_path.open(encoding="utf-8") as f:  # responses can be long: keep only what comparing reads
            samples = [{k: v for k, v in json.loads(line).items() if k in keep} for line in f if line.strip()]
    return summary, samples, run_dir
