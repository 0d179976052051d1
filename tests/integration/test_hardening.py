"""Issue 13's findings, each written as the attack: oversized bodies, deep metadata on
all three intake paths, unusable Dramatiq ids, replayed expired callbacks, flooded
callback events, case-variant emails, and two producers probing each other."""

from __future__ import annotations

import dataclasses
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy.engine import make_url

import worker
from tests.support.system import (
    API_TOKEN,
    CALLBACK_SECRET,
    System,
    magic_phone,
    running_system,
    unique_phone,
)
from worker.schemas import SendRequest
from worker.security import callback_token
from worker.usecases import intake
from worker.usecases.callbacks import MAX_EVENTS_PER_ATTEMPT, UNKNOWN_BODY_CHARS
from worker.usecases.limits import RateLimited

ALPHA_TOKEN = "alpha-token-0123456789abcdef"
BETA_TOKEN = "beta-token-0123456789abcdef"


@pytest.fixture(scope="module")
def system(pg_server_url: str, redis_url: str, template_db: str) -> Iterator[System]:
    """The usual system, with two named producers besides the bare (default) tokens."""
    tokens = f"other-token-zzzzzzzz,{API_TOKEN},alpha:{ALPHA_TOKEN},beta:{BETA_TOKEN}"
    with running_system(
        pg_server_url, redis_url, template=template_db, extra_env={"API_TOKENS": tokens}
    ) as running:
        yield running


def _db(system: System) -> psycopg.Connection[dict[str, Any]]:
    url = make_url(system.db_url).set(drivername="postgresql")
    return psycopg.connect(
        url.render_as_string(hide_password=False), autocommit=True, row_factory=dict_row
    )


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- 1. bounded input before authentication and parsing ----------------------------

HUNDRED_MB = 100 * 1024 * 1024


def _post_huge(web_url: str, *, chunked: bool) -> tuple[str, float, int]:
    """POST a 100 MB body to /v1/messages without a token over a raw socket, sending
    until the server answers or stops reading. Returns (status line, seconds to the
    answer, bytes the server took)."""
    parts = urlsplit(web_url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    framing = (
        b"Transfer-Encoding: chunked\r\n"
        if chunked
        else f"Content-Length: {HUNDRED_MB}\r\n".encode()
    )
    sock.sendall(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + framing
        + b"\r\n"
    )
    chunk = b"[" * 65536
    if chunked:
        chunk = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    started = time.monotonic()
    sent = 0
    sock.setblocking(False)
    answer = b""
    while time.monotonic() - started < 10:
        try:
            answer += sock.recv(4096)
            if b"\r\n" in answer:
                break
        except BlockingIOError:
            pass
        if sent < HUNDRED_MB:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)  # the server is not reading
            except (BrokenPipeError, ConnectionResetError):
                time.sleep(0.01)
        else:
            time.sleep(0.01)
    elapsed = time.monotonic() - started
    sock.close()
    return answer.split(b"\r\n", 1)[0].decode(), elapsed, sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "streamed"])
def test_a_100_mb_body_without_a_token_is_refused_fast_and_never_read(
    system: System, chunked: bool
) -> None:
    # Given the web's memory now
    before = _rss_kb()

    # When an attacker posts 100 MB of JSON without Authorization
    status, elapsed, sent = _post_huge(system.web_url, chunked=chunked)

    # Then the answer is 413, within a second, before most of the body was even sent
    assert status == "HTTP/1.1 413 Request Entity Too Large", status
    assert elapsed < 1.0, elapsed
    assert sent < 16 * 1024 * 1024, f"the server took {sent} bytes"
    # And the web (in this process) did not grow by anything like the body
    assert _rss_kb() - before < 30 * 1024, (before, _rss_kb())


def test_a_body_over_16_kib_on_v1_is_413_even_with_a_token(system: System) -> None:
    body = {"to": unique_phone(), "metadata": {"pad": "x" * 17000}}
    response = system.api.post("/v1/messages", json=body)
    assert response.status_code == 413


def test_a_callback_body_over_64_kib_is_413_but_32_kib_is_read(system: System) -> None:
    attempt_id = str(uuid.uuid4().int)[:26]
    url = f"{system.web_url}/callbacks/kodmobi/{attempt_id}/x"
    assert httpx.post(url, content=b"a" * (65 * 1024)).status_code == 413
    # Under the callback limit the route itself answers (404: no such attempt/token).
    assert httpx.post(url, content=b"a" * (32 * 1024)).status_code == 404


def test_a_malformed_content_length_is_400(system: System) -> None:
    parts = urlsplit(system.web_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
        assert sock.recv(100).split(b"\r\n", 1)[0].split(b" ")[1] == b"400"


def _nested(depth: int) -> dict[str, Any]:
    inner: dict[str, Any] = {}
    node = inner
    for _ in range(depth):
        node["k"] = {}
        node = node["k"]
    return inner


def test_deep_metadata_over_http_is_422_naming_metadata(system: System) -> None:
    # When a producer sends metadata nested 300 levels (about 2 KB)
    response = system.api.post(
        "/v1/messages", json={"to": unique_phone(), "metadata": _nested(300)}
    )
    # Then 422 names the field; not a 500
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "metadata"]


def test_metadata_nested_20_levels_is_422_naming_metadata(system: System) -> None:
    response = system.api.post("/v1/messages", json={"to": unique_phone(), "metadata": _nested(20)})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "metadata"]


def test_metadata_with_too_many_items_is_422(system: System) -> None:
    metadata = {"list": list(range(400))}
    response = system.api.post("/v1/messages", json={"to": unique_phone(), "metadata": metadata})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "metadata"]


def test_a_json_body_nested_5000_deep_is_not_a_500(system: System) -> None:
    response = system.api.post(
        "/v1/messages", content=b"[" * 5000, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": "+7" + "9" * 400}, "to"),
        ({"to": "a" * 300 + "@example.com"}, "to"),
        ({"to": "+79991234567", "code": "1" * 300}, "code"),
        ({"to": "+79991234567", "channels": ["sms"] * 50}, "channels"),
    ],
)
def test_long_strings_are_422_naming_the_field(
    system: System, body: dict[str, Any], field: str
) -> None:
    response = system.api.post("/v1/messages", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:2] == ["body", field]


def test_an_idempotency_key_over_255_is_422(system: System) -> None:
    response = system.api.post(
        "/v1/messages", json={"to": unique_phone()}, headers={"Idempotency-Key": "k" * 256}
    )
    assert response.status_code == 422


def test_deep_metadata_over_dramatiq_is_rejected_once_with_the_reason(system: System) -> None:
    # When a Dramatiq producer enqueues metadata nested 300 levels
    message_id = system.send_raw(to=unique_phone(), metadata=_nested(300))
    # Then it is recorded as rejected, naming metadata, and not retried
    found = system.wait_key_final(message_id)
    assert found["status"] == "rejected"
    assert found["failure_reason"].startswith("metadata:")


def test_deep_metadata_over_python_is_invalid_request(system: System) -> None:
    with pytest.raises(worker.InvalidRequest, match="metadata"):
        worker.send_code(unique_phone(), metadata=_nested(300))
    with pytest.raises(worker.InvalidRequest, match="idempotency_key"):
        worker.send_code(unique_phone(), idempotency_key="k" * 256)


@pytest.mark.parametrize("bad_id", ["m" * 300, "nul\x00id"], ids=["long", "nul"])
def test_an_unusable_dramatiq_message_id_falls_back_to_a_derived_key(
    system: System, bad_id: str
) -> None:
    # Given a producer whose message id cannot be an idempotency key
    import dramatiq

    to = unique_phone()
    message = dramatiq.Message(
        queue_name="kodmobi",
        actor_name="send_code",
        args=(),
        kwargs={"to": to},
        options={},
        message_id=bad_id,
    )
    # When it is enqueued
    system.broker.enqueue(message)
    # Then the code is sent, under a key derived from the id (no retry loop)
    key = intake.derived_key(bad_id)
    found = system.wait_key_final(key)
    assert found["status"] == "delivered", found
    assert found["to"] == to


# -- 1 and 2. callbacks ---------------------------------------------------------------


def _accepted_attempt(system: System) -> str:
    """An attempt kod.mobi accepted and whose callbacks never come (the sandbox loses them)."""
    response = system.api.post("/v1/messages", json={"to": magic_phone(telegram=2)})
    assert response.status_code == 202, response.text
    message_id = response.json()["id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        attempts = system.message(message_id)["attempts"]
        if attempts and attempts[0]["status"] == "accepted":
            # Held open: only the test's callbacks may move it, not the 2 s deadline.
            with _db(system) as conn:
                conn.execute(
                    "UPDATE attempts SET deadline = now() + interval '1 hour' WHERE id = %s",
                    (attempts[0]["id"],),
                )
            return str(attempts[0]["id"])
        time.sleep(0.05)
    raise AssertionError("no accepted attempt")


def _token(attempt_id: str, in_s: float = 3600) -> str:
    return callback_token(CALLBACK_SECRET, attempt_id, int(time.time() + in_s))


def test_a_callback_nested_5000_deep_with_a_valid_token_is_400(system: System) -> None:
    attempt_id = _accepted_attempt(system)
    url = f"{system.web_url}/callbacks/kodmobi/{attempt_id}/{_token(attempt_id)}"
    response = httpx.post(url, content=b"[" * 5000, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text


def test_an_expired_callback_url_is_404_and_changes_nothing(system: System) -> None:
    # Given an attempt, and a callback URL for it that expired a second ago
    attempt_id = _accepted_attempt(system)
    with _db(system) as conn:
        before = conn.execute(
            "SELECT status, (SELECT count(*) FROM callback_events WHERE attempt_id = %s) AS n"
            " FROM attempts WHERE id = %s",
            (attempt_id, attempt_id),
        ).fetchone()
    expired = _token(attempt_id, in_s=-1)
    # When someone who once saw it replays a "failed" (or a "delivered")
    for status in ("failed", "delivered"):
        url = f"{system.web_url}/callbacks/kodmobi/{attempt_id}/{expired}"
        response = httpx.post(url, json={"status": status})
        # Then it is 404, as for a forged token
        assert response.status_code == 404
        assert response.json() == {"detail": "not found"}
    # And neither the attempt nor the stored events changed
    with _db(system) as conn:
        after = conn.execute(
            "SELECT status, (SELECT count(*) FROM callback_events WHERE attempt_id = %s) AS n"
            " FROM attempts WHERE id = %s",
            (attempt_id, attempt_id),
        ).fetchone()
    assert after == before


def test_a_token_with_its_expiry_pushed_forward_is_404(system: System) -> None:
    attempt_id = _accepted_attempt(system)
    expiry, mac = _token(attempt_id, in_s=-1).split(".")
    forged = f"{int(expiry) + 10**6}.{mac}"
    url = f"{system.web_url}/callbacks/kodmobi/{attempt_id}/{forged}"
    assert httpx.post(url, json={"status": "failed"}).status_code == 404


def test_the_url_sent_to_kodmobi_expires_after_the_deadline_and_grace(system: System) -> None:
    # Given a message delivered through the sandbox
    to = unique_phone()
    sent = system.api.post("/v1/messages", json={"to": to})
    found = system.wait_final(sent.json()["id"])
    callback_url = system.sandbox_sends(to)[0]["callback_url"]
    # Then its token's expiry is the attempt's deadline plus CALLBACK_GRACE_S, give or take
    token = callback_url.rsplit("/", 1)[1]
    expiry = int(token.split(".")[0])
    settings = system.root.settings
    sent_at = found["attempts"][0]["sent_at"]
    from datetime import datetime

    start = datetime.fromisoformat(sent_at).timestamp()
    window = settings.kodmobi_read_timeout_s + settings.delivery_timeout_s
    assert abs(expiry - (start + window + settings.callback_grace_s)) < 5


def test_stored_callback_events_per_attempt_are_capped(system: System) -> None:
    # Given a URL that leaked, used to post many distinct unknown words with big bodies
    attempt_id = _accepted_attempt(system)
    url = f"{system.web_url}/callbacks/kodmobi/{attempt_id}/{_token(attempt_id)}"
    with httpx.Client(timeout=10) as client:
        for n in range(60):
            response = client.post(url, json={"status": f"weird-{n}", "pad": "x" * 30000})
            assert response.status_code == 200
    # Then no more than the cap is stored, and unknown words keep a short body only
    with _db(system) as conn:
        rows = conn.execute(
            "SELECT length(raw_body) AS size FROM callback_events WHERE attempt_id = %s",
            (attempt_id,),
        ).fetchall()
    assert len(rows) <= MAX_EVENTS_PER_ATTEMPT < 60
    assert max(r["size"] for r in rows) <= UNKNOWN_BODY_CHARS


# -- 3. canonical recipients ----------------------------------------------------------


def test_case_variant_emails_share_one_limit(system: System) -> None:
    # Given a one-per-cooldown limit on a channel
    settings = system.root.settings.model_copy(update={"channel_cooldown_s": 60.0})
    ctx = dataclasses.replace(system.root.ctx, settings=settings)
    mailbox = f"victim-{uuid.uuid4().hex[:8]}@example.com"
    first = intake.accept(ctx, SendRequest(to=mailbox), idempotency_key=None, source="python")
    assert first.created
    # When the attacker asks again with the case changed
    for variant in (mailbox.capitalize(), mailbox.upper(), "vIcTiM" + mailbox[6:]):
        # Then each is refused by the same cooldown
        with pytest.raises(RateLimited):
            intake.accept(ctx, SendRequest(to=variant), idempotency_key=None, source="python")
    # And the address as given is what was recorded to send
    assert system.message(first.accepted.id)["to"] == mailbox


def test_the_address_as_given_is_what_is_sent(system: System) -> None:
    given = f"Mixed.Case-{uuid.uuid4().hex[:6]}@Example.COM"
    response = system.api.post("/v1/messages", json={"to": given})
    found = system.wait_final(response.json()["id"])
    assert found["to"] == given.rsplit("@", 1)[0] + "@example.com"


# -- 6. producers scoped by their token ----------------------------------------------


def _client(system: System, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=system.web_url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def test_two_producers_cannot_see_each_others_messages(system: System) -> None:
    key = f"order-{uuid.uuid4().hex[:8]}"
    with _client(system, ALPHA_TOKEN) as alpha, _client(system, BETA_TOKEN) as beta:
        # Given alpha's message under a key
        made = alpha.post(
            "/v1/messages",
            json={"to": unique_phone(), "code": "1234"},
            headers={"Idempotency-Key": key},
        )
        assert made.status_code == 202
        message_id = made.json()["id"]
        assert alpha.get(f"/v1/messages/{message_id}").status_code == 200

        # When beta probes it by id, by key, and by checking codes
        by_id = beta.get(f"/v1/messages/{message_id}")
        by_key = beta.get("/v1/messages", params={"idempotency_key": key})
        check = beta.post(f"/v1/messages/{message_id}/check", json={"code": "1234"})
        absent = beta.get("/v1/messages/01ARZ3NDEKTSV4RRFFQ69G5FAV")

        # Then each answer is the one for a message that does not exist
        for response in (by_id, by_key, check):
            assert response.status_code == 404
            assert response.json() == absent.json()
        # And beta's guesses did not use up alpha's checks
        assert alpha.post(f"/v1/messages/{message_id}/check", json={"code": "1234"}).json() == {
            "valid": True,
            "reason": None,
        }
        # And the bare (default) token does not see it either
        assert system.api.get(f"/v1/messages/{message_id}").status_code == 404

        # When beta uses the same key with another body: its own message, not a 409
        other = beta.post(
            "/v1/messages", json={"to": unique_phone()}, headers={"Idempotency-Key": key}
        )
        assert other.status_code == 202
        assert other.json()["id"] != message_id

        # When alpha reuses its key with another body: 409 naming no message
        conflict = alpha.post(
            "/v1/messages", json={"to": unique_phone()}, headers={"Idempotency-Key": key}
        )
        assert conflict.status_code == 409
        assert message_id not in conflict.text
        assert other.json()["id"] not in conflict.text


def test_dramatiq_messages_belong_to_the_producer_they_name(system: System) -> None:
    message_id = system.send_raw(to=unique_phone(), producer="alpha")
    with _client(system, ALPHA_TOKEN) as alpha:
        deadline = time.monotonic() + 30
        while (
            found := alpha.get("/v1/messages", params={"idempotency_key": message_id})
        ).status_code == 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert found.status_code == 200
    assert system.by_key(message_id) is None  # the default producer does not see it
    # And without `producer` a Dramatiq message belongs to `default`
    plain = system.send_raw(to=unique_phone())
    assert system.wait_key_final(plain)["status"] == "delivered"


# -- 7. docs off ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_api_docs_are_off_by_default(system: System, path: str) -> None:
    assert httpx.get(f"{system.web_url}{path}").status_code == 404
    assert system.api.get(path).status_code == 404


# -- 4. logs over a run with database errors ------------------------------------------


def test_a_database_error_logged_by_dramatiq_carries_no_phone(system: System) -> None:
    import io
    import logging

    from sqlalchemy import text

    from worker.db import make_engine
    from worker.logging import configure_logging

    stream = io.StringIO()
    configure_logging("json", "INFO", stream=stream)
    engine = make_engine(system.db_url)
    phone = "+7 (952) 296-62-03"
    try:
        # Given a statement Postgres refuses, with a phone among its parameters
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO messages (id, recipient) VALUES (:id, :recipient)"),
                {"id": "x" * 40, "recipient": phone},
            )
    except Exception as exc:  # noqa: BLE001 - whatever the driver raises
        # Then the exception hides the parameters (hide_parameters=True)
        assert "SQL parameters hidden" in str(exc)
        assert phone not in str(exc)
        # And when Dramatiq logs the failed message with it, no spelling survives
        logging.getLogger("dramatiq.worker.WorkerThread").error(
            "Failed to process message %s with unhandled exception.",
            f"send_code(to={phone!r})",
            exc_info=exc,
        )
    else:
        raise AssertionError("the insert should have failed")
    finally:
        engine.dispose()
        logging.getLogger().handlers[:] = []
    logged = stream.getvalue()
    assert "Failed to process message" in logged
    digits = "".join(c for c in logged if c.isdigit())
    assert "2966" not in digits, logged
