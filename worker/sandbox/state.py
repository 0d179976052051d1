"""The sandbox's memory: config, random draws, accepted sends, sessions, timeouts and counters."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from ulid import ULID

from worker.sandbox.callbacks import CallbackDispatcher
from worker.sandbox.config import SandboxConfig
from worker.sandbox.rules import (
    CHANNEL_TIMEOUT_S,
    MAGIC_OUTCOMES,
    RANDOM_5XX,
    RANDOM_429,
    SESSION_TTL_S,
    Outcome,
    encrypt_code,
    is_email,
    iso,
    iso_now,
    magic_code,
    random_outcome,
)

#: the plain outcome of a recipient that is not magic, when no rate is set
DELIVERED = Outcome("delivered")
#: how often expired sessions and timeouts are forgotten
PURGE_EVERY_S = 5.0
#: recipients whose last used channel is remembered (oldest forgotten first)
MAX_REMEMBERED_RECIPIENTS = 100_000


class Session:
    """A kod.mobi session: one recipient, one code, a 60-second timeout per channel."""

    __slots__ = ("session_id", "to", "code", "expires_mono", "expired_at", "sent_mono")

    def __init__(self, to: str, code: str, now: float) -> None:
        self.session_id = str(ULID())
        self.to = to
        self.code = code
        self.expires_mono = now + SESSION_TTL_S
        self.expired_at = iso(datetime.now(UTC) + timedelta(seconds=SESSION_TTL_S))
        self.sent_mono: dict[str, float] = {}

    def timeout(self, channel: str, now: float) -> int:
        """Whole seconds left of `channel`'s sending timeout (0..60)."""
        sent = self.sent_mono.get(channel)
        if sent is None:
            return 0
        return max(0, math.ceil(sent + CHANNEL_TIMEOUT_S - now))

    @property
    def channels(self) -> tuple[str, ...]:
        # Seed order (session/channels example); an email session only has email.
        return ("email",) if is_email(self.to) else ("whatsapp", "telegram", "sms")


class Stats:
    """Counters for GET /sandbox/stats (kod.mobi endpoints only, not /sandbox/*)."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.responses: dict[int, int] = {}
        self.sends_accepted = 0
        self.sends_refused = 0
        self.callbacks_sent = 0
        self.callbacks_failed = 0
        self.callbacks_retried = 0
        self.callbacks_dropped = 0
        #: every try of every callback by the receiver's answer: its HTTP status or the error
        self.callback_answers: dict[str, int] = {}

    def as_dict(self, pending_callbacks: int) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "responses": {str(k): v for k, v in sorted(self.responses.items())},
            "sends": {"accepted": self.sends_accepted, "refused": self.sends_refused},
            "callbacks": {
                "sent": self.callbacks_sent,
                "failed": self.callbacks_failed,
                "retried": self.callbacks_retried,
                "dropped": self.callbacks_dropped,
                "pending": pending_callbacks,
                "answers": dict(sorted(self.callback_answers.items())),
            },
        }


class SandboxState:
    """Everything the sandbox remembers. One per app; touched only from the event loop."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.api_key_bytes = config.api_key.encode()
        self.rng = random.Random(config.seed)
        self.next_message_id = 1
        self.messages: deque[dict[str, Any]] = deque()
        self.by_id: dict[int, dict[str, Any]] = {}
        self.sessions: dict[str, Session] = {}
        #: sessions in creation order, which is expiry order (every session lives 3 minutes)
        self.session_queue: deque[Session] = deque()
        self.session_by_to: dict[str, Session] = {}
        self.last_channel: dict[str, str] = {}
        #: (to, channel) -> monotonic end of manual/send's timeout, when that is enforced
        self.manual_timeouts: dict[tuple[str, str], float] = {}
        self.stats = Stats()
        self.callbacks = CallbackDispatcher(self)
        self._purger: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        await self.callbacks.start()
        self._purger = asyncio.get_running_loop().create_task(self._purge_forever())

    async def stop(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        await self.callbacks.stop()

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(PURGE_EVERY_S)
            self.purge(time.monotonic())

    def purge(self, now: float) -> None:
        """Forget expired sessions and finished timeouts: memory stays flat under load."""
        queue = self.session_queue
        while queue and queue[0].expires_mono <= now:
            session = queue.popleft()
            self.sessions.pop(session.session_id, None)
            if self.session_by_to.get(session.to) is session:
                del self.session_by_to[session.to]
        for key in [k for k, until in self.manual_timeouts.items() if until <= now]:
            del self.manual_timeouts[key]

    # -- configuration --------------------------------------------------------------

    def set_config(self, config: SandboxConfig, *, reseed: bool) -> None:
        self.config = config
        self.api_key_bytes = config.api_key.encode()
        if reseed:
            self.rng.seed(config.seed)

    # -- sends ------------------------------------------------------------------------

    def draw_code(self) -> str:
        return f"{self.rng.randrange(10_000):04d}"

    def encrypt(self, code: str) -> str:
        return encrypt_code(
            code, self.config.api_key, self.rng.randbytes(16), self.rng.randrange(10**7, 10**8)
        )

    def choose_outcome(self, to: str, channel: str) -> Outcome:
        """Magic recipients get exactly what they ask for; the others get the dice."""
        magic = magic_code(to, channel)
        if magic is not None:
            return MAGIC_OUTCOMES.get(magic) or MAGIC_OUTCOMES["00"]
        c = self.config
        if not (
            c.error_5xx_rate
            or c.throttle_429_rate
            or c.slow_rate
            or c.failure_callback_rate
            or c.lost_callback_rate
            or c.duplicate_callback_rate
            or c.out_of_order_rate
            or c.progress_callbacks
        ):
            return DELIVERED  # the benchmark's hot path: no draws at all
        draw = self.rng.random
        if c.error_5xx_rate and draw() < c.error_5xx_rate:
            return RANDOM_5XX
        if c.throttle_429_rate and draw() < c.throttle_429_rate:
            return RANDOM_429
        return random_outcome(
            slow=bool(c.slow_rate) and draw() < c.slow_rate,
            lost=bool(c.lost_callback_rate) and draw() < c.lost_callback_rate,
            failed=bool(c.failure_callback_rate) and draw() < c.failure_callback_rate,
            duplicated=bool(c.duplicate_callback_rate) and draw() < c.duplicate_callback_rate,
            out_of_order=bool(c.out_of_order_rate) and draw() < c.out_of_order_rate,
            progress=c.progress_callbacks,
        )

    def accept_send(
        self,
        to: str,
        channel: str,
        code: str,
        *,
        provider_id: int | None = None,
        callback_url: str | None = None,
        source: str,
        session_id: str | None = None,
    ) -> tuple[dict[str, Any], float]:
        """Record a send and plan its callbacks; (record, seconds to hold the answer back).

        Raises the outcome's ApiError when the send is refused (nothing is recorded).
        """
        outcome = self.choose_outcome(to, channel)
        if outcome.error is not None:
            self.stats.sends_refused += 1
            raise outcome.error.clone()
        self.stats.sends_accepted += 1
        message_id = self.next_message_id
        self.next_message_id += 1
        record: dict[str, Any] = {
            "message_id": message_id,
            "to": to,
            "channel": channel,
            "code": code,
            "provider_id": provider_id,
            "callback_url": callback_url,
            "outcome": outcome.name,
            "magic": outcome.magic,
            "source": source,
            "session_id": session_id,
            "received_at": iso_now(),
            "callbacks": [],
        }
        self._remember(record)
        config = self.config
        slow_s = 0.0
        if outcome.slow:
            slow_s = (config.magic_slow_ms if outcome.magic else config.slow_ms) / 1000
        if callback_url and outcome.callbacks:
            # Counted from acceptance, after the slow answer: the send was accepted even if
            # the caller gave up waiting, and its callback still comes.
            self.callbacks.schedule(
                record, outcome.callbacks, slow_s + config.callback_delay_ms / 1000
            )
        return record, slow_s

    def _remember(self, record: dict[str, Any]) -> None:
        self.messages.append(record)
        self.by_id[record["message_id"]] = record
        limit = self.config.record_limit
        while limit and len(self.messages) > limit:
            old = self.messages.popleft()
            self.by_id.pop(old["message_id"], None)

    def list_messages(
        self, to: str | None = None, since_id: int | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        found = [
            m
            for m in self.messages
            if (to is None or m["to"] == to) and (since_id is None or m["message_id"] > since_id)
        ]
        return found[:limit] if limit is not None else found

    def clear_messages(self) -> int:
        count = len(self.messages)
        self.messages.clear()
        self.by_id.clear()
        return count

    def remember_channel(self, to: str, channel: str) -> None:
        last = self.last_channel
        last.pop(to, None)  # re-insert: the dict's order is then least recently used first
        last[to] = channel
        if len(last) > MAX_REMEMBERED_RECIPIENTS:
            del last[next(iter(last))]

    def default_channel(self, to: str) -> str:
        """The last channel used for `to`, else whatsapp for phones and email for emails."""
        return self.last_channel.get(to) or ("email" if is_email(to) else "whatsapp")

    # -- sessions ---------------------------------------------------------------------

    def find_session(self, session_id: str, now: float) -> Session | None:
        session = self.sessions.get(session_id)
        if session is None or session.expires_mono <= now:
            return None
        return session

    def session_for(self, to: str, now: float) -> Session | None:
        session = self.session_by_to.get(to)
        if session is None or session.expires_mono <= now:
            return None
        return session

    def create_session(self, to: str, code: str, now: float) -> Session:
        session = Session(to, code, now)
        self.sessions[session.session_id] = session
        self.session_queue.append(session)
        self.session_by_to[to] = session
        return session
