"""GRPO losses (METHOD.md §3): group advantages, the clipped surrogate, icepop / TIS, k3 KL, entropy, SFT.

Every loss here returns the *masked sum* over the response tokens of one micro-batch plus its token
count, never a mean: the trainer runs Megatron with `calculate_per_token_loss`, which sums the counts
over micro-batches and data-parallel ranks and divides the gradients by that total, so the loss is
normalised by the number of response tokens in the global batch (`--calculate-per-token-loss`), and a
micro-batch's size does not change how much each of its tokens weighs. Statistics are returned as sums
for the same reason (`reduce_stats` turns the all-reduced sums into means).

Shapes: B = sequences in the micro-batch, T = positions; G = samples in a group. A position's mask is 1
where its label is a response token; padding and prompt positions are 0 and never reach the sums,
even when their values are inf or nan (every masked quantity goes through `torch.where`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.train_config import LossConfig


def grpo_advantages(rewards_G: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean r) / (std r + eps) over one group, with the unbiased std; (r_i - mean r) without std.

    A group of one sample has no spread: its advantage is 0.
    """
    assert rewards_G.dim() == 1 and rewards_G.numel() > 0
    rewards_G = rewards_G.to(torch.float64)
    centered_G = rewards_G - rewards_G.mean()
    if not normalize_std:
        return centered_G
    std = rewards_G.std(correction=1) if rewards_G.numel() > 1 else torch.zeros((), dtype=rewards_G.dtype)
    return centered_G / (std + eps)


def broadcast_advantages(adv_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Every response token of sequence b gets its sample's advantage; other positions get 0."""
    return torch.where(mask_BT.bool(), adv_B[:, None].to(torch.float32), 0.0)


@dataclass
class LossOutput:
    """One micro-batch: the masked loss sum (differentiable), its response-token count, and statistic sums."""

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    stats: dict[str, torch.Tensor]


def importance_weights(
    logp_old_BT: torch.Tensor, logp_rollout_BT: torch.Tensor, mask_BT: torch.Tensor, cfg: LossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token weight correcting the engine/trainer mismatch, r = exp(logp_old_trainer - logp_rollout_engine).

    icepop: w = r where is_low <= r <= is_high, else 0 (the token's loss is zeroed; its mask, hence the
    normaliser, is unchanged). tis: w = clamp(r, is_low, is_high). none: w = 1.
    Stats (sums over response tokens): r, [w != r], |r - 1|.
    """
    mask = mask_BT.bool()
    r_BT = torch.exp(torch.where(mask, logp_old_BT - logp_rollout_BT, 0.0)).detach()
    if cfg.importance_correction == "icepop":
        in_band = (r_BT >= cfg.is_low) & (r_BT <= cfg.is_high)
        w_BT = torch.where(in_band, r_BT, 0.0)
    elif cfg.importance_correction == "tis":
        w_BT = r_BT.clamp(cfg.is_low, cfg.is_high)
    else:
        w_BT = torch.ones_like(r_BT)
    zero = torch.zeros((), dtype=r_BT.dtype, device=r_BT.device)
    stats = {
        "is_ratio_sum": torch.where(mask, r_BT, zero).sum(),
        "is_modified_sum": (mask & (w_BT != r_BT)).sum().to(r_BT.dtype),
        "is_abs_dev_sum": torch.where(mask, (r_BT - 1).abs(), zero).sum(),
    }
    return w_BT, stats


def k3_kl(logp_BT: torch.Tensor, logp_ref_BT: torch.Tensor) -> torch.Tensor:
    """Low-variance estimator of KL(pi || ref) per token (Schulman's k3): exp(d) - d - 1 with d = logp_ref - logp."""
    d_BT = logp_ref_BT - logp_BT
    return torch.exp(d_BT) - d_BT - 1


def policy_loss(
    logp_BT: torch.Tensor,
    logp_old_BT: torch.Tensor,
    adv_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    cfg: LossConfig,
    logp_rollout_BT: torch.Tensor | None = None,
    logp_ref_BT: torch.Tensor | None = None,
    entropy_BT: torch.Tensor | None = None,
) -> LossOutput:
    """Clipped surrogate L_t = max(-rho A, -clip(rho, 1 - eps_clip, 1 + eps_clip_high) A), rho = exp(logp - logp_old),
    times the icepop/TIS weight, plus kl_coef * k3 KL minus entropy_coef * entropy; masked sum over tokens."""
    mask = mask_BT.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logp_BT.device)
    logp_BT = logp_BT.float()
    log_ratio_BT = torch.where(mask, logp_BT - logp_old_BT.float(), 0.0)
    ratio_BT = torch.exp(log_ratio_BT)
    surr_BT = -ratio_BT * adv_BT
    surr_clipped_BT = -ratio_BT.clamp(1 - cfg.eps_clip, 1 + cfg.eps_clip_high) * adv_BT
    pg_BT = torch.maximum(surr_BT, surr_clipped_BT)
    stats: dict[str, torch.Tensor] = {
        "clipped_sum": (mask & (surr_clipped_BT > surr_BT)).sum().float(),
        "ratio_sum": torch.where(mask, ratio_BT, zero).sum().detach(),
        "logp_old_sum": torch.where(mask, logp_old_BT.float(), zero).sum(),
    }
    if cfg.importance_correction != "none":
        assert logp_rollout_BT is not None, "icepop/TIS need the rollout engine's logprobs"
        w_BT, is_stats = importance_weights(logp_old_BT.float(), logp_rollout_BT.float(), mask_BT, cfg)
        pg_BT = pg_BT * w_BT
        stats.update(is_stats)
    stats["pg_loss_sum"] = torch.where(mask, pg_BT, zero).sum().detach()
    per_token_BT = pg_BT
    if cfg.kl_coef > 0:
        assert logp_ref_BT is not None, "kl_coef > 0 needs the reference model's logprobs"
        kl_BT = k3_kl(logp_BT, logp_ref_BT.float())
        per_token_BT = per_token_BT + cfg.kl_coef * kl_BT
        stats["kl_sum"] = torch.where(mask, kl_BT, zero).sum().detach()
    assert cfg.entropy_coef == 0 or entropy_BT is not None, "entropy_coef > 0 needs the per-token entropy"
    if entropy_BT is not None:
        if cfg.entropy_coef > 0:
            per_token_BT = per_token_BT - cfg.entropy_coef * entropy_BT.float()
        stats["entropy_sum"] = torch.where(mask, entropy_BT.float(), zero).sum().detach()
    loss_sum = torch.where(mask, per_token_BT, zero).sum()
    num_tokens = mask.sum()
    stats["loss_sum"] = loss_sum.detach()
    stats["num_tokens"] = num_tokens.float()
    return LossOutput(loss_sum=loss_sum, num_tokens=num_tokens, stats=stats)


def sft_loss(logp_BT: torch.Tensor, mask_BT: torch.Tensor, entropy_BT: torch.Tensor | None = None) -> LossOutput:
    """Cross-entropy on demonstration tokens: the masked sum of -log p (per-token normalised like the RL loss)."""
    mask = mask_BT.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logp_BT.device)
    loss_sum = torch.where(mask, -logp_BT.float(), zero).sum()
    num_tokens = mask.sum()
    stats = {"loss_sum": loss_sum.detach(), "num_tokens": num_tokens.float()}
    if entropy_BT is not None:
        stats["entropy_sum"] = torch.where(mask, entropy_BT.float(), zero).sum().detach()
    return LossOutput(loss_sum=loss_sum, num_tokens=num_tokens, stats=stats)


def compute_loss(
    cfg: LossConfig,
    logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    logp_old_BT: torch.Tensor | None = None,
    adv_BT: torch.Tensor | None = None,
    logp_rollout_BT: torch.Tensor | None = None,
    logp_ref_BT: torch.Tensor | None = None,
    entropy_BT: torch.Tensor | None = None,
) -> LossOutput:
    """The configured loss (`cfg.mode`) of one micro-batch."""
    if cfg.mode == "sft":
        return sft_loss(logp_BT, mask_BT, entropy_BT)
    assert logp_old_BT is not None and adv_BT is not None
    return policy_loss(logp_BT, logp_old_BT, adv_BT, mask_BT, cfg, logp_rollout_BT, logp_ref_BT, entropy_BT)


# Statistic sums turned into per-token means once summed over the global batch.
_MEANS = {
    "loss_sum": "loss",
    "pg_loss_sum": "pg_loss",
    "clipped_sum": "clip_fraction",
    "ratio_sum": "ratio_mean",
    "logp_old_sum": "logp_old_mean",
    "is_ratio_sum": "is_ratio_mean",
    "is_modified_sum": "is_modified_fraction",
    "is_abs_dev_sum": "is_abs_dev_mean",
    "kl_sum": "kl",
    "entropy_sum": "entropy",
}


# Every statistic sum any loss can report, in a fixed order (ranks all-reduce them as one vector).
STAT_KEYS = (*_MEANS, "num_tokens")


def reduce_stats(sums: dict[str, float]) -> dict[str, float]:
    """Global-batch means from statistic sums already summed over micro-batches and ranks."""
    n = max(sums.get("num_tokens", 0.0), 1.0)
    out = {name: sums[key] / n for key, name in _MEANS.items() if key in sums}
    out["num_loss_tokens"] = sums.get("num_tokens", 0.0)
    return out
