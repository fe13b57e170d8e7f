"""Progress bars of the long commands (every `longtrace bench`): one tqdm on stderr, drawn on a terminal only.

`bar(total, desc, unit)` is the one place the arguments live: stderr (a bench's stdout is its JSON, which scripts
parse), `disable=None` (tqdm draws only when stderr is a TTY: a log file or a pipe gets nothing), `leave=False`
(the bar is erased when it closes, so the bench's own lines and answer stay as they were) and `dynamic_ncols`.
Update it per unit of the bench's work (a request batch, a round, a step, a run), never per token: an update costs
about a microsecond, and a closed or disabled bar ignores updates.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm


def bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    *,
    file: TextIO | None = None,
    disable: bool | None = None,
    delay_s: float = 0.0,
) -> Any:
    """A tqdm bar over `total` units (None: a counter) named `desc`; use it as a context manager or close it.
    `file` defaults to the stderr of the call (pytest's capture included); `disable=False` forces it on; `delay_s`:
    drawn only once the work has taken that long (a short scan shows nothing)."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr if file is None else file,
        disable=disable,
        leave=False,
        dynamic_ncols=True,
        delay=delay_s,
    )
