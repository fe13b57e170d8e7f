"""Scoring under a deadline that can fire: CPU-heavy work off the event loop, and the deadline inside the scan.

`asyncio.timeout` alone cannot interrupt synchronous work: a long scan run in a handler holds the event loop, so
neither the request's timeout nor /health answer until it ends. So (1) the work of a long text or of many rubrics
runs in a scoring thread (short inputs stay inline, where a thread hop would cost more than the work), while the
awaiting side's timeout fires on time; and (2) the deadline travels in a context variable, which tasks and the
scoring threads inherit, so the scan itself stops at it instead of burning CPU for an answer nobody awaits.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

INLINE_MAX_CHARS = 1 << 17
"""Texts up to this many characters are scored on the event loop (about a millisecond of work); longer ones in a
thread."""
INLINE_MAX_RUBRICS = 256
"""More rubrics than this are scanned in a thread, whatever the text's length."""

_DEADLINE_S: ContextVar[float] = ContextVar("scoring_deadline_s", default=math.inf)
# Scans have a pool of their own: queued behind them in the loop's default executor, the stream worker's broker
# calls (`asyncio.to_thread`: reads, lease renewals) would wait. A few threads: the scans share one GIL anyway.
_SCORING_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="reward-scoring")


def deadline_s() -> float:
    """The current scoring deadline on the `time.monotonic()` clock; inf outside `scoring_deadline`."""
    return _DEADLINE_S.get()


@asynccontextmanager
async def scoring_deadline(timeout_s: float) -> AsyncIterator[None]:
    """Bound the block to `timeout_s`: TimeoutError when it passes, whether the block was awaiting (a judge) or
    scanning in a thread (the scan checks `deadline_s()`). Nested deadlines keep the earlier one."""
    token = _DEADLINE_S.set(min(_DEADLINE_S.get(), time.monotonic() + timeout_s))
    try:
        async with asyncio.timeout(timeout_s):
            yield
    finally:
        _DEADLINE_S.reset(token)


async def off_loop(heavy: bool, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)`: inline, or when `heavy` in a scoring thread with this context (so `deadline_s()`)."""
    if not heavy:
        return fn(*args, **kwargs)
    context = contextvars.copy_context()
    call = functools.partial(context.run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_SCORING_THREADS, call)
