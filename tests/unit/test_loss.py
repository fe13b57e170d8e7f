"""GRPO loss pieces against hand-computed values (METHOD.md §3)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import ConfigError, load_config
from learner.loss import broadcast_advantages, compute_loss, grpo_advantages, k3_kl, policy_loss, reduce_stats
from learner.train_config import LossConfig, TrainConfig

NONE = LossConfig(importance_correction="none")


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor([list(xs)], dtype=torch.float32)


def test_advantages_equal_rewards_are_zero_and_std_is_unbiased() -> None:
    """Guards against NaN/inf advantages for all-equal groups (std 0) and against the biased std (the paper
    divides by the unbiased one) or a missing no-std option."""
    assert torch.equal(grpo_advantages(torch.tensor([0.7, 0.7, 0.7, 0.7])), torch.zeros(4, dtype=torch.float64))
    # mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64) * 0.5 / (0.5 + 1e-6))
    no_std = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), normalize_std=False)
    assert torch.allclose(no_std, torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64))
    assert torch.equal(grpo_advantages(torch.tensor([1.0])), torch.zeros(1, dtype=torch.float64))


def test_advantages_broadcast_only_to_response_tokens() -> None:
    """Guards against prompt or padding positions receiving an advantage (they would leak into the loss)."""
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    adv = broadcast_advantages(torch.tensor([2.0, -1.0]), mask)
    assert torch.equal(adv, torch.tensor([[0.0, 2.0, 2.0, 0.0], [0.0, 0.0, -1.0, -1.0]]))


def test_clipped_surrogate_clips_both_sides() -> None:
    """Guards against a symmetric clip (eps_clip_high 0.28 must bound rho above, 0.2 below), against clipping
    the pessimistic side, and against padding positions (inf logprobs) turning the sum into NaN."""
    logp_old = torch.zeros(1, 5)
    logp = torch.log(_t(1.5, 0.5, 1.1, 0.5, 1.0))
    logp[0, 4] = float("inf")  # a padding position
    adv = _t(1.0, -1.0, 1.0, 1.0, 5.0)
    mask = _t(1, 1, 1, 1, 0)
    out = policy_loss(logp, logp_old, adv, mask, NONE)
    # rho=1.5,A=+1 -> -1.28 (clipped high); rho=0.5,A=-1 -> +0.8 (clipped low);
    # rho=1.1,A=+1 -> -1.1; rho=0.5,A=+1 -> max(-0.5, -0.8) = -0.5 (the unclipped, pessimistic term)
    assert out.loss_sum.item() == pytest.approx(-1.28 + 0.8 - 1.1 - 0.5, abs=1e-6)
    assert out.num_tokens.item() == 4
    assert out.stats["clipped_sum"].item() == 2


def test_clipped_tokens_get_no_gradient() -> None:
    """Guards against gradients flowing through a clipped ratio (the point of the clip)."""
    logp_old = torch.zeros(1, 2)
    logp = torch.log(_t(1.5, 1.1)).requires_grad_(True)
    policy_loss(logp, logp_old, _t(1.0, 1.0), _t(1, 1), NONE).loss_sum.backward()
    assert logp.grad is not None
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-1.1, abs=1e-6)  # d(-rho A)/dlogp = -rho A


def test_icepop_zeroes_out_of_band_tokens_but_keeps_them_in_the_normaliser() -> None:
    """Guards against icepop clamping instead of zeroing, against dropping zeroed tokens from the token count
    (which would upweight the remaining ones), and against wrong icepop statistics."""
    logp_old = torch.log(_t(0.5, 0.6, 0.2, 0.3))
    logp_rollout = torch.log(_t(0.5, 0.2, 0.5, 0.2))  # r = 1.0, 3.0, 0.4, 1.5
    adv = torch.ones(1, 4)
    mask = torch.ones(1, 4)
    out = policy_loss(logp_old.clone(), logp_old, adv, mask, LossConfig(), logp_rollout_BT=logp_rollout)
    assert out.loss_sum.item() == pytest.approx(-(1.0 + 0.0 + 0.0 + 1.5), abs=1e-5)
    assert out.num_tokens.item() == 4
    means = reduce_stats({k: v.item() for k, v in out.stats.items()})
    assert means["loss"] == pytest.approx(-2.5 / 4, abs=1e-5)
    assert means["is_ratio_mean"] == pytest.approx((1.0 + 3.0 + 0.4 + 1.5) / 4, abs=1e-5)
    assert means["is_modified_fraction"] == pytest.approx(0.5)
    assert means["is_abs_dev_mean"] == pytest.approx((0 + 2.0 + 0.6 + 0.5) / 4, abs=1e-5)

    tis = policy_loss(logp_old.clone(), logp_old, adv, mask, LossConfig(importance_correction="tis"), logp_rollout)
    assert tis.loss_sum.item() == pytest.approx(-(1.0 + 2.0 + 0.5 + 1.5), abs=1e-5)
    assert tis.stats["is_modified_sum"].item() == 2


def test_loss_is_normalised_by_the_global_token_count() -> None:
    """Guards against averaging per micro-batch (or per sequence): a micro-batch with 1 token and one with 3
    must weigh each token equally, the loss being sum / 4, not the mean of the two micro-batch means."""
    mb1 = policy_loss(torch.zeros(1, 1, requires_grad=True), torch.zeros(1, 1), _t(1.0), _t(1), NONE)
    mb2 = policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), _t(-1.0, -1.0, -1.0), _t(1, 1, 1), NONE)
    sums = {k: mb1.stats[k].item() + mb2.stats[k].item() for k in mb1.stats}
    assert sums["num_tokens"] == 4
    assert reduce_stats(sums)["loss"] == pytest.approx((-1.0 + 3.0) / 4)


def test_kl_entropy_and_sft() -> None:
    """Guards against a wrong KL estimator (k3 = e^d - d - 1, d = logp_ref - logp), the entropy bonus having
    the wrong sign, and SFT not being the masked negative log-likelihood."""
    d = math.log(0.5)
    assert k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item() == pytest.approx(math.exp(d) - d - 1)
    logp = torch.log(_t(0.5, 0.25))
    cfg = LossConfig(importance_correction="none", kl_coef=0.5, entropy_coef=0.1)
    out = compute_loss(
        cfg, logp, _t(1, 1), logp_old_BT=logp, adv_BT=torch.zeros(1, 2), logp_ref_BT=logp, entropy_BT=_t(2.0, 3.0)
    )
    assert out.loss_sum.item() == pytest.approx(-0.1 * 5.0, abs=1e-6)  # KL 0 to itself; bonus lowers the loss
    sft = compute_loss(LossConfig(mode="sft"), logp, _t(1, 0))
    assert sft.loss_sum.item() == pytest.approx(-math.log(0.5), abs=1e-6)
    assert sft.num_tokens.item() == 1


def test_loss_config_rejects_an_empty_band() -> None:
    """Guards against an icepop band that zeroes every token (is_low >= is_high) being accepted silently."""
    with pytest.raises(ValueError, match="is_low"):
        LossConfig(is_low=2.0, is_high=0.5)


def test_train_config_defaults_are_the_paper_recipe_and_errors_name_the_flag(tmp_path: Path) -> None:
    """Guards against drifting from METHOD.md §3-4 defaults and against config errors (a missing model, an
    unsupported layout) that do not name the flag to fix, in the config and through the CLI entry point."""
    cfg = TrainConfig.model_validate({"model": {"hf_path": "m"}, "data": {"dataset_path": "d.jsonl"}})
    assert (cfg.optim.lr, cfg.optim.adam_beta1, cfg.optim.adam_beta2) == (2e-6, 0.9, 0.98)
    assert (cfg.optim.weight_decay, cfg.optim.clip_grad) == (0.1, 1.0)
    assert (cfg.data.groups_per_step, cfg.data.num_samples, cfg.data.temperature) == (16, 8, 1.0)
    assert (cfg.loss.eps_clip, cfg.loss.eps_clip_high, cfg.loss.importance_correction) == (0.2, 0.28, "icepop")
    assert (cfg.loss.kl_coef, cfg.loss.entropy_coef, cfg.batch.zero_variance_filter) == (0.0, 0.0, False)
    sp = ["--model.tp_size", "2", "--model.cp_size", "2", "--model.sequence_parallel", "--batch.pad_multiple", "2"]
    sp += ["--model.transformer_impl", "transformer_engine"]
    with pytest.raises(
        ConfigError, match="--batch.pad_multiple 2 must be a multiple of --model.tp_size x --model.cp_size"
    ):
        load_config(TrainConfig, None, ["--model.hf_path", "m", "--data.dataset_path", "d", *sp])
    # Pushes rarer than the staleness window starve admission (found by bench async's warm start).
    rare = ["--weight_sync.type", "disk", "--weight_sync.export_dir", "e", "--weight_sync.every_k_steps", "3"]
    with pytest.raises(ConfigError, match="--weight_sync.every_k_steps 3 > --data.max_staleness"):
        load_config(TrainConfig, None, ["--model.hf_path", "m", "--data.dataset_path", "d", *rare])
    (tmp_path / "c.toml").write_text('[data]\ndataset_path = "d.jsonl"\n')
    out = subprocess.run(
        [sys.executable, "-m", "learner.train_cli", "--config", str(tmp_path / "c.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--model.hf_path" in out.stderr
