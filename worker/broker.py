"""The only place a Dramatiq broker is built; work is enqueued by actor name."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

#: The queue producers enqueue `send_code` on (contract).
QUEUE = "kodmobi"
#: The producers' actor (contract) and ours, for a fallback, a retry or a re-dispatch.
SEND_CODE = "send_code"
DELIVER_ATTEMPT = "deliver_attempt"
#: A worker silent this long is dead: its unacknowledged messages go back on the queue.
HEARTBEAT_TIMEOUT_MS = 20_000
#: Out of a million broker commands, how many also run that dead-worker maintenance.
MAINTENANCE_CHANCE = 10_000


def build_broker(redis_url: str, namespace: str = "dramatiq") -> RedisBroker:
    """A Redis broker; not made Dramatiq's global one (see worker.wiring.start)."""
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


def enqueue(broker: dramatiq.Broker, actor_name: str, *args: Any, **kwargs: Any) -> str:
    """Enqueue a message for `actor_name` on our queue, as any producer would: no actor
    object needed, so web, clock and the Python API never import the actors."""
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=QUEUE, actor_name=actor_name, args=args, kwargs=kwargs, options={}
    )
    broker.enqueue(message)
    return message.message_id
