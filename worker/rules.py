"""The vocabulary (statuses, channels, callback outcomes) and the delivery rules as pure
functions: the order of statuses, the fallback chain, retry timing, callback words.

Every other module (cli, demo, tests, scripts) names statuses and channels from here.
The enums are `StrEnum`s: they are stored, compared and serialised as their values."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

# -- channels --------------------------------------------------------------------------


class Channel(StrEnum):
    """kod.mobi's channels; `email` reaches email addresses, the rest phones."""

    SMS = "sms"
    WHATSAPP = "whatsapp"
    TELEGRAM = "telegram"
    EMAIL = "email"


CHANNELS: tuple[str, ...] = tuple(Channel)
#: The default fallback chain for phones (DESIGN §2 `DEFAULT_CHANNELS`).
PHONE_CHANNELS: tuple[str, ...] = (Channel.TELEGRAM, Channel.WHATSAPP, Channel.SMS)

# -- message statuses ----------------------------------------------------------------


class MessageStatus(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    REJECTED = "rejected"


# -- attempt statuses ----------------------------------------------------------------


class AttemptStatus(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    ACCEPTED = "accepted"
    DELIVERED = "delivered"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ERROR = "error"


# Short names for the rules below and the use cases (a status word is the same value
# whether it names a message or an attempt: `queued`, `sending`, `delivered`, `failed`).
QUEUED = MessageStatus.QUEUED
SENDING = MessageStatus.SENDING
SENT = MessageStatus.SENT
DELIVERED = MessageStatus.DELIVERED
FAILED = MessageStatus.FAILED
EXPIRED = MessageStatus.EXPIRED
REJECTED = MessageStatus.REJECTED
ACCEPTED = AttemptStatus.ACCEPTED
TIMED_OUT = AttemptStatus.TIMED_OUT
ERROR = AttemptStatus.ERROR

MESSAGE_STATUSES: tuple[str, ...] = tuple(MessageStatus)
MESSAGE_FINAL: frozenset[str] = frozenset({DELIVERED, FAILED, EXPIRED, REJECTED})
MESSAGE_OPEN: tuple[str, ...] = (QUEUED, SENDING, SENT)
_MESSAGE_RANK: dict[str, int] = {QUEUED: 0, SENDING: 1, SENT: 2}

ATTEMPT_STATUSES: tuple[str, ...] = tuple(AttemptStatus)
ATTEMPT_FINAL: frozenset[str] = frozenset({DELIVERED, FAILED, TIMED_OUT, ERROR})
ATTEMPT_OPEN: tuple[str, ...] = (QUEUED, SENDING, ACCEPTED)
_ATTEMPT_RANK: dict[str, int] = {QUEUED: 0, SENDING: 1, ACCEPTED: 2}

#: Transient errors: tries of one attempt before the channel is given up.
TRANSIENT_TRIES = 4
#: First retry delay; doubles each try, capped by RETRY_MAX_BACKOFF_S, full jitter.
BASE_BACKOFF_S = 0.5


def _rank(status: str, ranks: dict[str, int], final: frozenset[str]) -> int:
    return 3 if status in final else ranks[status]


def message_can_move(current: str, new: str) -> bool:
    """Statuses only move forward, and a final status never changes."""
    if current in MESSAGE_FINAL:
        return False
    return _rank(new, _MESSAGE_RANK, MESSAGE_FINAL) > _rank(current, _MESSAGE_RANK, MESSAGE_FINAL)


def attempt_can_move(current: str, new: str) -> bool:
    """Forward only, with one exception: a `sending` claim whose call provably did not
    reach kod.mobi (or will be retried) goes back to `queued` for the next try."""
    if current in ATTEMPT_FINAL:
        return False
    if current == SENDING and new == QUEUED:
        return True
    return _rank(new, _ATTEMPT_RANK, ATTEMPT_FINAL) > _rank(current, _ATTEMPT_RANK, ATTEMPT_FINAL)


def message_moves_to(new: str) -> frozenset[str]:
    """The message statuses from which `new` may be reached (for SQL guards)."""
    return frozenset(s for s in MESSAGE_STATUSES if message_can_move(s, new))


def attempt_moves_to(new: str) -> frozenset[str]:
    """The attempt statuses from which `new` may be reached (for SQL guards)."""
    return frozenset(s for s in ATTEMPT_STATUSES if attempt_can_move(s, new))


def next_channel(chain: Sequence[str], seq: int) -> str | None:
    """The channel after attempt number `seq` (1-based), or None when the chain is spent."""
    return chain[seq] if seq < len(chain) else None


@dataclass(frozen=True)
class RetryPlan:
    at: datetime | None  # None: no retry within the budget or the code's TTL

    @property
    def allowed(self) -> bool:
        return self.at is not None


def plan_retry(
    *,
    now: datetime,
    tries: int,
    expires_at: datetime,
    retry_after_s: float | None,
    max_backoff_s: float,
    limited_tries: bool,
    rng: random.Random | None = None,
) -> RetryPlan:
    """When to try an attempt again after `tries` failed tries, if at all.

    Exponential backoff with full jitter; kod.mobi's `Retry-After` is a floor.
    `limited_tries` applies the transient budget; throttling and account errors are
    retried as long as the code lives, since another channel would not help.
    """
    if limited_tries and tries >= TRANSIENT_TRIES:
        return RetryPlan(None)
    cap = min(max_backoff_s, BASE_BACKOFF_S * 2 ** max(0, tries - 1))
    delay = (rng or random).uniform(cap / 2, cap)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    at = now + timedelta(seconds=delay)
    if at >= expires_at:
        return RetryPlan(None)
    return RetryPlan(at)


# -- callbacks -----------------------------------------------------------------------


class CallbackStatus(StrEnum):
    """What a callback's status word means (DESIGN §6)."""

    DELIVERED = "delivered"
    FAILED = "failed"
    PROGRESS = "progress"
    UNKNOWN = "unknown"


class CallbackOutcome(StrEnum):
    """What a stored callback did; kept in `callback_events.outcome`."""

    #: kod.mobi holds the send: the attempt moved to `accepted`.
    PROGRESS = "progress"
    #: A progress word for an attempt already past `accepted`: stored, nothing moved.
    PROGRESS_NOTED = "progress_noted"
    DELIVERED = "delivered"
    #: Delivered after we gave up on the channel (timed out): the message is delivered.
    LATE_DELIVERY = "late_delivery"
    FAILED = "failed"
    #: Would move a status backwards or repeat a final one: stored, not applied.
    STALE = "stale"
    UNKNOWN_STATUS = "unknown_status"
    MESSAGE_ID_MISMATCH = "message_id_mismatch"
    #: The same (attempt, status, message id) arrived before.
    DUPLICATE = "duplicate"


CALLBACK_DELIVERED = frozenset({"delivered", "read", "seen", "success", "ok"})
CALLBACK_FAILED = frozenset({"failed", "error", "undelivered", "rejected", "expired", "blocked"})
CALLBACK_PROGRESS = frozenset({"sent", "queued", "accepted", "pending", "sending"})


def parse_callback_status(word: str) -> CallbackStatus:
    """kod.mobi's status word → delivered | failed | progress | unknown (DESIGN §6)."""
    word = word.strip().lower()
    if word in CALLBACK_DELIVERED:
        return CallbackStatus.DELIVERED
    if word in CALLBACK_FAILED:
        return CallbackStatus.FAILED
    if word in CALLBACK_PROGRESS:
        return CallbackStatus.PROGRESS
    return CallbackStatus.UNKNOWN
