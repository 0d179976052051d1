"""End to end: kod.mobi's delivery callbacks (DESIGN §6), sent by hand at real attempts
and by the sandbox itself."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from ulid import ULID

from tests.support.callbacks import Awaiting, awaiting_callback
from tests.support.db import connect
from tests.support.system import System, callback_token_for, magic_phone, unique_phone
from tests.support.waiting import wait_for
from worker.security import callback_token

MAX_BODY = 64 * 1024


def events(system: System, attempt_id: str) -> list[dict[str, Any]]:
    """The callback_events rows of an attempt, oldest first."""
    with connect(system) as conn:
        return conn.execute(
            "SELECT method, content_type, status_word, parsed_status, kodmobi_message_id,"
            " applied, outcome, duplicates, raw_body FROM callback_events"
            " WHERE attempt_id = %s ORDER BY id",
            (attempt_id,),
        ).fetchall()


class Waiting(Awaiting):
    """A silent attempt with the genuine callback URL and its events at hand."""

    @property
    def url(self) -> str:
        return callback_url(self.system, self.attempt_id)

    def attempt(self) -> dict[str, Any]:
        found: dict[str, Any] = self.message()["attempts"][0]
        return found

    def post(self, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url, timeout=10, **kwargs)

    def events(self) -> list[dict[str, Any]]:
        return events(self.system, self.attempt_id)


def callback_url(system: System, attempt_id: str, token: str | None = None) -> str:
    token = callback_token_for(attempt_id) if token is None else token
    return f"{system.web_url}/callbacks/kodmobi/{attempt_id}/{token}"


@pytest.fixture
def waiting(system: System) -> Waiting:
    return awaiting_callback(system, Waiting)


def assert_delivered_on_telegram(waiting: Waiting) -> dict[str, Any]:
    message = waiting.message()
    assert message["status"] == "delivered", message
    assert message["delivered_at"] is not None
    assert [(a["channel"], a["status"]) for a in message["attempts"]] == [
        ("telegram", "delivered"),
    ]
    return message


def assert_untouched(waiting: Waiting) -> None:
    message = waiting.message()
    assert message["status"] == "sent", message
    assert [(a["channel"], a["status"]) for a in message["attempts"]] == [
        ("telegram", "accepted"),
    ]


# -- the three ways a callback may come ----------------------------------------------


def test_json_post_applies_delivered(waiting: Waiting) -> None:
    # When kod.mobi POSTs JSON saying delivered
    response = waiting.post(
        json={"message_id": waiting.kodmobi_message_id, "status": "delivered", "to": "x"}
    )
    # Then it is stored and applied: the message is delivered on its first channel
    assert response.status_code == 200, response.text
    assert response.json() == {"ok": True, "outcome": "delivered"}
    assert_delivered_on_telegram(waiting)
    [event] = waiting.events()
    assert (event["method"], event["status_word"], event["applied"]) == ("POST", "delivered", True)
    assert event["kodmobi_message_id"] == waiting.kodmobi_message_id
    assert json.loads(event["raw_body"])["status"] == "delivered"


def test_form_post_applies_delivered(waiting: Waiting) -> None:
    response = waiting.post(
        data={"message_id": str(waiting.kodmobi_message_id), "status": "delivered"}
    )
    assert response.status_code == 200, response.text
    assert_delivered_on_telegram(waiting)
    [event] = waiting.events()
    assert event["content_type"].startswith("application/x-www-form-urlencoded")
    assert event["applied"] is True


def test_multipart_form_post_applies_delivered(waiting: Waiting) -> None:
    response = waiting.post(
        data={"status": "delivered"}, files={"attachment": ("a.txt", b"ignored")}
    )
    assert response.status_code == 200, response.text
    assert_delivered_on_telegram(waiting)


def test_get_with_a_query_string_applies_delivered(waiting: Waiting) -> None:
    response = httpx.get(
        waiting.url,
        params={"message_id": waiting.kodmobi_message_id, "status": "delivered"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert_delivered_on_telegram(waiting)
    [event] = waiting.events()
    assert (event["method"], event["applied"]) == ("GET", True)


def test_state_is_read_when_there_is_no_status(waiting: Waiting) -> None:
    response = waiting.post(json={"message_id": waiting.kodmobi_message_id, "state": "delivered"})
    assert response.status_code == 200, response.text
    assert_delivered_on_telegram(waiting)


# -- the status words ----------------------------------------------------------------


@pytest.mark.parametrize(
    "word", ["delivered", "read", "seen", "success", "ok", "DELIVERED", " Read "]
)
def test_words_meaning_delivered(waiting: Waiting, word: str) -> None:
    response = waiting.post(json={"status": word})
    assert response.json() == {"ok": True, "outcome": "delivered"}
    assert_delivered_on_telegram(waiting)


@pytest.mark.parametrize(
    "word", ["failed", "error", "undelivered", "rejected", "expired", "blocked", "Undelivered"]
)
def test_words_meaning_failed_fall_back_to_the_next_channel(
    system: System, waiting: Waiting, word: str
) -> None:
    # When kod.mobi calls back with a failure word
    response = waiting.post(json={"message_id": waiting.kodmobi_message_id, "status": word})
    # Then the attempt fails with that reason and whatsapp (the next channel) delivers
    assert response.json() == {"ok": True, "outcome": "failed"}
    final = system.wait_final(waiting.message_id)
    assert final["status"] == "delivered"
    first, second = final["attempts"]
    assert (first["channel"], first["status"]) == ("telegram", "failed")
    assert first["reason"] == f"failure callback: {word.lower()}"
    assert (second["channel"], second["status"]) == ("whatsapp", "delivered")


@pytest.mark.parametrize("word", ["sent", "queued", "accepted", "pending", "sending", "SENT"])
def test_words_meaning_progress_are_not_final(waiting: Waiting, word: str) -> None:
    # When kod.mobi reports progress only
    response = waiting.post(json={"message_id": waiting.kodmobi_message_id, "status": word})
    # Then it is stored, and the attempt still waits for its final callback
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] in ("progress", "progress_noted")
    assert_untouched(waiting)
    [event] = waiting.events()
    assert event["parsed_status"] == "progress"
    # And a final callback afterwards still applies
    assert waiting.post(json={"status": "delivered"}).json()["outcome"] == "delivered"
    assert_delivered_on_telegram(waiting)


@pytest.mark.parametrize(
    "body",
    [{"status": "exploded"}, {"status": ""}, {"message_id": 1}, {"status": ["delivered"]}, {}],
    ids=["unknown-word", "empty", "no-status", "list", "empty-object"],
)
def test_unknown_status_is_stored_and_not_applied(waiting: Waiting, body: dict[str, Any]) -> None:
    response = waiting.post(json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"ok": True, "outcome": "unknown_status"}
    assert_untouched(waiting)
    [event] = waiting.events()
    assert (event["parsed_status"], event["applied"], event["outcome"]) == (
        "unknown",
        False,
        "unknown_status",
    )


# -- authentication ------------------------------------------------------------------


def test_a_forged_token_or_unknown_attempt_is_404_and_changes_nothing(
    system: System, waiting: Waiting
) -> None:
    other = awaiting_callback(system, Waiting)
    unknown = str(ULID())
    token = callback_token_for(waiting.attempt_id)
    wrong_secret = callback_token("another-secret-0123456789", waiting.attempt_id, 2**40)
    others_token = callback_token_for(other.attempt_id)
    forged = [
        callback_url(system, waiting.attempt_id, token="A" * len(token)),
        callback_url(system, waiting.attempt_id, token=token[:-1]),
        callback_url(system, waiting.attempt_id, token=token + "A"),
        callback_url(system, waiting.attempt_id, token=token.lower()),
        callback_url(system, waiting.attempt_id, token=wrong_secret),
        # a genuine token of another attempt
        callback_url(system, waiting.attempt_id, token=others_token),
        # an attempt that does not exist, with a token that fits it
        callback_url(system, unknown),
        callback_url(system, unknown.lower()),
    ]
    for url in forged:
        # When someone without the right token calls back, by POST or GET
        posted = httpx.post(url, json={"status": "delivered"}, timeout=10)
        got = httpx.get(url, params={"status": "failed"}, timeout=10)
        # Then the answer is 404 either way
        assert (posted.status_code, got.status_code) == (404, 404), url
    # And nothing was stored or changed
    assert_untouched(waiting)
    assert_untouched(other)
    assert waiting.events() == [] and other.events() == []
    assert events(system, unknown) == []


# -- repeats and order ---------------------------------------------------------------


def test_a_duplicate_callback_is_stored_once_and_not_applied_again(waiting: Waiting) -> None:
    # Given a delivered callback already applied
    first = waiting.post(json={"message_id": waiting.kodmobi_message_id, "status": "delivered"})
    delivered = assert_delivered_on_telegram(waiting)
    # When kod.mobi sends it again, twice
    again = [
        waiting.post(json={"message_id": waiting.kodmobi_message_id, "status": "delivered"})
        for _ in range(2)
    ]
    # Then each repeat is acknowledged as a duplicate and changes nothing
    assert first.json()["outcome"] == "delivered"
    assert [r.json() for r in again] == [{"ok": True, "outcome": "duplicate"}] * 2
    assert waiting.message() == delivered
    [event] = waiting.events()
    assert (event["applied"], event["outcome"], event["duplicates"]) == (True, "delivered", 2)


def test_concurrent_duplicate_failures_fall_back_once(system: System, waiting: Waiting) -> None:
    # When the same failure callback arrives eight times at once
    go = threading.Barrier(8)
    answers: list[int] = []

    def call_back() -> None:
        go.wait()
        answers.append(waiting.post(json={"status": "failed"}).status_code)

    threads = [threading.Thread(target=call_back) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then it is applied once: one fallback, one whatsapp send
    assert answers == [200] * 8
    final = system.wait_final(waiting.message_id)
    assert [(a["channel"], a["status"]) for a in final["attempts"]] == [
        ("telegram", "failed"),
        ("whatsapp", "delivered"),
    ]
    [event] = waiting.events()
    assert event["duplicates"] == 7


def test_a_stale_progress_after_delivered_leaves_it_delivered(waiting: Waiting) -> None:
    waiting.post(json={"status": "delivered"})
    delivered = assert_delivered_on_telegram(waiting)
    late = waiting.post(json={"status": "sent"})
    assert late.status_code == 200
    assert late.json()["outcome"] != "progress"
    assert waiting.message() == delivered
    assert [(e["status_word"], e["applied"]) for e in waiting.events()] == [
        ("delivered", True),
        ("sent", False),
    ]


def test_a_failure_after_delivered_never_moves_it_back(waiting: Waiting) -> None:
    waiting.post(json={"status": "delivered"})
    delivered = assert_delivered_on_telegram(waiting)
    for word in ("failed", "undelivered", "error"):
        answer = waiting.post(json={"status": word})
        assert answer.json() == {"ok": True, "outcome": "stale"}
    assert waiting.message() == delivered  # no fallback, no second attempt


def test_a_callback_about_another_kodmobi_message_is_recorded_not_applied(
    waiting: Waiting,
) -> None:
    response = waiting.post(
        json={"message_id": waiting.kodmobi_message_id + 1000, "status": "delivered"}
    )
    assert response.status_code == 200
    assert response.json() == {"ok": True, "outcome": "message_id_mismatch"}
    assert_untouched(waiting)
    [event] = waiting.events()
    assert (event["kodmobi_message_id"], event["applied"]) == (
        waiting.kodmobi_message_id + 1000,
        False,
    )


def test_a_mismatched_callback_does_not_shadow_the_genuine_one(waiting: Waiting) -> None:
    # Given a callback about another kod.mobi message, recorded and not applied
    waiting.post(json={"message_id": waiting.kodmobi_message_id + 1000, "status": "delivered"})
    # When the genuine callback for our message arrives
    genuine = waiting.post(json={"message_id": waiting.kodmobi_message_id, "status": "delivered"})
    # Then it is applied: it is not a duplicate of a callback about something else
    assert genuine.json() == {"ok": True, "outcome": "delivered"}
    assert_delivered_on_telegram(waiting)


# -- unreadable callbacks ------------------------------------------------------------


def test_a_body_over_64_kib_is_413_and_stores_nothing(waiting: Waiting) -> None:
    padding = "x" * MAX_BODY
    declared = waiting.post(json={"status": "delivered", "padding": padding})

    def chunks() -> Iterator[bytes]:  # no Content-Length: the size is counted as it comes
        yield b'{"status": "delivered", "padding": "'
        for _ in range(17):
            yield b"x" * 4096
        yield b'"}'

    streamed = waiting.post(content=chunks(), headers={"content-type": "application/json"})
    assert (declared.status_code, streamed.status_code) == (413, 413)
    assert_untouched(waiting)
    assert waiting.events() == []


def test_a_body_of_exactly_64_kib_is_read(waiting: Waiting) -> None:
    head = b'{"status": "delivered", "padding": "'
    body = head + b"x" * (MAX_BODY - len(head) - 2) + b'"}'
    assert len(body) == MAX_BODY
    response = waiting.post(content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert_delivered_on_telegram(waiting)


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        pytest.param(b'{"status": "delivered"', "application/json", id="truncated-json"),
        pytest.param(b"status=delivered}{", "application/json", id="form-as-json"),
        pytest.param(b'["delivered"]', "application/json", id="json-array"),
        pytest.param(b'"delivered"', "application/json", id="json-string"),
        pytest.param(b"42", "application/json", id="json-number"),
        pytest.param(b"null", "text/plain", id="json-null"),
        pytest.param(b"\xff\xfe", "application/x-www-form-urlencoded", id="not-utf8"),
        pytest.param(b"status=delivered", "multipart/form-data", id="multipart-no-boundary"),
    ],
)
def test_an_unreadable_body_is_400_and_stores_nothing(
    waiting: Waiting, content: bytes, content_type: str
) -> None:
    response = waiting.post(content=content, headers={"content-type": content_type})
    assert response.status_code == 400, response.text
    assert_untouched(waiting)
    assert waiting.events() == []


# -- the sandbox's own callbacks -----------------------------------------------------


def _sent_once(system: System, to: str) -> dict[str, Any]:
    """The one message to `to` created now over telegram, once it is final."""
    created = system.api.post("/v1/messages", json={"to": to, "channels": ["telegram"]})
    assert created.status_code == 202, created.text
    return system.wait_final(created.json()["id"])


def test_sandbox_duplicated_callback_ends_delivered_with_one_attempt(system: System) -> None:
    # Given kod.mobi that calls back "delivered" twice (magic 04)
    final = _sent_once(system, magic_phone(telegram=4))
    # Then the message is delivered once, with one attempt; the repeat is counted
    assert final["status"] == "delivered"
    [attempt] = final["attempts"]
    assert attempt["status"] == "delivered"
    [event] = wait_for(
        lambda: [e for e in events(system, attempt["id"]) if e["duplicates"] == 1],
        "the duplicated callback",
    )
    assert (event["status_word"], event["applied"]) == ("delivered", True)
    assert system.message(final["id"]) == final


def test_sandbox_out_of_order_callbacks_leave_it_delivered(system: System) -> None:
    # Given kod.mobi that calls back "delivered" and then a stale "sent" (magic 05)
    final = _sent_once(system, magic_phone(telegram=5))
    [attempt] = final["attempts"]
    found = wait_for(
        lambda: (rows := events(system, attempt["id"])) and len(rows) == 2 and rows,
        "both callbacks",
    )
    # Then the late "sent" is stored, not applied, and the message stays delivered
    assert [(e["status_word"], e["applied"]) for e in found] == [
        ("delivered", True),
        ("sent", False),
    ]
    assert system.message(final["id"]) == final
    assert final["status"] == "delivered"


@pytest.fixture
def callback_style(system: System) -> Iterator[Callable[[str], None]]:
    """Switch how the sandbox calls back; restored afterwards."""
    before = system.sandbox.get("/sandbox/config").json()["callback_style"]

    def switch(style: str) -> None:
        response = system.sandbox.post("/sandbox/config", json={"callback_style": style})
        assert response.status_code == 200, response.text

    yield switch
    switch(before)


@pytest.mark.parametrize(
    ("style", "method", "content_type"),
    [("form", "POST", "application/x-www-form-urlencoded"), ("get", "GET", None)],
)
def test_sandbox_callbacks_by_form_and_by_get_deliver(
    system: System,
    callback_style: Callable[[str], None],
    style: str,
    method: str,
    content_type: str | None,
) -> None:
    callback_style(style)
    final = _sent_once(system, unique_phone())
    assert final["status"] == "delivered"
    [attempt] = final["attempts"]
    [event] = events(system, attempt["id"])
    assert (event["method"], event["applied"]) == (method, True)
    assert event["content_type"] == content_type
    assert event["kodmobi_message_id"] == attempt["kodmobi_message_id"]
