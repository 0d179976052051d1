"""The producer request (DESIGN §3 input rules) and the views we answer with."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Literal, get_args

import phonenumbers
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from worker.rules import CHANNELS, PHONE_CHANNELS

#: The channel names as the API's schema shows them (worker.rules.Channel's values).
Channel = Literal["sms", "whatsapp", "telegram", "email"]
assert set(get_args(Channel)) == set(CHANNELS)

_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
MAX_METADATA_BYTES = 4096
#: Nesting deeper than this is refused before anything walks it recursively (a 1 KB body
#: of 256 levels made the fingerprint's model_dump raise: issue 13).
MAX_METADATA_DEPTH = 8
#: Keys and values (strings, lists, objects) in all of metadata, counted as walked.
MAX_METADATA_ITEMS = 256
CODE_PATTERN = re.compile(r"[0-9]{4,6}")
#: What our ids look like (ULID, Crockford base32); anything else is not found.
ULID_PATTERN = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
#: Idempotency keys: any text Postgres can store (no NUL), up to 255 characters.
KEY_PATTERN = r"^[^\x00]{1,255}$"
MAX_TTL_S = 86400


def normalise_recipient(raw: str) -> tuple[str, str]:
    """`(recipient, kind)`: an E.164 phone (`7…`/`8…` become `+7…`) or a lower-cased email."""
    value = raw.strip()
    if "@" in value:
        if len(value) > 254 or not _EMAIL.match(value):
            raise PydanticCustomError("email", "not a valid email address")
        local, _, domain = value.rpartition("@")
        return f"{local}@{domain.lower()}", "email"
    digits = value.replace(" ", "").replace("-", "").replace("(", "").replace(")", "")
    # kod.mobi's older API takes Russian numbers written 7XXXXXXXXXX or 8XXXXXXXXXX.
    # ASCII digits only: `\d` would also take Arabic-Indic and full-width ones.
    if re.fullmatch(r"[78][0-9]{10}", digits):
        digits = "+7" + digits[1:]
    if not re.fullmatch(r"\+[0-9]{8,15}", digits):
        raise PydanticCustomError(
            "phone", "not an E.164 phone number (+ and 8 to 15 digits) or an email address"
        )
    try:
        number = phonenumbers.parse(digits, None)
    except phonenumbers.NumberParseException:
        raise PydanticCustomError("phone", "not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise PydanticCustomError("phone", "not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), "phone"


def canonical_recipient(recipient: str) -> str:
    """The recipient as limits and lookups compare it: emails case-insensitively (the
    address as given is still what is sent), phones by E.164, as normalised already."""
    return recipient.lower() if "@" in recipient else recipient


def check_metadata_shape(value: Any) -> None:
    """Refuse metadata nested over MAX_METADATA_DEPTH or with over MAX_METADATA_ITEMS
    items, walking it iteratively (no recursion for an attacker to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    items = 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_METADATA_DEPTH:
                raise PydanticCustomError(
                    "metadata", "metadata nested deeper than {depth} levels",
                    {"depth": MAX_METADATA_DEPTH},
                )
            children = list(node.values()) if isinstance(node, dict) else node
            items += len(children)
            if items > MAX_METADATA_ITEMS:
                raise PydanticCustomError(
                    "metadata", "metadata over {items} items", {"items": MAX_METADATA_ITEMS}
                )
            stack.extend((child, depth + 1) for child in children)


#: The outcome events a producer can subscribe to (DESIGN §11).
EventType = Literal[
    "message.sending",
    "message.sent",
    "message.delivered",
    "message.failed",
    "message.expired",
    "message.rejected",
    "message.fallback",
]
#: What `notify` subscribes to when it names no events: the final statuses.
FINAL_EVENTS: tuple[str, ...] = (
    "message.delivered",
    "message.failed",
    "message.expired",
    "message.rejected",
)
_NAME = r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$"


class Notify(BaseModel):
    """Who hears of a message's events (contract): a webhook URL and/or a Dramatiq
    queue and actor; `events` defaults to the final ones."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    url: str | None = Field(None, max_length=2048, description="http(s) URL for webhooks")
    queue_name: str | None = Field(None, pattern=_NAME, description="Dramatiq queue for replies")
    actor_name: str | None = Field(None, pattern=_NAME, description="Dramatiq actor for replies")
    events: list[EventType] | None = Field(
        None, min_length=1, max_length=7, description="default: the final ones"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        from worker.webhooks import check_url

        if value is None:
            return None
        problem = check_url(value)
        if problem is not None:
            raise PydanticCustomError("url", problem)
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise PydanticCustomError("events", "events must not repeat")
        return value

    @model_validator(mode="after")
    def _pair(self) -> Notify:
        if (self.queue_name is None) != (self.actor_name is None):
            raise PydanticCustomError(
                "notify", "queue_name and actor_name go together: give both or neither"
            )
        if self.queue_name == "kodmobi":
            raise PydanticCustomError("notify", "queue_name: replies cannot go to our own queue")
        return self


class SendRequest(BaseModel):
    """One code to send; the same shape over HTTP, Dramatiq and Python."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    to: str = Field(description="E.164 phone number or email address", max_length=320)
    channels: list[Channel] | None = Field(
        None, description="fallback chain, first channel first", min_length=1, max_length=4
    )
    code: str | None = Field(None, description="4 to 6 digits; drawn when absent")
    provider_id: int | None = Field(None, ge=1, le=2**31 - 1)
    ttl_s: int | None = Field(None, ge=10, le=MAX_TTL_S, description="code lifetime, seconds")
    metadata: dict[str, Any] | None = None
    notify: Notify | None = Field(None, description="who hears of this message's events")

    @field_validator("to")
    @classmethod
    def _to(cls, value: str) -> str:
        return normalise_recipient(value)[0]

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        if len(set(value)) != len(value):
            raise PydanticCustomError("channels", "channels must not repeat")
        to = info.data.get("to")
        if to is not None:
            is_email = "@" in to
            wrong = [c for c in value if (c == "email") != is_email]
            if wrong:
                kind = "email addresses" if is_email else "phone numbers"
                allowed = "email" if is_email else ", ".join(PHONE_CHANNELS)
                raise PydanticCustomError(
                    "channels",
                    "{wrong} cannot reach {kind}; use {allowed}",
                    {"wrong": ", ".join(wrong), "kind": kind, "allowed": allowed},
                )
        return value

    @field_validator("code", mode="before")
    @classmethod
    def _code(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str) or not CODE_PATTERN.fullmatch(value):
            raise PydanticCustomError("code", "code must be a string of 4 to 6 digits")
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata_shape(cls, value: Any) -> Any:
        # Before pydantic or json walk it: both recurse.
        check_metadata_shape(value)
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            # Stored as jsonb: no NaN/Infinity, no NUL, no lone surrogates.
            dumped = json.dumps(value, allow_nan=False, ensure_ascii=False)
            encoded = dumped.encode("utf-8")
        except (ValueError, TypeError, UnicodeEncodeError, RecursionError):
            raise PydanticCustomError(
                "metadata", "metadata must be plain JSON (no NaN, Infinity or lone surrogates)"
            ) from None
        if "\\u0000" in dumped:
            raise PydanticCustomError("metadata", "metadata must not contain NUL characters")
        if len(encoded) > MAX_METADATA_BYTES:
            raise PydanticCustomError("metadata", "metadata over 4096 bytes")
        return value

    def recipient_kind(self) -> str:
        return "email" if "@" in self.to else "phone"

    def chain(self, default_channels: tuple[str, ...]) -> list[str]:
        if self.channels:
            return list(self.channels)
        return ["email"] if self.recipient_kind() == "email" else list(default_channels)


def is_ulid(value: str) -> bool:
    return ULID_PATTERN.fullmatch(value) is not None


def valid_key(value: object) -> bool:
    """An idempotency key we can store: 1-255 characters of text, no NUL."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 255
        and "\x00" not in value
        and db_text(value) == value
    )


def db_text(value: str) -> str:
    """Text Postgres can store: NUL and lone surrogates become U+FFFD."""
    return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def describe_errors(exc: ValidationError) -> str:
    """One line naming each bad field, never echoing the input (it may hold a code)."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{field}: {error['msg']}")
    return "; ".join(parts)


class AttemptView(BaseModel):
    id: str
    seq: int
    channel: str
    status: str
    reason: str | None
    error_code: str | None
    http_status: int | None
    kodmobi_message_id: int | None
    tries: int
    created_at: datetime
    sent_at: datetime | None
    accepted_at: datetime | None
    finished_at: datetime | None
    deadline: datetime | None


class MessageView(BaseModel):
    id: str
    idempotency_key: str
    status: str
    to: str
    channels: list[str]
    failure_reason: str | None
    expires_at: datetime
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    metadata: dict[str, Any] = {}
    attempts: list[AttemptView] = []


class AcceptedView(BaseModel):
    id: str
    status: str
    channels: list[str]
    expires_at: datetime


class CheckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(pattern=r"^[0-9]{4,6}$", description="the code the user typed")


class CheckResult(BaseModel):
    valid: bool
    reason: str | None = None


class FallbackDetail(BaseModel):
    from_channel: str
    to_channel: str
    reason: str


class EventView(BaseModel):
    """An outcome event as webhooks, Dramatiq replies and the feed carry it."""

    id: str
    type: str
    timestamp: datetime
    data: MessageView
    #: For `message.fallback` only.
    fallback: FallbackDetail | None = None


class DeliveryTryView(BaseModel):
    at: datetime
    http_status: int | None
    error: str | None
    duration_ms: int


class DeliveryView(BaseModel):
    target: str
    url: str | None
    queue_name: str | None
    actor_name: str | None
    state: str
    tries: int
    next_try_at: datetime | None
    last_error: str | None
    delivered_at: datetime | None
    history: list[DeliveryTryView] = []


class EventDetailView(EventView):
    deliveries: list[DeliveryView] = []


class EventPage(BaseModel):
    events: list[EventView]
    #: Pass as `after` for the next page (the last event's id; `after` again when empty).
    next_after: str | None
