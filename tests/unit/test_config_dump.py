"""`common.config.dump_config`: the resolved config written into every run directory, and read back from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.settings import BrokerConfig
from common.config import dump_config, load_config


def test_dump_masks_the_redis_password(tmp_path: Path) -> None:
    """Guards against a Redis password inside the URL landing in RUN_DIR/config.json, which gets shared with
    results, while the rest of the URL stays readable for reproducibility."""
    cfg = BrokerConfig(redis_url="redis://:hunter2@10.0.0.5:6380/1", run_id="r")
    dump_config(cfg, tmp_path / "config.json")
    text = (tmp_path / "config.json").read_text()
    assert "hunter2" not in text
    assert json.loads(text)["redis_url"] == "redis://:***@10.0.0.5:6380/1"


@pytest.mark.parametrize("config", ["configs/demo.toml", "configs/debug/up.toml"])
def test_a_dumped_up_config_reloads_equal(tmp_path: Path, config: str) -> None:
    """Guards against RUN_DIR/config.json (and the ablation's resolved TOMLs) that do not load back to the run's
    UpConfig: a service section dumped with the launcher's keys or stand-ins in it is refused on reload ("set by the
    launcher"), and one dumped whole would no longer be the tables the run was given."""
    from deploy.launcher.config import UpConfig
    from deploy.launcher.tomlfile import write_config

    root = Path(__file__).resolve().parents[2]
    flags = ["--reward.config.worker.concurrency", "4", "--phases.rl.learner.optim.lr", "0.5"]
    cfg = load_config(UpConfig, root / config, flags)
    dump_config(cfg, tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["reward"]["config"]["worker"] == {"concurrency": 4}  # what was given, not every default
    assert "hf_path" not in json.dumps(data["learner"])
    again = UpConfig.model_validate(data)
    assert again == cfg and again.model_dump(mode="json") == data
    assert load_config(UpConfig, write_config(cfg, tmp_path / "resolved.toml")) == cfg
