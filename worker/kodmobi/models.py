"""Typed requests and answers of kod.mobi's API (seeds); answers accept unknown fields."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

Channel = Literal["sms", "whatsapp", "telegram", "email"]


class _Answer(BaseModel):
    # kod.mobi may add fields at any time: keep them, never fail on them.
    model_config = ConfigDict(extra="allow")


class ManualSendResponse(_Answer):
    """`POST /manual/send`: `code` is the code kod.mobi encrypted (`aes256:…`)."""

    message: str | None = None
    code: str | None = None
    message_id: int


class Provider(_Answer):
    id: int
    name: str | None = None
    type: str | None = None
    is_system: bool | None = None


class ManualChannel(_Answer):
    """`GET /manual/channels`: a channel and the providers `provider_id` can name."""

    name: str | None = None
    type: str
    providers: list[Provider] = []


class SessionChannel(_Answer):
    name: str | None = None
    type: str
    is_active: bool | None = None
    timeout: float | None = None
    image_url: str | None = None
    link: str | None = None


class SessionCreateResponse(_Answer):
    session_id: str
    session_expired_at: datetime | None = None
    sent_to: str | None = None
    channels: list[SessionChannel] = []


class SessionSendResponse(_Answer):
    session_id: str
    session_expired_at: datetime | None = None
    channel: SessionChannel | None = None


class V2Response(_Answer):
    """The older `api/v2/...` endpoints document no answer shape; keep what comes."""

    success: bool | None = None
    session_id: str | None = None
    message: str | None = None
    type: str | None = None
    #: `message/check`: was the code right.
    valid: bool | None = None
    #: `channel/check`: is the user active on the channel.
    is_active: bool | None = None
