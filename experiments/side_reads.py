"""The broker settings of a harness that reads a running system's queue on the side (the chaos bench's probe, the
async bench's observer of `scored`): one quick attempt per call, so a read never stalls the harness while Redis is
down or restarting; the caller treats a BrokerError as "not readable now".
"""

from __future__ import annotations

from broker.settings import BrokerConfig, BrokerRetryConfig


def side_reads_config(redis_url: str, run_id: str, connect_timeout_s: float) -> BrokerConfig:
    """BrokerConfig of `run_id`'s namespace at `redis_url` with short timeouts and no retry."""
    return BrokerConfig(
        redis_url=redis_url,
        run_id=run_id,
        socket_timeout_s=2.0,
        connect_timeout_s=connect_timeout_s,
        retry=BrokerRetryConfig(max_attempts=1, deadline_s=2.0),
    )
