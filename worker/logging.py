"""structlog setup: JSON lines on stdout, with codes, secrets and recipients redacted."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import structlog

REDACTED = "[redacted]"

#: Keys whose values are secrets or codes wherever they appear in an event.
SECRET_KEYS = frozenset(
    {
        "code",
        "codes",
        "plain_code",
        "api_key",
        "x-api-key",
        "x_api_key",
        "token",
        "tokens",
        "api_token",
        "api_tokens",
        "bearer",
        "authorization",
        "callback_token",
        "callback_secret",
        "code_key",
        "password",
        "secret",
    }
)
#: Keys whose values are recipients: masked, not removed, so support can still match them.
RECIPIENT_KEYS = frozenset({"to", "recipient", "phone", "email"})

_CALLBACK_PATH = re.compile(r"(/callbacks/kodmobi/[^/\s\"'?]+/)[^\s\"'?&]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
_KEYED_CODE = re.compile(
    r"(?i)([\"']?(?:code|x-api-key|api_key|token)[\"']?\s*[:=]\s*[\"']?)[^\"'\s,&}]+"
)
#: A phone number in any spelling: `+79522966236`, `8 (952) 296-62-03`,
#: `+7 952 296 62 03`, `7.952.296.62.03`: 10 to 15 digits with at most two separators
#: (space, dash, dot, brackets) between any two, not inside a longer run of digits.
_PHONE = re.compile(r"(?:(?<=%2[Bb])|(?<![\w+]))\+?\(?\d(?:[ \t\-.()/]{0,2}\d){9,14}(?![\w])")
# A recipient in a printed argument list or dict, as a producer wrote it: Dramatiq prints a
# message's arguments before our intake normalises them (`send_code(to='8 (952) 296-62-36')`).
_KEYED_RECIPIENT = re.compile(
    r"(?i)(\b(?:to|recipient|phone|email)[\"']?\s*[:=]\s*)([\"'])([^\"'\n]{1,320})\2"
)
_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*(@[A-Za-z0-9.-]+\.[A-Za-z]{2,})")

#: Shorter literals are not scrubbed (they would mangle every line); settings refuse
#: secrets under 16 characters (worker.settings.MIN_SECRET_LENGTH), so none is missed.
MIN_SCRUBBED_SECRET = 8

# Literal secrets of this process (API key, tokens, callback secret), registered
# at start so they are scrubbed even from text we did not foresee.
_known_secrets: set[str] = set()


def register_secrets(secrets: Iterable[str]) -> None:
    """Scrub these literal strings from every log line from now on."""
    _known_secrets.update(s for s in secrets if s and len(s) >= MIN_SCRUBBED_SECRET)


def mask_recipient(value: str) -> str:
    """`+79522966236` → `+7952***6236`; `alice@example.com` → `a***@example.com`."""
    if "@" in value:
        local, _, domain = value.rpartition("@")
        return f"{local[:1]}***@{domain}"
    if len(value) <= 6:
        return "***"
    head = 5 if value.startswith("+") else 4
    return f"{value[:head]}***{value[-4:]}"


def _mask_written(value: str) -> str:
    """A recipient as written by someone (spaces, dashes, brackets), masked."""
    if "***" in value:
        return value
    if "@" in value:
        return mask_recipient(value.strip())
    digits = re.sub(r"\D", "", value)
    if len(digits) < 7:
        return value
    return mask_recipient(("+" if value.strip().startswith("+") else "") + digits)


def scrub_text(text: str) -> str:
    """Remove tokens and codes from free text (URLs, bodies, exception messages)."""
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _CALLBACK_PATH.sub(lambda m: m.group(1) + REDACTED, text)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    text = _KEYED_CODE.sub(lambda m: m.group(1) + REDACTED, text)
    text = _KEYED_RECIPIENT.sub(
        lambda m: f"{m.group(1)}{m.group(2)}{_mask_written(m.group(3))}{m.group(2)}", text
    )
    text = _EMAIL.sub(lambda m: f"{m.group(1)}***{m.group(2)}", text)
    return _PHONE.sub(lambda m: _mask_phone(m.group(0)), text)


def _mask_phone(spelled: str) -> str:
    """A phone found in free text, masked as its digits: `8 (952) 296-62-03` →
    `8952***6203`, whatever separators it was written with."""
    digits = "".join(c for c in spelled if c.isdigit())
    plus = "+" if spelled.startswith("+") else ""
    # As many digits hidden as DESIGN §9's mask hides of an 11-digit number, or more.
    head = max(1, min(4, len(digits) - 7))
    return f"{plus}{digits[:head]}***{digits[-4:]}"


def _redact(value: Any, key: str | None = None) -> Any:
    if key is not None:
        lowered = key.lower()
        if lowered in SECRET_KEYS:
            return REDACTED
        # kod.mobi's older API takes phone numbers as numbers: mask those too.
        recipient = isinstance(value, str | int) and not isinstance(value, bool)
        if lowered in RECIPIENT_KEYS and recipient:
            return mask_recipient(str(value))
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, Mapping):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes | bytearray):
        return scrub_text(bytes(value).decode("utf-8", "replace"))
    # Anything else (an exception, a URL, a model) would be rendered by its repr: scrub that.
    return scrub_text(repr(value))


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the last word on what may leave the process."""
    for key in list(event_dict):
        if key == "exc_info":
            continue
        event_dict[key] = _redact(event_dict[key], key if key != "event" else None)
    return event_dict


def _scrub_rendered(_logger: Any, _method: str, event_dict: Any) -> Any:
    # Tracebacks are rendered to text just before output: scrub that text too.
    if isinstance(event_dict, MutableMapping) and isinstance(event_dict.get("exception"), str):
        event_dict["exception"] = scrub_text(event_dict["exception"])
    return event_dict


def configure_logging(
    fmt: str = "json", level: str = "INFO", secrets: Iterable[str] = (), stream: Any = None
) -> None:
    """Route structlog and the standard library (uvicorn, dramatiq) through one pipeline."""
    register_secrets(secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            _scrub_rendered,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "dramatiq"):
        library = logging.getLogger(name)
        if not library.handlers and not library.propagate:
            continue  # switched off on purpose (uvicorn --no-access-log): keep it off
        library.handlers[:] = []
        library.propagate = True
    # httpx logs every request URL at INFO: callback URLs are in request bodies, not
    # URLs, but keep it quiet anyway; our own events say what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
