"""Typed configs of the offline data tools: the tiered-distractor builder and the synthetic world."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from common.config import BaseConfig

DEFAULT_INSTRUCTION = "Do not introduce new facts. Answer only using the provided documents."


class BuildConfig(BaseConfig):
    """How `longtrace data build` assembles a context (see datagen/builder.py for the algorithm)."""

    context_tokens: int = Field(131072, gt=0)
    """Token budget of the whole user message (instruction, documents, question), without the chat template."""
    seed: int = 0
    """Seed of the document shuffle (and of the random fill); the output is a pure function of inputs and seed."""
    instruction: str = DEFAULT_INSTRUCTION
    """First line of the user message."""
    documents_header: str = "\n\nDocuments:\n"
    """Text between the instruction and the first document."""
    doc_template: str = '<section id="{id}" title="{title}">\n{text}\n</section>'
    """Template of one document: {id} and {title} are HTML-escaped, {text} is inserted as is."""
    doc_separator: str = "\n"
    """Text between two documents."""
    question_prefix: str = "\n\nQuestion: "
    """Text between the last document and the question."""
    source: str = "longqa"
    """The rows' `source` (selects the reward endpoint in LongTraceRL)."""
    dataset_name: str = "longtracerl"
    """`extra_reward_info.dataset_name` for questions that name none."""
    tier1_ratio: float | None = Field(None, ge=0.0, le=1.0)
    """None: all Tier-1 documents before any Tier-2 (the paper). A number: the share of Tier-1 among
    distractors while both tiers have documents left."""
    random_fill: bool = False
    """After both tiers, fill the remaining budget with uniformly drawn corpus documents (the paper's
    'random' distractors)."""
    random_fill_max_misses: int = Field(64, ge=1)
    """The random fill stops after this many consecutive drawn documents that do not fit or repeat."""

    @field_validator("dataset_name")
    @classmethod
    def _not_longrlvr(cls, v: str) -> str:
        if v == "longrlvr":
            raise ValueError("'longrlvr' marks the LongRLVR chunk-id rubric variant, not entity rubrics")
        return v

    @field_validator("doc_template")
    @classmethod
    def _template_has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("the template must contain {text}")
        return v


class SynthConfig(BaseConfig):
    """The synthetic world of `longtrace data synth` (datagen/synth/)."""

    style: Literal["full", "tiny"] = "full"
    """full: encyclopedia-style entity documents; tiny: the demo's word-level world of one-line facts."""
    num_questions: int = Field(100, ge=1)
    """Rows to produce. Questions without a correct trajectory or whose gold documents exceed the budget are
    dropped and replaced by new ones."""
    hops: int = Field(3, ge=1, le=8)
    """Edges of a question's chain, the final attribute edge included: a k-hop question names v0 and asks an
    attribute of v_{k-1}; its rubrics are the k path entities. Default: 3 (full), 2 (tiny)."""
    context_tokens: int = Field(1024, gt=0)
    """Token budget of a user message. Default: 1024 (full), 60 (tiny). A full-style question's tiers hold about
    1,000 words at top_k 8: for longer contexts raise top_k or set random_fill."""
    tier1_ratio: float | None = Field(None, ge=0.0, le=1.0)
    """Share of Tier-1 among distractors while both tiers have documents (None: Tier-1 first, as the paper)."""
    confusability: float = Field(0.3, ge=0.0, le=1.0)
    """full style: probability that a new name reuses a name part of an existing entity, so searches return
    near-namesakes. The tiny world's names are fixed (E00, C07) and ignore it."""
    seed: int = 0
    """Seed of the world, the questions, the agent and the builder."""
    num_entities: int = Field(300, ge=8)
    """Entities per world. Default: 300 (full), 64 (tiny)."""
    num_cities: int = Field(32, ge=4, le=100)
    """tiny style: cities, the answer candidates."""
    questions_per_world: int | None = Field(None, ge=1)
    """Questions drawn from one world before a fresh world is generated. Default: all of them (full), 4 (tiny:
    fresh facts keep a tiny model from memorising the world instead of reading the context)."""
    trajectories_per_question: int = Field(5, ge=1)
    """Search-agent trajectories per question (the paper samples 5)."""
    top_k: int = Field(8, ge=1)
    """Search results per query."""
    wrong_open_prob: float = Field(0.5, ge=0.0, le=1.0)
    """Probability that the agent opens a wrong search result before the right one at a hop (makes Tier-1)."""
    agent_error_prob: float = Field(0.15, ge=0.0, le=1.0)
    """Probability that a trajectory ends with a wrong answer (dropped by the builder)."""
    random_fill: bool = False
    """Fill what the tiers leave of the budget with random documents of the world."""
    instruction: str | None = None
    """Instruction line (default: the builder's for full, none for tiny)."""

    @model_validator(mode="before")
    @classmethod
    def _style_defaults(cls, data: Any) -> Any:
        # Knobs left unset take the style's default: the tiny world is a different scale.
        if isinstance(data, dict) and data.get("style") == "tiny":
            data = dict(data)
            for name, value in _TINY_DEFAULTS.items():
                if data.get(name) is None:
                    data[name] = value
        return data

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if self.style == "tiny" and self.num_entities > 100:
            raise ValueError("num_entities: the tiny world names entities E00..E99, at most 100")
        return self


_TINY_DEFAULTS: dict[str, Any] = {"hops": 2, "context_tokens": 60, "num_entities": 64, "questions_per_world": 4}
