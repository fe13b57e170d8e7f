"""`common.config.dump_config`: the resolved config written into every run directory."""

from __future__ import annotations

import json
from pathlib import Path

from broker.settings import BrokerConfig
from common.config import dump_config


def test_dump_masks_the_redis_password(tmp_path: Path) -> None:
    """Guards against a Redis password inside the URL landing in RUN_DIR/config.json, which gets shared with
    results, while the rest of the URL stays readable for reproducibility."""
    cfg = BrokerConfig(redis_url="redis://:hunter2@10.0.0.5:6380/1", run_id="r")
    dump_config(cfg, tmp_path / "config.json")
    text = (tmp_path / "config.json").read_text()
    assert "hunter2" not in text
    assert json.loads(text)["redis_url"] == "redis://:***@10.0.0.5:6380/1"
