"""Every TOML under configs/ and deploy/ loads with its config class (prime-rl's test_load_configs).

A file's class comes from its name (learner.toml -> TrainConfig, ...) or from a first-line comment
`# config: module:Class`. A TOML that maps to no class fails the test, so no config file escapes the check.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest

from common.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLASS_BY_STEM = {
    "learner": "learner.train_config:TrainConfig",
    "engine": "rollout_server.launch:LaunchConfig",
    "serve": "rollout_server.engine.config:EngineConfig",
    "rollout": "rollout_server.worker.config:RolloutConfig",
    "reward": "reward_service.config:RewardConfig",
    "up": "deploy.launcher.config:UpConfig",
}
HEADER = re.compile(r"^#\s*config:\s*([\w.]+:\w+)\s*$")
MODELS = ("qwen3-4b-thinking-2507", "deepseek-r1-0528-qwen3-8b", "qwen3-30b-a3b-thinking-2507")


def config_files() -> list[Path]:
    return sorted([*(REPO / "configs").rglob("*.toml"), *(REPO / "deploy").rglob("*.toml")])


def config_class(path: Path) -> Any:
    first = path.read_text().splitlines()[:1]
    match = HEADER.match(first[0]) if first else None
    target = match.group(1) if match else CLASS_BY_STEM.get(path.stem)
    assert target, f"{path.relative_to(REPO)}: no config class (name it after a service or add '# config: mod:Class')"
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_toml_loads_with_its_config_class(path: Path) -> None:
    """Guards against a shipped config that fails at start: a typo'd key (unknown keys are errors), a value out of
    range, or a section that a config class no longer has."""
    cls = config_class(path)
    config = load_config(cls, path)
    assert isinstance(config, cls)


def test_each_model_recipe_has_the_paper_settings() -> None:
    """Guards against a model recipe drifting from the paper (METHOD.md §4): parallel layout, lr, Adam betas,
    batch, context, icepop band, engine TP8 at memory fraction 0.7, the model's response parser."""
    from learner.train_config import TrainConfig
    from rollout_server.launch import LaunchConfig
    from rollout_server.worker.config import RolloutConfig

    for model in MODELS:
        d = REPO / "configs" / "models" / model
        learner = load_config(TrainConfig, d / "learner.toml")
        m = learner.model
        assert (m.tp_size, m.pp_size, m.sequence_parallel, m.dtype) == (4, 2, True, "bf16"), model
        assert (learner.optim.lr, learner.optim.adam_beta1, learner.optim.adam_beta2) == (2e-6, 0.9, 0.98), model
        assert learner.optim.weight_decay == 0.1, model
        assert (learner.data.groups_per_step, learner.data.num_samples) == (16, 8), model
        assert (learner.data.max_new_tokens, learner.data.max_total_tokens) == (32000, 160000), model
        assert (learner.loss.importance_correction, learner.loss.is_low, learner.loss.is_high) == ("icepop", 0.5, 2.0)
        assert (learner.checkpoint.interval_steps, learner.max_steps) == (20, 200), model
        assert learner.weight_sync.type == "distributed", model

        engine = load_config(LaunchConfig, d / "engine.toml")
        assert (engine.backend, engine.tp_size, engine.mem_fraction_static) == ("sglang", 8, 0.7), model
        assert engine.context_length >= learner.data.max_total_tokens, model
        assert Path(engine.model_path).name == Path(m.hf_path).name, model

        rollout = load_config(RolloutConfig, d / "rollout.toml")
        assert rollout.processor == ("deepseek_r1" if "deepseek" in model else "qwen3"), model
        assert rollout.sampling.max_context_len == learner.data.max_total_tokens, model
        assert rollout.sampling.num_samples == learner.data.num_samples, model
        assert learner.broker.run_id == engine.broker.run_id == rollout.broker.run_id, model
