"""UpConfig: the cross-service checks reject what would break a run (every shipped TOML is parsed in test_deploy_configs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from deploy.launcher.config import UpConfig
from tests.unit.test_deploy_configs import config_files

ROOT = Path(__file__).resolve().parents[2]


def test_demo_and_debug_configs_are_shipped() -> None:
    """Guards against `make demo` or the CI end-to-end test naming a config that is not in the repository."""
    shipped = {p.relative_to(ROOT).as_posix() for p in config_files()}
    assert {"configs/demo.toml", "configs/debug/up.toml"} <= shipped


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "up.toml"
    path.write_text(text)
    return path


BASE = """
run_dir = "runs/x"
[prepare]
num_train = 8
num_heldout = 4
[learner.config.data]
groups_per_step = 4
[learner.config.weight_sync]
type = "distributed"
[phases.rl]
kind = "rl"
steps = 2
"""


def test_up_config_accepts_a_minimal_file(tmp_path: Path) -> None:
    """Guards against defaults of the composite config that contradict each other (a minimal file must load)."""
    cfg = load_config(UpConfig, _write(tmp_path, BASE))
    assert cfg.phase_run_id("rl") == "up-rl"
    train = cfg.train_config("redis://h:1/0", "rl", "/m", "/d.jsonl", "/p")
    assert (train.broker.redis_url, train.model.hf_path, train.max_steps) == ("redis://h:1/0", "/m", 2)
    assert train.weight_sync.export_dir == "/p/exports"  # the next phase starts from this phase's last export


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--learner.config.broker.run_id", "x"], "--learner.config.broker.run_id is set by the launcher"),
        (["--engines.config.port", "8000"], "--engines.config.port is set by the launcher"),
        (["--phases.rl.learner.max_steps", "9"], "--phases.rl.learner.max_steps is set by the launcher"),
        (["--rollout.config.sampling.temperature", "0.7"], "--rollout.config.sampling.temperature (0.7)"),
        (["--learner.config.optim.lr", "-1"], "--learner.config.optim.lr"),
        (["--learner.config.model.tp_size", "4"], "not a multiple of tp*pp*cp"),
        (["--engines.config.context_length", "64"], "exceeds --engines.config.context_length 64"),
        (["--learner.config.weight_sync.type", "none"], "eval_after: without weight sync"),
        (["--phases.Bad.kind", "rl", "--phases.Bad.steps", "1"], "--phases.Bad: name a phase"),
        (["--prepare.synth.hops", "0"], "--prepare.synth.hops"),
        (["--reward.serve", "false"], "evaluation scores through the reward API"),
    ],
)
def test_up_config_rejects_cross_service_mistakes(tmp_path: Path, overrides: list[str], message: str) -> None:
    """Guards against a composite config that would start and then hang or train wrongly: a value the launcher
    owns set in a section, engines sampling at another temperature than the learner assumes, a scored stream
    too small for what the learner holds unacked, a layout that does not fit the ranks, an evaluation of stale
    weights; and against errors that do not name the flag."""
    with pytest.raises(ConfigError) as e:
        load_config(UpConfig, _write(tmp_path, BASE), overrides)
    assert message in str(e.value)


def test_previous_init_needs_an_exporting_phase(tmp_path: Path) -> None:
    """Guards against a phase that starts 'from the previous phase' when that phase never exports weights
    (it would silently restart from the base model)."""
    text = BASE + '[phases.rl2]\nkind = "rl"\nsteps = 1\n'
    overrides = ["--phases.rl.learner.weight_sync.type", "none", "--phases.rl.eval_after", "false"]
    with pytest.raises(ConfigError, match=r"--phases.rl2.init previous: phase 'rl' exports no weights"):
        load_config(UpConfig, _write(tmp_path, text), overrides)
    cfg = load_config(UpConfig, _write(tmp_path, text), [*overrides, "--phases.rl2.init", "base"])
    assert list(cfg.phases) == ["rl", "rl2"]  # file order is run order


def test_up_config_needs_a_model_or_prepare(tmp_path: Path) -> None:
    """Guards against a config with neither a model nor a [prepare] section failing late, inside a child."""
    text = BASE.replace("[prepare]\nnum_train = 8\nnum_heldout = 4\n", "")
    with pytest.raises(ConfigError, match="--model_path is required"):
        load_config(UpConfig, _write(tmp_path, text))
