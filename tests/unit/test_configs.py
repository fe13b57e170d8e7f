"""UpConfig: typed service sections, the cross-service checks that reject what would break a run, and the retry keys
of before RetryConfig (every shipped TOML is parsed in test_deploy_configs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, has_path, load_config
from deploy.launcher.config import UpConfig
from tests.unit.test_deploy_configs import config_files

ROOT = Path(__file__).resolve().parents[2]


def test_demo_and_debug_configs_are_shipped() -> None:
    """Guards against `make demo` or the CI end-to-end test naming a config that is not in the repository."""
    shipped = {p.relative_to(ROOT).as_posix() for p in config_files()}
    assert {"configs/demo.toml", "configs/debug/up.toml", "configs/debug/up_moe.toml"} <= shipped


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
        (["--learner.config.model.routing_replay", "true"], "--rollout.config.sampling.routing_replay (False)"),
    ],
)
def test_up_config_rejects_cross_service_mistakes(tmp_path: Path, overrides: list[str], message: str) -> None:
    """Guards against a composite config that would start and then hang or train wrongly: a value the launcher
    owns set in a section, engines sampling at another temperature than the learner assumes, a scored stream
    too small for what the learner holds unacked, a layout that does not fit the ranks, an evaluation of stale
    weights, a learner that replays routing the workers never ask for (every group dead-lettered); and against
    errors that do not name the flag."""
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


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        (["--reward.config.judge.kind", "llm", "--reward.config.judge.timeout", "5"], "--reward.config.judge"),
        (["--reward.config.worker.concurency", "4"], "--reward.config.worker.concurency"),
        (["--phases.rl.learner.optim.lrr", "0.1"], "--phases.rl.learner.optim.lrr"),
        (["--phases.rl.learner.data.max_staleness", "-1"], "--phases.rl.learner.data.max_staleness"),
        (["--learner.config.batch.due_wait_s", "1e9"], "--learner.config.batch"),
    ],
)
def test_a_typo_in_a_service_section_or_a_phase_table_fails_at_load(
    tmp_path: Path, overrides: list[str], flag: str
) -> None:
    """Guards against a section typed as a plain table again: a misspelt key inside `[reward.config]` or a phase's
    `[phases.rl.learner]` must fail when `longtrace up` loads the file, naming the flag, not minutes later inside
    the child that reads it (or never, for a key that is silently ignored)."""
    with pytest.raises(ConfigError) as e:
        load_config(UpConfig, _write(tmp_path, BASE), overrides)
    assert flag in str(e.value)


def test_sections_hold_typed_service_configs(tmp_path: Path) -> None:
    """Guards against a service section read as a dict (`cfg.reward.config["eta"]`) or built with the launcher's
    stand-ins leaking into what it dumps: each section is its service's config class, the phase table goes over the
    learner's, and launcher keys are rejected in every section even when given their default value."""
    from learner.train_config import TrainConfig
    from reward_service.config import LlmJudgeConfig, RewardConfig

    flags = ["--reward.config.judge.kind", "llm", "--phases.rl.learner.optim.lr", "0.5"]
    cfg = load_config(UpConfig, _write(tmp_path, BASE), flags)
    assert isinstance(cfg.reward.config, RewardConfig) and isinstance(cfg.reward.config.judge, LlmJudgeConfig)
    assert isinstance(cfg.learner.config, TrainConfig) and cfg.learner.config.data.groups_per_step == 4
    assert cfg.learner.given() == {"data": {"groups_per_step": 4}, "weight_sync": {"type": "distributed"}}
    train = cfg.train_config("redis://h:1/0", "rl", "/m", "/d.jsonl", "/p")
    assert (train.optim.lr, train.data.groups_per_step, train.model.hf_path) == (0.5, 4, "/m")
    for flag in ("--reward.config.port", "--learner.config.model.hf_path", "--rollout.config.worker_id"):
        default = "7248" if flag.endswith("port") else '""'
        with pytest.raises(ConfigError, match=f"{flag} is set by the launcher"):
            load_config(UpConfig, _write(tmp_path, BASE), [flag, default])


OLD_RETRY_KEYS = [
    # (config class, flags with the deprecated keys, path to its retry table, attempts, the new key's flag)
    ("reward_service.config:RewardConfig", ["--judge.kind", "llm", "--judge.max_retries", "2"], "judge.retry", 3,
     "--judge.retry.max_attempts"),
    ("reward_service.config:RewardConfig", ["--worker.max_group_retries", "0", "--worker.retry_backoff_s", "0.5"],
     "worker.retry", 1, "--worker.retry.max_attempts"),
    ("rollout_server.worker.config:RolloutConfig", ["--broker.retry_attempts", "40", "--broker.retry_deadline_s", "9"],
     "broker.retry", 40, "--broker.retry.max_attempts"),
    ("rollout_server.worker.config:RolloutConfig", ["--max_attempts", "2", "--retry_backoff_s", "0.1"], "retry", 2,
     "--retry.max_attempts"),
    ("eval.config:EvalConfig", ["--dataset_path", "d", "--model_path", "m", "--max_attempts", "7"], "engine_retry", 7,
     "--engine_retry.max_attempts"),
]  # fmt: skip


@pytest.mark.parametrize(("target", "flags", "table", "attempts", "new_flag"), OLD_RETRY_KEYS)
def test_deprecated_retry_keys_still_load_and_mean_the_same_attempts(
    target: str, flags: list[str], table: str, attempts: int, new_flag: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards against files and flags written before retries took one shape (`[...retry]`, common.retry.RetryConfig)
    failing to load, against a count of retries (`max_retries`, `max_group_retries`) read as attempts (one try
    fewer), and against the old key being accepted without saying which key replaces it."""
    import importlib
    import logging

    module, name = target.split(":")
    cls = getattr(importlib.import_module(module), name)
    with caplog.at_level(logging.WARNING):
        cfg = load_config(cls, None, flags)
    retry = cfg
    for part in table.split("."):
        retry = getattr(retry, part)
    assert retry.policy().max_attempts == attempts
    assert new_flag in caplog.text and "deprecated" in caplog.text
    dumped = cfg.model_dump(mode="json")  # what RUN_DIR and the launcher's child TOMLs hold: the new keys only
    assert not any(has_path(dumped, f[2:]) for f in flags if "retr" in f or "attempts" in f)
    with pytest.raises(ConfigError, match="deprecated"):
        load_config(cls, None, [*flags, new_flag, str(attempts)])  # both spellings: which one wins is unclear


def test_an_old_up_config_with_retry_keys_loads_and_dumps_the_new_ones(tmp_path: Path) -> None:
    """Guards against a run directory's config.json (or a TOML) from before the retry keys moved failing to load:
    the ablation re-reads the config.json of reused runs, and `longtrace up` takes any UpConfig TOML."""
    text = BASE + "[reward.config.broker]\nretry_attempts = 40\n[phases.rl.learner.broker]\nretry_deadline_s = 9.0\n"
    cfg = load_config(UpConfig, _write(tmp_path, text))
    assert cfg.reward.config.broker.retry.max_attempts == 40
    assert cfg.reward_config("redis://h:1/0", "rl", 0).broker.retry.max_attempts == 40
    assert cfg.train_config("redis://h:1/0", "rl", "/m", "/d", "/p").broker.retry.deadline_s == 9.0
    assert cfg.model_dump(mode="json")["reward"]["config"] == {"broker": {"retry": {"max_attempts": 40}}}
