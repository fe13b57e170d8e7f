"""Outcome judges: `rule` (offline, normalised matching) and `llm` (OpenAI-compatible chat API)."""

from __future__ import annotations

from reward_service.config import JudgeConfig, LlmJudgeConfig
from reward_service.judges.base import Judge, JudgeError

__all__ = ["Judge", "JudgeError", "build_judge"]


def build_judge(config: JudgeConfig) -> Judge:
    """The judge backend the config names."""
    if isinstance(config, LlmJudgeConfig):
        from reward_service.judges.llm import LlmJudge

        return LlmJudge(config)
    from reward_service.judges.rule import RuleJudge

    return RuleJudge(config)
