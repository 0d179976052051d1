"""The only place a Dramatiq broker is built; work is enqueued by actor name.

Idle workers block on Redis instead of polling it: a consumer that finds its queue empty
waits in `BLMOVE queue queue LEFT LEFT` (up to Dramatiq's idle timeout), which returns as
soon as anything is pushed onto the queue list and, moving the head back onto the head,
leaves the queue exactly as it was; Dramatiq then fetches as usual. Every producer wakes
it, ours and a raw Dramatiq producer of another service alike. Needs Redis 6.2 (BLMOVE);
an older server gets Dramatiq's plain sleep."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message
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


#: A Redis command that takes longer has lost its server (a dead server must not hang a
#: thread); an idle consumer's blocking wait stays below it.
SOCKET_TIMEOUT_S = 10.0


class _WakeableConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer (dramatiq 2.x `_RedisConsumer.__next__`), with its idle
    sleep replaced by a blocking wait for the queue list to be non-empty, and its
    prefetched messages kept across a reconnect.

    Dramatiq's worker replaces a consumer whose connection broke and drops the messages
    it had prefetched; those stay in this live worker's ack set, where nothing requeues
    them until the worker process dies (a chaos run found one producer's message held
    so). Here a closing consumer leaves them with the broker, and the next consumer of
    its queue hands them out first: they are still ours to process and ack."""

    def __init__(
        self, broker: KodmobiRedisBroker, queue_name: str, prefetch: int, timeout: int
    ) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        self.queue_key = f"{broker.namespace}:{queue_name}"
        self.can_block = True
        self.message_cache = broker.take_prefetched(queue_name)

    def close(self) -> None:
        cast(KodmobiRedisBroker, self.broker).keep_prefetched(self.queue_name, self.message_cache)
        self.message_cache = []
        super().close()

    def __next__(self) -> Any:
        try:
            while True:
                if self.message_cache:
                    data = self.message_cache.pop(0)
                    if data is None:
                        continue
                    self.misses = 0
                    message = Message.decode(data)
                    self.queued_message_ids.add(message.message_id)
                    return dramatiq.MessageProxy(message)
                messages = []
                if self.outstanding_message_count < self.prefetch:
                    self.message_cache = messages = self.broker.do_fetch(
                        self.queue_name, self.prefetch - self.outstanding_message_count
                    )
                if not messages:
                    self.misses, backoff_ms = compute_backoff(
                        self.misses, max_backoff=self.timeout
                    )
                    self._wait(backoff_ms / 1000)
                    return None
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def _wait(self, seconds: float) -> None:
        if self.outstanding_message_count >= self.prefetch or not self.can_block:
            time.sleep(seconds)  # busy, not idle: new messages could not be taken yet
            return
        # Redis takes the timeout in seconds (0 would mean forever); a blocked command
        # must end before the socket timeout, which would take it for a dead server.
        timeout = min(max(seconds, 0.01), SOCKET_TIMEOUT_S - 2)
        try:
            self.broker.client.blmove(self.queue_key, self.queue_key, timeout, "LEFT", "LEFT")
        except redis.ResponseError:  # Redis before 6.2: no BLMOVE
            self.can_block = False


class KodmobiRedisBroker(RedisBroker):
    """Dramatiq's Redis broker whose idle consumers block in Redis, and whose consumers
    pass prefetched messages on to their successors (see _WakeableConsumer)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._prefetched: dict[str, list[bytes]] = {}
        self._prefetched_lock = threading.Lock()

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        return _WakeableConsumer

    def keep_prefetched(self, queue_name: str, messages: list[bytes]) -> None:
        kept = [m for m in messages if m is not None]
        if kept:
            with self._prefetched_lock:
                self._prefetched.setdefault(queue_name, []).extend(kept)

    def take_prefetched(self, queue_name: str) -> list[bytes]:
        with self._prefetched_lock:
            return self._prefetched.pop(queue_name, [])


def build_broker(redis_url: str, namespace: str = "dramatiq") -> RedisBroker:
    """A Redis broker; not made Dramatiq's global one (see worker.wiring.start)."""
    broker = KodmobiRedisBroker(
        url=redis_url,
        namespace=namespace,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
        maintenance_chance=MAINTENANCE_CHANCE,
        # redis-py reconnects by itself; these keep a dead server from hanging a thread.
        socket_timeout=SOCKET_TIMEOUT_S,
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

