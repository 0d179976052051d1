"""`dramatiq worker.actors`: the worker process's entry point.

Its one call into the composition root builds this process's root (settings, logging,
the broker made Dramatiq's global one); the actors are then declared on that broker.
Nothing else imports this module."""

from __future__ import annotations

from worker import wiring
from worker.jobs import declare_actors

root = wiring.start("worker")
_actors = declare_actors(root)
send_code = _actors.send_code
deliver_attempt = _actors.deliver_attempt
