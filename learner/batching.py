"""Batch assembly: scored groups -> training samples -> micro-batches packed by a token budget per rank.

Rank 0 reads the `scored` stream with `ScoredReader`: it drops (and counts) groups older than the
staleness bound, optionally groups whose rewards are all equal, skips redelivered groups it already
consumed, and dead-letters malformed ones. It fills each step oldest-first: it waits (bounded) for
admitted groups that would be too old after this step, and carries younger surplus groups to the next
step instead of letting them overtake older ones. Entries stay unacked until the checkpoint that
includes the step they fed (`ack_held`; carried groups stay unacked across it), so a crash loses
nothing and retrains nothing.

The rest is pure and deterministic, so every rank computes the same plan from the same batch:
`plan_micro_batches` balances sequences over data-parallel ranks (longest first onto the least loaded
rank) and packs each rank's share into micro-batches whose padded size (count x longest, rounded up to
`pad_multiple`) stays within `max_tokens_per_micro_batch` (dynamic batch size).

Token layout of one sequence of length L with a prompt of P tokens: inputs are tokens[0 : L-1] and
labels tokens[1 : L]; position i predicts token i+1, so the response tokens are the labels at
positions P-1 .. L-2, which is where the loss mask, the advantage and the rollout logprobs sit.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from broker.base import Consumer, Entry
from broker.schemas import ScoredGroup
from learner.loss import grpo_advantages
from learner.state import LearnerState
from learner.train_config import BatchConfig, DataConfig, LossConfig

logger = logging.getLogger(__name__)

CONSUMER_GROUP = "learner"  # the learner's consumer group on `scored` (one consumer: rank 0)


@dataclass
class TrainSample:
    """One sequence to train on: prompt + response tokens, where the response starts, and per-token data."""

    tokens: npt.NDArray[np.int32]
    prompt_len: int
    rollout_logp: npt.NDArray[np.float32]  # one per response token (engine-side log p)
    advantage: float

    @property
    def num_inputs(self) -> int:
        return len(self.tokens) - 1

    @property
    def response_len(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class TrainBatch:
    """One optimizer step's data (identical on every rank after the broadcast)."""

    samples: list[TrainSample]
    group_ids: list[str]
    metrics: dict[str, float] = field(default_factory=dict)  # data metrics computed on rank 0


# ---------------------------------------------------------------- groups -> samples


def group_version(sg: ScoredGroup) -> int:
    """The oldest weight version the group was generated under; its admission version when the worker
    recorded no weight segments (then the group is at least that old)."""
    v = sg.group.min_version
    return v if v >= 0 else sg.group.task.policy_version


def invalid_reason(sg: ScoredGroup) -> str | None:
    """Why a scored group cannot be trained on (it goes to the dead stream), or None."""
    samples = sg.group.samples
    if not samples:
        return "group has no samples"
    if len(sg.rewards) != len(samples):
        return f"{len(sg.rewards)} rewards for {len(samples)} samples"
    if len(sg.group.task.prompt_ids_np()) < 1:
        return "empty prompt"
    for i, s in enumerate(samples):
        n_ids, n_logp = len(s.response_ids_np()), len(s.logprobs_np())
        if n_ids != n_logp:
            return f"sample {i}: {n_ids} response tokens but {n_logp} logprobs"
    return None


def is_zero_variance(sg: ScoredGroup) -> bool:
    rewards = [r.reward for r in sg.rewards]
    return max(rewards) == min(rewards)


def group_to_samples(sg: ScoredGroup, cfg: LossConfig) -> list[TrainSample]:
    """The group's samples with GRPO advantages (or advantage 1 in SFT mode: every token is a target)."""
    prompt = sg.group.task.prompt_ids_np()
    if cfg.mode == "sft":
        adv = [1.0] * len(sg.rewards)
    else:
        rewards_G = torch.tensor([r.reward for r in sg.rewards], dtype=torch.float64)
        adv = grpo_advantages(rewards_G, cfg.normalize_advantage_std, cfg.advantage_eps).tolist()
    return [
        TrainSample(
            tokens=np.concatenate([prompt, s.response_ids_np()]).astype(np.int32),
            prompt_len=len(prompt),
            rollout_logp=s.logprobs_np().astype(np.float32),
            advantage=float(a),
        )
        for s, a in zip(sg.group.samples, adv, strict=True)
    ]


def group_metrics(groups: Sequence[ScoredGroup], staleness: Sequence[int]) -> dict[str, float]:
    """Reward, outcome (accuracy), rubric and length statistics of one step's groups, and the staleness histogram."""
    rewards = [r for sg in groups for r in sg.rewards]
    samples = [s for sg in groups for s in sg.group.samples]
    lengths = np.array([len(s.response_ids_np()) for s in samples], dtype=np.float64)
    out = {
        "reward_mean": float(np.mean([r.reward for r in rewards])),
        "outcome_mean": float(np.mean([r.outcome_reward for r in rewards])),
        "rubric_mean": float(np.mean([r.rubric_reward for r in rewards])),
        "raw_rubric_mean": float(np.mean([r.raw_rubric_reward for r in rewards])),
        "zeroed_fraction": float(np.mean([bool(r.zeroed_reason) for r in rewards])),
        "truncated_fraction": float(np.mean([s.status == "truncated" for s in samples])),
        "response_len_mean": float(lengths.mean()),
        "response_len_max": float(lengths.max()),
        "zero_variance_group_fraction": float(np.mean([is_zero_variance(sg) for sg in groups])),
        "num_groups": float(len(groups)),
        "num_samples": float(len(samples)),
    }
    out["accuracy"] = out["outcome_mean"]
    for lag, n in sorted(Counter(staleness).items()):
        out[f"staleness/{lag}"] = float(n)
    return out


def build_batch(groups: Sequence[ScoredGroup], staleness: Sequence[int], cfg: LossConfig) -> TrainBatch:
    samples = [s for sg in groups for s in group_to_samples(sg, cfg)]
    return TrainBatch(samples, [sg.group_id for sg in groups], group_metrics(groups, staleness))


# ---------------------------------------------------------------- reading the scored stream (rank 0)


@dataclass
class _Pooled:
    """A trainable group read from `scored` and not yet in a batch (its entry unacked, its id not consumed)."""

    entry_id: str
    group: ScoredGroup


class ScoredReader:
    """Rank 0's view of the `scored` stream: collects one step's worth of trainable groups, oldest first.

    A step at policy version v needs `groups_per_step` groups. Once that many are in, the reader checks the
    feeder's record of admitted groups not read yet (`LearnerState.admitted_unread`): one admitted at version a
    with v - a >= max_staleness is *due* (read at the next version it would be too old). While a due group is
    unread and the batch would hold a *young* group (v - its version < max_staleness, still within the bound
    next step), the reader keeps reading, up to `due_wait_s`, then takes the oldest groups first; the younger
    surplus is carried to the next step. A due group that does not come in time (dead-lettered upstream, its
    worker lost) is given up on and never waited for again; one the reader drops or dead-letters is read, so it
    is no longer due.
    """

    def __init__(
        self,
        consumer: Consumer[ScoredGroup],
        state: LearnerState,
        data_cfg: DataConfig,
        batch_cfg: BatchConfig,
        loss_cfg: LossConfig,
    ) -> None:
        self._consumer = consumer
        self._state = state
        self._data_cfg = data_cfg
        self._batch_cfg = batch_cfg
        self._loss_cfg = loss_cfg
        self._consumed = set(state.consumed_group_ids)
        self._held: list[str] = []  # entries of groups decided since the last checkpoint (acked after it is saved)
        self._pool: list[_Pooled] = []  # trainable groups read, not yet in a batch
        self._due_since: float | None = None  # when this step began waiting for due groups
        self._given_up = 0  # due groups given up on in this step

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
        st.admitted_unread.pop(sg.group_id, None)
        if sg.group_id in self._consumed or any(p.group.group_id == sg.group_id for p in self._pool):
            st.num_duplicates += 1  # redelivered after a crash between a checkpoint and its acks, or published twice
            self._held.append(entry.id)
            return
        reason = invalid_reason(sg)
        if reason is not None:
            st.num_dead_lettered += 1
            self._consumer.dead_letter(entry, reason)  # acks the entry itself
            self._consumed.add(sg.group_id)
            st.consumed_group_ids.append(sg.group_id)
            return
        if self._lag(sg) > self._data_cfg.max_staleness:
            self._drop_stale(entry.id, sg)
        elif self._batch_cfg.zero_variance_filter and is_zero_variance(sg):
            st.num_dropped_zero_variance += 1
            self._decide(entry.id, sg.group_id)
        else:
            self._pool.append(_Pooled(entry.id, sg))

    def _lag(self, sg: ScoredGroup) -> int:
        return self._state.policy_version - group_version(sg)

    def _decide(self, entry_id: str, group_id: str) -> None:
        """The group is trained in this step or dropped: consumed, and its entry acked after the next checkpoint."""
        self._held.append(entry_id)
        self._consumed.add(group_id)
        self._state.consumed_group_ids.append(group_id)

    def _drop_stale(self, entry_id: str, sg: ScoredGroup) -> None:
        self._state.num_dropped_stale += 1
        self._decide(entry_id, sg.group_id)
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
            if self._lag(p.group) > self._data_cfg.max_staleness:
                self._drop_stale(p.entry_id, p.group)
            else:
                keep.append(p)
        self._pool = keep

    def _oldest_first(self) -> list[_Pooled]:
        # The pool is in arrival order (a carried surplus, itself in this order, then new reads) and sorted() is
        # stable: groups of one weight version keep their arrival order.
        return sorted(self._pool, key=lambda p: group_version(p.group))

    def _due_worth_waiting_for(self) -> list[str]:
        """Due groups still unread, when one arriving would displace a young group from the batch; else []."""
        st, bound = self._state, self._data_cfg.max_staleness
        unread = st.admitted_unread
        for gid in [g for g, a in unread.items() if g in self._consumed or st.policy_version - a > bound]:
            # Already decided (a resumed feeder records its republished tasks again), or too old to be saved by
            # waiting: no longer due.
            del unread[gid]
        due = [g for g, a in unread.items() if st.policy_version - a >= bound]
        if not due:
            return []
        batch = self._oldest_first()[: self._data_cfg.groups_per_step]
        return due if any(self._lag(p.group) < bound for p in batch) else []

    def _give_up(self, due: list[str]) -> None:
        logger.warning(
            "%d due group(s) not read within %.1fs (--batch.due_wait_s), training without them: %s",
            len(due),
            self._batch_cfg.due_wait_s,
            ", ".join(due[:5]),
        )
        for gid in due:
            del self._state.admitted_unread[gid]
        self._given_up += len(due)

    def _form_batch(self) -> TrainBatch:
        ordered = self._oldest_first()
        take, self._pool = ordered[: self._data_cfg.groups_per_step], ordered[self._data_cfg.groups_per_step :]
        for p in take:
            self._decide(p.entry_id, p.group.group_id)
        groups = [p.group for p in take]
        batch = build_batch(groups, [self._lag(sg) for sg in groups], self._loss_cfg)
        waited = time.monotonic() - self._due_since if self._due_since is not None else 0.0
        batch.metrics |= {
            "due_wait_s": waited,
            "due_given_up": float(self._given_up),
            "carried_groups": float(len(self._pool)),
        }
        self._due_since, self._given_up = None, 0
        return batch

    def ack_held(self) -> int:
        """Ack the entries of every group decided since the last checkpoint; call only once that checkpoint is durable.

        Carried groups (read, not yet trained) stay unacked and out of `consumed_group_ids`, so the saved state
        has never seen them. Crash safety, for a crash at any point after a checkpoint at step s:
        - before `latest` names it: the previous checkpoint holds, nothing read since was acked or is in its
          state, so every such entry comes back (own pending first) and steps after it are retrained exactly;
        - after `latest`, before these acks: entries of groups decided up to step s come back but are in the
          saved `consumed_group_ids`: skipped as duplicates (and acked at the next checkpoint);
        - after these acks: decided entries are gone; carried ones are still pending in this consumer and are
          redelivered to its restart, which has not consumed them, so they are trained once.
        A carried group is thus neither lost (its entry is acked only once a saved state lists it) nor trained
        twice (a saved state lists it only with a step that trained or dropped it).
        """
        carried = {p.entry_id for p in self._pool}
        assert carried.isdisjoint(self._held), "a carried group's entry must stay unacked"
        n = len(self._held)
        if n:
            self._consumer.ack(self._held)
            self._held = []
        return n


# ---------------------------------------------------------------- micro-batch planning (every rank)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def balance_over_ranks(lengths: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Sample indices per rank: longest first onto the rank with the fewest tokens (ties: fewer samples, lower rank)."""
    if len(lengths) < num_ranks:
        raise ValueError(f"{len(lengths)} sequences cannot feed {num_ranks} data-parallel ranks")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    shares: list[list[int]] = [[] for _ in range(num_ranks)]
    load = [0] * num_ranks
    for i in order:
        r = min(range(num_ranks), key=lambda k: (load[k], len(shares[k]), k))
        shares[r].append(i)
        load[r] += lengths[i]
    return shares


def pack_micro_batches(
    indices: Sequence[int], lengths: Sequence[int], max_tokens: int, pad_multiple: int
) -> list[list[int]]:
    """First-fit decreasing: a micro-batch's cost is count x (its longest length rounded up to pad_multiple).

    A sequence longer than the budget gets a micro-batch of its own.
    """
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    for i in order:
        for b in bins:
            # sorted descending: the bin's first sequence is its longest
            if (len(b) + 1) * _round_up(lengths[b[0]], pad_multiple) <= max_tokens:
                b.append(i)
                break
        else:
            bins.append([i])
    return bins


def plan_micro_batches(
    lengths: Sequence[int], dp_size: int, max_tokens: int, pad_multiple: int
) -> list[list[list[int]]]:
    """plan[dp_rank] = that rank's micro-batches, each a list of sample indices."""
    return [pack_micro_batches(s, lengths, max_tokens, pad_multiple) for s in balance_over_ranks(lengths, dp_size)]


@dataclass
class MicroBatch:
    """Padded tensors of one micro-batch; positions beyond a sequence's end are masked out."""

    input_ids_BS: torch.Tensor  # int64
    position_ids_BS: torch.Tensor  # int64
    labels_BS: torch.Tensor  # int64
    loss_mask_BS: torch.Tensor  # float32, 1 on response-token labels
    advantages_BS: torch.Tensor  # float32
    rollout_logp_BS: torch.Tensor  # float32
    sample_indices: list[int]
    logp_old_BS: torch.Tensor | None = None  # the trainer's logprobs before the update (set on the last stage)
    logp_ref_BS: torch.Tensor | None = None  # the reference model's (only with a KL term)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask_BS.sum().item())

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(
            self.input_ids_BS.to(device),
            self.position_ids_BS.to(device),
            self.labels_BS.to(device),
            self.loss_mask_BS.to(device),
            self.advantages_BS.to(device),
            self.rollout_logp_BS.to(device),
            self.sample_indices,
        )


def build_micro_batch(samples: Sequence[TrainSample], indices: Sequence[int], pad_multiple: int) -> MicroBatch:
    seq_len = _round_up(max(samples[i].num_inputs for i in indices), pad_multiple)
    b = len(indices)
    input_ids = torch.zeros(b, seq_len, dtype=torch.int64)
    labels = torch.zeros(b, seq_len, dtype=torch.int64)
    mask = torch.zeros(b, seq_len, dtype=torch.float32)
    adv = torch.zeros(b, seq_len, dtype=torch.float32)
    rollout = torch.zeros(b, seq_len, dtype=torch.float32)
    for row, i in enumerate(indices):
        s = samples[i]
        assert s.prompt_len >= 1 and len(s.rollout_logp) == s.response_len
        tokens = torch.from_numpy(s.tokens.astype(np.int64))
        n = s.num_inputs
        input_ids[row, :n] = tokens[:-1]
        labels[row, :n] = tokens[1:]
        start = s.prompt_len - 1
        mask[row, start:n] = 1.0
        adv[row, start:n] = s.advantage
        rollout[row, start:n] = torch.from_numpy(s.rollout_logp)
    positions = torch.arange(seq_len, dtype=torch.int64).expand(b, seq_len).contiguous()
    return MicroBatch(input_ids, positions, labels, mask, adv, rollout, list(indices))


# ---------------------------------------------------------------- wire format (rank 0 -> all ranks)


def batch_to_tensors(batch: TrainBatch) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """Small metadata (for broadcast_object_list) and flat tensors (for tensor broadcasts) of a batch."""
    s = batch.samples
    tensors = {
        "tokens": torch.from_numpy(np.concatenate([x.tokens for x in s]).astype(np.int32)),
        "lengths": torch.tensor([len(x.tokens) for x in s], dtype=torch.int64),
        "prompt_lens": torch.tensor([x.prompt_len for x in s], dtype=torch.int64),
        "advantages": torch.tensor([x.advantage for x in s], dtype=torch.float64),
        "rollout_logp": torch.from_numpy(np.concatenate([x.rollout_logp for x in s]).astype(np.float32)),
    }
    meta: dict[str, object] = {
        "group_ids": batch.group_ids,
        "metrics": batch.metrics,
        "shapes": {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
    }
    return meta, tensors


def batch_from_tensors(meta: dict[str, object], tensors: dict[str, torch.Tensor]) -> TrainBatch:
    tokens = tensors["tokens"].numpy()
    logp = tensors["rollout_logp"].numpy()
    lengths = tensors["lengths"].tolist()
    prompt_lens = tensors["prompt_lens"].tolist()
    samples = []
    t_off = l_off = 0
    for n, p, a in zip(lengths, prompt_lens, tensors["advantages"].tolist(), strict=True):
        samples.append(TrainSample(tokens[t_off : t_off + n].copy(), p, logp[l_off : l_off + n - p].copy(), a))
        t_off += n
        l_off += n - p
    group_ids = meta["group_ids"]
    metrics = meta["metrics"]
    assert isinstance(group_ids, list) and isinstance(metrics, dict)
    return TrainBatch(samples, group_ids, metrics)
