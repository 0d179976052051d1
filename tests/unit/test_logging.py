"""Logs are JSON lines, and no code, secret, token or full recipient ever leaves the process."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

import worker.logging as worker_logging
from worker.logging import REDACTED, configure_logging, get_logger, mask_recipient

PHONE = "+79522966236"
MASKED_PHONE = "+7952***6236"
EMAIL = "alice@example.com"
MASKED_EMAIL = "a***@example.com"
CODE = "4821"
API_KEY = "kmk_live_9f8e7d6c5b4a"
BEARER = "tok_producer_Zx81Qw"
CALLBACK_TOKEN = "Qm9vLXRva2VuLXNlY3JldA"
ATTEMPT_ID = "01K8N1VMPN0EE389K72YW0CBM2"
CALLBACK_PATH = f"/callbacks/kodmobi/{ATTEMPT_ID}/{CALLBACK_TOKEN}"
STDLIB_LOGGERS = (
    "",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "dramatiq",
    "dramatiq.worker",
    "httpx",
    "httpcore",
)


@pytest.fixture(autouse=True)
def clean_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test configures logging afresh, and leaves the process as it found it."""
    saved = {}
    for name in STDLIB_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.level, logger.propagate, logger.disabled)
        if name:  # as in a fresh process: an earlier test's uvicorn may have set levels
            logger.setLevel(logging.NOTSET)
            logger.disabled = False
    # Secrets registered by one test must not make another pass.
    monkeypatch.setattr(worker_logging, "_known_secrets", set())
    # A system running in this process (the integration tests') logs through structlog too.
    saved_structlog = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved_structlog)
    for name, (handlers, level, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


def configured(fmt: str = "json", **kwargs: Any) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(fmt=fmt, stream=stream, **kwargs)
    return stream


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line is one JSON object: parse them all (a non-JSON line fails the test)."""
    lines = stream.getvalue().splitlines()
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]


def only_record(stream: io.StringIO) -> dict[str, Any]:
    [record] = records(stream)
    return record


def visible_text(record: dict[str, Any]) -> str:
    """What a reader of the log line sees, without the timestamp (whose digits vary)."""
    return json.dumps({k: v for k, v in record.items() if k != "timestamp"})


# -- one JSON object per line ---------------------------------------------------------


def test_structlog_events_are_one_json_object_per_line() -> None:
    # Given JSON logging
    stream = configured()
    log = get_logger("worker.service")

    # When the worker logs two events with bound context
    log.bind(message_id="01MSG", attempt_id="01ATT").info("attempt.accepted", channel="sms")
    log.warning("fallback.triggered", channel="telegram", reason="timed_out")

    # Then each is one JSON object on its own line, with name, level and time
    first, second = records(stream)
    assert first["event"] == "attempt.accepted"
    assert first["level"] == "info"
    assert first["logger"] == "worker.service"
    assert first["message_id"] == "01MSG"
    assert first["attempt_id"] == "01ATT"
    assert first["channel"] == "sms"
    assert first["timestamp"].endswith("Z")
    assert second["event"] == "fallback.triggered"
    assert second["level"] == "warning"


@pytest.mark.parametrize("name", ["uvicorn.error", "dramatiq.worker.WorkerThread", "alembic"])
def test_standard_library_records_come_out_as_json_lines_too(name: str) -> None:
    # Given JSON logging
    stream = configured()

    # When a library logs through the standard library, with %-arguments and extras
    logging.getLogger(name).warning("worker %s stopped after %d tries", "w-1", 3, extra={"n": 1})

    # Then it is one JSON line with the formatted message
    record = only_record(stream)
    assert record["event"] == "worker w-1 stopped after 3 tries"
    assert record["level"] == "warning"
    assert record["logger"] == name
    assert record["n"] == 1


def test_uvicorn_loggers_with_their_own_handlers_are_routed_through_redaction() -> None:
    # Given uvicorn already installed its own handler that prints raw lines
    raw = io.StringIO()
    access = logging.getLogger("uvicorn.access")
    access.addHandler(logging.StreamHandler(raw))
    access.propagate = False

    # When logging is configured and uvicorn logs a request
    stream = configured()
    access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5555", "GET", CALLBACK_PATH, "1.1", 200)

    # Then the line goes through our pipeline only, never raw
    assert raw.getvalue() == ""
    assert only_record(stream)["logger"] == "uvicorn.access"


def test_an_access_log_switched_off_by_uvicorn_stays_off() -> None:
    # Given `uvicorn --no-access-log`: the access logger has no handler and does not propagate
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False

    # When logging is configured and a request is served
    stream = configured()
    access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5555", "GET", "/healthz", "1.1", 200)

    # Then no access line is written
    assert stream.getvalue() == ""


def test_the_level_filters_events() -> None:
    # Given logging at WARNING
    stream = configured(level="warning")

    # When an info and an error are logged
    get_logger("w").info("attempt.accepted")
    logging.getLogger("dramatiq").info("chatter")
    get_logger("w").error("attempt.error")

    # Then only the error is written
    assert [r["event"] for r in records(stream)] == ["attempt.error"]


def test_console_format_writes_readable_redacted_lines() -> None:
    # Given console logging for a developer's terminal
    stream = configured(fmt="console")

    # When the worker logs an event with a recipient and a code
    get_logger("w").info("attempt.accepted", to=PHONE, code=CODE, channel="sms")
    logging.getLogger("uvicorn.error").info("Started server process")

    # Then the lines are readable text, not JSON, and still redacted
    first, second = stream.getvalue().splitlines()
    assert "attempt.accepted" in first
    assert f"to={MASKED_PHONE}" in first
    assert "channel=sms" in first
    assert PHONE not in first
    assert CODE not in first.split(" ", 1)[1]  # past the timestamp
    assert not first.lstrip().startswith("{")
    assert "Started server process" in second


# -- recipients are masked ------------------------------------------------------------


def test_mask_recipient_keeps_enough_to_match_and_no_more() -> None:
    assert mask_recipient(PHONE) == MASKED_PHONE
    assert mask_recipient(EMAIL) == MASKED_EMAIL
    assert mask_recipient("79522966236") == "7952***6236"
    assert mask_recipient("12345") == "***"


@pytest.mark.parametrize(
    ("key", "value", "masked"),
    [
        ("to", PHONE, MASKED_PHONE),
        ("recipient", PHONE, MASKED_PHONE),
        ("phone", PHONE, MASKED_PHONE),
        ("email", EMAIL, MASKED_EMAIL),
        ("to", EMAIL, MASKED_EMAIL),
        ("phone", 79522966236, "7952***6236"),
    ],
)
def test_recipients_are_masked_under_their_keys(key: str, value: Any, masked: str) -> None:
    # Given JSON logging
    stream = configured()

    # When an event names a recipient
    get_logger("w").info("message.accepted", **{key: value})

    # Then the recipient is masked, not removed, so support can still match it
    record = only_record(stream)
    assert record[key] == masked
    assert str(value) not in visible_text(record)


def test_recipients_are_masked_inside_free_text() -> None:
    # Given JSON logging
    stream = configured()

    # When recipients appear inside messages, from structlog and from the stdlib
    get_logger("w").info(f"sending to {PHONE}", note=f"copy to {EMAIL} please")
    logging.getLogger("dramatiq").warning("retrying send to %s / %s", PHONE, EMAIL)

    # Then every mention is masked
    first, second = records(stream)
    assert first["event"] == f"sending to {MASKED_PHONE}"
    assert first["note"] == f"copy to {MASKED_EMAIL} please"
    assert second["event"] == f"retrying send to {MASKED_PHONE} / {MASKED_EMAIL}"
    for record in (first, second):
        assert PHONE not in visible_text(record)
        assert EMAIL not in visible_text(record)


@pytest.mark.parametrize(
    ("written", "masked"),
    [
        ("8 (952) 296-62-36", "8952***6236"),
        ("+7 952 296 62 36", "+7952***6236"),
        ("+7-952-296-6236", "+7952***6236"),
        ("Alice.Smith@Example.com ", "A***@Example.com"),
    ],
)
def test_dramatiq_printing_a_message_as_the_producer_wrote_it_masks_the_recipient(
    written: str, masked: str
) -> None:
    # Given JSON logging, and a producer's message whose recipient is written out loosely
    # (Dramatiq prints arguments as sent, before our intake normalises them)
    import dramatiq

    stream = configured()
    message = dramatiq.Message(
        queue_name="kodmobi", actor_name="send_code", args=(),
        kwargs={"to": written, "metadata": {"phone": written}}, options={},
    )

    # When Dramatiq's own worker and consumer lines print it (issue 12)
    logging.getLogger("dramatiq.worker.WorkerThread").error(
        "Failed to process message %s with unhandled exception.", message
    )
    logging.getLogger("dramatiq.worker.ConsumerThread").warning(
        "Failed to post_process_message(%s) due to a connection error: %s", message, "refused"
    )

    # Then neither line holds the recipient as written, and both hold it masked
    for record in records(stream):
        assert written.strip() not in visible_text(record)
        assert masked in record["event"]


# -- codes are removed ----------------------------------------------------------------


def test_a_code_under_its_key_is_removed() -> None:
    # Given JSON logging
    stream = configured()

    # When an event carries the code
    get_logger("w").info("message.created", code=CODE, to=PHONE)

    # Then the code is gone
    record = only_record(stream)
    assert record["code"] == REDACTED
    assert CODE not in visible_text(record)


def test_codes_in_nested_bodies_are_removed() -> None:
    # Given JSON logging
    stream = configured()

    # When a request body with codes in nested dicts and lists is logged
    body = {
        "to": PHONE,
        "channel": "sms",
        "code": CODE,
        "attempts": [{"code": CODE, "channel": "telegram"}, ("tuple", {"code": CODE})],
        "meta": {"inner": {"code": int(CODE)}},
    }
    get_logger("w").info("kodmobi.request", body=body)

    # Then no code is left anywhere, and the rest of the body is intact
    record = only_record(stream)
    assert CODE not in visible_text(record)
    assert record["body"]["code"] == REDACTED
    assert record["body"]["attempts"][0] == {"code": REDACTED, "channel": "telegram"}
    assert record["body"]["attempts"][1] == ["tuple", {"code": REDACTED}]
    assert record["body"]["meta"]["inner"]["code"] == REDACTED
    assert record["body"]["to"] == MASKED_PHONE
    assert record["body"]["channel"] == "sms"


@pytest.mark.parametrize(
    "text",
    [
        f'request body {{"to": "{PHONE}", "code": "{CODE}"}}',
        f"request body {{'code': '{CODE}'}}",
        f"query ?code={CODE}&session_id=1",
        f"code: {CODE}",
    ],
)
def test_a_code_inside_a_string_is_removed(text: str) -> None:
    # Given JSON logging
    stream = configured()

    # When a body or query string with a code is logged as text, both ways
    get_logger("w").info("kodmobi.request", body=text)
    logging.getLogger("httpx").warning(text)

    # Then the code is gone from both lines
    for record in records(stream):
        assert CODE not in visible_text(record)
        assert REDACTED in visible_text(record)


def test_a_code_in_a_bytes_body_is_removed() -> None:
    # Given JSON logging
    stream = configured()

    # When a raw request body is logged as bytes
    get_logger("w").info("kodmobi.request", body=f'{{"code": "{CODE}", "to": "{PHONE}"}}'.encode())

    # Then it is shown as text, scrubbed
    record = only_record(stream)
    assert CODE not in visible_text(record)
    assert PHONE not in visible_text(record)
    assert MASKED_PHONE in record["body"]


# -- secrets and tokens never appear ---------------------------------------------------


def test_the_api_key_never_appears() -> None:
    # Given JSON logging that knows the API key
    stream = configured(secrets=[API_KEY])

    # When the key shows up under its own names and in text
    log = get_logger("w")
    log.info("kodmobi.request", headers={"x-api-key": API_KEY, "Accept": "application/json"})
    log.info("config", api_key=API_KEY)
    log.info(f"calling kod.mobi with key {API_KEY}")
    logging.getLogger("httpx").warning("sent header x-api-key: %s", API_KEY)

    # Then it is nowhere in the output
    output = stream.getvalue()
    assert API_KEY not in output
    assert len(records(stream)) == 4
    assert records(stream)[0]["headers"]["Accept"] == "application/json"


def test_bearer_tokens_never_appear() -> None:
    # Given JSON logging
    stream = configured()

    # When a producer's Authorization header is logged, as a dict and as text
    log = get_logger("w")
    log.info("api.request", headers={"Authorization": f"Bearer {BEARER}"})
    log.info("api.request", raw=f"Authorization: Bearer {BEARER}")
    logging.getLogger("uvicorn.error").warning("bad header Authorization: Bearer %s", BEARER)

    # Then the token is nowhere in the output
    assert BEARER not in stream.getvalue()
    assert len(records(stream)) == 3


def test_callback_tokens_in_uvicorn_access_lines_never_appear() -> None:
    # Given JSON logging
    stream = configured()

    # When uvicorn logs kod.mobi's callback request the way it does
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "10.0.0.7:51234", "POST", CALLBACK_PATH, "1.1", 200
    )
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d',
        "10.0.0.7:51234",
        "GET",
        f"{CALLBACK_PATH}?status=delivered",
        "1.1",
        200,
    )

    # Then the token is gone but the attempt id stays, for support
    first, second = records(stream)
    assert CALLBACK_TOKEN not in stream.getvalue()
    assert f"/callbacks/kodmobi/{ATTEMPT_ID}/{REDACTED}" in first["event"]
    assert "?status=delivered" in second["event"]


def test_callback_urls_in_events_never_carry_the_token() -> None:
    # Given JSON logging
    stream = configured()

    # When the worker logs the callback URL it handed to kod.mobi
    get_logger("w").info(
        "attempt.sending",
        callback_url=f"https://worker.example.com{CALLBACK_PATH}",
        body={"callback_url": f"https://worker.example.com{CALLBACK_PATH}"},
    )

    # Then the token is gone from both
    record = only_record(stream)
    assert CALLBACK_TOKEN not in visible_text(record)
    assert record["callback_url"].endswith(f"/{ATTEMPT_ID}/{REDACTED}")


def test_registered_secrets_never_appear_anywhere() -> None:
    # Given JSON logging told about the process's secrets
    callback_secret = "cbsecret-0123456789abcdef"
    code_key = "codekey-fedcba9876543210"
    stream = configured(secrets=[callback_secret, code_key, BEARER])

    # When they appear in places no rule foresaw
    get_logger("w").info("debug dump", blob=f"{callback_secret}|{code_key}", items=[BEARER])
    logging.getLogger("dramatiq").warning("env has %s and %s", callback_secret, code_key)

    # Then none of them is in the output
    output = stream.getvalue()
    for secret in (callback_secret, code_key, BEARER):
        assert secret not in output
    assert len(records(stream)) == 2


# -- exceptions -----------------------------------------------------------------------


def _fail() -> None:
    raise ValueError(
        f"kod.mobi refused {PHONE} code={CODE} key {API_KEY} "
        f"at https://w.example.com{CALLBACK_PATH} with Bearer {BEARER}"
    )


def test_structlog_exception_tracebacks_are_scrubbed() -> None:
    # Given JSON logging that knows the API key
    stream = configured(secrets=[API_KEY])

    # When an exception whose message carries secrets is logged with its traceback
    try:
        _fail()
    except ValueError:
        get_logger("w").exception("attempt.error")

    # Then the traceback is there, but scrubbed
    record = only_record(stream)
    assert "Traceback" in record["exception"]
    assert "ValueError" in record["exception"]
    assert MASKED_PHONE in record["exception"]
    for secret in (PHONE, CODE, API_KEY, CALLBACK_TOKEN, BEARER):
        assert secret not in visible_text(record)


def test_stdlib_exception_tracebacks_are_scrubbed() -> None:
    # Given JSON logging that knows the API key
    stream = configured(secrets=[API_KEY])

    # When dramatiq logs a failed actor with its traceback
    try:
        _fail()
    except ValueError:
        logging.getLogger("dramatiq.worker").exception("Failed to process message")

    # Then the traceback is there, but scrubbed
    record = only_record(stream)
    assert "ValueError" in record["exception"]
    for secret in (PHONE, CODE, API_KEY, CALLBACK_TOKEN, BEARER):
        assert secret not in visible_text(record)


def test_an_exception_logged_as_a_value_is_scrubbed() -> None:
    # Given JSON logging that knows the API key
    stream = configured(secrets=[API_KEY])

    # When an exception object is logged as a field
    try:
        _fail()
    except ValueError as exc:
        get_logger("w").warning("attempt.error", error=exc)

    # Then its text is shown, scrubbed
    record = only_record(stream)
    assert record["error"].startswith("ValueError(")
    for secret in (PHONE, CODE, API_KEY, CALLBACK_TOKEN, BEARER):
        assert secret not in visible_text(record)
