"""`TrainConfig`: everything `longtrace learner` reads (the model section, the broker, data and admission,
batching, loss, optimizer, checkpoints, experiment tracking). Defaults are the paper's recipe (METHOD.md §3-4).

Loaded with `load_config(TrainConfig, path, overrides)`; this module imports nothing heavy.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from broker.settings import BrokerConfig
from common.config import BaseConfig
from learner.config import LearnerConfig
from learner.weight_sync.config import NoSyncConfig, WeightSyncConfig


class DataConfig(BaseConfig):
    dataset_path: str = ""
    """LongTraceRL-format JSONL (source, input_messages, label, metadata.extra_reward_info) the feeder reads."""
    tokenizer_path: str = ""
    """Tokenizer (with its chat template) for the prompts; empty = the model's --model.hf_path."""
    seed: int = 0
    """Seed of the per-epoch shuffle (epoch e uses the permutation of rng(seed, e))."""
    shuffle: bool = True
    """Shuffle the dataset every epoch (off: dataset order)."""
    groups_per_step: int = Field(16, ge=1)
    """Prompts (groups) per optimizer step: the global batch is groups_per_step * num_samples sequences."""
    num_samples: int = Field(8, ge=1)
    """Samples generated per prompt (the GRPO group size n)."""
    max_staleness: int = Field(1, ge=0)
    """Generation may run this many policy versions ahead of training; older groups are dropped (0: synchronous)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the engines; the trainer's logprobs use the same log_softmax(logits / T)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the engines."""
    max_new_tokens: int = Field(32000, ge=1)
    """Longest response; a prompt gets min(max_new_tokens, max_total_tokens - prompt length)."""
    max_total_tokens: int = Field(160000, ge=2)
    """Longest prompt + response; prompts that leave no room for a response are skipped (and counted)."""
    stop_token_ids: list[int] = []
    """Extra stop token ids sent with every task (the engine always stops on the tokenizer's EOS)."""


class BatchConfig(BaseConfig):
    max_tokens_per_micro_batch: int = Field(8192, ge=1)
    """Dynamic batch size: a micro-batch holds sequences while its tokens stay within this (packed: the sum of the
    lengths; padded: count * padded max length). A longer sequence gets a micro-batch of its own."""
    packing: bool = True
    """Pack a micro-batch's sequences into one row without padding (THD with cu_seqlens: attention never crosses a
    sequence boundary); off: one padded row per sequence (BSHD)."""
    pad_multiple: int = Field(8, ge=1)
    """Micro-batch sequence length is padded up to a multiple of this (keeps shapes few; SP needs tp_size | it)."""
    logprob_impl: Literal["fused_head", "chunked", "megatron"] = "fused_head"
    """How the last stage turns hidden states into token logprobs and entropy. fused_head: the output layer runs
    inside the chunked pass, so the `[tokens, vocab / tp]` logits never exist whole; chunked: the model's logits,
    then the chunked pass (learner/logprobs.py); megatron: the model's logits through megatron's vocab-parallel
    cross entropy plus a separate entropy pass (the path before chunking; kept as the memory bench's baseline)."""
    logprob_chunk_mb: float = Field(256.0, gt=0)
    """Size of one fp32 `[rows, vocab / tp]` chunk of the chunked logprob pass (learner/logprobs.py): rows =
    logprob_chunk_mb / (4 B x padded vocab / tp), at least 1 (256 MB: 441 rows of Qwen3's 151,936 vocabulary at TP1,
    1765 at TP4). The pass keeps at most two such buffers alive, in the forward and in the backward."""
    zero_variance_filter: bool = False
    """Drop groups whose samples all have the same reward (zero advantage); off in the paper."""
    read_block_s: float = Field(1.0, gt=0)
    """How long one read of the scored stream blocks before rank 0 tells the other ranks it is still waiting."""
    batch_timeout_s: float = Field(6 * 3600.0, gt=0)
    """Give up (error) when a step's groups have not all arrived within this long."""
    due_wait_s: float = Field(30.0, ge=0)
    """With a step's groups in, wait up to this long for older admitted groups still unread that would be stale
    after this step, and train those first (the younger surplus waits for the next step); each group is waited for
    at most once. 0: take the first groups to arrive."""
    lost_scan_after_s: float = Field(60.0, gt=0)
    """Once a step has waited this long for its groups, and then at most this often, rank 0 looks for the admitted
    groups it has not read in every stream (tasks, rollouts, scored, dead letters not read yet); a group missing
    from two consecutive scans (deleted, lost with Redis's data, its dead letter trimmed unread) is released as
    `lost`: counted in `groups_dead_lettered/lost` and its admission slot given back, so the run can finish. A scan
    reads the streams (read-only): keep it at a minute or more on large runs. Below half of batch_timeout_s."""

    @model_validator(mode="after")
    def _check_waits(self) -> BatchConfig:
        if self.due_wait_s >= self.batch_timeout_s:
            raise ValueError(
                f"--batch.due_wait_s ({self.due_wait_s}) must be below --batch.batch_timeout_s ({self.batch_timeout_s})"
            )
        if 2 * self.lost_scan_after_s >= self.batch_timeout_s:
            raise ValueError(
                f"--batch.lost_scan_after_s ({self.lost_scan_after_s}) must be below half of --batch.batch_timeout_s "
                f"({self.batch_timeout_s}): a lost group is released after two scans, before the step gives up"
            )
        return self


class LossConfig(BaseConfig):
    mode: Literal["grpo", "sft"] = "grpo"
    """grpo: the clipped policy loss on scored groups; sft: cross-entropy on the response tokens (warm start)."""
    normalize_advantage_std: bool = True
    """GRPO advantage (r - mean) / (std + eps) with the unbiased std; off: r - mean (Dr. GRPO style)."""
    advantage_eps: float = Field(1e-6, gt=0)
    """Added to the group std before dividing."""
    eps_clip: float = Field(0.2, ge=0)
    """Lower clip of the ratio: clip(rho, 1 - eps_clip, 1 + eps_clip_high)."""
    eps_clip_high: float = Field(0.28, ge=0)
    """Upper clip of the ratio (clip-higher)."""
    importance_correction: Literal["icepop", "tis", "none"] = "icepop"
    """Engine/trainer mismatch r = exp(logp_old - logp_rollout): icepop zeroes tokens outside [is_low, is_high],
    tis clamps r into it, none ignores the rollout logprobs."""
    is_low: float = Field(0.5, gt=0)
    """Lower bound of the importance-ratio band."""
    is_high: float = Field(2.0, gt=0)
    """Upper bound of the importance-ratio band."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the k3 KL to the frozen initial model (0 in the paper: no reference model is built)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus (0 in the paper; entropy is still logged)."""

    @model_validator(mode="after")
    def _check_band(self) -> LossConfig:
        if self.is_low >= self.is_high:
            raise ValueError(f"--loss.is_low ({self.is_low}) must be below --loss.is_high ({self.is_high})")
        return self


class OptimConfig(BaseConfig):
    lr: float = Field(2e-6, gt=0)
    """Adam learning rate, constant, no warmup."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """Adam beta1."""
    adam_beta2: float = Field(0.98, ge=0, lt=1)
    """Adam beta2."""
    adam_eps: float = Field(1e-8, gt=0)
    """Adam epsilon."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay (megatron skips biases and norms)."""
    clip_grad: float = Field(1.0, gt=0)
    """Clip the global gradient norm to this."""
    distributed_optimizer: bool = False
    """Shard optimizer states over data-parallel ranks (megatron's distributed optimizer, ZeRO-1)."""


class CheckpointConfig(BaseConfig):
    dir: str = ""
    """Checkpoint directory; empty = <run_dir>/checkpoints."""
    interval_steps: int = Field(20, ge=1)
    """Save every this many steps (and after the last step); scored entries are acked only after a save."""
    resume: bool = True
    """Resume from the latest complete checkpoint in `dir` when there is one."""
    keep_last: int = Field(2, ge=1)
    """Newest complete checkpoints kept on disk; older ones are deleted after a save unless `keep_every_steps` keeps
    them (`latest` is never deleted)."""
    keep_every_steps: int = Field(0, ge=0)
    """Also keep, for good, every checkpoint whose step is a multiple of this (kept versions to export or start a
    new run from: `longtrace checkpoints list`); 0: off. A multiple of interval_steps (other steps are not saved)."""
    init_from: str = ""
    """Start this run from another run's checkpoint: a step_N directory, or a checkpoints directory (its `latest`).
    Only when this run has no checkpoint of its own to resume from; the run starts at step 0 with its own data
    cursor, and needs its own --broker.run_id and checkpoint directory (the source is only read)."""
    init_optimizer: bool = True
    """With init_from: load the optimizer state (Adam moments) too; off: the weights only, with a fresh optimizer."""

    @model_validator(mode="after")
    def _check_keep_every(self) -> CheckpointConfig:
        if self.keep_every_steps and self.keep_every_steps % self.interval_steps:
            raise ValueError(
                f"--checkpoint.keep_every_steps {self.keep_every_steps} must be a multiple of "
                f"--checkpoint.interval_steps {self.interval_steps}: only those steps are saved"
            )
        return self


class EarlyStopConfig(BaseConfig):
    """End training before `max_steps` once the train loss has fallen far enough. Meant for a warm start: RL gains
    most from an SFT phase that stops just after its loss leaves the plateau, and the step at which that happens
    moves with the seed (docs/demo_tuning.md), while the loss level does not."""

    loss_below: float = Field(0.0, ge=0)
    """Stop when the mean `loss` of the last `window_steps` steps is below this; 0: never stop early."""
    window_steps: int = Field(10, ge=1)
    """Steps averaged (a single noisy step never ends training)."""
    min_steps: int = Field(0, ge=0)
    """Never stop before this step."""


class TrackingConfig(BaseConfig):
    """Where rank 0 sends each step's metrics besides metrics.jsonl (learner/tracking.py): TensorBoard event files,
    a W&B run. Trackers get the numeric metrics on the same `step` axis as metrics.jsonl; the group-id lists and
    non-finite values stay out of them."""

    backends: list[Literal["jsonl", "tensorboard", "wandb"]] = ["jsonl"]
    """Metric sinks. jsonl (<run_dir>/metrics.jsonl) is required: it is the independent record the launcher, the
    report and the benches read. tensorboard needs the `tensorboard` package (a main dependency), wandb the
    `tracking` extra (pip install -e '.[tracking]')."""
    tensorboard_dir: str = ""
    """TensorBoard log directory (event files, flushed every step); empty = <run_dir>/tensorboard."""
    wandb_project: str = "longtrace"
    """W&B project of the run."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb.init mode: offline writes the run under wandb_dir for a later `wandb sync`; online streams it to the
    W&B server (needs WANDB_API_KEY in the environment); disabled makes every W&B call a no-op."""
    wandb_dir: str = ""
    """Directory W&B writes its `wandb/` folder under; empty = run_dir."""
    run_name: str = ""
    """Name of the W&B run; empty: W&B picks one (`longtrace up` sets <run_id>-<phase>)."""

    @model_validator(mode="after")
    def _check_backends(self) -> TrackingConfig:
        if "jsonl" not in self.backends:
            raise ValueError(
                f'--tracking.backends {self.backends} must include "jsonl": metrics.jsonl is the independent record '
                "of each step that the launcher, the report and the benches read (add trackers beside it)"
            )
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"--tracking.backends {self.backends} names a backend twice")
        return self


class PrometheusConfig(BaseConfig):
    """Rank 0's Prometheus endpoint: each step's metrics as `longtrace_learner_*` (learner/prom.py)."""

    port: int = Field(0, ge=0, le=65535)
    """Port of GET /metrics; 0: off (docker compose serves it on 9500)."""
    host: str = "127.0.0.1"
    """Address it binds to (loopback unless the scraper runs elsewhere)."""


class TrainConfig(LearnerConfig):
    """`longtrace learner`: LearnerConfig's `model` section plus the training loop's sections."""

    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    """The broker (memory:// for tests). Rank 0 is the one consumer of `scored` (name `consumer_name`) and holds
    what it read unacked until the next checkpoint; a restart under the same name gets those entries back first."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Dataset, sampling and admission control."""
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """Batch assembly from the scored stream and micro-batch packing."""
    loss: LossConfig = Field(default_factory=LossConfig)
    """GRPO / SFT loss options."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    """Stop before max_steps on a low train loss (off by default); the last step is checkpointed and pushed."""
    weight_sync: WeightSyncConfig = Field(default_factory=NoSyncConfig)
    """How weights reach the engines after a step (`type`: none | distributed | disk). With `none` the policy
    version key is still set to the step count, so admission control and staleness work without engines."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment trackers beside metrics.jsonl (TensorBoard, W&B); rank 0 writes them."""
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)
    """Rank 0's Prometheus /metrics endpoint (off unless `port` is set)."""
    run_dir: str = "runs/learner"
    """Run directory: resolved config, metrics.jsonl, checkpoints, tensorboard/ (with that tracker)."""
    max_steps: int = Field(200, ge=1)
    """Optimizer steps to train (the step counter survives resume)."""
    consumer_name: str = "learner"
    """Name of rank 0's consumer in the scored stream's group; keep it across restarts to get held entries back."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.model.hf_path:
            raise ValueError("--model.hf_path is required (the HF model directory to train)")
        if self.loss.mode == "grpo" and not self.data.dataset_path:
            raise ValueError("--data.dataset_path is required (the LongTraceRL JSONL the feeder publishes)")
        every_k = getattr(self.weight_sync, "every_k_steps", 1)
        if self.weight_sync.type != "none" and every_k > self.data.max_staleness + 1:
            # Admission follows the policy version, which moves only on a push: tasks for step v + 1 are admitted
            # once version v - max_staleness is out, so with rarer pushes the learner starves for data.
            raise ValueError(
                f"--weight_sync.every_k_steps {every_k} > --data.max_staleness {self.data.max_staleness} + 1: "
                "admission waits for pushes that come too rarely, so the learner would starve"
            )
        bound = getattr(self.weight_sync, "attempt_bound_s", 0.0)
        if self.model.dist_timeout_s <= bound:
            # Ranks other than the sender wait in a collective while it pushes: a hung engine must fail the push
            # (whose deadlines add up to `bound`) before it times out the learner's own group.
            raise ValueError(
                f"--model.dist_timeout_s {self.model.dist_timeout_s:g} must exceed {bound:g} s, the longest a weight "
                "push attempt keeps the other ranks waiting (2 x --weight_sync.init_timeout_s + 15 + 2 x "
                "--weight_sync.broadcast_timeout_s + --weight_sync.http_timeout_s + 5)"
            )
        split = self.model.tp_size * self.model.cp_size
        if self.model.sequence_parallel and self.batch.pad_multiple % split:
            raise ValueError(
                f"--batch.pad_multiple {self.batch.pad_multiple} must be a multiple of --model.tp_size x "
                f"--model.cp_size = {split} with sequence parallelism (a CP rank's tokens are split over TP ranks)"
            )
        return self

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run_dir.rstrip('/')}/checkpoints"

    @property
    def tokenizer_path(self) -> str:
        return self.data.tokenizer_path or self.model.hf_path
