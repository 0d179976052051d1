"""A no-op actor on the project's broker: the ceiling of anything built on it (`make bench`).

Run as the Procfile runs the real worker, from the repository root:
    dramatiq_worker_timeout=10 python -m dramatiq noop_actor --path benchmarks \
        --processes 2 --threads 16 --skip-logging
with REDIS_URL (and BROKER_NAMESPACE) set. It shares the real actors' queue name,
so it must run against a namespace of its own.
"""

from __future__ import annotations

import os

import dramatiq

from worker.broker import QUEUE, build_broker

broker = build_broker(os.environ["REDIS_URL"], os.environ.get("BROKER_NAMESPACE", "dramatiq"))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="noop", queue_name=QUEUE)
def noop() -> None:
    """Nothing: what is left is Dramatiq's own cost per message (fetch, decode, ack)."""
