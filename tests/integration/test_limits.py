"""Abuse limits: codes per recipient per window, one code per channel per cooldown, the cap
on concurrent kod.mobi calls across processes, and at most 5 code checks per message.

The session's system runs with the per-recipient limits off, so these tests serve a second
web app over the same database and Redis, built from the same runtime with limits on. The
Dramatiq path is tested by running the `send_code` actor's function in this process with
its service swapped for the limited one (a real Dramatiq worker would need a second broker
and worker with other settings; the actor's own code is what decides `rejected`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from tests.support.servers import serve
from tests.support.system import API_TOKEN, System, unique_phone
from worker.broker import build_broker
from worker.call_slots import KodMobiSlots, SlotsBusy
from worker.jobs import declare_actors
from worker.schemas import SendRequest
from worker.usecases import intake
from worker.usecases.context import Context
from worker.usecases.limits import RateLimited
from worker.web.app import create_app

LIMIT = 3
WINDOW_S = 600
COOLDOWN_S = 60


@dataclass
class Limited:
    ctx: Context
    api: httpx.Client

    def send(self, to: str, channels: list[str], key: str | None = None) -> httpx.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return self.api.post("/v1/messages", json={"to": to, "channels": channels}, headers=headers)


@contextmanager
def limited_app(system: System, **limits: Any) -> Iterator[Limited]:
    """A second web app over the same database and Redis, with these limits on."""
    root = system.root
    settings = root.settings.model_copy(update=limits)
    limited_root = dataclasses.replace(
        root, settings=settings, ctx=dataclasses.replace(root.ctx, settings=settings)
    )
    with (
        serve(create_app(limited_root)) as url,
        httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10
        ) as api,
    ):
        yield Limited(limited_root.ctx, api)


@pytest.fixture(scope="module")
def limited(system: System) -> Iterator[Limited]:
    with limited_app(
        system,
        recipient_limit=LIMIT,
        recipient_window_s=WINDOW_S,
        channel_cooldown_s=COOLDOWN_S,
    ) as app:
        yield app


def recorded(system: System, to: str) -> int:
    """How many messages the database holds for this recipient."""
    url = make_url(system.db_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        row = conn.execute("SELECT count(*) FROM messages WHERE recipient = %s", (to,)).fetchone()
    assert row is not None
    return int(row[0])


def retry_after(response: httpx.Response) -> int:
    value = response.headers["Retry-After"]
    assert value.isdigit(), value  # whole seconds, as HTTP says
    return int(value)


# -- codes per recipient -----------------------------------------------------------------


def test_the_fourth_code_to_one_recipient_in_the_window_is_429(
    limited: Limited, system: System
) -> None:
    # Given three codes accepted for one recipient, each on its own first channel
    to = unique_phone()
    for channel in ("telegram", "whatsapp", "sms"):
        accepted = limited.send(to, [channel])
        assert accepted.status_code == 202, accepted.text
    # When a fourth is asked for within the window
    refused = limited.send(to, ["sms", "telegram"])
    # Then it is refused with 429, a Retry-After in whole seconds, and the limit named
    assert refused.status_code == 429, refused.text
    assert 1 <= retry_after(refused) <= WINDOW_S
    detail = refused.json()["detail"]
    assert "recipient limit" in detail and f"at most {LIMIT} codes" in detail
    # And nothing was recorded for it
    assert recorded(system, to) == LIMIT


def test_other_recipients_are_not_limited_by_one_recipients_codes(limited: Limited) -> None:
    # Given a recipient at its limit
    busy = unique_phone()
    for channel in ("telegram", "whatsapp", "sms"):
        assert limited.send(busy, [channel]).status_code == 202
    assert limited.send(busy, ["telegram"]).status_code == 429
    # When another recipient asks for a code on the same channel
    other = limited.send(unique_phone(), ["telegram"])
    # Then it is accepted
    assert other.status_code == 202, other.text


def test_a_replay_of_an_accepted_message_is_not_limited(limited: Limited) -> None:
    # Given a recipient whose first code was accepted under an Idempotency-Key, and who
    # has since reached the limit
    to = unique_phone()
    key = uuid.uuid4().hex
    first = limited.send(to, ["telegram"], key=key)
    assert first.status_code == 202, first.text
    for channel in ("whatsapp", "sms"):
        assert limited.send(to, [channel]).status_code == 202
    assert limited.send(to, ["whatsapp", "sms"]).status_code == 429
    # When the producer retries the first request (same key, same body)
    replay = limited.send(to, ["telegram"], key=key)
    # Then it gets the same message back, 200, not a 429
    assert replay.status_code == 200, replay.text
    assert replay.json()["id"] == first.json()["id"]


def test_concurrent_requests_cannot_slip_past_the_limit_together(system: System) -> None:
    # Given the recipient limit alone (no channel cooldown), and ten requests at once
    to = unique_phone()
    with (
        limited_app(
            system, recipient_limit=LIMIT, recipient_window_s=WINDOW_S, channel_cooldown_s=0
        ) as app,
        ThreadPoolExecutor(max_workers=10) as pool,
    ):
        codes = list(pool.map(lambda _: app.send(to, ["sms"]).status_code, range(10)))
    # Then exactly the limit's worth are accepted and recorded, and the rest refused
    assert sorted(codes) == [202] * LIMIT + [429] * (10 - LIMIT)
    assert recorded(system, to) == LIMIT


# -- one code per channel per cooldown ----------------------------------------------------


def test_a_second_code_on_the_same_first_channel_within_the_cooldown_is_429(
    limited: Limited,
) -> None:
    # Given a code just sent to a recipient over sms
    to = unique_phone()
    assert limited.send(to, ["sms"]).status_code == 202
    # When another code for them starts with sms again, within the cooldown
    refused = limited.send(to, ["sms", "telegram"])
    # Then it is refused, naming the channel's cooldown, with Retry-After up to the cooldown
    assert refused.status_code == 429, refused.text
    assert 1 <= retry_after(refused) <= COOLDOWN_S
    assert refused.json()["detail"] == f"channel cooldown: one sms code per {COOLDOWN_S}s"
    # But one starting with another channel passes
    other_channel = limited.send(to, ["telegram", "sms"])
    assert other_channel.status_code == 202, other_channel.text


# -- the Dramatiq path --------------------------------------------------------------------


def test_intake_raises_rate_limited_with_the_wait(limited: Limited) -> None:
    # Given a recipient just sent a code over whatsapp
    to = unique_phone()
    assert limited.send(to, ["whatsapp"]).status_code == 202
    # When the service is asked for another on whatsapp
    with pytest.raises(RateLimited) as raised:
        intake.accept(
            limited.ctx,
            SendRequest(to=to, channels=["whatsapp"]),
            idempotency_key=None,
            source="python",
        )
    # Then it says which limit and how long to wait
    assert "channel cooldown" in raised.value.reason
    assert 1 <= raised.value.retry_after_s <= COOLDOWN_S


def test_a_limited_dramatiq_message_ends_rejected_with_the_limit_as_reason(
    limited: Limited, system: System
) -> None:
    # Given the send_code actor running with limits on, and a recipient just sent a code
    limited_root = dataclasses.replace(system.root, ctx=limited.ctx, broker=build_broker(
        system.redis_url, system.root.settings.broker_namespace))
    actors = declare_actors(limited_root)
    to = unique_phone()
    first_key, second_key = uuid.uuid4().hex, uuid.uuid4().hex
    actors.send_code.fn(to=to, channels=["telegram"], idempotency_key=first_key)
    # When a producer's message asks for another code on the same channel at once
    actors.send_code.fn(to=to, channels=["telegram", "sms"], idempotency_key=second_key)
    # Then the first is sent and the second recorded as rejected, the limit its reason,
    # visible to the producer by its key, and nothing was sent for it
    assert system.wait_key_final(first_key)["status"] == "delivered"
    second = system.by_key(second_key)
    assert second is not None
    assert second["status"] == "rejected"
    assert second["failure_reason"] == f"channel cooldown: one telegram code per {COOLDOWN_S}s"
    assert second["attempts"] == []
    assert len(system.sandbox_sends(to)) == 1


# -- the cap on concurrent kod.mobi calls -------------------------------------------------


@pytest.fixture
def redis_client(system: System) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(system.redis_url)
    yield client
    client.close()


def test_at_most_the_cap_of_calls_are_in_flight_across_processes(
    redis_client: redis.Redis,
) -> None:
    # Given a cap of 2, shared in Redis by two "processes" (two KodMobiSlots, one namespace)
    namespace = f"limits-test-{uuid.uuid4().hex}"
    processes = [KodMobiSlots(redis_client, limit=2, namespace=namespace) for _ in range(2)]
    in_flight = 0
    observed: list[int] = []
    lock = threading.Lock()

    def call(i: int) -> int:
        nonlocal in_flight
        with processes[i % 2]():
            with lock:
                in_flight += 1
                observed.append(in_flight)
            time.sleep(0.05)  # a call to kod.mobi
            with lock:
                in_flight -= 1
        return i

    # When 8 threads call at once
    with ThreadPoolExecutor(max_workers=8) as pool:
        done = list(pool.map(call, range(8)))
    # Then never more than 2 were in flight, 2 were at some moment, and all 8 completed
    assert max(observed) == 2
    assert sorted(done) == list(range(8))


def test_a_caller_that_finds_every_slot_taken_gives_up_with_slots_busy(
    redis_client: redis.Redis,
) -> None:
    # Given both slots of a cap of 2 held by calls that have not returned
    namespace = f"limits-test-{uuid.uuid4().hex}"
    slots = KodMobiSlots(redis_client, limit=2, namespace=namespace, wait_s=0.1)
    holding, release = threading.Barrier(3), threading.Event()

    def hold() -> None:
        with slots():
            holding.wait()
            release.wait(5)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    holding.wait()
    try:
        # When a third caller asks for a slot
        started = time.monotonic()
        with pytest.raises(SlotsBusy), slots():
            pytest.fail("got a slot while both were held")
        # Then it waited about wait_s, no longer
        assert time.monotonic() - started < 2
    finally:
        release.set()
        for thread in holders:
            thread.join(5)
    # And once the calls return, a slot is free again
    with slots():
        pass


# -- code checks --------------------------------------------------------------------------


def test_after_five_checks_even_the_right_code_is_too_many(system: System) -> None:
    # Given a delivered code
    created = system.api.post(
        "/v1/messages", json={"to": unique_phone(), "channels": ["sms"], "code": "4321"}
    )
    message_id = created.json()["id"]
    system.wait_final(message_id)
    check = f"/v1/messages/{message_id}/check"
    # When five wrong guesses are made
    for _ in range(5):
        assert system.api.post(check, json={"code": "9999"}).json() == {
            "valid": False,
            "reason": "mismatch",
        }
    # Then the sixth check fails even with the right code
    assert system.api.post(check, json={"code": "4321"}).json() == {
        "valid": False,
        "reason": "too_many_checks",
    }
