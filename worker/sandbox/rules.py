"""Pure rules of the sandbox: input checks, kod.mobi's error body, magic recipients and outcomes.

(About 400 lines: mostly the table of magic recipients and kod.mobi's channel list.)"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import phonenumbers
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from worker.rules import CHANNELS
from worker.rules import PHONE_CHANNELS as _PHONE_CHAIN

PHONE_CHANNELS = frozenset(_PHONE_CHAIN)
#: the older api/v2 endpoints know phones only
V2_CHANNELS = ("sms", "whatsapp", "telegram")

SESSION_TTL_S = 180.0  # "Session valid 3 minutes"
CHANNEL_TIMEOUT_S = 60.0  # "Each channel has 60 seconds sending timeout"
MAX_BODY_BYTES = 64 * 1024

# -- kod.mobi's error body --------------------------------------------------------


class ApiError(Exception):
    """An answer other than success; the app turns it into kod.mobi's error body.

    `raw_body` replaces the JSON body, for imitating a proxy's non-JSON 5xx page.
    """

    def __init__(
        self,
        status: int,
        sys_message: str,
        error: str,
        params: dict[str, str] | None = None,
        *,
        retry_after: int | None = None,
        raw_body: bytes | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.sys_message = sys_message
        self.error = error
        self.params = params or {}
        self.retry_after = retry_after
        self.raw_body = raw_body

    def clone(self) -> ApiError:
        """A fresh instance: a shared, pre-built error must not carry one request's traceback."""
        return ApiError(
            self.status,
            self.sys_message,
            self.error,
            dict(self.params),
            retry_after=self.retry_after,
            raw_body=self.raw_body,
        )

    def body(self) -> dict[str, Any]:
        return {
            "success": False,
            "error": self.error,
            "error_params": self.params,
            "status": self.status,
            "sys_message": self.sys_message,
        }


def bad_request(params: dict[str, str]) -> ApiError:
    return ApiError(400, "ERROR_BAD_REQUEST", "The given data was invalid.", params)


def throttled(retry_after: int, params: dict[str, str] | None = None) -> ApiError:
    return ApiError(
        429,
        "ERROR_MESSAGE_ATTEMPT",
        "Too many attempts. Try again later.",
        params,
        retry_after=max(1, retry_after),
    )


def session_not_found() -> ApiError:
    return ApiError(
        404, "ERROR_SESSION_NOT_FOUND", "Session not found.", {"session_id": "not found"}
    )


def internal_error() -> ApiError:
    return ApiError(500, "ERROR_INTERNAL", "Internal server error.")


UNAVAILABLE_PAGE = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n"
    b"<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n"
    b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

# -- input checks: each returns the clean value, or raises ValueError with the problem ---

_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_CODE = re.compile(r"[0-9]{4,6}")
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}")
_V2_PHONE = re.compile(r"\+?([78])([0-9]{10})")


def is_email(to: str) -> bool:
    return "@" in to


def check_recipient(to: Any) -> str:
    """An E.164 phone number (must start with "+", parse and be valid) or an email address."""
    if not isinstance(to, str) or not to:
        raise ValueError("required: an E.164 phone number or an email address")
    return _check_recipient(to)


@lru_cache(maxsize=65536)  # benchmarks send to the same recipients again and again
def _check_recipient(to: str) -> str:
    if is_email(to):
        if len(to) > 254 or not _EMAIL.fullmatch(to):
            raise ValueError("not a valid email address")
        return to
    if not _E164.fullmatch(to):
        raise ValueError("must be an E.164 phone number (+ and digits) or an email address")
    try:
        number = phonenumbers.parse(to, None)
    except phonenumbers.NumberParseException:
        raise ValueError("not a valid phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number")
    return to


def check_channel(channel: Any, to: str | None) -> str:
    """One of the four channels, and one that can reach `to` (email only for emails)."""
    if not isinstance(channel, str) or channel not in CHANNELS:
        raise ValueError(f"must be one of {', '.join(CHANNELS)}")
    if to is not None and (channel == "email") != is_email(to):
        raise ValueError(
            "email is for email addresses only"
            if channel == "email"
            else f"{channel} is for phone numbers only"
        )
    return channel


def check_code(code: Any) -> str:
    """A string of 4 to 6 digits (a JSON integer is taken as its digits)."""
    if isinstance(code, int) and not isinstance(code, bool):
        code = str(code)
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        raise ValueError("must be a string of 4 to 6 digits")
    return code


def check_callback_url(url: Any) -> str:
    if not isinstance(url, str) or len(url) > 2048:
        raise ValueError("must be an http(s) URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise ValueError("must be an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL")
    return url


def check_ulid(value: Any) -> str:
    if not isinstance(value, str) or not _ULID.fullmatch(value):
        raise ValueError("must be a ULID")
    return value.upper()


def check_v2_phone(phone: Any) -> str:
    """The older API's phone: 11 digits starting with 7, +7 or 8; 8… is Russia's 7…"""
    match = _V2_PHONE.fullmatch(phone) if isinstance(phone, str) else None
    if match is None or (phone.startswith("+") and match.group(1) != "7"):
        raise ValueError("must start with 7, +7 or 8 and have 11 digits")
    return "+7" + match.group(2)


def check_flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


# -- magic recipients and outcomes ---------------------------------------------------

MAGIC_PHONE_PREFIX = "+79990"
_MAGIC_PHONE_SLOT = {"telegram": 6, "whatsapp": 8, "sms": 10}
_MAGIC_EMAIL = re.compile(r"\+o([0-9]{2})")


def magic_code(to: str, channel: str) -> str | None:
    """The two-digit outcome a magic recipient asks for on `channel`, or None if not magic.

    `+79990TTWWSS`: TT for telegram, WW for whatsapp, SS for sms.
    `local+oNN@domain`: NN for email.
    """
    if channel == "email":
        local = to.partition("@")[0]
        match = _MAGIC_EMAIL.search(local)
        return match.group(1) if match else None
    if len(to) == 12 and to.startswith(MAGIC_PHONE_PREFIX):
        slot = _MAGIC_PHONE_SLOT.get(channel)
        if slot is not None:
            return to[slot : slot + 2]
    return None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happens to one send: refused with `error`, or accepted with `callbacks` in order."""

    name: str
    callbacks: tuple[str, ...] = ("delivered",)
    slow: bool = False
    error: ApiError | None = None
    magic: str | None = None


def _refusal(code: str, status: int, sys_message: str, text: str, **kw: Any) -> Outcome:
    return Outcome(
        name=sys_message.lower().removeprefix("error_"),
        callbacks=(),
        error=ApiError(status, sys_message, text, **kw),
        magic=code,
    )


MAGIC_OUTCOMES: dict[str, Outcome] = {
    "00": Outcome("delivered", ("delivered",), magic="00"),
    "01": Outcome("failed", ("failed",), magic="01"),
    "02": Outcome("no_callback", (), magic="02"),
    "03": Outcome("slow", ("delivered",), slow=True, magic="03"),
    "04": Outcome("duplicated", ("delivered", "delivered"), magic="04"),
    "05": Outcome("out_of_order", ("delivered", "sent"), magic="05"),
    "06": Outcome("progress_only", ("sent",), magic="06"),
    "10": _refusal(
        "10", 403, "ERROR_USER_NOT_AUTHORIZE_ON_CHANNEL", "User is not authorized on the channel."
    ),
    "11": _refusal("11", 400, "ERROR_PROJECT_HAS_NO_CHANNEL", "Project has no such channel."),
    "12": _refusal("12", 400, "ERROR_PROJECT_HAS_NO_CHANNELS", "Project has no channels."),
    "13": _refusal(
        "13", 403, "ERROR_CHANNEL_NOT_ALLOWED_COUNTRY", "Channel is not allowed for this country."
    ),
    "14": _refusal("14", 403, "ERROR_PHONE_BLOCKED", "Phone is blocked."),
    "15": _refusal("15", 403, "ERROR_BLOCKED", "Blocked."),
    "16": _refusal(
        "16", 429, "ERROR_MESSAGE_ATTEMPT", "Too many attempts. Try again later.", retry_after=1
    ),
    "17": _refusal("17", 400, "ERROR_WRONG_BALANCE", "Insufficient balance."),
    "18": _refusal("18", 403, "ERROR_ACCESS_DENIED", "Access denied."),
    "19": _refusal(
        "19", 400, "ERROR_BAD_REQUEST", "Bad request.", params={"to": "refused (magic outcome 19)"}
    ),
    "20": _refusal("20", 500, "ERROR_INTERNAL", "Internal server error."),
    "21": Outcome(
        "unavailable",
        (),
        error=ApiError(503, "", "", raw_body=UNAVAILABLE_PAGE),
        magic="21",
    ),
}

#: outcome codes after which the recipient is not "active" on the channel
INACTIVE_CODES = frozenset({"10", "11", "12", "13"})

RANDOM_5XX = Outcome("error_5xx", (), error=internal_error())
RANDOM_429 = Outcome("throttled_429", (), error=throttled(1))


@lru_cache(maxsize=128)  # at most 2**6 combinations: built once each, not per request
def random_outcome(
    *, slow: bool, lost: bool, failed: bool, duplicated: bool, out_of_order: bool, progress: bool
) -> Outcome:
    """The accepted outcome for one combination of the rate draws."""
    final = "failed" if failed else "delivered"
    names = [final]
    callbacks: list[str] = [final]
    if lost:
        names, callbacks = ["lost"], []
    else:
        if duplicated:
            callbacks.append(final)
            names.append("duplicated")
        if progress:
            callbacks.insert(0, "sent")
        if out_of_order:
            # The final status first, then the "sent" that should have come before it.
            callbacks.append("sent")
            names.append("out_of_order")
    if slow:
        names.insert(0, "slow")
    return Outcome("+".join(names), tuple(callbacks), slow=slow)


# -- the answer's encrypted code --------------------------------------------------------


@lru_cache(maxsize=16)
def _aes_key(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


def encrypt_code(code: str, api_key: str, iv: bytes, nonce: int) -> str:
    """`aes256:<iv hex>:<ciphertext hex>:<digits>` like kod.mobi's answer: AES-256-CBC of the
    code under sha256(api key). What kod.mobi's trailing digits mean is not published."""
    data = code.encode()
    pad = 16 - len(data) % 16
    encryptor = Cipher(algorithms.AES(_aes_key(api_key)), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(data + bytes([pad]) * pad) + encryptor.finalize()
    return f"aes256:{iv.hex()}:{ciphertext.hex()}:{nonce}"


def decrypt_code(encrypted: str, api_key: str) -> str:
    """The plain code of `encrypt_code`'s answer (for tests and curious users)."""
    _, iv_hex, ciphertext_hex, _ = encrypted.split(":")
    decryptor = Cipher(
        algorithms.AES(_aes_key(api_key)), modes.CBC(bytes.fromhex(iv_hex))
    ).decryptor()
    data = decryptor.update(bytes.fromhex(ciphertext_hex)) + decryptor.finalize()
    return data[: -data[-1]].decode()


def iso_now() -> str:
    """Now in UTC as kod.mobi writes it: `2025-10-28T09:22:48.950Z`."""
    return iso(datetime.now(UTC))


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the project's channels ------------------------------------------------------------

CHANNEL_NAMES = {"whatsapp": "Whatsapp", "telegram": "Telegram", "sms": "SMS", "email": "Email"}
CHANNEL_LINKS = {
    "whatsapp": "https://kod.mobi",
    "telegram": "https://t.me/kodmobi_sandbox_bot",
    "sms": "https://kod.mobi",
    "email": "https://kod.mobi",
}
#: GET /manual/channels. Email's provider is id 1 so that the seed's own example
#: (`"channel": "email", "provider_id": 1`) is accepted.
MANUAL_CHANNELS: list[dict[str, Any]] = [
    {
        "name": "Email",
        "type": "email",
        "providers": [{"id": 1, "name": "kod.mobi Mail", "type": "smtp", "is_system": True}],
    },
    {
        "name": "Telegram",
        "type": "telegram",
        "providers": [
            {"id": 2, "name": "Telegram Gateway", "type": "telegram_gateway", "is_system": True},
            {"id": 3, "name": "Own Telegram bot", "type": "telegram_bot", "is_system": False},
        ],
    },
    {
        "name": "Whatsapp",
        "type": "whatsapp",
        "providers": [
            {"id": 4, "name": "WhatsApp Business", "type": "whatsapp_business", "is_system": True}
        ],
    },
    {
        "name": "SMS",
        "type": "sms",
        "providers": [
            {"id": 5, "name": "SMS Aero", "type": "smsaero", "is_system": True},
            {"id": 6, "name": "SMSC", "type": "smsc", "is_system": False},
        ],
    },
]
PROVIDER_IDS: dict[str, frozenset[int]] = {
    channel["type"]: frozenset(p["id"] for p in channel["providers"]) for channel in MANUAL_CHANNELS
}
#: session/channels without a session: every channel, in the seed's order
ALL_SESSION_CHANNELS = ("whatsapp", "telegram", "sms", "email")


def check_provider_id(provider_id: Any, channel: str | None) -> int:
    """An integer naming one of `channel`'s providers in GET /manual/channels."""
    if isinstance(provider_id, bool) or not isinstance(provider_id, int):
        raise ValueError("must be an integer provider id from GET /manual/channels")
    allowed = PROVIDER_IDS.get(channel or "")
    if allowed is None:
        if not any(provider_id in ids for ids in PROVIDER_IDS.values()):
            raise ValueError("unknown provider")
    elif provider_id not in allowed:
        raise ValueError(f"not a provider of channel {channel}: one of {sorted(allowed)}")
    return provider_id


def session_channel(channel: str, is_active: bool, timeout: int) -> dict[str, Any]:
    """A SessionChannel object as in the seeds."""
    return {
        "name": CHANNEL_NAMES[channel],
        "type": channel,
        "is_active": is_active,
        "timeout": timeout,
        "image_url": f"https://storage.kod.mobi/icons/{channel}.svg",
        "link": CHANNEL_LINKS[channel],
    }
