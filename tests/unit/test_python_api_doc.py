"""The examples of docs/python_api.md marked `python runnable` run as written (offline), from the repository root."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "python_api.md"
BLOCKS = re.findall(r"^```python runnable\n(.*?)^```$", DOC.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_the_doc_has_its_runnable_examples() -> None:
    """Guards against the runnable marker being lost (a renamed fence would leave the test below with nothing to
    run, and the doc's examples unchecked): scoring, TRL, verl, datasets and the launcher's config."""
    assert len(BLOCKS) == 5, [b.splitlines()[0] for b in BLOCKS]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_runnable_example(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against the doc's examples going stale (a renamed entry point, a changed signature or default, a
    wrong reward in a comment): each block runs in a fresh namespace and its own asserts hold."""
    monkeypatch.chdir(REPO)
    code = compile(BLOCKS[index], f"{DOC.name}[block {index}]", "exec")
    exec(code, {"__name__": f"python_api_doc_{index}"})
