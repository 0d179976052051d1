"""The Dramatiq actors, declared on a root's broker: thin over the use cases.

`worker.actors` declares them for the `worker` process; tests declare them on roots of
their own. An actor takes the message, calls a use case, and never loses or loops on
bad input (intake records it as `rejected`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from worker.broker import DELIVER_ATTEMPT, QUEUE, SEND_CODE
from worker.db import retry_on_disconnect
from worker.usecases import deliver, intake
from worker.wiring import Root

#: Unexpected errors (database or Redis away) are retried with backoff for about an
#: hour; the sweeper covers anything that still slips through for deliveries.
RETRY_OPTIONS: dict[str, Any] = {
    "max_retries": 120,
    "min_backoff": 250,
    "max_backoff": 30_000,
    "time_limit": 120_000,
}


@dataclass(frozen=True)
class Actors:
    send_code: dramatiq.Actor[..., None]
    deliver_attempt: dramatiq.Actor[..., None]


def declare_actors(root: Root) -> Actors:
    ctx = root.ctx

    def send_code(*args: Any, **kwargs: Any) -> None:
        """Intake from a Dramatiq producer, then deliver the first attempt in this same run.

        Takes anything, so that a malformed message is recorded as `rejected` with a
        reason instead of failing in Dramatiq's own call (and being retried)."""
        current = CurrentMessage.get_current_message()
        message_id = current.message_id if current is not None else None
        # Wait out a database restart here rather than in a delayed Dramatiq retry: those
        # sit in worker memory, and a Redis reconnect drops them (dramatiq#527).
        attempt_id = retry_on_disconnect(
            lambda: intake.accept_dramatiq(ctx, args, kwargs, message_id)
        )
        if attempt_id is not None:
            # As in deliver_attempt below: a restart between intake and the send is waited
            # out here, not raised into a Dramatiq retry (and a traceback).
            retry_on_disconnect(lambda: deliver.deliver(ctx, attempt_id))

    def deliver_attempt(attempt_id: str) -> None:
        """Deliver one attempt (a fallback, a retry, or a re-dispatch by the sweeper).

        A database restart is waited out here too, not left to a Dramatiq retry: that is
        a delayed message, held in a consumer's memory, which a Redis reconnect drops
        while it stays in the live worker's ack set (dramatiq#527; the chaos report's
        "deliver_attempt unacked in a live worker"). Running it again is safe: only an
        attempt still `queued` is sent, and what kod.mobi answered is recorded in place."""
        retry_on_disconnect(lambda: deliver.deliver(ctx, attempt_id))

    def declare(fn: Any, name: str) -> dramatiq.Actor[..., None]:
        decorate = dramatiq.actor(
            actor_name=name, queue_name=QUEUE, broker=root.broker, **RETRY_OPTIONS
        )
        actor: dramatiq.Actor[..., None] = decorate(fn)
        return actor

    return Actors(
        send_code=declare(send_code, SEND_CODE),
        deliver_attempt=declare(deliver_attempt, DELIVER_ATTEMPT),
    )
