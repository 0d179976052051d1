"""Our own outages (issue 12): Postgres restarted or away while callbacks and producers
arrive, Postgres and Redis away together. Nothing kod.mobi told us is lost, nobody gets a
code twice because our database blinked, and the logs stay clean.

This module runs the whole system (tests.support.system) on an embedded Postgres and an
embedded Redis of its own, which it stops and starts; the shared servers are never touched.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy.engine import make_url

from tests.support.logs import captured_logs
from tests.support.system import (
    API_KEY,
    API_TOKEN,
    CALLBACK_SECRET,
    CODE_KEY,
    System,
    magic_phone,
    running_system,
    template_database,
)
from worker.embedded import EmbeddedPostgres, EmbeddedRedis
from worker.security import callback_token
from worker.usecases.receive import CALLBACK_WAIT_S, SPOOLED_AT_HEADER
from worker.wiring import configure_process_logging

#: Seconds Postgres stays away in the spool test (issue 12 asks for at least 10); raise it
#: with KODMOBI_OUTAGE_S to measure how long an outage the spool rides out.
LONG_OUTAGE_S = float(os.environ.get("KODMOBI_OUTAGE_S", "12"))
DELIVERY_TIMEOUT_S = 4.0

pytestmark = pytest.mark.slow


class Servers:
    def __init__(self, root: Path) -> None:
        self.postgres = EmbeddedPostgres(root / "pg")
        self.redis = EmbeddedRedis(root / "redis")

    def postgres_down(self) -> None:
        self.postgres.stop(mode="fast")

    def postgres_up(self) -> None:
        self.postgres.start()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    found = Servers(Path(tmp_path_factory.mktemp("outages")))
    found.postgres.start()
    found.redis.start()
    try:
        yield found
    finally:
        found.redis.stop()
        found.postgres.stop(mode="immediate")


@pytest.fixture(scope="module")
def system(servers: Servers) -> Iterator[System]:
    with (
        template_database(servers.postgres.url) as template,
        running_system(
            servers.postgres.url,
            servers.redis.url,
            template=template,
            delivery_timeout_s=DELIVERY_TIMEOUT_S,
        ) as running,
    ):
        # A refused callback is lost: kod.mobi is not known to retry (issue 12).
        running.sandbox.post("/sandbox/config", json={"callback_retries": 0}).raise_for_status()
        yield running


@pytest.fixture(scope="module", autouse=True)
def logs(system: System) -> Iterator[Any]:
    """Everything the module's system logs, as a Procfile process would print it."""
    configure_process_logging(system.root.settings)
    with captured_logs() as buffer:
        yield buffer


PHONES: list[str] = []


def phone() -> str:
    """A fresh recipient, remembered for the log scan."""
    number = f"+79993{uuid.uuid4().int % 10**6:06d}"
    PHONES.append(number)
    return number


def _db(system: System) -> psycopg.Connection[dict[str, Any]]:
    url = make_url(system.db_url).set(drivername="postgresql")
    return psycopg.connect(
        url.render_as_string(hide_password=False), autocommit=True, row_factory=dict_row
    )


def _callback_url(system: System, attempt_id: str) -> str:
    return (
        f"{system.web_url}/callbacks/kodmobi/{attempt_id}/"
        f"{callback_token(CALLBACK_SECRET, attempt_id, int(time.time()) + 3600)}"
    )


def _silent_attempt(system: System, chain: list[str]) -> tuple[str, dict[str, Any]]:
    """A message whose first attempt kod.mobi accepted and never called back about."""
    to = magic_phone(2, 0, 0)  # accepted, never called back, on every channel
    created = system.api.post(
        "/v1/messages", json={"to": to, "channels": chain},
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    assert created.status_code == 202, created.text
    message_id = created.json()["id"]
    deadline = time.monotonic() + 10
    while True:
        found = system.message(message_id)
        if found["attempts"] and found["attempts"][0]["status"] == "accepted":
            return message_id, found["attempts"][0]
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


def _wait_postgres(system: System) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with _db(system) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


# -- item 1: callbacks --------------------------------------------------------------------


def test_a_callback_during_a_short_postgres_restart_is_waited_out_and_applied(
    system: System, servers: Servers
) -> None:
    # Given an accepted attempt waiting for its callback
    message_id, attempt = _silent_attempt(system, ["telegram", "sms"])
    # When Postgres restarts (1.5 s away) just as kod.mobi calls back "delivered"
    servers.postgres_down()
    restarter = threading.Timer(1.5, servers.postgres_up)
    restarter.start()
    started = time.monotonic()
    answer = httpx.post(
        _callback_url(system, attempt["id"]),
        json={"status": "delivered", "message_id": attempt["kodmobi_message_id"]}, timeout=10,
    )
    took = time.monotonic() - started
    restarter.join()
    # Then the receiver waited it out and applied it: 200, within its budget
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "delivered"
    assert took < CALLBACK_WAIT_S + 1.0
    final = system.wait_final(message_id)
    assert final["status"] == "delivered"
    assert [a["status"] for a in final["attempts"]] == ["delivered"]


def test_a_long_postgres_outage_spools_callbacks_and_nobody_gets_a_second_code(
    system: System, servers: Servers
) -> None:
    # Given attempts waiting for their callbacks, on a chain with a next channel
    waiting = [_silent_attempt(system, ["telegram", "sms"]) for _ in range(3)]
    before = {m: len(system.message(m)["attempts"]) for m, _ in waiting}
    # When Postgres goes away for longer than the receiver waits, and longer than the
    # attempts' silence deadline, while kod.mobi calls back (one repeats itself)
    servers.postgres_down()
    down_at = time.monotonic()
    answers = []
    try:
        for _, attempt in waiting:
            body = {"status": "delivered", "message_id": attempt["kodmobi_message_id"]}
            answers.append(httpx.post(_callback_url(system, attempt["id"]), json=body, timeout=10))
        first = waiting[0][1]
        answers.append(httpx.post(
            _callback_url(system, first["id"]),
            json={"status": "delivered", "message_id": first["kodmobi_message_id"]}, timeout=10,
        ))
        time.sleep(max(0.0, LONG_OUTAGE_S - (time.monotonic() - down_at)))
    finally:
        servers.postgres_up()
    outage_s = time.monotonic() - down_at
    _wait_postgres(system)
    # Then every callback was answered 2xx (spooled: 202), none refused
    assert [a.status_code for a in answers] == [202] * 4, [a.text for a in answers]
    assert all(a.json()["outcome"] == "spooled" for a in answers)
    assert outage_s > DELIVERY_TIMEOUT_S + CALLBACK_WAIT_S
    # And once Postgres is back each message is delivered on its first channel: the spool
    # was applied before any deadline was enforced, so no fallback and no second code
    for message_id, attempt in waiting:
        final = system.wait_final(message_id, timeout_s=30)
        assert final["status"] == "delivered", final
        assert [a["status"] for a in final["attempts"]] == ["delivered"], final
        assert len(final["attempts"]) == before[message_id]
    for message_id, attempt in waiting:
        sends = [s for s in system.sandbox_sends(magic_phone(2, 0, 0))
                 if s["callback_url"].split("/")[-2] == attempt["id"]]
        assert len(sends) == 1
    # And the repeat was recognised by the same key as on the normal path
    with _db(system) as conn:
        rows = conn.execute(
            "SELECT attempt_id, outcome, duplicates, headers FROM callback_events"
            " WHERE attempt_id = ANY(%s)", ([a["id"] for _, a in waiting],),
        ).fetchall()
    assert len(rows) == 3
    assert sorted(r["duplicates"] for r in rows) == [0, 0, 1]
    assert all(SPOOLED_AT_HEADER in r["headers"] for r in rows)
    assert all(r["outcome"] == "delivered" for r in rows)


def test_with_postgres_and_redis_both_away_a_callback_gets_503_and_retry_after(
    system: System, servers: Servers
) -> None:
    # Given an accepted attempt
    message_id, attempt = _silent_attempt(system, ["telegram", "sms"])
    url = _callback_url(system, attempt["id"])
    body = {"status": "delivered", "message_id": attempt["kodmobi_message_id"]}
    # When Postgres and Redis are both away as kod.mobi calls back
    servers.postgres_down()
    servers.redis.stop()
    try:
        refused = httpx.post(url, json=body, timeout=10)
    finally:
        servers.redis.start()
        servers.postgres_up()
    _wait_postgres(system)
    # Then it is told to come back (never a 500), and coming back is applied
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) > 0
    again = httpx.post(url, json=body, timeout=10)
    assert again.status_code in (200, 202), again.text
    assert system.wait_final(message_id, timeout_s=30)["status"] == "delivered"


def test_a_postgres_restart_while_callbacks_arrive_refuses_none_and_sends_no_code_twice(
    system: System, servers: Servers
) -> None:
    # Given codes flowing: kod.mobi (the sandbox) accepts each and calls back 20 ms later
    recipients = [phone() for _ in range(40)]

    def send(to: str) -> str:
        for _ in range(40):
            answer = system.api.post(
                "/v1/messages", json={"to": to, "channels": ["telegram", "whatsapp"]},
                headers={"Idempotency-Key": f"restart-{to}"},
            )
            if answer.status_code in (200, 202):
                return str(answer.json()["id"])
            assert answer.status_code == 503, answer.text  # and retried, same key
            time.sleep(0.25)
        raise AssertionError(f"{to} never accepted")

    # When Postgres restarts (2 s away) in the middle of them
    def restart() -> None:
        time.sleep(0.6)
        servers.postgres_down()
        time.sleep(2.0)
        servers.postgres_up()

    fault = threading.Thread(target=restart)
    fault.start()
    with ThreadPoolExecutor(8) as pool:
        futures = []
        for to in recipients:
            futures.append(pool.submit(send, to))
            time.sleep(0.05)
        ids = [f.result() for f in futures]
    fault.join()
    # Then every message is delivered, each recipient got exactly one code, and kod.mobi
    # never had a callback refused
    finals = [system.wait_final(m, timeout_s=40) for m in ids]
    assert [f["status"] for f in finals] == ["delivered"] * len(ids)
    results = []
    for to in recipients:
        sends = system.sandbox_sends(to)
        assert len(sends) == 1, sends
        results += [cb["result"] for s in sends for cb in s["callbacks"]]
    assert results and all(r in ("200", "202") for r in results), results


# -- item 2: intake and reads -------------------------------------------------------------


def test_intake_and_reads_answer_503_during_a_postgres_outage_and_a_retry_makes_one_message(
    system: System, servers: Servers, logs: Any
) -> None:
    to, key = phone(), uuid.uuid4().hex
    body = {"to": to, "channels": ["sms"]}
    existing = system.api.post("/v1/messages", json={"to": phone(), "channels": ["sms"]})
    existing_id = existing.json()["id"]
    mark = len(logs.getvalue())
    # When Postgres is away
    servers.postgres_down()
    try:
        post = system.api.post("/v1/messages", json=body, headers={"Idempotency-Key": key})
        read = system.api.get(f"/v1/messages/{existing_id}")
        found = system.api.get("/v1/messages", params={"idempotency_key": key})
    finally:
        servers.postgres_up()
    _wait_postgres(system)
    # Then each is a clean 503 with Retry-After, and one warning line each, no traceback
    for answer in (post, read, found):
        assert answer.status_code == 503, answer.text
        assert int(answer.headers["Retry-After"]) > 0
    written = logs.getvalue()[mark:]
    assert written.count("request.unavailable") == 3
    assert "Traceback" not in written
    # And the producer's retry with the same key makes exactly one message
    again = system.api.post("/v1/messages", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 202, again.text
    twice = system.api.post("/v1/messages", json=body, headers={"Idempotency-Key": key})
    assert twice.status_code == 200 and twice.json()["id"] == again.json()["id"]
    assert system.wait_final(again.json()["id"])["status"] == "delivered"
    assert len(system.sandbox_sends(to)) == 1


def test_intake_during_a_redis_outage_is_kept_and_sent_once_redis_is_back(
    system: System, servers: Servers
) -> None:
    # When Redis is away, the message is recorded in Postgres (202: nothing to retry)
    # and the clock hands it to a worker once Redis is back
    to = phone()
    servers.redis.stop()
    try:
        answer = system.api.post(
            "/v1/messages", json={"to": to, "channels": ["sms"]},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
    finally:
        servers.redis.start()
    assert answer.status_code == 202, answer.text
    assert system.wait_final(answer.json()["id"], timeout_s=60)["status"] == "delivered"
    assert len(system.sandbox_sends(to)) == 1


# -- item 4: the logs of all of the above -------------------------------------------------

def test_zz_the_logs_of_these_outages_hold_no_traceback_secret_or_recipient(
    system: System, logs: Any
) -> None:
    text = logs.getvalue()
    assert "callback.spooled" in text and "callback.unspooled" in text
    assert "Traceback" not in text
    leaked = [p for p in PHONES if p in text or p[1:] in text]
    assert not leaked, f"unmasked recipients in the logs: {leaked[:3]}"
    for name, secret in {
        "KODMOBI_API_KEY": API_KEY, "API_TOKENS": API_TOKEN,
        "CALLBACK_SECRET": CALLBACK_SECRET, "CODE_KEY": CODE_KEY,
    }.items():
        assert secret not in text, name
    assert "/callbacks/kodmobi/" not in text or "[redacted]" in text
