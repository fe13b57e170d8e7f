"""Rank 0's reader of the `scored` stream: one step's worth of trainable groups, oldest first.

It drops (and counts) groups older than the staleness bound (`Group.group_version` against the learner's
`LearnerState.policy_version`), optionally groups whose rewards are all equal, skips redelivered groups whose fate
is already decided (ledger.py), and dead-letters malformed ones. It fills each step oldest-first: it waits
(bounded) for admitted groups that would be too old after this step, and carries younger surplus groups to the
next step instead of letting them overtake older ones. Entries stay unacked until the checkpoint that includes the step
they fed (`ack_held`; carried groups stay unacked across it), so a crash loses nothing and retrains nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from broker.base import BrokerError, Consumer, Entry
from broker.routing import RoutingError, RoutingStore, decode_routing
from broker.schemas import ScoredGroup
from learner.batching import TrainBatch, build_batch, invalid_reason, is_zero_variance
from learner.ledger import GroupLedger
from learner.state import LearnerState
from learner.train_config import BatchConfig, DataConfig, LossConfig

logger = logging.getLogger(__name__)

CONSUMER_GROUP = "learner"  # the learner's consumer group on `scored` (one consumer: rank 0)


@dataclass
class _Pooled:
    """A trainable group read from `scored` and not yet in a batch (its entry unacked, its fate not decided)."""

    entry_id: str
    scored: ScoredGroup
    routing: list[npt.NDArray[np.int16]] | None = None  # its samples' routed experts (routing replay)


class ScoredReader:
    """Rank 0's view of the `scored` stream: collects one step's worth of trainable groups, oldest first.

    A step at policy version v needs `groups_per_step` groups. Once that many are in, the reader checks the
    feeder's record of admitted groups not read yet (`LearnerState.admitted_unread`): one admitted at version a
    with v - a >= max_staleness is *due* (read at the next version it would be too old). While a due group is
    unread and the batch would hold a *young* group (v - its version < max_staleness, still within the bound
    next step), the reader keeps reading, up to `due_wait_s`, then takes the oldest groups first; the younger
    surplus is carried to the next step. A due group that does not come in time (dead-lettered upstream, its
    worker lost) is given up on and not waited for again (it stays admitted: it may still come, or be released by
    upstream.py); one the reader drops or dead-letters is read, so it is no longer due.
    """

    def __init__(
        self,
        consumer: Consumer[ScoredGroup],
        state: LearnerState,
        data_cfg: DataConfig,
        batch_cfg: BatchConfig,
        loss_cfg: LossConfig,
        ledger: GroupLedger | None = None,
        routing: RoutingStore | None = None,
        routing_shape: tuple[int, int] = (0, 0),
    ) -> None:
        """`ledger`: the record of decided groups the feeder shares (one over `state` alone if None: every id is
        then kept for two checkpoint intervals). `routing` (routing replay, --model.routing_replay): where the
        samples' routed experts are (broker/routing.py), `routing_shape` the model's (moe layers, top-k);
        every trained sample then carries its routing, and a group whose routing is missing or misshapen is
        dead-lettered (never trained without replay)."""
        if routing is not None and min(routing_shape) < 1:
            raise ValueError(f"routing replay needs the model's (moe layers, top-k), got {routing_shape}")
        self._routing = routing
        self._routing_shape = routing_shape
        self._held_routing: list[str] = []  # routing keys of the held entries: deleted once they are acked
        self._consumer = consumer
        self._state = state
        self._data_cfg = data_cfg
        self._batch_cfg = batch_cfg
        self._loss_cfg = loss_cfg
        self.ledger = ledger if ledger is not None else GroupLedger(state)
        self._held: list[str] = []  # entries of groups decided since the last checkpoint (acked after it is saved)
        self._pool: list[_Pooled] = []  # trainable groups read, not yet in a batch
        self._due_since: float | None = None  # when this step began waiting for due groups
        self._given_up = 0  # due groups given up on in this step
        self._not_waited_for: set[str] = set()  # due groups given up on (not waited for again)
        self._waiting_since: float | None = None  # when this step began waiting for its groups

    @property
    def waiting_s(self) -> float:
        """How long the step being assembled has waited so far (0 between steps)."""
        return 0.0 if self._waiting_since is None else time.monotonic() - self._waiting_since

    def _pooled(self) -> set[str]:
        return {p.scored.group_id for p in self._pool}

    def unread(self) -> set[str]:
        """Admitted groups not decided and not read (the ones that may still arrive)."""
        return set(self._state.admitted_unread) - self._pooled()

    def release(self, group_id: str, cause: str) -> bool:
        """Give up on an admitted group that died upstream (upstream.py): counted under `cause`, its slot given
        back. False when it is decided or read already (a read group is trained or dropped here, never released)."""
        if group_id in self._pooled():
            return False
        return self.ledger.release(group_id, cause)

    @property
    def num_held(self) -> int:
        return len(self._held)

    @property
    def num_carried(self) -> int:
        """Trainable groups read but not yet trained (carried to the next step)."""
        return len(self._pool)

    def poll(self, block_s: float) -> TrainBatch | None:
        """Read what the step still needs for about `block_s`; the batch once it is complete, else None."""
        want = self._data_cfg.groups_per_step
        deadline = time.monotonic() + block_s
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()
        self._drop_stale_carried()
        while len(self._pool) < want:
            left = deadline - time.monotonic()
            if not self._read(want - len(self._pool), left) or left <= 0:
                return None
        wait_s = self._batch_cfg.due_wait_s
        if wait_s > 0:
            if self._due_since is None:
                self._due_since = time.monotonic()
            while due := self._due_worth_waiting_for():
                now = time.monotonic()
                wait_left, left = self._due_since + wait_s - now, deadline - now
                if wait_left <= 0:
                    self._give_up(due)
                    break
                if left <= 0:
                    return None  # the channel tells the other ranks we are still waiting, then polls again
                self._read(want, min(left, wait_left))
        return self._form_batch()

    def _read(self, count: int, block_s: float) -> int:
        entries = self._consumer.read(count, max(block_s, 0.001))
        for entry in entries:
            self._take(entry)
        return len(entries)

    def _take(self, entry: Entry[ScoredGroup]) -> None:
        sg, st = entry.msg, self._state
        keys = _routing_keys(sg)
        if self.ledger.is_decided(sg.group_id) or sg.group_id in self._pooled():
            st.num_duplicates += 1  # redelivered after a crash between a checkpoint and its acks, or published twice
            self._held.append(entry.id)
            if sg.group_id not in self._pooled():  # a pooled twin's keys are its own (one generation, one set)
                self._held_routing += keys
            return
        reason = invalid_reason(sg)
        if reason is not None:
            self._dead_letter(entry, "invalid", reason, keys)
            return
        if self._lag(sg) > self._data_cfg.max_staleness:
            self._drop_stale(entry.id, sg)
            self._held_routing += keys
        elif self._batch_cfg.zero_variance_filter and is_zero_variance(sg):
            st.num_dropped_zero_variance += 1
            self._decide(entry.id, sg.group_id, "zero_variance")
            self._held_routing += keys
        elif self._routing is None:
            self._pool.append(_Pooled(entry.id, sg))
        else:
            try:
                routing = self._read_routing(sg, self._routing)
            except RoutingError as e:
                self._dead_letter(entry, "invalid", f"routing replay: {e}", keys)
                return
            self._pool.append(_Pooled(entry.id, sg, routing))

    def _dead_letter(self, entry: Entry[ScoredGroup], cause: str, reason: str, routing_keys: list[str]) -> None:
        self._state.count_dead(cause)
        self._consumer.dead_letter(entry, reason)  # acks the entry itself
        self.ledger.decide(entry.msg.group_id, cause)
        self._delete_routing(routing_keys)

    def _read_routing(self, sg: ScoredGroup, store: RoutingStore) -> list[npt.NDArray[np.int16]]:
        """The group's routed experts, one MGET; RoutingError when a sample has none or it does not fit its tokens."""
        samples = sg.group.samples
        missing = [i for i, s in enumerate(samples) if s.routing_key is None]
        if missing:
            raise RoutingError(
                f"samples {missing[:8]} of group {sg.group_id} carry no routing key (was its rollout worker run "
                "without --sampling.routing_replay?)"
            )
        keys = [s.routing_key for s in samples if s.routing_key is not None]
        values = store.get(keys)
        num_prompt = len(sg.group.task.prompt_ids_np())
        return [
            decode_routing(v, k, num_prompt + len(s.response_ids_np()) - 1, self._routing_shape)
            for s, k, v in zip(samples, keys, values, strict=True)
        ]

    def _delete_routing(self, keys: list[str]) -> None:
        """Best effort: a key this misses expires by its TTL (--sampling.routing_ttl_s)."""
        if keys and self._routing is not None:
            try:
                self._routing.delete(keys)
            except BrokerError as e:
                logger.warning("could not delete %d routing keys (left to their TTL): %s", len(keys), e)

    def _lag(self, sg: ScoredGroup) -> int:
        return self._state.policy_version - sg.group.group_version

    def _decide(self, entry_id: str, group_id: str, dropped_as: str = "") -> None:
        """The group is trained in this step or dropped: decided, and its entry acked after the next checkpoint."""
        self._held.append(entry_id)
        self.ledger.decide(group_id, dropped_as)

    def _drop_stale(self, entry_id: str, sg: ScoredGroup) -> None:
        self._state.num_dropped_stale += 1
        self._decide(entry_id, sg.group_id, "stale")
        logger.info(
            "dropped group %s: %d versions old (max_staleness %d)",
            sg.group_id,
            self._lag(sg),
            self._data_cfg.max_staleness,
        )

    def _drop_stale_carried(self) -> None:
        """Carried groups that the policy version has since left behind (more due groups than a step takes)."""
        keep = []
        for p in self._pool:
            if self._lag(p.scored) > self._data_cfg.max_staleness:
                self._drop_stale(p.entry_id, p.scored)
                self._held_routing += _routing_keys(p.scored)
            else:
                keep.append(p)
        self._pool = keep

    def _oldest_first(self) -> list[_Pooled]:
        # The pool is in arrival order (a carried surplus, itself in this order, then new reads) and sorted() is
        # stable: groups of one weight version keep their arrival order.
        return sorted(self._pool, key=lambda p: p.scored.group.group_version)

    def _due_worth_waiting_for(self) -> list[str]:
        """Due groups still unread, when one arriving would displace a young group from the batch; else []."""
        st, bound = self._state, self._data_cfg.max_staleness
        self._not_waited_for.intersection_update(st.admitted_unread)
        skip = self._pooled() | self._not_waited_for
        # Older than due (lag > bound) cannot be saved by waiting: it is stale whenever it comes.
        due = [g for g, a in st.admitted_unread.items() if st.policy_version - a == bound and g not in skip]
        if not due:
            return []
        batch = self._oldest_first()[: self._data_cfg.groups_per_step]
        return due if any(self._lag(p.scored) < bound for p in batch) else []

    def _give_up(self, due: list[str]) -> None:
        logger.warning(
            "%d due group(s) not read within %.1fs (--batch.due_wait_s), training without them: %s",
            len(due),
            self._batch_cfg.due_wait_s,
            ", ".join(due[:5]),
        )
        self._not_waited_for.update(due)
        self._given_up += len(due)

    def _form_batch(self) -> TrainBatch:
        ordered = self._oldest_first()
        take, self._pool = ordered[: self._data_cfg.groups_per_step], ordered[self._data_cfg.groups_per_step :]
        for p in take:
            self._decide(p.entry_id, p.scored.group_id)
            self._held_routing += _routing_keys(p.scored)
        groups = [p.scored for p in take]
        routing = [p.routing for p in take] if self._routing is not None else None
        batch = build_batch(groups, [self._lag(sg) for sg in groups], self._loss_cfg, routing)
        batch.released_group_ids = self.ledger.take_released()
        waited = time.monotonic() - self._due_since if self._due_since is not None else 0.0
        batch.metrics |= {
            "due_wait_s": waited,
            "due_given_up": float(self._given_up),
            "carried_groups": float(len(self._pool)),
        }
        self._due_since, self._given_up, self._waiting_since = None, 0, None
        return batch

    def ack_held(self) -> int:
        """Ack the entries of every group decided since the last checkpoint; call only once that checkpoint is durable.

        Carried groups (read, not yet trained) stay unacked and undecided (still in `admitted_unread`), so the saved
        state has them as not arrived. Crash safety, for a crash at any point after a checkpoint at step s:
        - before `latest` names it: the previous checkpoint holds, nothing read since was acked or decided in its
          state, so every such entry comes back (own pending first) and steps after it are retrained exactly;
        - after `latest`, before these acks: entries of groups decided up to step s come back but are decided in
          the saved state (ledger.py): skipped as duplicates (and acked at the next checkpoint);
        - after these acks: decided entries are gone; carried ones are still pending in this consumer and are
          redelivered to its restart, which has not decided them, so they are trained once.
        A carried group is thus neither lost (its entry is acked only once a saved state has it decided) nor
        trained twice (a saved state has it decided only with a step that trained or dropped it).
        """
        carried = {p.entry_id for p in self._pool}
        assert carried.isdisjoint(self._held), "a carried group's entry must stay unacked"
        n = len(self._held)
        if n:
            self._consumer.ack(self._held)
            self._held = []
        # Their routing only now: a restart before these acks reads the entries, and so their routing, again.
        self._delete_routing(self._held_routing)
        self._held_routing = []
        self.ledger.checkpointed()
        return n


def _routing_keys(sg: ScoredGroup) -> list[str]:
    return [s.routing_key for s in sg.group.samples if s.routing_key is not None]
