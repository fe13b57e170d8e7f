"""One entry for every command line: `longtrace` (deploy/cli.py) and the `python -m` modules the launcher runs.

A command is a parser made by `command()`, `bench()` or `standalone()`: its defaults name the handler (`func`),
whether leftover `--section.key value` flags are config overrides (`overrides`) and how the process logs (`logs`).
`run_cli(parser, argv)` parses, hands the override flags to the handler as `args.overrides` where the command takes
them and rejects them, naming them, where not; sets up logging once; runs the handler and exits with its code. A
ConfigError (a bad flag, key or file) exits 2 with `PROG: error: ...` on stderr, as argparse's own usage errors do,
never with a traceback; Ctrl-C exits 130.

Kept light (argparse, common.config, common.logs): `longtrace --help` imports every package's CLI module and must
stay fast, so handlers import torch, megatron and the services themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from common.config import ConfigError
from common.logs import setup_logging

if TYPE_CHECKING:
    SubParsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    SubParsers: TypeAlias = argparse._SubParsersAction  # not subscriptable at runtime
Handler: TypeAlias = Callable[[argparse.Namespace], int]
Register: TypeAlias = Callable[[SubParsers, SubParsers], None]
"""A package CLI module's `register(commands, benches)`: adds its subcommands and its `bench` entries."""


@dataclass(frozen=True)
class Logs:
    """How a command's process logs (common/logs.py); run_cli sets it up once, before the handler runs."""

    prefix: str = ""
    """Written before each line's level: which process wrote it when several share a terminal."""
    level: str | None = None
    """Root level; None: $LONGTRACE_LOG_LEVEL, else INFO."""
    json_level: str | None = None
    """Root level when the command's `--json` is given: its stdout is the answer, stderr stays quiet."""
    ranked: bool = False
    """Under torchrun: `[rankN] ` before the prefix, and ranks other than 0 log only warnings and errors."""

    def setup(self, args: argparse.Namespace) -> None:
        level, prefix = self.level, self.prefix
        if self.json_level is not None and getattr(args, "json", False):
            level = self.json_level
        if self.ranked:
            rank = os.environ.get("RANK", "0")
            prefix = f"[rank{rank}] {prefix}"
            level = level if rank == "0" else "WARNING"
        setup_logging(level, prefix=prefix)


DEFAULT_LOGS = Logs()
QUIET = Logs(level="WARNING")
"""Commands whose answer is their stdout (a bench's JSON, a table): only warnings and errors on stderr."""


def _set(
    parser: argparse.ArgumentParser, func: Handler | None, overrides: bool, logs: Logs | None
) -> argparse.ArgumentParser:
    # The contract run_cli reads (and tests that call a handler directly rely on): `func`, `overrides` (a bool
    # until parsing, then the list of override flags) and `logs` (None: the command configures no logging).
    parser.set_defaults(func=func, overrides=overrides, logs=logs)
    return parser


def command(
    parent: SubParsers,
    name: str,
    func: Handler,
    *,
    overrides: bool = False,
    logs: Logs | None = DEFAULT_LOGS,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """Add subcommand `name` of `parent`, run by `func(args)`. With `overrides`, leftover `--section.key value`
    flags reach it as `args.overrides` (for load_config); without, they are usage errors naming the flag.
    `kwargs` go to argparse (help, description, epilog, ...)."""
    # No abbreviations: an override `--c` must not silently become `--config` (or `--cl` `--clients`).
    kwargs.setdefault("allow_abbrev", False)
    return _set(parent.add_parser(name, **kwargs), func, overrides, logs)


def bench(
    benches: SubParsers,
    name: str,
    func: Handler,
    *,
    json_help: str = "print one JSON object",
    overrides: bool = False,
    logs: Logs | None = QUIET,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """Add `longtrace bench NAME` with its `--json` flag (see `print_result`); quiet logs by default."""
    parser = command(benches, name, func, overrides=overrides, logs=logs, **kwargs)
    parser.add_argument("--json", action="store_true", help=json_help)
    return parser


def standalone(
    prog: str, func: Handler | None, *, overrides: bool = False, logs: Logs | None = DEFAULT_LOGS, **kwargs: Any
) -> argparse.ArgumentParser:
    """The parser of a one-command `python -m` module (the launcher's jobs, harness helpers) for run_cli."""
    kwargs.setdefault("allow_abbrev", False)  # as in `command`
    return _set(argparse.ArgumentParser(prog=prog, **kwargs), func, overrides, logs)


def add_config(
    parser: argparse.ArgumentParser,
    help: str,
    *,
    positional: bool = False,
    default: str | None = None,
    required: bool = False,
) -> None:
    """Add `--config FILE`, the command's TOML file (read into `args.config`). With `positional`, the command also
    keeps the CONFIG positional it always took (`longtrace up CONFIG`): either names the file (both: they must
    agree) and one of them is required."""
    if positional:
        parser.add_argument("config", nargs="?", metavar="CONFIG", help=help)
        parser.add_argument("--config", dest="config_option", metavar="FILE", help="the same as CONFIG")
    else:
        parser.add_argument("--config", metavar="FILE", default=default, required=required, help=help)


def root_parser(registers: Iterable[Register], description: str | None = None) -> argparse.ArgumentParser:
    """`longtrace COMMAND ...` and `longtrace bench BENCH ...` with the commands each `register` adds."""
    parser = argparse.ArgumentParser(prog="longtrace", description=description, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench_parser = commands.add_parser("bench", help="benchmarks that print one JSON object", allow_abbrev=False)
    benches = bench_parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for register in registers:
        register(commands, benches)
    return parser


def _take_overrides(argv: list[str], unknown: list[str]) -> tuple[list[str], list[str]]:
    """Split argv into what the parser knows and the override flags, each `--key` with its value.

    argparse hands the word after an unknown `--key` to a free positional (`up --config F --run_dir x` would read
    x as CONFIG); an override's value is the next word unless that is a flag (as in parse_overrides)."""
    flags = {word for word in unknown if word.startswith("--")}
    kept: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word not in flags:
            kept.append(word)
            continue
        overrides.append(word)
        if "=" not in word and i < len(argv) and not argv[i].startswith("--"):
            overrides.append(argv[i])
            i += 1
    return kept, overrides


def _resolve_config(args: argparse.Namespace) -> None:
    if not hasattr(args, "config_option"):
        return
    given, option = args.config, args.config_option
    if given is not None and option is not None and Path(given).resolve() != Path(option).resolve():
        raise ConfigError(f"CONFIG {given!r} and --config {option!r} differ: name the file once")
    args.config = given if given is not None else option
    if args.config is None:
        raise ConfigError("CONFIG is required (a positional TOML file, or --config FILE)")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse as run_cli does: `args.overrides` is the list of override flags (empty for a command without them),
    `args.config` the TOML file of a command with a CONFIG positional, whichever way it was named."""
    words = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(words)
    overrides: list[str] = []
    if unknown:
        if not getattr(args, "overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        words, overrides = _take_overrides(words, unknown)
        args, unknown = parser.parse_known_args(words)
        overrides += unknown  # stray words: parse_overrides rejects them by name
    args.overrides = overrides
    _resolve_config(args)
    return args


def guarded(prog: str, body: Callable[[], int]) -> int:
    """Run `body`; its exit code, 2 with `PROG: error: MESSAGE` on stderr for a ConfigError, 130 on Ctrl-C."""
    try:
        return body()
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> NoReturn:
    """Parse `argv` (default: sys.argv), set up the command's logging, run its handler, exit with its code."""

    def body() -> int:
        args = parse(parser, argv)
        logs: Logs | None = getattr(args, "logs", DEFAULT_LOGS)
        if logs is not None:
            logs.setup(args)
        code: int = args.func(args)
        return code

    sys.exit(guarded(parser.prog, body))


def run_command(register: Register, path: Sequence[str], argv: Sequence[str] | None = None) -> NoReturn:
    """`python -m MODULE ARGS` as `longtrace PATH... ARGS`, with only `register`'s commands (a service's module
    never imports another service, nor deploy/cli.py)."""
    run_cli(root_parser([register]), [*path, *(sys.argv[1:] if argv is None else argv)])


@contextmanager
def user_errors() -> Iterator[None]:
    """A ValueError raised inside is the user's (a bad model directory, a file named by a flag, a value the
    command cannot use): a ConfigError, so the message reaches stderr with exit 2 and no traceback."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Counts and sizes given as flags must be >= 1; the error names the flag (`num_groups` is `--num-groups`)."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def print_result(result: dict[str, Any], as_json: bool, text: Callable[[dict[str, Any]], str] | None = None) -> None:
    """A bench's answer on stdout: one JSON line with `--json` (what scripts parse), else `text(result)` or one
    `key: value` line per figure."""
    if as_json:
        print(json.dumps(result), flush=True)
    elif text is not None:
        print(text(result), flush=True)
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
