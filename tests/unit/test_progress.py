"""Progress bars of the long commands (common/progress.py): drawn on stderr only when it is a terminal, never on
stdout (a bench's stdout is the JSON scripts parse), and present in every `longtrace bench`."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import io
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.progress import bar
from deploy.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
HELPER_IMPORT = "from common.progress import bar"
EXEMPT: dict[str, str] = {}
"""Benches that may lack a bar for now, each with the reason."""


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr is in an interactive shell."""

    def isatty(self) -> bool:
        return True


def test_bar_draws_on_a_terminal_stderr_and_writes_nothing_to_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guards against a bar that goes to stdout (it would corrupt the JSON a bench prints there for scripts) or
    that never draws on a terminal (a long bench that looks hung)."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # the helper picks stderr when called, not at import
    with bar(3, "bench test", "req") as b:
        for _ in range(3):
            b.update()
    assert "bench test" in terminal.getvalue() and "req" in terminal.getvalue()
    assert capsys.readouterr().out == ""


def test_bar_is_silent_when_stderr_is_not_a_terminal() -> None:
    """Guards against bars written into log files and pipes (the launcher's logs, CI output, `2>file`): redrawn
    lines with carriage returns that bury the bench's own messages."""
    log = io.StringIO()
    with bar(5, "bench test", "req", file=log) as b:
        b.update(5)
        b.set_postfix_str("still silent")
    assert log.getvalue() == ""
    assert b.disable


def test_bar_is_erased_when_it_closes() -> None:
    """Guards against a finished bar left on the terminal above the bench's answer and its later lines."""
    terminal = _Terminal()
    b = bar(2, "bench test", "step", file=terminal)
    b.update(2)
    b.close()
    assert b.leave is False and b.dynamic_ncols
    assert terminal.getvalue().endswith("\r")  # tqdm's erase: the line cleared, the cursor back at its start


def _bench_parsers() -> dict[str, argparse.ArgumentParser]:
    root = build_parser()
    commands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    benches = next(a for a in commands.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    return dict(benches.choices)


def _modules_reached(handler: Callable[..., Any]) -> set[str]:
    """Modules a bench handler imports (its imports are inside the function), following the functions of its own
    module that it calls by name (e.g. `_bench` -> `_run`)."""
    module = sys.modules[handler.__module__]
    names = {handler.__module__}
    todo, seen = [handler], {handler}
    while todo:
        source = inspect.getsource(todo.pop())
        names |= set(re.findall(r"^\s*from ([\w.]+) import", source, re.M))
        for called in re.findall(r"\b(\w+)\(", source):
            fn = getattr(module, called, None)
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ and fn not in seen:
                seen.add(fn)
                todo.append(fn)
    return {name for name in names if (REPO / name.split(".")[0]).is_dir()}  # this repository's modules only


def test_every_bench_draws_a_bar_through_the_helper() -> None:
    """Guards against a bench added (or rewritten) without a progress bar, or with tqdm arguments of its own (a bar on
    stdout, or drawn into logs): each bench the parser registers must reach a module that imports the helper. The
    names come from the real parser, so the test cannot pass on an empty list."""
    parsers = _bench_parsers()
    expected = {"broker", "reward", "rollout", "engine", "learner", "learner-memory", "fuzz", "chaos", "ablation"}
    assert expected | {"async", "weight-sync"} <= set(parsers)
    missing = {}
    for name, parser in parsers.items():
        if name in EXEMPT:
            continue
        handler = parser.get_default("func")
        reached = _modules_reached(handler)
        using = []
        for module in sorted(reached):
            spec = importlib.util.find_spec(module)
            if spec is not None and spec.origin and HELPER_IMPORT in Path(spec.origin).read_text():
                using.append(module)
        if not using:
            missing[name] = sorted(reached)
    assert not missing, f"benches without a common.progress bar (modules their handler reaches): {missing}"
    assert not set(EXEMPT) - set(parsers), "an exempt bench is no longer registered: drop it from EXEMPT"


def test_no_module_builds_its_own_bench_bar() -> None:
    """Guards against bench modules calling tqdm directly: the stream, the TTY check and erase-on-close belong to
    the helper, one place."""
    offenders = [
        str(path.relative_to(REPO))
        for pattern in ("*/bench*.py", "experiments/fuzz*.py", "experiments/chaos*.py", "experiments/ablate*.py")
        for path in REPO.glob(pattern)
        if ".venv" not in path.parts and re.search(r"^\s*(from tqdm|import tqdm)", path.read_text(), re.M)
    ]
    assert offenders == []


def test_async_bench_step_bar_follows_the_metrics_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against the async bench's step bar that never moves (it watches the phases' metrics.jsonl, one line
    per learner step, of files that do not exist yet when the run starts) or overshoots its total."""
    from experiments.bench_async import _StepBar

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    sft, rl = tmp_path / "sft" / "metrics.jsonl", tmp_path / "rl" / "metrics.jsonl"
    with _StepBar([sft, rl], 5, "bench async: test", poll_s=0.01) as steps:
        sft.parent.mkdir()
        sft.write_text('{"step": 1}\n{"step": 2}\n')
        rl.parent.mkdir()
        rl.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4}\n')  # a retrained step: 6 lines in all
        deadline = time.monotonic() + 5
        while steps.bar.n < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert steps.bar.n == 5
    assert "bench async: test" in terminal.getvalue()


def test_async_bench_step_bar_runs_no_thread_when_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against a polling thread reading the run's files every second when nobody can see the bar."""
    from experiments.bench_async import _StepBar

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, even under `pytest -s` in one
    with _StepBar([tmp_path / "metrics.jsonl"], 3, "bench async: test") as steps:
        assert steps._thread is None


def test_data_commands_draw_a_bar_on_a_terminal_and_lines_in_a_log() -> None:
    """Guards against `data build`, synth and the feeder's scan showing only a redrawn text line on a terminal (no
    bar), or against the bar reaching their log files (the launcher's logs are not terminals: there they must keep
    one line per interval, and the final line either way)."""
    from datagen.progress import Progress

    terminal = _Terminal()
    p = Progress("build", total=4, stream=terminal, interval_s=0.0)
    for _ in range(4):
        p.update(1, note="ok")
    p.close()
    drawn = terminal.getvalue()
    assert re.search(r"build: +\d+%\|", drawn)  # tqdm's bar
    assert drawn.rsplit("\r", 1)[-1].startswith("build: 4/4 (") and drawn.endswith("\n")  # then the final line
    log = io.StringIO()
    q = Progress("build", total=4, stream=log, interval_s=0.0)
    for _ in range(4):
        q.update(1)
    q.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 5 and all(line.startswith("build: ") for line in lines) and "%|" not in log.getvalue()
