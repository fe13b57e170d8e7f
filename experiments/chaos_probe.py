"""What the chaos bench reads of the system under test: the Probe (cheap reads of the phase's queue through the
broker's read-only view, None while Redis is down) and the final accounting of every admitted group against the
streams and the final checkpoint's learner state (experiments/chaos.py describes the figures).
"""

from __future__ import annotations

from typing import Any

from broker.base import EngineInfo
from experiments.chaos_config import ChaosConfig, ChaosFailed
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

    def entry_group_ids(self) -> set[str]:
        """Group ids of the entries still in `tasks`, `rollouts` and `scored` (undecodable ones left out)."""
        from broker.base import ROLLOUTS, SCORED, TASKS
        from broker.schemas import Group, ScoredGroup, Task

        kinds: dict[str, Any] = {TASKS: Task, ROLLOUTS: Group, SCORED: ScoredGroup}
        ids: set[str] = set()
        for stream, kind in kinds.items():
            view, after = self._broker.view(stream), "0-0"
            while (page := view.peek(kind, after, count=1000)).last_id != after:
                ids.update(e.msg.group_id for e in page.entries)
                after = page.last_id
        return ids

    def close(self) -> None:
        self._broker.close()


def account(cfg: ChaosConfig, launcher: Any, probe: Probe) -> dict[str, Any]:
    """Every admitted group trained once in the final checkpoint's lineage, dropped, or still pending."""
    from broker.base import TASKS
    from learner.checkpoint import STATE_FILE, latest_checkpoint
    from learner.state import LearnerState

    phase = cfg.target_phase
    train = cfg.up.train_config("redis://x", phase, "m", "d", str(launcher.run.phase_dir(phase)))
    ckpt = latest_checkpoint(train.checkpoint_dir)
    if ckpt is None:
        raise ChaosFailed(f"no complete checkpoint in {train.checkpoint_dir}: the learner never finished")
    state = LearnerState.load(ckpt / STATE_FILE)
    admitted = probe.published(TASKS) or set()
    consumed = state.consumed_group_ids
    distinct = set(consumed)
    dropped = state.num_dropped_stale + state.num_dropped_zero_variance + state.num_dead_lettered
    pending_ids = probe.entry_group_ids()
    streams = probe.streams()
    stuck = {
        f"{stream}/{group}/{consumer}": held
        for stream, info in streams.items()
        for group, g in info["groups"].items()
        for consumer, held in g["holding"].items()
    }
    # The launcher samples the namespace once more after the learner exits, before the phase's processes stop.
    last = [x for x in launcher.run.system() if x.get("phase") == phase][-1:] or [{}]
    steps = cfg.up.phases[phase].steps
    return {
        "groups_admitted": len(admitted),
        "groups_trained": state.num_trained_groups,
        "groups_lost": len(admitted - distinct - pending_ids),
        "groups_duplicated": (len(consumed) - len(distinct))
        + max(0, state.num_trained_groups + dropped - len(distinct)),
        "groups_dropped_stale": state.num_dropped_stale,
        "groups_dropped_zero_variance": state.num_dropped_zero_variance,
        "groups_dead_lettered": state.num_dead_lettered,
        "groups_redelivered_skipped": state.num_duplicates,
        "groups_admitted_final_lineage": state.cursor.admitted,
        "groups_expected": steps * train.data.groups_per_step,
        "groups_pending_end": len(pending_ids),
        "entries_left": {s: info["length"] for s, info in streams.items()},
        "consumers_holding_entries": stuck,
        "final_checkpoint_step": state.step,
        # Steps logged twice: trained, lost with a killed learner, trained again after its restart.
        "steps_retrained": len(launcher.run.metrics(phase)) - steps,
        "finished": state.step == steps,
        "policy_version": last[0].get("policy_version"),
        "engine_versions": sorted(last[0].get("engine_versions", [])),
    }
