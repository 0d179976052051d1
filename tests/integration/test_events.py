"""Outcome events (issue 10): signed webhooks verified by `standardwebhooks`, retries with
the same webhook-id, per-message order, dead after the horizon and redelivery, Dramatiq
replies to a real actor, the feed in order, and `notify` on all three intake paths."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest

import worker
from tests.support.receiver import WEBHOOK_SECRET, Receiver, webhook_receiver
from tests.support.system import (
    API_TOKEN,
    System,
    magic_phone,
    running_system,
    unique_phone,
)
from tests.support.waiting import wait_for
from worker.broker import build_broker

#: Short, so that a dead delivery is seen within a test.
HORIZON_S = 3.0
REPLY_QUEUE = "producer-replies"
#: Another producer's token (issue 13): it sees none of the default producer's events.
OTHER_TOKEN = "token-of-producer-b-0123456789"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as running:
        yield running


@pytest.fixture(scope="module")
def system(
    pg_server_url: str, redis_url: str, template_db: str, receiver: Receiver
) -> Iterator[System]:
    env = {
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "WEBHOOK_RETRY_HORIZON_S": str(HORIZON_S),
        "API_TOKENS": f"{API_TOKEN},producer-b:{OTHER_TOKEN}",
    }
    with running_system(pg_server_url, redis_url, template=template_db, extra_env=env) as s:
        yield s


def _post(system: System, **body: Any) -> str:
    response = system.api.post("/v1/messages", json=body)
    assert response.status_code == 202, response.text
    message_id: str = response.json()["id"]
    return message_id


def _wait_events(receiver: Receiver, message_id: str, n: int, timeout_s: float = 20) -> Any:
    return wait_for(
        lambda: (got := receiver.delivered(message_id)) and len(got) >= n and got,
        f"{n} webhook(s) for {message_id}",
        timeout_s,
    )


def test_final_event_is_signed_and_carries_the_message_view(
    system: System, receiver: Receiver
) -> None:
    # Given a producer subscribing with a URL only (the default: final events)
    message_id = _post(
        system, to=unique_phone(), channels=["telegram"], notify={"url": f"{receiver.url}/ok"}
    )
    # When the code is delivered
    (event,) = _wait_events(receiver, message_id, 1)
    # Then one webhook came, verified by the standardwebhooks library, for the final status
    assert all(r.verified for r in receiver.of(message_id))
    assert event["type"] == "message.delivered"
    # and its data is what GET /v1/messages/{id} shows (nothing changed since)
    assert event["data"] == system.message(message_id)
    assert "code" not in event["data"] and "kodmobi_code" not in str(event)
    time.sleep(0.5)
    assert [r.event["type"] for r in receiver.of(message_id) if r.event] == ["message.delivered"]


def test_every_event_in_order_retried_with_the_same_webhook_id(
    system: System, receiver: Receiver
) -> None:
    # Given a receiver that answers 500 to the first try of every event, and a message
    # whose telegram attempt fails (a fallback to whatsapp)
    receiver.modes["/flaky"] = "flaky"
    every = ["message.sending", "message.sent", "message.fallback", "message.delivered"]
    message_id = _post(
        system,
        to=magic_phone(telegram=1, whatsapp=0),
        channels=["telegram", "whatsapp"],
        notify={"url": f"{receiver.url}/flaky", "events": every},
    )
    events = _wait_events(receiver, message_id, 4)
    # Then each event arrived, in the order of the changes
    assert [e["type"] for e in events] == every
    assert [e["data"]["status"] for e in events] == ["sending", "sent", "sent", "delivered"]
    assert events[2]["fallback"]["from_channel"] == "telegram"
    assert events[2]["fallback"]["to_channel"] == "whatsapp"
    assert [a["channel"] for a in events[2]["data"]["attempts"]] == ["telegram", "whatsapp"]
    # and every event was tried twice with one webhook-id, the next one only after
    receipts = receiver.of(message_id)
    assert [(r.event["type"] if r.event else None, r.status) for r in receipts] == [
        (t, s) for t in every for s in (500, 200)
    ]
    for first, second in zip(receipts[::2], receipts[1::2], strict=True):
        assert first.webhook_id == second.webhook_id == first.event["id"]  # type: ignore[index]
    # And the feed shows each try of it
    shown = system.api.get(f"/v1/events/{events[0]['id']}").json()
    (delivery,) = shown["deliveries"]
    assert delivery["state"] == "delivered"
    assert [t["http_status"] for t in delivery["history"]] == [500, 200]


def test_dead_after_the_horizon_then_redelivered(system: System, receiver: Receiver) -> None:
    # Given a receiver that is down
    receiver.modes["/down"] = "down"
    message_id = _post(
        system, to=unique_phone(), channels=["sms"], notify={"url": f"{receiver.url}/down"}
    )
    event_id = wait_for(
        lambda: receiver.of(message_id) and receiver.of(message_id)[0].webhook_id, "a try"
    )

    def delivery() -> dict[str, Any]:
        found: dict[str, Any] = system.api.get(f"/v1/events/{event_id}").json()
        return found["deliveries"][0]

    # Then after the horizon the event is dead, with its last error
    dead = wait_for(lambda: delivery()["state"] == "dead" and delivery(), "dead", HORIZON_S + 10)
    assert dead["last_error"] == "HTTP 500" and dead["tries"] >= 2
    # When the receiver is back and the producer asks for it again
    receiver.modes["/down"] = "ok"
    response = system.api.post(f"/v1/events/{event_id}/redeliver")
    assert response.status_code == 202, response.text
    # Then it arrives, with the same webhook-id
    (event,) = _wait_events(receiver, message_id, 1)
    assert event["id"] == event_id and event["type"] == "message.delivered"
    assert system.api.post(f"/v1/events/{event_id}/redeliver").status_code == 409


def test_dramatiq_reply_reaches_a_producer_actor(system: System) -> None:
    # Given a producer's actor on its own queue (nothing of ours imported but the broker
    # builder, for the test's namespace)
    broker = build_broker(system.redis_url, system.env["BROKER_NAMESPACE"])
    got: list[dict[str, Any]] = []
    arrived = threading.Event()

    @dramatiq.actor(queue_name=REPLY_QUEUE, actor_name="on_code_event", broker=broker)
    def on_code_event(event: dict[str, Any]) -> None:
        got.append(event)
        arrived.set()

    consumer = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    consumer.start()
    try:
        # When it sends over Dramatiq with notify naming that actor
        key = system.send_raw(
            to=unique_phone(),
            channels=["telegram"],
            notify={"queue_name": REPLY_QUEUE, "actor_name": "on_code_event"},
        )
        # Then its actor is called with the final event
        assert arrived.wait(20)
    finally:
        consumer.stop()
        broker.close()
    (event,) = got
    assert event["type"] == "message.delivered"
    assert event["data"]["idempotency_key"] == key
    assert event["data"] == system.by_key(key)


def test_python_path_and_rejected_input_are_heard_of(system: System, receiver: Receiver) -> None:
    # Given the Python API with notify
    accepted = worker.send_code(
        unique_phone(), channels=["whatsapp"], notify={"url": f"{receiver.url}/py"}
    )
    (event,) = _wait_events(receiver, accepted.id, 1)
    assert event["type"] == "message.delivered"
    # And a Dramatiq message with a bad recipient but a valid notify
    key = system.send_raw(to="not-a-phone", notify={"url": f"{receiver.url}/rejected"})
    rejected = wait_for(lambda: system.by_key(key), "the rejected message")
    (event,) = _wait_events(receiver, rejected["id"], 1)
    assert event["type"] == "message.rejected"
    assert event["data"]["status"] == "rejected" and "to:" in event["data"]["failure_reason"]
    assert event["data"] == system.by_key(key)


def test_bad_notify_is_refused_on_every_path(system: System) -> None:
    cases = [
        ({"url": "ftp://example.com/x"}, "url"),
        ({"url": "https://example.com/x", "events": ["message.nope"]}, "events"),
        ({"queue_name": "replies"}, "notify"),
        ({"queue_name": "kodmobi", "actor_name": "send_code"}, "notify"),
        ({"url": "https://example.com/x", "secret": "x"}, "secret"),
    ]
    for notify, field in cases:
        # HTTP: 422 naming the field
        response = system.api.post("/v1/messages", json={"to": unique_phone(), "notify": notify})
        assert response.status_code == 422, response.text
        locs = [e["loc"] for e in response.json()["detail"]]
        assert any(loc[:2] == ["body", "notify"] and field in loc for loc in locs), locs
        # Python: InvalidRequest naming it
        with pytest.raises(worker.InvalidRequest, match="notify"):
            worker.send_code(unique_phone(), notify=notify)
        # Dramatiq: recorded as rejected with a reason naming it
        key = system.send_raw(to=unique_phone(), notify=notify)
        found = wait_for(lambda k=key: system.by_key(k), "rejected")
        assert found["status"] == "rejected" and "notify" in found["failure_reason"]


def test_feed_lists_every_event_in_order(system: System, receiver: Receiver) -> None:
    # Given a message that falls back (four events)
    message_id = _post(
        system, to=magic_phone(telegram=1, whatsapp=0), channels=["telegram", "whatsapp"]
    )
    system.wait_final(message_id)

    def read_all() -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 3}
            if after:
                params["after"] = after
            page = system.api.get("/v1/events", params=params)
            assert page.status_code == 200, page.text
            listed += page.json()["events"]
            if page.json()["next_after"] in (after, None):
                return listed
            after = page.json()["next_after"]

    # When a pull consumer reads the feed page by page
    listed = wait_for(
        lambda: (
            (got := read_all())
            and any(e["type"] == "message.delivered" and e["data"]["id"] == message_id for e in got)
            and got
        ),
        "the final event in the feed",
    )
    # Then it sees every event once, this message's in the order of its changes
    assert len({e["id"] for e in listed}) == len(listed)
    mine = [e["type"] for e in listed if e["data"]["id"] == message_id]
    assert mine == ["message.sending", "message.sent", "message.fallback", "message.delivered"]
    # the final one equal to the message's view
    assert [e for e in listed if e["data"]["id"] == message_id][-1]["data"] == system.message(
        message_id
    )
    # And the feed keeps its rules
    assert system.api.get("/v1/events", params={"limit": 501}).status_code == 422
    unknown = "0" * 26
    assert system.api.get("/v1/events", params={"after": unknown}).status_code == 404
    assert system.api.get(f"/v1/events/{unknown}").status_code == 404
    no_token = system.api.get("/v1/events", headers={"Authorization": "Bearer nope"})
    assert no_token.status_code == 401
    # And another producer sees none of it
    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    assert system.api.get("/v1/events", headers=other).json()["events"] == []
    assert system.api.get(f"/v1/events/{listed[0]['id']}", headers=other).status_code == 404
    redeliver = system.api.post(f"/v1/events/{listed[0]['id']}/redeliver", headers=other)
    assert redeliver.status_code == 404
