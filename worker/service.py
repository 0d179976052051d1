"""The use cases over a database session: intake, deliver, apply_callback, sweep, check."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, selectinload
from ulid import ULID

from worker import delivery as rules
from worker.db import retry_on_disconnect, session_scope
from worker.kodmobi.errors import AccountError, Action, KodMobiError, TransientError, decide
from worker.kodmobi.models import ManualSendResponse
from worker.limits import SlotsBusy
from worker.logging import get_logger, mask_recipient
from worker.models import Attempt, CallbackEvent, Message
from worker.runtime import Runtime
from worker.schemas import (
    AcceptedView,
    AttemptView,
    CheckResult,
    MessageView,
    SendRequest,
    db_text,
)
from worker.security import callback_token, codes_equal, draw_code

log = get_logger("worker.service")

#: Dispatch an attempt to a worker: `dispatch(attempt_id, delay_s)`.
Dispatch = Callable[[str, float], None]

MAX_CHECKS = 5
#: An attempt left `queued` this long after its dispatch is re-dispatched by the sweeper.
REDISPATCH_AFTER_S = 20.0
DRAWN_CODE_LENGTH = 6
#: When every kod.mobi call slot is taken, try the attempt again this much later.
SLOT_RETRY_S = 1.0


# Built once: constructing and cache-keying a statement on every call cost more CPU
# than running it.
_LOCK_ATTEMPT = (
    select(Message, Attempt)
    .join(Attempt, Attempt.message_id == Message.id)
    .where(Attempt.id == bindparam("attempt_id"))
    .with_for_update()
)
_BY_KEY = select(Message).where(Message.idempotency_key == bindparam("key"))


def utcnow() -> datetime:
    return datetime.now(UTC)


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request."""

    def __init__(self, message_id: str) -> None:
        super().__init__(f"idempotency key already used for message {message_id} with another body")
        self.message_id = message_id


class RateLimited(Exception):
    """A per-recipient limit refuses this send for now."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class IntakeResult:
    message: Message
    created: bool
    #: An attempt still waiting to be sent (the first one, for a new message).
    attempt_id: str | None


@dataclass
class CallbackData:
    method: str
    content_type: str | None
    raw_body: str
    headers: dict[str, str]
    status_word: str
    kodmobi_message_id: int | None


@dataclass
class SweepReport:
    expired: int = 0
    timed_out: int = 0
    redispatched: int = 0
    dispatch: list[str] = field(default_factory=list)


def _bind(message: Message, attempt: Attempt | None = None) -> Any:
    bound = log.bind(message_id=message.id, recipient=mask_recipient(message.recipient))
    if attempt is not None:
        bound = bound.bind(attempt_id=attempt.id, channel=attempt.channel, seq=attempt.seq)
    return bound


class Service:
    """Every state change of a message or its attempts happens in one transaction that
    holds the message's (and attempt's) row lock: `SELECT … FOR UPDATE`."""

    def __init__(self, runtime: Runtime, dispatch: Dispatch) -> None:
        self.rt = runtime
        self.settings = runtime.settings
        self.dispatch = dispatch

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Session]:
        with session_scope(self.rt.sessions) as session:
            yield session

    # -- intake ------------------------------------------------------------------------

    def _fingerprint(self, request: SendRequest) -> str:
        canonical = json.dumps(
            request.model_dump(mode="json", exclude_none=True), sort_keys=True, default=str
        ).encode()
        return self.rt.codebox.fingerprint(canonical)

    def intake(
        self, request: SendRequest, *, idempotency_key: str | None, source: str
    ) -> IntakeResult:
        """Record the message and its first attempt in one transaction (DESIGN §5.1).

        The same key with the same request returns the message recorded before; with
        another request it raises IdempotencyConflict. Nothing is sent here."""
        now = utcnow()
        message_id = str(ULID())
        key = idempotency_key or message_id
        fingerprint = self._fingerprint(request)
        chain = request.chain(self.settings.default_channels)
        ttl = request.ttl_s or self.settings.code_ttl_s
        code = request.code or draw_code(DRAWN_CODE_LENGTH)
        with self._tx() as s:
            existing = self._existing(s, key, fingerprint)
            if existing is not None:
                return IntakeResult(existing, False, self._queued_attempt(s, existing.id))
            self._check_limits(s, request.to, chain[0], now)
            message = s.scalars(
                insert(Message)
                .values(
                    id=message_id,
                    idempotency_key=key,
                    fingerprint=fingerprint,
                    source=source,
                    recipient=request.to,
                    recipient_kind=request.recipient_kind(),
                    channels=chain,
                    provider_id=request.provider_id,
                    code_ciphertext=self.rt.codebox.seal(code, message_id),
                    status=rules.QUEUED,
                    meta=request.metadata or {},
                    created_at=now,
                    updated_at=now,
                    expires_at=now + timedelta(seconds=ttl),
                )
                .on_conflict_do_nothing(index_elements=["idempotency_key"])
                .returning(Message)
            ).one_or_none()
            if message is None:  # a concurrent intake with the same key won the race
                existing = self._existing(s, key, fingerprint)
                assert existing is not None
                return IntakeResult(existing, False, self._queued_attempt(s, existing.id))
            # provider_id names a provider of one channel: it goes with the first only.
            attempt = _new_attempt(message_id, 1, chain[0], request.provider_id, now)
            s.add(attempt)
        _bind(message).info("message.accepted", source=source, channels=chain)
        return IntakeResult(message, created=True, attempt_id=attempt.id)

    def _queued_attempt(self, s: Session, message_id: str) -> str | None:
        """A redelivered producer message resumes a first attempt its crash left queued."""
        return s.scalars(
            select(Attempt.id).where(
                Attempt.message_id == message_id, Attempt.status == rules.QUEUED
            )
        ).first()

    def _existing(self, s: Session, key: str, fingerprint: str) -> Message | None:
        message = s.scalars(_BY_KEY, {"key": key}).one_or_none()
        if message is not None and message.fingerprint != fingerprint:
            raise IdempotencyConflict(message.id)
        return message

    def _check_limits(self, s: Session, recipient: str, first_channel: str, now: datetime) -> None:
        """Per-recipient abuse limits: N codes per window, one per channel per cooldown."""
        limit, window = self.settings.recipient_limit, self.settings.recipient_window_s
        cooldown = self.settings.channel_cooldown_s
        if limit == 0 and cooldown == 0:
            return
        # Serialise intakes for one recipient, so two at once cannot both slip under a limit.
        s.execute(select(func.pg_advisory_xact_lock(func.hashtext(recipient))))
        if limit:
            recent = s.scalars(
                select(Message.created_at)
                .where(
                    Message.recipient == recipient,
                    Message.created_at >= now - timedelta(seconds=window),
                    Message.status != rules.REJECTED,
                )
                .order_by(Message.created_at.desc())
                .limit(limit)
            ).all()
            if len(recent) >= limit:
                wait = (recent[-1] + timedelta(seconds=window) - now).total_seconds()
                raise RateLimited(
                    f"recipient limit: at most {limit} codes per {window:g}s", max(1.0, wait)
                )
        if cooldown:
            # kod.mobi blocks a channel for a recipient for 60 s after each send.
            last_sent = s.scalar(
                select(func.max(Attempt.created_at))
                .join(Message, Message.id == Attempt.message_id)
                .where(
                    Message.recipient == recipient,
                    Attempt.channel == first_channel,
                    Attempt.created_at >= now - timedelta(seconds=cooldown),
                )
            )
            if last_sent is not None:
                wait = (last_sent + timedelta(seconds=cooldown) - now).total_seconds()
                raise RateLimited(
                    f"channel cooldown: one {first_channel} code per {cooldown:g}s",
                    max(1.0, wait),
                )

    def reject(
        self, *, idempotency_key: str, source: str, reason: str, raw_to: Any = None
    ) -> Message:
        """Record input we will never send, with the reason, so the producer can see why."""
        now = utcnow()
        message_id = str(ULID())
        recipient = db_text(raw_to) if isinstance(raw_to, str) else ""
        reason = db_text(reason)
        with self._tx() as s:
            s.execute(
                insert(Message)
                .values(
                    id=message_id,
                    idempotency_key=idempotency_key,
                    fingerprint="",
                    source=source,
                    recipient=recipient[:320],
                    recipient_kind="unknown",
                    channels=[],
                    status=rules.REJECTED,
                    failure_reason=reason[:2000],
                    meta={},
                    created_at=now,
                    updated_at=now,
                    expires_at=now,
                )
                .on_conflict_do_nothing(index_elements=["idempotency_key"])
            )
            message = s.scalars(
                select(Message).where(Message.idempotency_key == idempotency_key)
            ).one()
        _bind(message).warning("message.rejected", source=source, reason=reason)
        return message

    # -- delivery ----------------------------------------------------------------------

    def callback_url(self, attempt_id: str) -> str:
        token = callback_token(self.settings.callback_secret.get_secret_value(), attempt_id)
        return f"{self.settings.public_base_url}/callbacks/kodmobi/{attempt_id}/{token}"

    def _lock(self, s: Session, attempt_id: str) -> Any:
        """The attempt and its message, locked (`SELECT … FOR UPDATE`)."""
        return s.execute(_LOCK_ATTEMPT, {"attempt_id": attempt_id}).one_or_none()

    def deliver(self, attempt_id: str) -> None:
        """Deliver an attempt, and the next ones inline while channels are refused."""
        next_id: str | None = attempt_id
        while next_id is not None:
            current = next_id
            try:
                with self._kodmobi_slot():
                    next_id = self._deliver_one(current)
            except SlotsBusy as exc:
                # Taken before the attempt is marked `sending`: nothing left, nothing to undo.
                log.warning("attempt.no_call_slot", attempt_id=current, error=str(exc))
                self._retry_later(current, SLOT_RETRY_S)
                return

    def _retry_later(self, attempt_id: str, delay_s: float) -> None:
        """Leave a queued attempt for the clock to dispatch after `delay_s`."""
        with self._tx() as s:
            s.execute(
                update(Attempt)
                .where(Attempt.id == attempt_id, Attempt.status == rules.QUEUED)
                .values(next_try_at=utcnow() + timedelta(seconds=delay_s), dispatched_at=None)
            )

    def _deliver_one(self, attempt_id: str) -> str | None:
        """Send one attempt while holding a kod.mobi call slot; return the next to send."""
        now = utcnow()
        with self._tx() as s:
            row = self._lock(s, attempt_id)
            if row is None:
                log.warning("attempt.unknown", attempt_id=attempt_id)
                return None
            message, attempt = row
            if message.status in rules.MESSAGE_FINAL:
                self._close_open_attempts(s, message, now)
                return None
            if now >= message.expires_at:
                self._expire(s, message, now)
                return None
            if attempt.status != rules.QUEUED:
                _bind(message, attempt).debug("attempt.skipped", status=attempt.status)
                return None
            if attempt.next_try_at > now + timedelta(milliseconds=50):
                return None  # early: the clock dispatches it when it is due
            attempt.status = rules.SENDING
            attempt.tries += 1
            attempt.sent_at = now
            attempt.updated_at = now
            # Covers a crash mid-call: past this the sweeper times the attempt out (§5.5).
            attempt.deadline = now + timedelta(
                seconds=self.settings.kodmobi_read_timeout_s + self.settings.delivery_timeout_s
            )
            if rules.message_can_move(message.status, rules.SENDING):
                message.status = rules.SENDING
            assert message.code_ciphertext is not None
            code = self.rt.codebox.open(message.code_ciphertext, message.id)
            to, channel, provider_id = message.recipient, attempt.channel, attempt.provider_id
            bound = _bind(message, attempt)
        bound.info("attempt.sending", tries=attempt.tries)
        try:
            answer = self.rt.kodmobi.manual_send(
                to,
                channel,
                code=code,
                provider_id=provider_id,
                callback_url=self.callback_url(attempt_id),
            )
        except KodMobiError as exc:
            failure = exc
            return retry_on_disconnect(lambda: self._record_failure(attempt_id, failure))
        retry_on_disconnect(lambda: self._record_accepted(attempt_id, answer))
        return None

    @contextlib.contextmanager
    def _kodmobi_slot(self) -> Iterator[None]:
        slots = self.rt.kodmobi_slots
        if slots is None:
            yield
            return
        with slots():
            yield

    def _record_accepted(self, attempt_id: str, answer: ManualSendResponse) -> None:
        now = utcnow()
        with self._tx() as s:
            row = self._lock(s, attempt_id)
            if row is None:
                return
            message, attempt = row
            attempt.kodmobi_message_id = answer.message_id
            attempt.kodmobi_code = answer.code
            attempt.http_status = 200
            attempt.updated_at = now
            if rules.attempt_can_move(attempt.status, rules.ACCEPTED):
                attempt.status = rules.ACCEPTED
                attempt.accepted_at = now
                attempt.deadline = now + timedelta(seconds=self.settings.delivery_timeout_s)
            if rules.message_can_move(message.status, rules.SENT):
                message.status = rules.SENT
            bound = _bind(message, attempt)
        bound.info("attempt.accepted", kodmobi_message_id=answer.message_id)

    def _record_failure(self, attempt_id: str, exc: KodMobiError) -> str | None:
        """Apply DESIGN §7's table to a failed call; return an attempt to deliver now."""
        now = utcnow()
        action = decide(exc)
        retry_at: datetime | None = None
        with self._tx() as s:
            row = self._lock(s, attempt_id)
            if row is None:
                return None
            message, attempt = row
            bound = _bind(message, attempt)
            if attempt.status != rules.SENDING:
                return None  # a callback or the sweeper got here first
            attempt.error_code = exc.sys_message
            attempt.http_status = exc.status_code
            attempt.updated_at = now
            if action is Action.RETRY:
                plan = rules.plan_retry(
                    now=now,
                    tries=attempt.tries,
                    expires_at=message.expires_at,
                    retry_after_s=exc.retry_after,
                    max_backoff_s=self.settings.retry_max_backoff_s,
                    limited_tries=isinstance(exc, TransientError),
                )
                if plan.at is not None:
                    # Not a delayed Dramatiq message: those live in worker memory, can be
                    # enqueued twice (dramatiq#431) and are dropped when Redis reconnects
                    # (dramatiq#527). The clock dispatches it once `next_try_at` is due.
                    attempt.status = rules.QUEUED
                    attempt.next_try_at = plan.at
                    attempt.dispatched_at = None
                    attempt.reason = f"retrying after {exc.reason}"
                    retry_at = plan.at
                elif isinstance(exc, TransientError):
                    return self._fallback(
                        s, message, attempt, rules.ERROR, f"retries exhausted: {exc.reason}", now
                    )
                else:
                    # Throttled or an account problem: another channel would not help
                    # (DESIGN §7). Nothing fits before the code expires, so nothing more is
                    # sent; the attempt waits, and the sweeper expires the message at its TTL.
                    attempt.status = rules.QUEUED
                    attempt.next_try_at = message.expires_at
                    attempt.dispatched_at = now
                    attempt.reason = f"{exc.reason}: no retry fits before the code expires"
                    bound.warning("attempt.parked_until_expiry", error=exc.reason)
                    return None
            elif action is Action.FALLBACK:
                return self._fallback(
                    s, message, attempt, rules.ERROR, f"refused: {exc.reason}", now
                )
            else:
                self._finish_attempt(attempt, rules.ERROR, f"refused: {exc.reason}", now)
                self._finish_message(
                    s,
                    message,
                    rules.FAILED,
                    f"recipient blocked: {exc.reason}",
                    now,
                    others_open=False,
                )
                return None
        delay = max(0.0, (retry_at - now).total_seconds())
        # An account problem needs a person: log it as an error with an alert flag.
        alert = isinstance(exc, AccountError)
        (bound.error if alert else bound.warning)(
            "attempt.retry_scheduled",
            error=exc.reason,
            http_status=exc.status_code,
            delay_s=round(delay, 3),
            alert=alert,
        )
        return None

    def hand_off(self, attempt_id: str, delay_s: float = 0.0) -> None:
        try:
            self.dispatch(attempt_id, delay_s)
        except Exception as exc:  # the sweeper re-dispatches what the broker lost
            log.warning("attempt.dispatch_failed", attempt_id=attempt_id, error=str(exc))

    def _finish_attempt(self, attempt: Attempt, status: str, reason: str, now: datetime) -> None:
        attempt.status = status
        attempt.reason = reason
        attempt.finished_at = now
        attempt.updated_at = now

    def _finish_message(
        self,
        s: Session,
        message: Message,
        status: str,
        reason: str | None,
        now: datetime,
        *,
        others_open: bool = True,
    ) -> None:
        """Move the message to a final status. `others_open=False` when the caller has just
        finished the message's only open attempt (there is one at a time), which saves
        the statement that closes the rest."""
        if not rules.message_can_move(message.status, status):
            return
        message.status = status
        message.updated_at = now
        if status == rules.DELIVERED:
            message.delivered_at = now
        else:
            message.failure_reason = reason
        if others_open:
            self._close_open_attempts(s, message, now)
        _bind(message).log(
            20 if status == rules.DELIVERED else 30, f"message.{status}", reason=reason
        )

    def _close_open_attempts(self, s: Session, message: Message, now: datetime) -> None:
        """A final message has no open attempts: whatever is still open is closed."""
        s.execute(
            update(Attempt)
            .where(Attempt.message_id == message.id, Attempt.status.in_(rules.ATTEMPT_OPEN))
            .values(
                status=rules.ERROR,
                reason=func.concat_ws("; ", Attempt.reason, f"closed: message {message.status}"),
                finished_at=now,
                updated_at=now,
            )
        )

    def _expire(
        self, s: Session, message: Message, now: datetime, *, others_open: bool = True
    ) -> None:
        self._finish_message(
            s, message, rules.EXPIRED, "code TTL passed", now, others_open=others_open
        )

    def _fallback(
        self,
        s: Session,
        message: Message,
        attempt: Attempt,
        status: str,
        reason: str,
        now: datetime,
    ) -> str | None:
        """End `attempt` and queue the next channel; the message fails when none is left."""
        self._finish_attempt(attempt, status, reason, now)
        channel = rules.next_channel(message.channels, attempt.seq)
        if now >= message.expires_at:
            self._expire(s, message, now, others_open=False)
            return None
        if channel is None:
            self._finish_message(
                s,
                message,
                rules.FAILED,
                f"all channels failed; last: {reason}",
                now,
                others_open=False,
            )
            return None
        nxt = _new_attempt(message.id, attempt.seq + 1, channel, None, now)
        s.add(nxt)
        _bind(message, attempt).info(
            "fallback.triggered", from_channel=attempt.channel, to_channel=channel, reason=reason
        )
        return nxt.id

    # -- callbacks ---------------------------------------------------------------------

    def apply_callback(self, attempt_id: str, data: CallbackData) -> str | None:
        """Store the event and apply it if it moves things forward. Returns the outcome,
        or None when the attempt does not exist."""
        now = utcnow()
        parsed = rules.parse_callback_status(data.status_word) if data.status_word else "unknown"
        follow_up: str | None = None
        with self._tx() as s:
            row = self._lock(s, attempt_id)
            if row is None:
                return None
            message, attempt = row
            bound = _bind(message, attempt)
            # Decide first, then store the event with its outcome in one statement. A
            # repeat changes nothing: statuses only move forward, so applying the same
            # status twice is a no-op; the unique key just keeps one row and counts.
            outcome, applied, follow_up = self._apply(s, message, attempt, parsed, data, now)
            stored = s.execute(
                insert(CallbackEvent)
                .values(
                    attempt_id=attempt_id,
                    received_at=now,
                    method=data.method,
                    content_type=data.content_type,
                    raw_body=data.raw_body,
                    headers=data.headers,
                    status_word=data.status_word[:64],
                    parsed_status=parsed,
                    kodmobi_message_id=data.kodmobi_message_id,
                    applied=applied,
                    outcome=outcome,
                )
                .on_conflict_do_update(
                    constraint="uq_callback_events_attempt_status",
                    set_={"duplicates": CallbackEvent.duplicates + 1},
                )
                .returning(CallbackEvent.duplicates)
            ).scalar_one()
            if stored > 0:
                outcome, applied = "duplicate", False
        event = "callback.applied" if applied else "callback.ignored"
        bound.info(event, status=data.status_word[:64], parsed=parsed, outcome=outcome)
        if follow_up is not None:
            self.hand_off(follow_up)
        return outcome

    def _apply(
        self,
        s: Session,
        message: Message,
        attempt: Attempt,
        parsed: str,
        data: CallbackData,
        now: datetime,
    ) -> tuple[str, bool, str | None]:
        if parsed == "unknown":
            return "unknown_status", False, None
        if (
            data.kodmobi_message_id is not None
            and attempt.kodmobi_message_id is not None
            and data.kodmobi_message_id != attempt.kodmobi_message_id
        ):
            return "message_id_mismatch", False, None
        if data.kodmobi_message_id is not None and attempt.kodmobi_message_id is None:
            attempt.kodmobi_message_id = data.kodmobi_message_id
        if parsed == "progress":
            # The token proves kod.mobi holds one of our sends of this attempt, even one
            # whose answer we never saw: a queued retry is then not needed.
            if rules.attempt_can_move(attempt.status, rules.ACCEPTED):
                attempt.status = rules.ACCEPTED
                attempt.accepted_at = now
                attempt.deadline = now + timedelta(seconds=self.settings.delivery_timeout_s)
                if rules.message_can_move(message.status, rules.SENT):
                    message.status = rules.SENT
                return "progress", True, None
            return "progress_noted", False, None
        if parsed == rules.DELIVERED:
            if rules.attempt_can_move(attempt.status, rules.DELIVERED):
                self._finish_attempt(attempt, rules.DELIVERED, "delivery callback", now)
                self._finish_message(s, message, rules.DELIVERED, None, now, others_open=False)
                return "delivered", True, None
            if (
                attempt.status in (rules.TIMED_OUT, rules.ERROR)
                and message.status not in rules.MESSAGE_FINAL
            ):
                # The code reached the user after we gave up on this channel: say so.
                self._finish_message(s, message, rules.DELIVERED, None, now)
                return "late_delivery", True, None
            return "stale", False, None
        # parsed == failed
        if rules.attempt_can_move(attempt.status, rules.FAILED):
            reason = f"failure callback: {data.status_word[:64]}"
            if message.status in rules.MESSAGE_FINAL:
                self._finish_attempt(attempt, rules.FAILED, reason, now)
                return "failed", True, None
            follow_up = self._fallback(s, message, attempt, rules.FAILED, reason, now)
            return "failed", True, follow_up
        return "stale", False, None

    # -- the sweeper -------------------------------------------------------------------

    def sweep(self, *, batch: int = 500) -> SweepReport:
        """Expire old messages, time out silent attempts, re-dispatch lost ones (§5.4).
        Safe in several processes at once: rows are claimed with SKIP LOCKED."""
        report = SweepReport()
        now = utcnow()
        with self._tx() as s:
            for message in s.scalars(
                select(Message)
                .where(
                    Message.status.in_((rules.QUEUED, rules.SENDING, rules.SENT)),
                    Message.expires_at <= now,
                )
                .limit(batch)
                .with_for_update(skip_locked=True)
            ):
                self._expire(s, message, now)
                report.expired += 1
        with self._tx() as s:
            rows = s.execute(
                select(Message, Attempt)
                .join(Attempt, Attempt.message_id == Message.id)
                .where(
                    Attempt.status.in_((rules.SENDING, rules.ACCEPTED)),
                    Attempt.deadline <= now,
                )
                .limit(batch)
                .with_for_update(skip_locked=True)
            ).all()
            for message, attempt in rows:
                if message.status in rules.MESSAGE_FINAL:
                    continue
                silent = (
                    "no answer from kod.mobi"
                    if attempt.status == rules.SENDING
                    else "no final callback"
                )
                follow_up = self._fallback(
                    s,
                    message,
                    attempt,
                    rules.TIMED_OUT,
                    f"{silent} within {self.settings.delivery_timeout_s:g}s",
                    now,
                )
                report.timed_out += 1
                if follow_up:
                    report.dispatch.append(follow_up)
        # Due attempts never handed over (retries, whose time has come) and attempts
        # handed over long ago that are still queued (the broker lost them).
        stale = now - timedelta(seconds=REDISPATCH_AFTER_S)
        with self._tx() as s:
            attempts = s.scalars(
                select(Attempt)
                .where(
                    Attempt.status == rules.QUEUED,
                    Attempt.next_try_at <= now,
                    or_(Attempt.dispatched_at.is_(None), Attempt.dispatched_at <= stale),
                )
                .limit(batch)
                .with_for_update(skip_locked=True)
            ).all()
            for attempt in attempts:
                attempt.dispatched_at = now
                report.dispatch.append(attempt.id)
                report.redispatched += 1
        for attempt_id in report.dispatch:
            self.hand_off(attempt_id)
        if report.expired or report.timed_out or report.redispatched:
            log.info(
                "sweep.done",
                expired=report.expired,
                timed_out=report.timed_out,
                redispatched=report.redispatched,
            )
        return report

    # -- reading and checking ----------------------------------------------------------

    def get(self, message_id: str) -> MessageView | None:
        return self._view_where(Message.id == message_id)

    def find(self, idempotency_key: str) -> MessageView | None:
        return self._view_where(Message.idempotency_key == idempotency_key)

    def _view_where(self, condition: Any) -> MessageView | None:
        with self._tx() as s:
            message = s.scalars(
                select(Message).where(condition).options(selectinload(Message.attempts))
            ).one_or_none()
            return None if message is None else view(message)

    def check_code(self, message_id: str, code: str) -> CheckResult | None:
        """Constant-time compare; at most MAX_CHECKS per message; never valid once expired."""
        now = utcnow()
        with self._tx() as s:
            message = s.scalars(
                select(Message).where(Message.id == message_id).with_for_update()
            ).one_or_none()
            if message is None:
                return None
            if message.status == rules.REJECTED or message.code_ciphertext is None:
                return CheckResult(valid=False, reason="rejected")
            if message.check_count >= MAX_CHECKS:
                return CheckResult(valid=False, reason="too_many_checks")
            message.check_count += 1
            if message.status == rules.EXPIRED or now >= message.expires_at:
                return CheckResult(valid=False, reason="expired")
            if message.verified_at is not None:
                return CheckResult(valid=False, reason="already_used")
            expected = self.rt.codebox.open(message.code_ciphertext, message.id)
            if not codes_equal(expected, code):
                return CheckResult(valid=False, reason="mismatch")
            message.verified_at = now
            return CheckResult(valid=True)


def _new_attempt(
    message_id: str, seq: int, channel: str, provider_id: int | None, now: datetime
) -> Attempt:
    """A queued attempt, due now and counted as handed to the broker now."""
    return Attempt(
        id=str(ULID()),
        message_id=message_id,
        seq=seq,
        channel=channel,
        provider_id=provider_id,
        status=rules.QUEUED,
        next_try_at=now,
        dispatched_at=now,
        created_at=now,
        updated_at=now,
    )


def view(message: Message) -> MessageView:
    return MessageView(
        id=message.id,
        idempotency_key=message.idempotency_key,
        status=message.status,
        to=message.recipient,
        channels=list(message.channels),
        failure_reason=message.failure_reason,
        expires_at=message.expires_at,
        created_at=message.created_at,
        updated_at=message.updated_at,
        delivered_at=message.delivered_at,
        metadata=message.meta or {},
        attempts=[
            AttemptView(
                id=a.id,
                seq=a.seq,
                channel=a.channel,
                status=a.status,
                reason=a.reason,
                error_code=a.error_code,
                http_status=a.http_status,
                kodmobi_message_id=a.kodmobi_message_id,
                tries=a.tries,
                created_at=a.created_at,
                sent_at=a.sent_at,
                accepted_at=a.accepted_at,
                finished_at=a.finished_at,
                deadline=a.deadline,
            )
            for a in message.attempts
        ],
    )


def accepted_view(message: Message) -> AcceptedView:
    return AcceptedView(
        id=message.id,
        status=message.status,
        channels=list(message.channels),
        expires_at=message.expires_at,
    )
