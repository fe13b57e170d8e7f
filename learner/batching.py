"""Batch assembly: scored groups -> training samples -> micro-batches packed by a token budget per rank.

Rank 0 reads the `scored` stream (learner/scored_reader.py) and turns one step's groups into a `TrainBatch`
here (GRPO advantages, data metrics), which it broadcasts to every rank.

The rest is pure and deterministic, so every rank computes the same plan from the same batch:
`plan_micro_batches` balances sequences over data-parallel ranks (longest first onto the least loaded
rank) and packs each rank's share into micro-batches whose tokens, padding included, stay within
`max_tokens_per_micro_batch` (dynamic batch size). A `Layout` says where the padding goes: packed (the default:
one row of sequences back to back, THD) or padded (a row per sequence); `MicroBatch.shard_for_cp` cuts out a
context-parallel rank's share.

Token layout of one sequence of length L with a prompt of P tokens: inputs are tokens[0 : L-1] and
labels tokens[1 : L]; position i predicts token i+1, so the response tokens are the labels at
positions P-1 .. L-2, which is where the loss mask, the advantage and the rollout logprobs sit.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from broker.schemas import ScoredGroup
from learner.context_parallel import shard_positions, zigzag_index
from learner.loss import grpo_advantages
from learner.train_config import LossConfig


@dataclass
class TrainSample:
    """One sequence to train on: prompt + response tokens, where the response starts, and per-token data."""

    tokens: npt.NDArray[np.int32]
    prompt_len: int
    rollout_logp: npt.NDArray[np.float32]  # one per response token (engine-side log p)
    advantage: float
    routed_experts: npt.NDArray[np.int16] | None = None
    """The engine's experts per input token (routing replay): int16 [num_inputs, moe_layers, topk] (SGLang's
    `routed_experts`: prompt + output tokens - 1), or None. int16 on the host: at 128K tokens x 48 layers x top-8 a
    sample's routing is 100 MB; a micro-batch widens its own to int64."""

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
    # Rank 0 only (not broadcast): groups given up on since the previous batch, by cause (learner/ledger.py).
    released_group_ids: dict[str, list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------- groups -> samples


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


def group_to_samples(
    sg: ScoredGroup, cfg: LossConfig, routing: Sequence[npt.NDArray[np.int16] | None] | None = None
) -> list[TrainSample]:
    """The group's samples with GRPO advantages (or advantage 1 in SFT mode: every token is a target); `routing`:
    each sample's routed experts [num_inputs, moe layers, topk] (routing replay, read by the scored reader)."""
    prompt = sg.group.task.prompt_ids_np()
    if cfg.mode == "sft":
        adv = [1.0] * len(sg.rewards)
    else:
        rewards_G = torch.tensor([r.reward for r in sg.rewards], dtype=torch.float64)
        adv = grpo_advantages(rewards_G, cfg.normalize_advantage_std, cfg.advantage_eps).tolist()
    routed = list(routing) if routing is not None else [None] * len(sg.group.samples)
    return [
        TrainSample(
            tokens=np.concatenate([prompt, s.response_ids_np()]).astype(np.int32),
            prompt_len=len(prompt),
            rollout_logp=s.logprobs_np().astype(np.float32),
            advantage=float(a),
            routed_experts=r,
        )
        for s, a, r in zip(sg.group.samples, adv, routed, strict=True)
    ]


REWARD_METRICS = frozenset(
    {"reward_mean", "outcome_mean", "accuracy", "rubric_mean", "raw_rubric_mean", "zeroed_fraction"}
    | {"zero_variance_group_fraction"}
    | {"rollout/group_s_mean", "rollout/group_s_max", "rollout/resumes_per_sample", "reward/score_s_mean"}
)
"""The keys of `group_metrics` that come from the rollout workers and the rewards (meaningless for SFT
demonstrations, which neither generated nor scored)."""


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
    # What the rollout workers and reward workers measured for these groups: the trackers (TensorBoard, W&B) show
    # them on the learner's step axis beside the losses, without scraping the services.
    rollout_s = np.array([sg.group.rollout_s for sg in groups], dtype=np.float64)
    out["rollout/group_s_mean"] = float(rollout_s.mean())
    out["rollout/group_s_max"] = float(rollout_s.max())
    out["rollout/resumes_per_sample"] = float(np.mean([s.num_resumes for s in samples]))
    out["reward/score_s_mean"] = float(np.mean([sg.score_s for sg in groups]))
    for lag, n in sorted(Counter(staleness).items()):
        out[f"staleness/{lag}"] = float(n)
    return out


def build_batch(
    groups: Sequence[ScoredGroup],
    staleness: Sequence[int],
    cfg: LossConfig,
    routing: Sequence[Sequence[npt.NDArray[np.int16] | None] | None] | None = None,
) -> TrainBatch:
    """`routing`: per group, its samples' routed experts (or None), as `group_to_samples` takes them."""
    per_group = list(routing) if routing is not None else [None] * len(groups)
    samples = [s for sg, r in zip(groups, per_group, strict=True) for s in group_to_samples(sg, cfg, r)]
    return TrainBatch(samples, [sg.group_id for sg in groups], group_metrics(groups, staleness))


# ---------------------------------------------------------------- micro-batch planning (every rank)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Layout:
    """How a micro-batch lays its sequences out. Padded: one row per sequence, every row as long as the longest
    rounded up to `pad_multiple`. Packed: one row, the sequences back to back (THD, `cu_seqlens`), the row
    rounded up to `pad_multiple`. Under context parallelism every sequence is also a multiple of 2 x cp_size
    tokens (its zig-zag chunks, learner/context_parallel.py)."""

    pad_multiple: int = 1
    packing: bool = False
    cp_size: int = 1

    @property
    def seq_multiple(self) -> int:
        return 2 * self.cp_size if self.cp_size > 1 else 1

    def slots(self, lengths: Sequence[int]) -> list[int]:
        """The tokens each sequence takes in the micro-batch, padding included (sum: the micro-batch's tokens)."""
        if not lengths:
            return []
        if not self.packing:
            row = _round_up(max(lengths), math.lcm(self.pad_multiple, self.seq_multiple))
            return [row] * len(lengths)
        slots = [_round_up(n, self.seq_multiple) for n in lengths]
        # The last sequence takes the row's padding: its slot stays a multiple of seq_multiple.
        slots[-1] += _round_up(sum(slots), math.lcm(self.pad_multiple, self.seq_multiple)) - sum(slots)
        return slots


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
    indices: Sequence[int], lengths: Sequence[int], max_tokens: int, layout: Layout
) -> list[list[int]]:
    """First-fit decreasing by the micro-batch's tokens under `layout` (padding included, as `Layout.slots` counts
    them). A sequence longer than the budget gets a micro-batch of its own. Each fit test is O(1): a bin keeps the
    sum of its sequences' slots, and its first sequence is its longest (decreasing order)."""
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    row_multiple = math.lcm(layout.pad_multiple, layout.seq_multiple)
    bins: list[list[int]] = []
    seq_sums: list[int] = []
    for i in order:
        seq = _round_up(lengths[i], layout.seq_multiple)
        for b, members in enumerate(bins):
            if layout.packing:
                tokens = _round_up(seq_sums[b] + seq, row_multiple)
            else:
                tokens = _round_up(lengths[members[0]], row_multiple) * (len(members) + 1)
            if tokens <= max_tokens:
                members.append(i)
                seq_sums[b] += seq
                break
        else:
            bins.append([i])
            seq_sums.append(seq)
    return bins


def plan_micro_batches(lengths: Sequence[int], dp_size: int, max_tokens: int, layout: Layout) -> list[list[list[int]]]:
    """plan[dp_rank] = that rank's micro-batches, each a list of sample indices."""
    return [pack_micro_batches(s, lengths, max_tokens, layout) for s in balance_over_ranks(lengths, dp_size)]


def padding_fraction(lengths: Sequence[int], plan: list[list[list[int]]], layout: Layout) -> float:
    """Padding tokens / all tokens over every rank's micro-batches of a plan (0: no token wasted)."""
    total = sum(sum(layout.slots([lengths[i] for i in mb])) for rank in plan for mb in rank)
    return 1.0 - sum(lengths) / total if total else 0.0


@dataclass
class MicroBatch:
    """The tensors of one micro-batch, `[rows, tokens]`: one padded row per sequence, or one packed row whose
    sequences `cu_seqlens` delimits (padding tokens carry no loss). Under CP: this rank's share of the tokens."""

    input_ids_BS: torch.Tensor  # int64
    position_ids_BS: torch.Tensor  # int64
    labels_BS: torch.Tensor  # int64
    loss_mask_BS: torch.Tensor  # float32, 1 on response-token labels
    advantages_BS: torch.Tensor  # float32
    rollout_logp_BS: torch.Tensor  # float32
    sample_indices: list[int]
    cu_seqlens: torch.Tensor | None = None  # int32 [n + 1]: packed sequence boundaries (whole sequences, not shares)
    logp_old_BS: torch.Tensor | None = None  # the trainer's logprobs before the update (set on the last stage)
    logp_ref_BS: torch.Tensor | None = None  # the reference model's (only with a KL term)
    # int64 [rows, tokens, moe_layers, topk]: the engine's experts per token (-1: none, the learner's router picks)
    routed_experts_BSLK: torch.Tensor | None = None

    _TOKEN_FIELDS = ("input_ids_BS", "position_ids_BS", "labels_BS", "loss_mask_BS", "advantages_BS", "rollout_logp_BS")

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask_BS.sum().item())

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], cu_seqlens: torch.Tensor | None) -> MicroBatch:
        fields = {name: fn(getattr(self, name)) for name in self._TOKEN_FIELDS}
        routed = None if self.routed_experts_BSLK is None else fn(self.routed_experts_BSLK)
        return MicroBatch(
            **fields, sample_indices=self.sample_indices, cu_seqlens=cu_seqlens, routed_experts_BSLK=routed
        )

    def to(self, device: torch.device | str) -> MicroBatch:
        return self._map(lambda t: t.to(device), None if self.cu_seqlens is None else self.cu_seqlens.to(device))

    def shard_for_cp(self, cp_size: int, cp_rank: int) -> MicroBatch:
        """This CP rank's zig-zag share of every sequence (`cu_seqlens` keeps the whole sequences' boundaries, as
        megatron's THD attention and rotary embedding expect)."""
        if cp_size == 1:
            return self
        if self.cu_seqlens is None:
            index = zigzag_index(self.input_ids_BS.shape[1], cp_size, cp_rank)
        else:
            index = shard_positions(torch.diff(self.cu_seqlens).tolist(), cp_size, cp_rank)
        return self._map(lambda t: t[:, index.to(t.device)].contiguous(), self.cu_seqlens)


def build_micro_batch(samples: Sequence[TrainSample], indices: Sequence[int], lay: Layout) -> MicroBatch:
    """The micro-batch of `samples[indices]` under layout `lay`."""
    slots = lay.slots([samples[i].num_inputs for i in indices])
    rows, width = (1, sum(slots)) if lay.packing else (len(indices), slots[0])
    input_ids = torch.zeros(rows, width, dtype=torch.int64)
    positions = torch.zeros(rows, width, dtype=torch.int64)
    labels = torch.zeros(rows, width, dtype=torch.int64)
    mask = torch.zeros(rows, width, dtype=torch.float32)
    adv = torch.zeros(rows, width, dtype=torch.float32)
    rollout = torch.zeros(rows, width, dtype=torch.float32)
    routed = None
    given = [r for i in indices if (r := samples[i].routed_experts) is not None]
    if given:
        routed = torch.full((rows, width, *given[0].shape[1:]), -1, dtype=torch.int64)
    start = 0
    for k, (i, slot) in enumerate(zip(indices, slots, strict=True)):
        s = samples[i]
        assert s.prompt_len >= 1 and len(s.rollout_logp) == s.response_len
        row, col = (0, start) if lay.packing else (k, 0)
        tokens = torch.from_numpy(s.tokens.astype(np.int64))
        n = s.num_inputs
        input_ids[row, col : col + n] = tokens[:-1]
        labels[row, col : col + n] = tokens[1:]
        positions[row, col : col + slot] = torch.arange(slot)
        first = col + s.prompt_len - 1
        mask[row, first : col + n] = 1.0
        adv[row, first : col + n] = s.advantage
        rollout[row, first : col + n] = torch.from_numpy(s.rollout_logp)
        if routed is not None and s.routed_experts is not None:
            assert len(s.routed_experts) == n, f"routing of {len(s.routed_experts)} tokens for {n} inputs"
            routed[row, col : col + n] = torch.from_numpy(s.routed_experts.astype(np.int64))
        start += slot
    cu = torch.tensor([0, *itertools.accumulate(slots)], dtype=torch.int32) if lay.packing else None
    return MicroBatch(
        input_ids, positions, labels, mask, adv, rollout, list(indices), cu_seqlens=cu, routed_experts_BSLK=routed
    )


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
    routed = [x.routed_experts for x in s if x.routed_experts is not None]
    if routed:  # samples without routing travel as -1 rows (no replay for their tokens)
        shape = routed[0].shape[1:]
        tensors["routed_experts"] = torch.from_numpy(
            np.concatenate(
                [x.routed_experts if x.routed_experts is not None else np.full((x.num_inputs, *shape), -1) for x in s]
            ).astype(np.int16)
        ).view(torch.uint8)  # as bytes: gloo broadcasts no int16
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
    routed = tensors["routed_experts"].numpy().view(np.int16) if "routed_experts" in tensors else None
    samples = []
    t_off = l_off = r_off = 0
    for n, p, a in zip(lengths, prompt_lens, tensors["advantages"].tolist(), strict=True):
        sample = TrainSample(tokens[t_off : t_off + n].copy(), p, logp[l_off : l_off + n - p].copy(), a)
        if routed is not None:
            sample.routed_experts = routed[r_off : r_off + n - 1].copy()
            r_off += n - 1
        samples.append(sample)
        t_off += n
        l_off += n - p
    group_ids = meta["group_ids"]
    metrics = meta["metrics"]
    assert isinstance(group_ids, list) and isinstance(metrics, dict)
    return TrainBatch(samples, group_ids, metrics)
