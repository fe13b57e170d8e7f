"""What the chaos bench reads of the system under test: the Probe, cheap reads of the phase's queue through the
broker's read-only view (None while Redis is down or a read fails), for the monkey's recovery times and for the
final accounting (experiments/chaos_accounting.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from broker.base import EngineInfo
from broker.schemas import DeadLetter
from experiments.side_reads import side_reads_config


class Probe:
    """Cheap reads of one phase's namespace through the broker's read-only view; the reads of the policy version,
    the engines and the dedup keys give None while Redis is down."""

    def __init__(self, redis_url: str, run_id: str) -> None:
        from broker.factory import connect

        # One quick attempt per read: a probe must not stall the launcher's tick while Redis is down.
        self._broker = connect(side_reads_config(redis_url, run_id, connect_timeout_s=1.0))

    def _try(self, fn: Any) -> Any:
        from broker.base import BrokerError

        try:
            return fn()
        except BrokerError:
            return None

    def published(self, stream: str) -> set[str] | None:
        """Group ids ever published to `stream` (its dedup keys); None while Redis is down."""
        keys: set[str] | None = self._try(self._broker.view(stream).dedup_keys)
        return keys

    def policy_version(self) -> int | None:
        version: int | None = self._try(self._broker.policy_version.get)
        return version

    def engines(self) -> list[EngineInfo] | None:
        """The live engines of the registry, or None."""
        engines: list[EngineInfo] | None = self._try(self._broker.engines.live)
        return engines

    def streams(self) -> dict[str, Any]:
        """Per stream: length, its consumer groups' pending counts, and consumers holding entries."""
        from broker.base import STREAMS

        out: dict[str, Any] = {}
        for stream in STREAMS:
            stats = self._broker.view(stream).stats()
            out[stream] = {
                "length": stats.length,
                "groups": {
                    name: {
                        "pending": g.pending,
                        "holding": {
                            c: {"pending": h.pending, "idle_s": round(h.idle_s, 1)} for c, h in g.holders.items()
                        },
                    }
                    for name, g in stats.groups.items()
                },
            }
        return out

    def entry_group_ids(self) -> set[str] | None:
        """Group ids of the entries still in `tasks`, `rollouts` and `scored` (undecodable ones left out); None if a
        read failed."""
        from broker.base import ROLLOUTS, SCORED, TASKS
        from broker.schemas import Group, ScoredGroup, Task

        kinds: dict[str, Any] = {TASKS: Task, ROLLOUTS: Group, SCORED: ScoredGroup}

        def read() -> set[str]:
            ids: set[str] = set()
            for stream, kind in kinds.items():
                ids.update(m.group_id for m in self._messages(stream, kind))
            return ids

        found: set[str] | None = self._try(read)
        return found

    def dead_letters(self) -> list[DeadLetter] | None:
        """Every letter in the `dead` stream, oldest first; None if the read failed."""
        from broker.base import DEAD

        letters: list[DeadLetter] | None = self._try(lambda: list(self._messages(DEAD, DeadLetter)))
        return letters

    def _messages(self, stream: str, kind: Any) -> Iterator[Any]:
        view, after = self._broker.view(stream), "0-0"
        while (page := view.peek(kind, after, count=1000)).last_id != after:
            yield from (e.msg for e in page.entries)
            after = page.last_id

    def close(self) -> None:
        self._broker.close()


class ProbeHandle:
    """One run's Probe, opened on first use: the injectors exist before the launcher has started Redis."""

    def __init__(self, launcher: Any, phase: str) -> None:
        self._launcher = launcher
        self._phase = phase
        self._probe: Probe | None = None

    def get(self) -> Probe:
        if self._probe is None:
            self._probe = Probe(self._launcher.redis_url, self._launcher.cfg.phase_run_id(self._phase))
        return self._probe

    def close(self) -> None:
        """Close the probe's broker connection, if it was opened."""
        if self._probe is not None:
            self._probe.close()
