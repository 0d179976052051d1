"""End to end: what the worker does when kod.mobi refuses or fails a send (DESIGN §7)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.support.system import System, magic_phone
from worker.rules import BASE_BACKOFF_S, TRANSIENT_TRIES

#: The shortest time transient retries can take: each backoff is at least half its cap.
MIN_TRANSIENT_BACKOFF_S = sum(BASE_BACKOFF_S * 2 ** (t - 1) / 2 for t in range(1, TRANSIENT_TRIES))


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _seconds(start: str, end: str) -> float:
    return (_at(end) - _at(start)).total_seconds()


def _send(system: System, to: str, channels: list[str], **extra: Any) -> str:
    response = system.api.post("/v1/messages", json={"to": to, "channels": channels, **extra})
    assert response.status_code == 202, response.text
    message_id: str = response.json()["id"]
    return message_id


#: The slow scenarios (backoff, Retry-After, TTL): recipient, chain and extra fields.
SLOW = {
    "500": (magic_phone(telegram=20, whatsapp=0), ["telegram", "whatsapp"], {}),
    "503": (magic_phone(telegram=21, whatsapp=0), ["telegram", "whatsapp"], {}),
    "5xx-everywhere": (magic_phone(telegram=20, whatsapp=21), ["telegram", "whatsapp"], {}),
    "429": (magic_phone(telegram=16, whatsapp=0), ["telegram", "whatsapp"], {"ttl_s": 10}),
    "balance-ttl": (
        magic_phone(telegram=17, whatsapp=0, sms=1),
        ["telegram", "whatsapp"],
        {"ttl_s": 10},
    ),
}


@pytest.fixture(scope="module")
def started(system: System) -> dict[str, str]:
    """The slow scenarios' messages, all sent at once so that the suite waits for them once."""
    return {name: _send(system, to, chain, **extra) for name, (to, chain, extra) in SLOW.items()}


@pytest.mark.parametrize(
    ("scenario", "http_status", "error_code", "reason"),
    [
        pytest.param("500", 500, "ERROR_INTERNAL", "ERROR_INTERNAL", id="500"),
        pytest.param("503", 503, None, "http_503", id="503-not-json"),
    ],
)
def test_server_errors_are_retried_with_backoff_then_the_next_channel_delivers(
    system: System,
    started: dict[str, str],
    scenario: str,
    http_status: int,
    error_code: str | None,
    reason: str,
) -> None:
    # Given kod.mobi that fails every telegram send to this recipient with a 5xx (magic 20,
    # 21), when a code is sent over telegram, then whatsapp
    to = SLOW[scenario][0]
    final = system.wait_final(started[scenario], timeout_s=20)
    # Then telegram was tried several times, backing off, until its budget ran out
    assert final["status"] == "delivered"
    telegram, whatsapp = final["attempts"]
    assert (telegram["channel"], telegram["status"]) == ("telegram", "error")
    assert telegram["reason"] == f"retries exhausted: {reason}"
    assert (telegram["http_status"], telegram["error_code"]) == (http_status, error_code)
    assert 1 < telegram["tries"] == TRANSIENT_TRIES
    assert _seconds(telegram["created_at"], telegram["finished_at"]) >= MIN_TRANSIENT_BACKOFF_S
    # And whatsapp delivered the code
    assert (whatsapp["channel"], whatsapp["status"], whatsapp["tries"]) == (
        "whatsapp",
        "delivered",
        1,
    )
    assert [s["channel"] for s in system.sandbox_sends(to)] == ["whatsapp"]


def test_server_errors_on_every_channel_fail_the_message(
    system: System, started: dict[str, str]
) -> None:
    # Given 5xx on telegram and on whatsapp, when a code is sent over both
    to = SLOW["5xx-everywhere"][0]
    final = system.wait_final(started["5xx-everywhere"], timeout_s=30)
    # Then each channel used its retry budget, and the message failed
    assert final["status"] == "failed"
    assert [(a["channel"], a["status"], a["tries"]) for a in final["attempts"]] == [
        ("telegram", "error", TRANSIENT_TRIES),
        ("whatsapp", "error", TRANSIENT_TRIES),
    ]
    assert final["failure_reason"] == "all channels failed; last: retries exhausted: http_503"
    assert system.sandbox_sends(to) == []


def test_throttling_is_retried_after_retry_after_and_never_falls_back(
    system: System, started: dict[str, str]
) -> None:
    # Given kod.mobi that always throttles telegram (429 ERROR_MESSAGE_ATTEMPT, Retry-After: 1),
    # when a code that lives 10 s is sent over telegram, then whatsapp
    to = SLOW["429"][0]
    final = system.wait_final(started["429"], timeout_s=20)
    [telegram] = final["attempts"]
    # Then telegram is retried, never sooner than Retry-After, while a retry fits in the TTL
    assert (telegram["http_status"], telegram["error_code"]) == (429, "ERROR_MESSAGE_ATTEMPT")
    assert telegram["tries"] >= 4, telegram  # 1 s, 1 s, 1-2 s, 2-4 s all fit in 10 s
    assert _seconds(telegram["created_at"], telegram["sent_at"]) >= telegram["tries"] - 1
    # And no other channel is tried (DESIGN §7: throttling is retried, not a fallback):
    # once no retry fits, the attempt waits and the code expires
    assert final["status"] == "expired", final
    assert telegram["status"] == "error"
    assert telegram["reason"].startswith(
        "ERROR_MESSAGE_ATTEMPT: no retry fits before the code expires"
    )
    assert _at(telegram["sent_at"]) < _at(final["expires_at"])
    assert system.sandbox_sends(to) == []


def test_a_refused_request_falls_back_at_once(system: System) -> None:
    # Given kod.mobi that answers telegram sends with ERROR_BAD_REQUEST
    to = magic_phone(telegram=19, whatsapp=0)
    final = system.wait_final(_send(system, to, ["telegram", "whatsapp"]))
    # Then telegram is not retried: whatsapp takes over at once
    assert final["status"] == "delivered"
    telegram, whatsapp = final["attempts"]
    assert (telegram["status"], telegram["tries"], telegram["reason"]) == (
        "error",
        1,
        "refused: ERROR_BAD_REQUEST",
    )
    assert (telegram["http_status"], telegram["error_code"]) == (400, "ERROR_BAD_REQUEST")
    assert (whatsapp["channel"], whatsapp["status"]) == ("whatsapp", "delivered")


def _db(system: System) -> psycopg.Connection[Any]:
    url = make_url(system.db_url).set(drivername="postgresql")
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


@pytest.mark.parametrize(
    ("magic", "error_code"), [(17, "ERROR_WRONG_BALANCE"), (18, "ERROR_ACCESS_DENIED")]
)
def test_account_errors_are_retried_not_fallen_back(
    system: System, magic: int, error_code: str
) -> None:
    # Given kod.mobi that refuses our account (balance, access) on telegram
    to = magic_phone(telegram=magic, whatsapp=0)
    message_id = _send(system, to, ["telegram", "whatsapp"], ttl_s=60)
    try:
        # When the worker has tried telegram more than once
        deadline = time.monotonic() + 10
        while True:
            message = system.message(message_id)
            if message["attempts"][0]["tries"] >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        # Then it is still retrying telegram: another channel would not help
        assert message["status"] not in ("delivered", "failed", "expired"), message
        [telegram] = message["attempts"]
        assert telegram["tries"] >= 2, telegram
        assert telegram["status"] in ("queued", "sending"), telegram
        assert telegram["error_code"] == error_code
        assert system.sandbox_sends(to) == []
    finally:
        # Let the code expire now rather than keep retrying through later tests
        with _db(system) as conn:
            conn.execute("UPDATE messages SET expires_at = now() WHERE id = %s", (message_id,))
    expired = system.wait_final(message_id)
    assert expired["status"] == "expired"
    assert system.sandbox_sends(to) == []


def test_account_errors_never_fall_back_even_when_the_ttl_runs_out(
    system: System, started: dict[str, str]
) -> None:
    # Given kod.mobi that refuses our account on every telegram send (ERROR_WRONG_BALANCE),
    # when a code that lives 10 s is sent over telegram, then whatsapp
    to = SLOW["balance-ttl"][0]
    final = system.wait_final(started["balance-ttl"], timeout_s=20)
    # Then telegram was retried until the code expired, and no other channel was tried
    assert final["status"] == "expired", final
    [telegram] = final["attempts"]
    assert telegram["tries"] > 1
    assert system.sandbox_sends(to) == []


def test_a_blocked_recipient_fails_the_message_with_one_attempt(system: System) -> None:
    # Given kod.mobi that says the recipient is blocked (ERROR_BLOCKED)
    to = magic_phone(telegram=15, whatsapp=0, sms=0)
    final = system.wait_final(_send(system, to, ["telegram", "whatsapp", "sms"]))
    # Then the message fails at once, without trying the other channels
    assert final["status"] == "failed"
    [telegram] = final["attempts"]
    assert (telegram["status"], telegram["tries"], telegram["error_code"]) == (
        "error",
        1,
        "ERROR_BLOCKED",
    )
    assert final["failure_reason"] == "recipient blocked: ERROR_BLOCKED"
    assert system.sandbox_sends(to) == []
