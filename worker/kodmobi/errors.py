"""kod.mobi's error body, one exception class per row of DESIGN §7, and the retry decision."""

from __future__ import annotations

import enum
import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx


class Action(enum.Enum):
    """What the worker does about a failed call; decided in one place, `decide()`."""

    RETRY = "retry"  # same channel, later, with backoff
    FALLBACK = "fallback"  # this channel cannot do it: next channel now
    FAIL = "fail"  # no channel will: the message fails


class KodMobiError(Exception):
    """Any failure talking to kod.mobi. The class declares the whole policy for it:

    - `action`: retry the same channel, fall back to the next, or fail the message;
    - `limited_tries`: a retry counts against the transient budget (rules.TRANSIENT_TRIES),
      after which the channel is given up; otherwise retries go on while the code lives;
    - `alert`: a person must look (logged as an error with `alert=true`).
    """

    action: Action = Action.FALLBACK
    limited_tries: bool = False
    alert: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        sys_message: str | None = None,
        retry_after: float | None = None,
        error_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.sys_message = sys_message
        self.retry_after = retry_after
        self.error_params = error_params or {}

    @property
    def reason(self) -> str:
        """A short, code-free description for `failure_reason` columns and logs."""
        return self.sys_message or (
            f"http_{self.status_code}" if self.status_code else type(self).__name__
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status_code={self.status_code}, "
            f"sys_message={self.sys_message!r})"
        )


class ChannelUnavailableError(KodMobiError):
    """This channel cannot reach the recipient (not authorised, not configured, country)."""

    action = Action.FALLBACK


class RecipientBlockedError(KodMobiError):
    """The recipient is blocked: no channel may send to them."""

    action = Action.FAIL


class ThrottledError(KodMobiError):
    """Too many attempts (`ERROR_MESSAGE_ATTEMPT` or HTTP 429): retry after `retry_after`."""

    action = Action.RETRY


class AccountError(KodMobiError):
    """Our account cannot send (balance, access, API key): retry and alert; fallback won't help."""

    action = Action.RETRY
    alert = True


class RequestRefusedError(KodMobiError):
    """kod.mobi refused this request (`ERROR_BAD_REQUEST`, other 4xx): try the next channel."""

    action = Action.FALLBACK


class TransientError(KodMobiError):
    """5xx, connection failure, timeout or garbled answer: retry with backoff and jitter,
    a few times; then this channel is given up."""

    action = Action.RETRY
    limited_tries = True


class ServerError(TransientError):
    """kod.mobi answered 5xx."""


class ConnectionFailedError(TransientError):
    """The request never reached kod.mobi (connect error): safe to send again."""


class ResponseTimeoutError(TransientError):
    """kod.mobi did not answer in time; it may still have accepted the request."""


class ProtocolError(TransientError):
    """A 2xx answer we could not read."""


CHANNEL_UNAVAILABLE = frozenset(
    {
        "ERROR_USER_NOT_AUTHORIZE_ON_CHANNEL",
        "ERROR_PROJECT_HAS_NO_CHANNEL",
        "ERROR_PROJECT_HAS_NO_CHANNELS",
        "ERROR_CHANNEL_NOT_ALLOWED_COUNTRY",
    }
)
RECIPIENT_BLOCKED = frozenset({"ERROR_PHONE_BLOCKED", "ERROR_BLOCKED"})
THROTTLED = frozenset({"ERROR_MESSAGE_ATTEMPT"})
ACCOUNT = frozenset({"ERROR_WRONG_BALANCE", "ERROR_ACCESS_DENIED"})


def decide(exc: BaseException) -> Action:
    """The one place that decides retry, fallback or fail for a failed call."""
    if isinstance(exc, KodMobiError):
        return exc.action
    # Anything else (a bug, a database hiccup) is not kod.mobi's verdict: try again.
    return Action.RETRY


def is_retryable(exc: BaseException) -> bool:
    return decide(exc) is Action.RETRY


def _retry_after(headers: httpx.Headers) -> float | None:
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_class(status_code: int, sys_message: str | None) -> type[KodMobiError]:
    """Map kod.mobi's `sys_message` first, then the HTTP status, to an error class."""
    if sys_message in CHANNEL_UNAVAILABLE:
        return ChannelUnavailableError
    if sys_message in RECIPIENT_BLOCKED:
        return RecipientBlockedError
    if sys_message in THROTTLED or status_code == 429:
        return ThrottledError
    if sys_message in ACCOUNT or status_code == 401:
        return AccountError
    if status_code >= 500:
        return ServerError
    return RequestRefusedError


def from_response(response: httpx.Response) -> KodMobiError:
    """Turn a non-2xx answer, with or without kod.mobi's error body, into an exception."""
    body: Any = None
    try:
        body = json.loads(response.content) if response.content else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    sys_message = body.get("sys_message") if isinstance(body.get("sys_message"), str) else None
    message = body.get("error") if isinstance(body.get("error"), str) else None
    params = body.get("error_params") if isinstance(body.get("error_params"), dict) else None
    cls = error_class(response.status_code, sys_message)
    return cls(
        message or f"kod.mobi answered HTTP {response.status_code}",
        status_code=response.status_code,
        sys_message=sys_message,
        retry_after=_retry_after(response.headers),
        error_params=params,
    )
