"""The outcome judge interface: is `response` a correct answer to `question` given the gold `label`?"""

from __future__ import annotations

from typing import Protocol


class JudgeError(RuntimeError):
    """The judge could not reach a verdict (API down after retries, verdict unparseable after re-asks).

    Never turned into a reward of 0: the HTTP API answers 502 with the reason, the worker retries the group
    and finally dead-letters it.
    """


class Judge(Protocol):
    kind: str

    async def judge(self, question: str, label: str, response: str) -> bool:
        """True when `response` answers `question` with `label`; raise JudgeError when no verdict can be had."""
        ...

    async def aclose(self) -> None:
        """Release connections (called once, on shutdown)."""
        ...
