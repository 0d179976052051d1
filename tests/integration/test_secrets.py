"""No code, key, token or secret in the logs, and no readable code in the database.

It stands alone, wherever it runs in the session: it sets up the process's logging itself,
exactly as a worker process does (`configure_process_logging` with the system's settings),
with the root handler writing into a buffer of its own; it drives a representative set of
scenarios through the running system; then it looks for every secret it knows of in that
buffer and in everything the process wrote to its stdout and stderr meanwhile (so a line
that bypassed the root logger, as a structlog left at its defaults does, is searched too).
The Dramatiq worker, the sandbox and the web app all run in this process; uvicorn's loggers
are routed to the root logger at INFO, as in production (the harness's uvicorn runs quieter).
Everything it changes in the logging set-up is put back afterwards.
"""

from __future__ import annotations

import io
import logging
import re
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import structlog
from cryptography.exceptions import InvalidTag

from tests.support.db import connect
from tests.support.system import (
    API_KEY,
    API_TOKEN,
    CALLBACK_SECRET,
    CODE_KEY,
    System,
    callback_token_for,
    magic_phone,
    unique_phone,
)
from worker import logging as worker_logging
from worker.security import CodeBox
from worker.settings import Settings
from worker.wiring import configure_process_logging

OTHER_API_TOKEN = "other-token-zzzzzzzz"  # the system's second API_TOKENS entry
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
EVENTS = ("message.accepted", "attempt.accepted", "callback.applied", "fallback.triggered")


def new_code() -> str:
    return f"{secrets.randbelow(10**6):06d}"


def standalone(code: str) -> re.Pattern[str]:
    """A code as a token of its own: not a run of digits inside a longer number, an id or
    the fraction of a timestamp."""
    return re.compile(rf"(?<![\w.]){re.escape(code)}(?!\w)")


@contextmanager
def process_logs(settings: Settings) -> Iterator[io.StringIO]:
    """The process's own logging, freshly set up, writing every record into the buffer."""
    root = logging.getLogger()
    routed = (*UVICORN_LOGGERS, "dramatiq", "httpx", "httpcore")
    saved_root = (root.handlers[:], root.level)
    saved = {name: _logger_state(logging.getLogger(name)) for name in routed}
    saved_structlog = structlog.get_config()
    saved_secrets = set(worker_logging._known_secrets)
    buffer = io.StringIO()
    try:
        # As a fresh process: only the secrets its own set-up registers are scrubbed.
        worker_logging._known_secrets.clear()
        configure_process_logging(settings)
        (handler,) = root.handlers
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(buffer)
        for name in UVICORN_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
        yield buffer
    finally:
        root.handlers[:], level = saved_root
        root.setLevel(level)
        for name, state in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:], level, logger.propagate = state
            logger.setLevel(level)
        structlog.configure(**saved_structlog)
        worker_logging._known_secrets.clear()
        worker_logging._known_secrets.update(saved_secrets)


def _logger_state(logger: logging.Logger) -> tuple[list[logging.Handler], int, bool]:
    return logger.handlers[:], logger.level, logger.propagate


def run_scenarios(system: System, web: httpx.Client) -> dict[str, Any]:
    """Drive one of each kind of traffic; return the explicit codes and the messages made."""
    codes: list[str] = []
    message_ids: list[str] = []
    keys: list[str] = []

    def post(body: dict[str, Any]) -> str:
        response = web.post(
            "/v1/messages", json=body, headers={"Idempotency-Key": uuid.uuid4().hex}
        )
        assert response.status_code == 202, response.text
        message_ids.append(response.json()["id"])
        return str(response.json()["id"])

    # HTTP intake with an explicit code, and with a drawn one
    explicit = new_code()
    codes.append(explicit)
    with_code = post({"to": unique_phone(), "channels": ["sms"], "code": explicit})
    post({"to": unique_phone(), "channels": ["telegram"]})
    # Raw Dramatiq, with a code to a phone and with a drawn code to an email address
    raw_code = new_code()
    codes.append(raw_code)
    keys.append(system.send_raw(to=unique_phone(), channels=["whatsapp"], code=raw_code))
    keys.append(system.send_raw(to=f"user-{uuid.uuid4().hex[:8]}@example.com"))
    # Fallbacks: a refused channel, a failure callback, silence past the deadline, a 5xx
    # kod.mobi keeps answering; and a blocked recipient
    refused_code = new_code()
    codes.append(refused_code)
    post({"to": magic_phone(10, 0), "channels": ["telegram", "whatsapp"], "code": refused_code})
    post({"to": magic_phone(1, 0), "channels": ["telegram", "whatsapp"]})
    post({"to": magic_phone(2, 0), "channels": ["telegram", "whatsapp"]})
    post({"to": magic_phone(20, 0), "channels": ["telegram", "whatsapp"]})
    post({"to": magic_phone(14), "channels": ["telegram"]})
    # Bad input carrying a code, over HTTP and Dramatiq
    bad_code, bad_raw_code = new_code(), new_code()
    codes += [bad_code, bad_raw_code]
    refused = web.post("/v1/messages", json={"to": "not-a-phone", "code": bad_code})
    assert refused.status_code == 422
    keys.append(system.send_raw(to="not-a-phone", channels=["sms"], code=bad_raw_code))
    # A bearer token that is not ours, on a request with a code: 401
    unauthorised_code = new_code()
    codes.append(unauthorised_code)
    wrong_bearer = f"wrong-bearer-{uuid.uuid4().hex}"
    denied = httpx.post(
        f"{system.web_url}/v1/messages",
        json={"to": unique_phone(), "code": unauthorised_code},
        headers={"Authorization": f"Bearer {wrong_bearer}"},
        timeout=10,
    )
    assert denied.status_code == 401

    # Once the first is delivered: callbacks by hand, forged and genuine, and code checks
    delivered = system.wait_final(with_code)
    attempt_id = delivered["attempts"][0]["id"]
    forged = httpx.post(
        f"{system.web_url}/callbacks/kodmobi/{attempt_id}/{callback_token_for('x')}",
        json={"status": "delivered", "code": explicit},
        timeout=10,
    )
    assert forged.status_code == 404
    token = callback_token_for(attempt_id)
    genuine = httpx.get(
        f"{system.web_url}/callbacks/kodmobi/{attempt_id}/{token}",
        params={"status": "delivered", "code": explicit},
        timeout=10,
    )
    assert genuine.status_code == 200
    wrong = "000000" if explicit != "000000" else "111111"
    check = f"/v1/messages/{with_code}/check"
    assert web.post(check, json={"code": wrong}).json()["valid"] is False
    assert web.post(check, json={"code": explicit}).json()["valid"] is True
    return {"codes": codes, "message_ids": message_ids, "keys": keys, "bearer": wrong_bearer}


def sent_codes(system: System, message: dict[str, Any]) -> list[str]:
    """The codes the sandbox received for this message's attempts."""
    ours = {a["kodmobi_message_id"] for a in message["attempts"]} - {None}
    return [s["code"] for s in system.sandbox_sends(message["to"]) if s["message_id"] in ours]


def test_no_code_key_token_or_secret_reaches_the_logs(
    system: System, capfd: pytest.CaptureFixture[str]
) -> None:
    # Given the process's logging, set up as a worker process sets it up, into a buffer;
    # and the process's stdout and stderr captured besides
    capfd.readouterr()
    with (
        process_logs(system.root.settings) as logs,
        httpx.Client(
            base_url=system.web_url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10
        ) as web,
    ):
        # When every kind of traffic passes through the system, and ends
        made = run_scenarios(system, web)
        finals = [system.wait_final(m, timeout_s=30) for m in made["message_ids"]]
        finals += [system.wait_key_final(k, timeout_s=30) for k in made["keys"]]
    printed = capfd.readouterr()
    text = "\n".join((logs.getvalue(), printed.out, printed.err))

    # Then the capture holds the story (so the search below cannot pass on an empty log)
    for event in (*EVENTS, "callback.rejected", "message.rejected", "attempt.retry_scheduled"):
        assert event in text, f"{event} was never logged"
    assert "/callbacks/kodmobi/" in text, "no access line with a callback URL was captured"

    # And no code appears, whether given by the producer or drawn by the worker
    codes = set(made["codes"])
    for message in finals:
        codes.update(sent_codes(system, message))
    # (every scenario ran to its end: eight delivered, the blocked one failed, bad input
    # rejected; and the five drawn codes were found in the sandbox)
    assert sorted(m["status"] for m in finals) == ["delivered"] * 8 + ["failed", "rejected"]
    assert len(codes) >= len(made["codes"]) + 5
    leaked_codes = sorted(c for c in codes if standalone(c).search(text))
    assert not leaked_codes, f"codes in the logs: {leaked_codes}"

    # And neither does any key, bearer token, secret, or callback token of any attempt
    with connect(system) as conn:
        attempt_ids = [row["id"] for row in conn.execute("SELECT id FROM attempts")]
    named = {
        "KODMOBI_API_KEY": API_KEY,
        "API_TOKENS[1]": API_TOKEN,
        "API_TOKENS[0]": OTHER_API_TOKEN,
        "a rejected bearer token": made["bearer"],
        "CALLBACK_SECRET": CALLBACK_SECRET,
        "CODE_KEY": CODE_KEY,
    }
    named.update(
        {f"callback token of {a}": callback_token_for(a) for a in attempt_ids}
    )
    leaked = sorted(name for name, secret in named.items() if secret in text)
    assert not leaked, f"in the logs: {leaked}"


# -- codes at rest -----------------------------------------------------------------------


@pytest.fixture
def stored(system: System) -> tuple[str, str, dict[str, Any]]:
    """A delivered message with a known code, and its `messages` row as stored."""
    code = new_code()
    created = system.api.post(
        "/v1/messages", json={"to": unique_phone(), "channels": ["sms"], "code": code}
    )
    message_id = created.json()["id"]
    system.wait_final(message_id)
    with connect(system) as conn:
        row = conn.execute("SELECT * FROM messages WHERE id = %s", (message_id,)).fetchone()
    assert row is not None
    return code, message_id, row


def test_the_code_is_nowhere_in_its_database_row(stored: tuple[str, str, dict[str, Any]]) -> None:
    # Given a message whose code we know
    code, _, row = stored
    # When its row is read straight from the database, every column
    # Then the code is in none of them, as text or as bytes
    for column, value in row.items():
        if isinstance(value, bytes | bytearray | memoryview):
            assert code.encode() not in bytes(value), column
        else:
            assert not standalone(code).search(str(value)), column
    assert row["code_ciphertext"], "the row holds no sealed code at all"


def test_only_code_key_opens_the_stored_code(stored: tuple[str, str, dict[str, Any]]) -> None:
    code, message_id, row = stored
    sealed = bytes(row["code_ciphertext"])
    # With CODE_KEY, the code comes back
    assert CodeBox(CODE_KEY).open(sealed, message_id) == code
    # With another key, it does not
    with pytest.raises(InvalidTag):
        CodeBox("another-key-0123456789").open(sealed, message_id)
    # Nor when copied onto another message's row
    with pytest.raises(InvalidTag):
        CodeBox(CODE_KEY).open(sealed, uuid.uuid4().hex)
