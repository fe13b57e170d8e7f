"""`RedisBroker`: the Redis backend assembled from its parts, one connection shared by all of them."""

from __future__ import annotations

import logging

from redis.exceptions import ResponseError

from broker.base import (
    Broker,
    Consumer,
    Producer,
    RunDataLost,
    RunMarker,
    StreamView,
    check_one_group,
    check_stream,
    marker_lost,
)
from broker.redis.consumer import RedisConsumer
from broker.redis.layout import text
from broker.redis.producer import RedisProducer
from broker.redis.state import RedisEngineRegistry, RedisPolicyVersion, RedisRunState, WatchedConnection, durability
from broker.redis.view import RedisStreamView
from broker.schemas import M
from broker.settings import BrokerConfig

log = logging.getLogger(__name__)


class RedisBroker(Broker):
    """The queues and keys of one run on one Redis (redis://, rediss:// with user:password, unix://); the password
    may instead come from `redis_password_file` or `redis_password_env`."""

    def __init__(self, config: BrokerConfig) -> None:
        self.conn = WatchedConnection(config)
        self.config = config
        self.run_id = config.run_id
        self.url = self.conn.url  # without its password
        self.client = self.conn.client
        self.policy_version = RedisPolicyVersion(self.conn)
        self.engines = RedisEngineRegistry(self.conn)
        self.state = RedisRunState(self.conn)

    def key(self, name: str) -> str:
        """The full Redis key of `name` in this run's namespace (`longtrace:{run}:name`)."""
        return self.conn.keys.key(name)

    def holds_keys(self) -> bool:
        """Whether Redis holds any key of this run (SCAN, up to the first): a reused run id would find its group
        ids already deduplicated (for `dedup_ttl_s`) and publish nothing."""
        pattern = self.conn.keys.pattern()
        return self.conn.call(
            lambda: next(self.client.scan_iter(match=pattern, count=1000), None) is not None, "SCAN run keys"
        )

    def producer(self, stream: str, kind: type[M]) -> Producer[M]:
        check_stream(stream)
        return RedisProducer(self.conn, stream, kind)

    def consumer(self, stream: str, kind: type[M], group: str, name: str) -> Consumer[M]:
        check_stream(stream)
        key = self.key(stream)

        def create() -> None:
            try:
                self.client.xgroup_create(key, group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

        self.conn.call(create, "XGROUP CREATE")
        groups = self.conn.call(lambda: self.client.xinfo_groups(key), "XINFO GROUPS")
        check_one_group(stream, [text(g["name"]) for g in groups], group)
        return RedisConsumer(self.conn, stream, kind, group, name)

    def view(self, stream: str) -> StreamView:
        check_stream(stream)
        return RedisStreamView(self.conn, stream)

    def check_durability(self) -> list[str]:
        return durability(self.conn)

    def attach_run(self, who: str, owner: bool = False, resumed_from: str = "") -> RunMarker | None:
        self.check_durability()
        marker = self.conn.read_marker()
        if marker is None and resumed_from:
            raise RunDataLost(marker_lost(self.url, self.run_id, None, None, resumed_from))
        if marker is None and owner:
            marker = self.conn.create_marker(RunMarker.new(self.run_id, who))
        self.conn.watch(marker)
        log.info("%s attached to %s on %s", who, marker.describe() if marker else f"run {self.run_id!r}", self.url)
        return marker

    def close(self) -> None:
        self.conn.close()
