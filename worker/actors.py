"""`dramatiq worker.actors`: the worker process's entry point.

Its one call into the composition root builds this process's root (settings, logging,
the broker made Dramatiq's global one); the actors are then declared on that broker.
Nothing else imports this module. Metrics are set up first: prometheus_client must
see the multiprocess directory before anything imports it (worker.metrics_setup)."""

from __future__ import annotations

from worker.metrics_setup import prepare_worker

prepare_worker()

from worker import wiring  # noqa: E402 - after the metrics directory is set
from worker.jobs import declare_actors  # noqa: E402

root = wiring.start("worker")
_actors = declare_actors(root)
send_code = _actors.send_code
deliver_attempt = _actors.deliver_attempt
