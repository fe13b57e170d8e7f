"""`longtrace data synth`: worlds -> questions -> agent trajectories -> the tiered-distractor builder -> rows.

Worlds are generated one after another (a world gives `questions_per_world` questions, or all of them for
the full style) until `num_questions` rows exist: a question is dropped when none of its trajectories is
correct or its gold documents exceed the budget. Generation stops early, with a warning, when the single
full-style world runs out of new questions or MAX_EMPTY_WORLDS worlds in a row yield no row. Every random choice comes from an RNG seeded by
(seed, split, what, index), so the output is a pure function of the config and the split name.

`write_synth` writes the three builder inputs (docs.jsonl, questions.jsonl, trajectories.jsonl), so
`longtrace data build` can rebuild the dataset from them, plus dataset.jsonl, stats.json, config.json and,
for the tiny style, sft.jsonl and vocab.txt.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from common.config import ConfigError
from datagen.agent_logs import Trajectory
from datagen.builder import Builder, BuildStats, correct_by_question
from datagen.config import BuildConfig, SynthConfig
from datagen.dataset import Row, write_jsonl, write_rows
from datagen.docstore import Doc, MemoryDocs
from datagen.progress import Progress
from datagen.synth.agent import ScriptedAgent
from datagen.synth.tiny import TINY_FORMAT, TinyWorld, sft_example, tiny_vocabulary
from datagen.synth.types import SynthQuestion, World
from datagen.synth.world import FullWorld
from datagen.tokens import TokenCounter, WhitespaceCounter

logger = logging.getLogger(__name__)

MAX_EMPTY_WORLDS = 10


def dataset_name(cfg: SynthConfig) -> str:
    return "longtrace_tiny" if cfg.style == "tiny" else "longtrace_synth"


def build_config(cfg: SynthConfig) -> BuildConfig:
    """The builder settings of a synthetic dataset (the tiny style has its own prompt format)."""
    common: dict[str, Any] = {
        "context_tokens": cfg.context_tokens,
        "seed": cfg.seed,
        "tier1_ratio": cfg.tier1_ratio,
        "random_fill": cfg.random_fill,
        "dataset_name": dataset_name(cfg),
    }
    if cfg.style == "tiny":
        if cfg.instruction is not None:
            raise ConfigError("--instruction: the tiny world's prompt has no instruction (its vocabulary is closed)")
        return BuildConfig.model_validate(common | TINY_FORMAT)
    if cfg.instruction is not None:
        common["instruction"] = cfg.instruction
    return BuildConfig.model_validate(common)


def make_world(cfg: SynthConfig, index: int, rng: random.Random) -> World:
    if cfg.style == "tiny":
        return TinyWorld(index, cfg.num_entities, cfg.num_cities, rng)
    return FullWorld(index, cfg.num_entities, cfg.confusability, rng)


@dataclass
class SynthResult:
    config: SynthConfig
    docs: list[Doc]
    """Documents of every world (ids are prefixed with the world: "w3/f17")."""
    questions: list[SynthQuestion]
    """Every question asked, also those without a row."""
    trajectories: list[Trajectory]
    rows: list[Row]
    row_questions: list[SynthQuestion]
    """The question of each row."""
    stats: BuildStats
    num_worlds: int

    def summary(self) -> dict[str, Any]:
        return {
            "style": self.config.style,
            "num_worlds": self.num_worlds,
            "num_docs": len(self.docs),
            "num_questions_asked": len(self.questions),
            "num_trajectories": len(self.trajectories),
            "build": self.stats.to_dict(),
        }


def _warn_unused(cfg: SynthConfig) -> None:
    unused = {"tiny": ("confusability",), "full": ("num_cities",)}[cfg.style]
    for name in unused:
        if name in cfg.model_fields_set:
            logger.warning("--%s has no effect with --style %s", name.replace("_", "-"), cfg.style)


def synthesize(
    cfg: SynthConfig, split: str = "q", counter: TokenCounter | None = None, quiet: bool = True
) -> SynthResult:
    """Generate `cfg.num_questions` rows; `split` names the RNG streams and prefixes the question ids."""
    _warn_unused(cfg)
    builder = Builder(MemoryDocs([]), counter or WhitespaceCounter(), build_config(cfg))
    name = dataset_name(cfg)
    docs: list[Doc] = []
    questions: list[SynthQuestion] = []
    trajectories: list[Trajectory] = []
    rows: list[Row] = []
    row_questions: list[SynthQuestion] = []
    progress = Progress(f"synth {split}", total=cfg.num_questions, quiet=quiet)
    num_worlds = empty_worlds = 0
    while len(rows) < cfg.num_questions:
        world = make_world(cfg, num_worlds, random.Random(f"{cfg.seed}:{split}:world:{num_worlds}"))
        num_worlds += 1
        docs += world.docs
        store = MemoryDocs(world.docs)
        agent = ScriptedAgent(world, cfg.top_k, cfg.wrong_open_prob, cfg.agent_error_prob)
        qrng = random.Random(f"{cfg.seed}:{split}:questions:{world.index}")
        asked, rows_before = 0, len(rows)
        while len(rows) < cfg.num_questions and (cfg.questions_per_world is None or asked < cfg.questions_per_world):
            q = world.sample_question(qrng, cfg.hops, f"{split}{len(questions):05d}")
            if q is None:
                break
            asked += 1
            questions.append(q)
            trajs = [
                agent.run(q, random.Random(f"{cfg.seed}:{split}:agent:{q.id}:{t}"))
                for t in range(cfg.trajectories_per_question)
            ]
            trajectories += trajs
            question = q.to_question(name)
            correct = correct_by_question([question], trajs, builder.stats, {q.id}).get(q.id, [])
            row = builder.build(question, correct, store=store)
            if row is not None:
                rows.append(row)
                row_questions.append(q)
                progress.update()
        empty_worlds = empty_worlds + 1 if len(rows) == rows_before else 0
        if cfg.questions_per_world is None or empty_worlds >= MAX_EMPTY_WORLDS:
            break
    progress.close()
    if len(rows) < cfg.num_questions:
        logger.warning(
            "produced %d of %d rows (questions skipped: %s): the worlds ran out of usable questions; raise "
            "--num-entities or --context-tokens, or lower --hops",
            len(rows),
            cfg.num_questions,
            dict(builder.stats.skipped),
        )
    return SynthResult(cfg, docs, questions, trajectories, rows, row_questions, builder.stats, num_worlds)


def write_synth(result: SynthResult, out_dir: str | Path) -> dict[str, str]:
    """Write the world, the builder inputs and the dataset under out_dir; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = dataset_name(result.config)
    paths = {k: str(out / f"{k}.jsonl") for k in ("docs", "questions", "trajectories", "dataset")}
    write_jsonl(paths["docs"], ({"id": d.id, "title": d.title, "text": d.text} for d in result.docs))
    write_jsonl(paths["questions"], (q.to_json(name) for q in result.questions))
    write_jsonl(paths["trajectories"], (_trajectory_json(t) for t in result.trajectories))
    write_rows(paths["dataset"], result.rows)
    paths["stats"] = str(out / "stats.json")
    Path(paths["stats"]).write_text(json.dumps(result.summary(), indent=2) + "\n")
    paths["config"] = str(out / "config.json")
    Path(paths["config"]).write_text(json.dumps(result.config.model_dump(mode="json"), indent=2) + "\n")
    if result.config.style == "tiny":
        paths["sft"] = str(out / "sft.jsonl")
        write_jsonl(paths["sft"], (sft_example(q, r) for q, r in zip(result.row_questions, result.rows, strict=True)))
        paths["vocab"] = str(out / "vocab.txt")
        vocab = tiny_vocabulary(result.config.num_entities, result.config.num_cities)
        Path(paths["vocab"]).write_text("\n".join(vocab) + "\n")
    return paths


def _trajectory_json(t: Trajectory) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(t)
    return out
