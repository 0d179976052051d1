"""The only place a Dramatiq broker is built and set; import it before any actor."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

#: The queue producers enqueue `send_code` on (contract).
QUEUE = "kodmobi"
#: A worker silent this long is dead: its unacknowledged messages go back on the queue.
HEARTBEAT_TIMEOUT_MS = 20_000
#: Out of a million broker commands, how many also run that dead-worker maintenance.
MAINTENANCE_CHANCE = 10_000


def build_broker(redis_url: str, namespace: str = "dramatiq") -> RedisBroker:
    broker = RedisBroker(  # type: ignore[no-untyped-call]
        url=redis_url,
        namespace=namespace,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
        maintenance_chance=MAINTENANCE_CHANCE,
        # redis-py reconnects by itself; these keep a dead server from hanging a thread.
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry_on_timeout=True,
    )
    broker.add_middleware(CurrentMessage())
    return broker


def setup_broker(redis_url: str, namespace: str = "dramatiq") -> RedisBroker:
    """Build the broker and make it Dramatiq's global one (actors bind to it)."""
    broker = build_broker(redis_url, namespace)
    dramatiq.set_broker(broker)
    return broker
