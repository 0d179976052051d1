"""Idle workers block on Redis and wake when anything is enqueued: no busy polling, and
no waiting out a poll interval either."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import dramatiq
import pytest

from worker import broker as worker_broker
from worker.broker import QUEUE, build_broker, enqueue

#: Longer than any wait below (and under the Redis socket timeout, which caps a blocking
#: wait): a message found sooner was found by a wake-up.
IDLE_TIMEOUT_MS = 7_000


@pytest.fixture
def idle_worker(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[dramatiq.Broker, threading.Event]]:
    # An idle consumer waits its whole idle timeout at once (Dramatiq grows the wait
    # 5, 10, 20 … ms up to it): a message found within the test was found by a wake-up.
    monkeypatch.setattr(
        worker_broker, "compute_backoff", lambda misses, max_backoff: (misses + 1, max_backoff)
    )
    broker = build_broker(redis_url, f"kodmobi-test-{uuid.uuid4().hex[:8]}")
    seen = threading.Event()

    @dramatiq.actor(actor_name="ping", queue_name=QUEUE, broker=broker)
    def ping() -> None:
        seen.set()

    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=IDLE_TIMEOUT_MS)
    worker.start()
    time.sleep(0.5)  # the consumer found the queue empty and waits
    try:
        yield broker, seen
    finally:
        worker.stop(timeout=1000)
        broker.close()


def test_an_enqueue_wakes_an_idle_worker_at_once(
    idle_worker: tuple[dramatiq.Broker, threading.Event],
) -> None:
    broker, seen = idle_worker
    # When a producer enqueues as any Dramatiq producer does (no help from us)
    broker.enqueue(
        dramatiq.Message(queue_name=QUEUE, actor_name="ping", args=(), kwargs={}, options={})
    )
    # Then the worker takes it long before its idle timeout would have let it look
    assert seen.wait(5)


def test_the_wait_leaves_the_queue_as_it_was(redis_url: str) -> None:
    # Given a queue with three messages and a consumer that finds nothing to take (its
    # prefetch is spent) but waits as an idle one would
    broker = build_broker(redis_url, f"kodmobi-test-{uuid.uuid4().hex[:8]}")
    try:
        for i in range(3):
            enqueue(broker, "ping", i)
        queue_key = f"{broker.namespace}:{QUEUE}"
        before = broker.client.lrange(queue_key, 0, -1)
        consumer = broker.consume(QUEUE, prefetch=1, timeout=100)
        # When it waits on the queue list
        consumer._wait(0.1)
        # Then the queue holds the same messages in the same order
        assert len(before) == 3
        assert broker.client.lrange(queue_key, 0, -1) == before
    finally:
        broker.close()


def test_messages_prefetched_before_a_reconnect_go_to_the_next_consumer(
    redis_url: str,
) -> None:
    # Given a consumer that fetched three messages and handed out one, when its
    # connection broke (Dramatiq then closes it and starts another)
    broker = build_broker(redis_url, f"kodmobi-test-{uuid.uuid4().hex[:8]}")
    try:
        sent = [enqueue(broker, "ping", i) for i in range(3)]
        first = broker.consume(QUEUE, prefetch=3, timeout=100)
        taken = [next(first)]
        first.close()
        # When the next consumer of the queue runs (the queue list itself is empty now:
        # the three sit in this worker's ack set)
        assert broker.client.llen(f"{broker.namespace}:{QUEUE}") == 0
        second = broker.consume(QUEUE, prefetch=3, timeout=100)
        taken += [next(second), next(second)]
        # Then it hands out the two the first had prefetched, and they can be acked
        assert [m.message_id for m in taken] == sent
        for message in taken[1:]:
            second.ack(message)
        first.ack(taken[0])
        acks = broker.client.keys(f"{broker.namespace}:__acks__.*")
        assert all(broker.client.scard(k) == 0 for k in acks)
    finally:
        broker.close()
