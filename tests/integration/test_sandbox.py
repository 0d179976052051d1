"""The sandbox over a real loopback socket, driven by plain httpx (not our kod.mobi client)."""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.support.servers import serve
from tests.support.waiting import wait_for
from worker.embedded import free_port
from worker.sandbox import SandboxConfig, create_app
from worker.sandbox.rules import decrypt_code

KEY = "test-key"
#: the sandbox's baseline for this module; every test starts from it again
BASE_CONFIG: dict[str, Any] = {
    **SandboxConfig().as_dict(),
    "api_key": KEY,
    "seed": 7,
    "callback_delay_ms": 10,
    "magic_slow_ms": 300,
    "slow_ms": 300,
}
ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
ERROR_KEYS = {"success", "error", "error_params", "status", "sys_message"}

_phones = itertools.count(1000)


def fresh_phone() -> str:
    """A valid Russian mobile number no other test uses (sessions are per recipient)."""
    return f"+7952{next(_phones):07d}"


def magic_phone(telegram: str = "00", whatsapp: str = "00", sms: str = "00") -> str:
    return f"+79990{telegram}{whatsapp}{sms}"


def assert_error(response: httpx.Response, status: int, sys_message: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ERROR_KEYS
    assert body["success"] is False
    assert body["status"] == status
    assert body["sys_message"] == sys_message
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["error_params"], dict)
    return body


# -- a callback receiver ------------------------------------------------------------------


class Receiver:
    """Collects every callback by the token in its URL. Tokens starting `flaky` fail their
    first call with a 503; `chunked` ones are answered chunked, `close` ones close."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.lock = threading.Lock()
        self.base_url = ""
        self.app = Starlette(routes=[Route("/cb/{token}", self.endpoint, methods=["GET", "POST"])])

    async def endpoint(self, request: Request) -> Response:
        token = request.path_params["token"]
        content_type = request.headers.get("content-type", "")
        if request.method == "GET":
            kind, data = "query", dict(request.query_params)
        elif content_type.startswith("application/json"):
            kind, data = "json", json.loads(await request.body())
        else:
            kind, data = "form", dict(await request.form())
        with self.lock:
            calls = self.calls[token]
            calls.append({"method": request.method, "kind": kind, "data": data})
            first = len(calls) == 1
        if token.startswith("flaky") and first:
            return Response("try later", status_code=503)
        if token.startswith("chunked"):
            return StreamingResponse(iter([b"o", b"k" * 10_000]))
        if token.startswith("close"):
            return Response("ok", headers={"connection": "close"})
        return Response("ok")

    def url(self, prefix: str = "t") -> tuple[str, str]:
        token = f"{prefix}-{uuid.uuid4().hex}"
        return token, f"{self.base_url}/cb/{token}?src=sandbox"

    def got(self, token: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.calls.get(token, []))

    def statuses(self, token: str) -> list[str]:
        return [c["data"]["status"] for c in self.got(token)]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    with serve(rec.app) as base_url:
        rec.base_url = base_url
        yield rec


@pytest.fixture(scope="module")
def sandbox_url() -> Iterator[str]:
    with serve(create_app(SandboxConfig(**BASE_CONFIG))) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def http(sandbox_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox_url, headers={"x-api-key": KEY}, timeout=10) as client:
        yield client


@pytest.fixture(autouse=True)
def _baseline(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "http" in request.fixturenames:
        client: httpx.Client = request.getfixturevalue("http")
        assert client.post("/sandbox/config", json=BASE_CONFIG).status_code == 200


def configure(http: httpx.Client, **changes: Any) -> None:
    response = http.post("/sandbox/config", json=changes)
    assert response.status_code == 200, response.text


def send(http: httpx.Client, to: str, channel: str, **extra: Any) -> httpx.Response:
    return http.post("/manual/send", json={"to": to, "channel": channel, **extra})


def sentinel_arrived(http: httpx.Client, receiver: Receiver) -> None:
    """Send an ordinary message and wait for its callback: earlier callbacks have had as long."""
    token, url = receiver.url()
    assert send(http, fresh_phone(), "sms", callback_url=url).status_code == 200
    wait_for(lambda: receiver.got(token))
    time.sleep(0.05)


# -- authentication and the error body ----------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}], ids=["missing", "wrong"])
@pytest.mark.parametrize("path", ["/manual/send", "/manual/channels", "/sandbox/messages"])
def test_missing_or_wrong_key_is_401_with_kodmobi_error_body(
    sandbox_url: str, headers: dict[str, str], path: str
) -> None:
    method = "POST" if path == "/manual/send" else "GET"
    body = {"to": "+79522966236", "channel": "sms"}
    response = httpx.request(method, sandbox_url + path, headers=headers, json=body)
    assert_error(response, 401, "ERROR_UNAUTHORIZED")
    assert "x-api-key" in response.json()["error_params"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": "+7952", "channel": "sms"}, "to"),
        ({"to": "79522966236", "channel": "sms"}, "to"),
        ({"to": "+7 952 296 62 36", "channel": "sms"}, "to"),
        ({"to": "+70000000000", "channel": "sms"}, "to"),
        ({"to": "not-an-email@", "channel": "email"}, "to"),
        ({"channel": "sms"}, "to"),
        ({"to": "+79522966236", "channel": "fax"}, "channel"),
        ({"to": "+79522966236"}, "channel"),
        ({"to": "+79522966236", "channel": "email"}, "channel"),
        ({"to": "user@example.com", "channel": "sms"}, "channel"),
        ({"to": "+79522966236", "channel": "sms", "code": "1234567"}, "code"),
        ({"to": "+79522966236", "channel": "sms", "code": "123"}, "code"),
        ({"to": "+79522966236", "channel": "sms", "code": "12ab"}, "code"),
        ({"to": "+79522966236", "channel": "sms", "provider_id": 99}, "provider_id"),
        ({"to": "+79522966236", "channel": "sms", "provider_id": 1}, "provider_id"),
        ({"to": "+79522966236", "channel": "sms", "provider_id": "5"}, "provider_id"),
        ({"to": "+79522966236", "channel": "sms", "callback_url": "ftp://x/y"}, "callback_url"),
        ({"to": "+79522966236", "channel": "sms", "callback_url": "not a url"}, "callback_url"),
        ({"to": ["+79522966236"], "channel": {"x": 1}}, "to"),
    ],
)
def test_bad_manual_send_is_400_naming_the_field(
    http: httpx.Client, body: dict[str, Any], field: str
) -> None:
    response = http.post("/manual/send", json=body)
    error = assert_error(response, 400, "ERROR_BAD_REQUEST")
    assert field in error["error_params"]


def test_every_bad_field_is_named_at_once(http: httpx.Client) -> None:
    body = {"to": "+7952", "channel": "fax", "code": "1234567", "callback_url": "x"}
    error = assert_error(http.post("/manual/send", json=body), 400, "ERROR_BAD_REQUEST")
    assert set(error["error_params"]) == {"to", "channel", "code", "callback_url"}


@pytest.mark.parametrize(
    "content", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe", b"[" * 50_000]
)
def test_unreadable_body_is_400_never_500(http: httpx.Client, content: bytes) -> None:
    for path in ("/manual/send", "/session/create", "/session/send", "/sandbox/config"):
        response = http.post(path, content=content, headers={"content-type": "application/json"})
        error = assert_error(response, 400, "ERROR_BAD_REQUEST")
        assert "body" in error["error_params"]


def test_unknown_route_and_wrong_method_answer_the_error_body(http: httpx.Client) -> None:
    assert_error(http.get("/no/such/route"), 404, "ERROR_NOT_FOUND")
    assert_error(http.post("/manual/send/"), 404, "ERROR_NOT_FOUND")
    response = http.get("/manual/send")
    assert_error(response, 405, "ERROR_METHOD_NOT_ALLOWED")
    assert "POST" in response.headers["allow"]


# -- manual/send and its callbacks ------------------------------------------------------------


def test_manual_send_answers_like_kodmobi_with_increasing_ids(http: httpx.Client) -> None:
    first = send(http, fresh_phone(), "sms", code="0000")
    second = send(http, "someone@example.com", "email", provider_id=1)
    assert first.status_code == second.status_code == 200
    a, b = first.json(), second.json()
    assert a["message"] == "Sent to queue."
    assert re.fullmatch(r"aes256:[0-9a-f]{32}:[0-9a-f]+:[0-9]+", a["code"])
    assert decrypt_code(a["code"], KEY) == "0000"
    assert re.fullmatch(r"[0-9]{4}", decrypt_code(b["code"], KEY)), "a drawn 4-digit code"
    assert isinstance(a["message_id"], int) and a["message_id"] >= 1
    assert b["message_id"] == a["message_id"] + 1


def test_accepted_send_gets_a_delivered_callback(http: httpx.Client, receiver: Receiver) -> None:
    token, url = receiver.url()
    to = fresh_phone()
    answer = send(http, to, "telegram", code="4321", provider_id=2, callback_url=url).json()

    [call] = wait_for(lambda: receiver.got(token))
    assert call["method"] == "POST" and call["kind"] == "json"
    data = call["data"]
    assert data["message_id"] == answer["message_id"]
    assert data["status"] == "delivered"
    assert data["channel"] == "telegram" and data["to"] == to
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["timestamp"])

    def recorded() -> Any:
        [record] = http.get("/sandbox/messages", params={"to": to}).json()["messages"]
        return record if record["callbacks"] and record["callbacks"][0]["result"] else None

    record = wait_for(recorded)
    assert record["message_id"] == answer["message_id"]
    assert record["code"] == "4321" and record["provider_id"] == 2
    assert record["callback_url"] == url
    assert record["callbacks"][0]["status"] == "delivered"
    assert record["callbacks"][0]["result"] == "200"


@pytest.mark.parametrize(
    ("to", "channel", "statuses"),
    [
        (magic_phone(telegram="00"), "telegram", ["delivered"]),
        (magic_phone(telegram="01"), "telegram", ["failed"]),
        (magic_phone(telegram="01"), "whatsapp", ["delivered"]),
        (magic_phone(whatsapp="04"), "whatsapp", ["delivered", "delivered"]),
        (magic_phone(sms="05"), "sms", ["delivered", "sent"]),
        (magic_phone(sms="42"), "sms", ["delivered"]),
        ("someone+o01@example.com", "email", ["failed"]),
        ("someone+o04@example.com", "email", ["delivered", "delivered"]),
    ],
)
def test_magic_recipient_chooses_its_callbacks(
    http: httpx.Client, receiver: Receiver, to: str, channel: str, statuses: list[str]
) -> None:
    token, url = receiver.url()
    message_id = send(http, to, channel, callback_url=url).json()["message_id"]
    wait_for(lambda: len(receiver.got(token)) >= len(statuses))
    sentinel_arrived(http, receiver)
    assert receiver.statuses(token) == statuses
    assert {c["data"]["message_id"] for c in receiver.got(token)} == {message_id}


def test_out_of_order_sends_a_stale_sent_after_the_final(
    http: httpx.Client, receiver: Receiver
) -> None:
    token, url = receiver.url()
    send(http, magic_phone(telegram="05"), "telegram", callback_url=url)
    final, stale = (
        c["data"] for c in wait_for(lambda: len(receiver.got(token)) == 2 and receiver.got(token))
    )
    assert (final["status"], stale["status"]) == ("delivered", "sent")
    assert stale["timestamp"] <= final["timestamp"]


@pytest.mark.parametrize(("code", "statuses"), [("02", []), ("06", ["sent"])])
def test_magic_no_callback_and_progress_only(
    http: httpx.Client, receiver: Receiver, code: str, statuses: list[str]
) -> None:
    token, url = receiver.url()
    assert send(http, magic_phone(whatsapp=code), "whatsapp", callback_url=url).status_code == 200
    sentinel_arrived(http, receiver)
    assert receiver.statuses(token) == statuses


def test_magic_slow_answer_then_delivered(http: httpx.Client, receiver: Receiver) -> None:
    token, url = receiver.url()
    started = time.monotonic()
    response = send(http, magic_phone(sms="03"), "sms", callback_url=url)
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3  # magic_slow_ms of BASE_CONFIG
    wait_for(lambda: receiver.got(token))
    assert receiver.statuses(token) == ["delivered"]


@pytest.mark.parametrize(
    ("code", "status", "sys_message"),
    [
        ("10", 403, "ERROR_USER_NOT_AUTHORIZE_ON_CHANNEL"),
        ("11", 400, "ERROR_PROJECT_HAS_NO_CHANNEL"),
        ("12", 400, "ERROR_PROJECT_HAS_NO_CHANNELS"),
        ("13", 403, "ERROR_CHANNEL_NOT_ALLOWED_COUNTRY"),
        ("14", 403, "ERROR_PHONE_BLOCKED"),
        ("15", 403, "ERROR_BLOCKED"),
        ("16", 429, "ERROR_MESSAGE_ATTEMPT"),
        ("17", 400, "ERROR_WRONG_BALANCE"),
        ("18", 403, "ERROR_ACCESS_DENIED"),
        ("19", 400, "ERROR_BAD_REQUEST"),
        ("20", 500, "ERROR_INTERNAL"),
    ],
)
def test_magic_refusals(http: httpx.Client, code: str, status: int, sys_message: str) -> None:
    to = magic_phone(sms=code)
    for _ in range(2):  # every time, not once
        response = send(http, to, "sms", callback_url="http://127.0.0.1:9/never")
        assert_error(response, status, sys_message)
    if status == 429:
        assert response.headers["retry-after"] == "1"
    # Another channel of the same number is not refused; the refusals were not recorded.
    assert send(http, to, "telegram").status_code == 200
    recorded = http.get("/sandbox/messages", params={"to": to}).json()["messages"]
    assert {m["channel"] for m in recorded} == {"telegram"}


def test_magic_email_refusal(http: httpx.Client) -> None:
    assert_error(send(http, "blocked+o14@example.com", "email"), 403, "ERROR_PHONE_BLOCKED")


def test_magic_503_is_not_json(http: httpx.Client) -> None:
    response = send(http, magic_phone(telegram="21"), "telegram")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("text/html")
    with pytest.raises(ValueError):
        response.json()


def test_magic_recipients_ignore_the_rates(http: httpx.Client, receiver: Receiver) -> None:
    configure(http, error_5xx_rate=1, failure_callback_rate=1)
    token, url = receiver.url()
    assert send(http, magic_phone(), "sms", callback_url=url).status_code == 200
    wait_for(lambda: receiver.got(token))
    assert receiver.statuses(token) == ["delivered"]


@pytest.mark.parametrize(
    ("style", "method", "kind"), [("form", "POST", "form"), ("get", "GET", "query")]
)
def test_callback_styles(
    http: httpx.Client, receiver: Receiver, style: str, method: str, kind: str
) -> None:
    configure(http, callback_style=style)
    token, url = receiver.url()
    to = fresh_phone()
    message_id = send(http, to, "sms", callback_url=url).json()["message_id"]
    [call] = wait_for(lambda: receiver.got(token))
    assert (call["method"], call["kind"]) == (method, kind)
    assert call["data"]["message_id"] == str(message_id)
    assert call["data"]["status"] == "delivered"
    assert call["data"]["to"] == to and call["data"]["channel"] == "sms"
    if kind == "query":
        assert call["data"]["src"] == "sandbox", "the callback URL's own query is kept"


def test_failed_callback_is_retried_once_a_second(http: httpx.Client, receiver: Receiver) -> None:
    configure(http, callback_retries=1)
    token, url = receiver.url("flaky")
    to = fresh_phone()
    send(http, to, "sms", callback_url=url)
    wait_for(lambda: len(receiver.got(token)) == 2, timeout_s=5)
    record = wait_for(
        lambda: (
            (m := http.get("/sandbox/messages", params={"to": to}).json()["messages"])
            and m[0]["callbacks"][0]["result"] == "200"
            and m[0]
        )
    )
    assert record["callbacks"][0]["tries"] == 2
    stats = http.get("/sandbox/stats").json()["callbacks"]
    assert stats["retried"] >= 1 and stats["sent"] >= 1


def test_unreachable_callback_url_is_recorded_not_fatal(http: httpx.Client) -> None:
    configure(http, callback_retries=0)
    to = fresh_phone()
    url = f"http://127.0.0.1:{free_port()}/gone"
    assert send(http, to, "sms", callback_url=url).status_code == 200
    record = wait_for(
        lambda: (
            (m := http.get("/sandbox/messages", params={"to": to}).json()["messages"])
            and m[0]["callbacks"]
            and m[0]["callbacks"][0]["result"]
            and m[0]
        )
    )
    assert record["callbacks"][0]["result"] == "ConnectError"
    assert http.get("/manual/channels").status_code == 200


@pytest.mark.parametrize("kind", ["chunked", "close", "t"])
def test_callbacks_survive_any_answer_framing(
    http: httpx.Client, receiver: Receiver, kind: str
) -> None:
    # Given a receiver answering chunked, or closing each connection, or keeping it
    tokens = []
    for _ in range(5):
        token, url = receiver.url(kind)
        tokens.append(token)
        assert send(http, fresh_phone(), "sms", callback_url=url).status_code == 200
    # Then every callback arrives once, and each is recorded as answered 200
    wait_for(lambda: all(receiver.got(t) for t in tokens))
    results = wait_for(
        lambda: (
            (
                r := [
                    cb["result"]
                    for m in http.get("/sandbox/messages").json()["messages"]
                    if m["callback_url"] and any(t in m["callback_url"] for t in tokens)
                    for cb in m["callbacks"]
                ]
            )
            and None not in r
            and r
        )
    )
    assert results == ["200"] * 5
    assert all(len(receiver.got(t)) == 1 for t in tokens)


def test_progress_callbacks_come_before_the_final(http: httpx.Client, receiver: Receiver) -> None:
    configure(http, progress_callbacks=True)
    token, url = receiver.url()
    send(http, fresh_phone(), "sms", callback_url=url)
    wait_for(lambda: len(receiver.got(token)) == 2)
    assert receiver.statuses(token) == ["sent", "delivered"]


# -- rates, latency and runtime configuration ----------------------------------------------------


def test_runtime_config_injects_5xx_and_429(http: httpx.Client) -> None:
    configure(http, error_5xx_rate=1)
    assert_error(send(http, fresh_phone(), "sms"), 500, "ERROR_INTERNAL")
    configure(http, error_5xx_rate=0, throttle_429_rate=1)
    response = send(http, fresh_phone(), "sms")
    assert_error(response, 429, "ERROR_MESSAGE_ATTEMPT")
    assert response.headers["retry-after"] == "1"
    configure(http, throttle_429_rate=0)
    assert send(http, fresh_phone(), "sms").status_code == 200


@pytest.mark.parametrize(
    "changes",
    [
        {"no_such_knob": 1},
        {"error_5xx_rate": 2},
        {"error_5xx_rate": "0.5"},
        {"callback_style": "xml"},
        {"progress_callbacks": "yes"},
        {"latency_ms": -1},
        {"callback_retries": 1.5},
    ],
)
def test_bad_config_is_400_naming_the_field(http: httpx.Client, changes: dict[str, Any]) -> None:
    before = http.get("/sandbox/config").json()
    error = assert_error(http.post("/sandbox/config", json=changes), 400, "ERROR_BAD_REQUEST")
    assert set(error["error_params"]) == set(changes)
    assert http.get("/sandbox/config").json() == before, "nothing applied"


def test_config_is_read_back(http: httpx.Client) -> None:
    configure(http, failure_callback_rate=0.25, callback_style="form")
    config = http.get("/sandbox/config").json()
    assert config["failure_callback_rate"] == 0.25 and config["callback_style"] == "form"
    assert set(SandboxConfig().as_dict()) <= set(config)


def test_same_seed_same_outcomes(http: httpx.Client) -> None:
    def outcomes() -> list[str]:
        configure(http, seed=123, failure_callback_rate=0.5, lost_callback_rate=0.3)
        since = http.get("/sandbox/messages").json()["messages"][-1]["message_id"]
        for _ in range(12):
            send(http, fresh_phone(), "sms")
        messages = http.get("/sandbox/messages", params={"since_id": since}).json()["messages"]
        return [m["outcome"] for m in messages]

    first, second = outcomes(), outcomes()
    assert first == second
    assert len(set(first)) > 1, "the rates really were drawn"


def test_slow_answer_is_accepted_even_when_the_caller_gives_up(
    http: httpx.Client, receiver: Receiver
) -> None:
    configure(http, slow_rate=1)
    token, url = receiver.url()
    to = fresh_phone()
    body = {"to": to, "channel": "sms", "callback_url": url}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/manual/send", json=body, timeout=0.1)  # the slow answer takes 0.3 s
    wait_for(lambda: receiver.got(token))
    [record] = http.get("/sandbox/messages", params={"to": to}).json()["messages"]
    assert record["outcome"].startswith("slow")


def test_latency_is_added_to_answers(http: httpx.Client) -> None:
    configure(http, latency_ms=200)
    started = time.monotonic()
    assert http.get("/manual/channels").status_code == 200
    assert time.monotonic() - started >= 0.2


def test_manual_channel_timeout_when_enabled(http: httpx.Client) -> None:
    to = fresh_phone()
    assert send(http, to, "sms").status_code == 200
    assert send(http, to, "sms").status_code == 200, "not enforced by default"
    configure(http, manual_channel_timeout_s=30)
    assert send(http, to, "sms").status_code == 200
    response = send(http, to, "sms")
    assert_error(response, 429, "ERROR_MESSAGE_ATTEMPT")
    assert 1 <= int(response.headers["retry-after"]) <= 30
    assert send(http, to, "whatsapp").status_code == 200, "per channel"


# -- channels ----------------------------------------------------------------------------------


def test_manual_channels_lists_every_channel_with_providers(http: httpx.Client) -> None:
    channels = http.get("/manual/channels").json()
    assert {c["type"] for c in channels} == {"sms", "whatsapp", "telegram", "email"}
    ids = []
    for channel in channels:
        assert isinstance(channel["name"], str) and channel["providers"]
        for provider in channel["providers"]:
            assert set(provider) == {"id", "name", "type", "is_system"}
            assert isinstance(provider["id"], int) and isinstance(provider["is_system"], bool)
            ids.append(provider["id"])
    assert len(ids) == len(set(ids))
    # Every listed provider is accepted for its own channel.
    for channel in channels:
        to = "p@example.com" if channel["type"] == "email" else fresh_phone()
        for provider in channel["providers"]:
            assert send(http, to, channel["type"], provider_id=provider["id"]).status_code == 200


# -- sessions ----------------------------------------------------------------------------------


SESSION_CHANNEL_KEYS = {"name", "type", "is_active", "timeout", "image_url", "link"}


def test_session_create_send_and_timeouts(http: httpx.Client) -> None:
    to = fresh_phone()
    created = http.post("/session/create", json={"to": to, "type": "telegram", "send": True})
    assert created.status_code == 200, created.text
    session = created.json()
    assert ULID_RE.match(session["session_id"])
    assert session["sent_to"] == "telegram"
    assert session["session_expired_at"].endswith("Z")
    timeouts = {c["type"]: c["timeout"] for c in session["channels"]}
    assert timeouts == {"whatsapp": 0, "telegram": 60, "sms": 0}
    assert all(set(c) == SESSION_CHANNEL_KEYS for c in session["channels"])

    again = http.post("/session/create", json={"to": to, "send": False}).json()
    assert again["session_id"] == session["session_id"]
    assert again["sent_to"] is None

    refused = http.post(
        "/session/send", json={"session_id": session["session_id"], "type": "telegram"}
    )
    assert_error(refused, 429, "ERROR_MESSAGE_ATTEMPT")
    assert 1 <= int(refused.headers["retry-after"]) <= 60

    sent = http.post("/session/send", json={"session_id": session["session_id"], "type": "sms"})
    assert sent.status_code == 200, sent.text
    body = sent.json()
    assert body["session_id"] == session["session_id"]
    assert body["session_expired_at"] == session["session_expired_at"]
    assert set(body["channel"]) == SESSION_CHANNEL_KEYS
    assert (body["channel"]["type"], body["channel"]["timeout"]) == ("sms", 60)

    channels = http.get("/session/channels", params={"session_id": session["session_id"]})
    timeouts = {c["type"]: c["timeout"] for c in channels.json()}
    assert timeouts["whatsapp"] == 0 and 0 < timeouts["telegram"] <= 60
    assert 0 < timeouts["sms"] <= 60

    recorded = http.get("/sandbox/messages", params={"to": to}).json()["messages"]
    assert [(m["channel"], m["source"]) for m in recorded] == [
        ("telegram", "session"),
        ("sms", "session"),
    ]
    assert recorded[0]["code"] == recorded[1]["code"], "one session, one code"
    assert {m["session_id"] for m in recorded} == {session["session_id"]}


def test_session_default_channel_is_whatsapp_then_the_last_used(http: httpx.Client) -> None:
    phone = fresh_phone()
    assert http.post("/session/create", json={"to": phone}).json()["sent_to"] == "whatsapp"
    email = f"s{uuid.uuid4().hex[:8]}@example.com"
    created = http.post("/session/create", json={"to": email}).json()
    assert created["sent_to"] == "email"
    assert [c["type"] for c in created["channels"]] == ["email"]


def test_session_magic_refusal_creates_no_session(http: httpx.Client) -> None:
    to = magic_phone(whatsapp="15", telegram="10")
    refused = http.post("/session/create", json={"to": to, "type": "whatsapp"})
    assert_error(refused, 403, "ERROR_BLOCKED")
    created = http.post("/session/create", json={"to": to, "send": False}).json()
    active = {c["type"]: c["is_active"] for c in created["channels"]}
    assert active == {"whatsapp": True, "telegram": False, "sms": True}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": "+7952"}, "to"),
        ({"type": "sms"}, "to"),
        ({"to": "+79522966236", "type": "email"}, "type"),
        ({"to": "+79522966236", "type": "fax"}, "type"),
        ({"to": "+79522966236", "send": "yes"}, "send"),
    ],
)
def test_bad_session_create_is_400(http: httpx.Client, body: dict[str, Any], field: str) -> None:
    error = assert_error(http.post("/session/create", json=body), 400, "ERROR_BAD_REQUEST")
    assert set(error["error_params"]) == {field}


def test_invalid_and_unknown_session_ids(http: httpx.Client) -> None:
    unknown = "01K8N1VMPN0EE389K72YW0CBM2"
    for bad in ("nope", "01K8N1VMPN0EE389K72YW0CBMU", unknown + "0"):
        error = assert_error(
            http.post("/session/send", json={"session_id": bad, "type": "sms"}),
            400,
            "ERROR_BAD_REQUEST",
        )
        assert "session_id" in error["error_params"]
        assert_error(
            http.get("/session/channels", params={"session_id": bad}), 400, "ERROR_BAD_REQUEST"
        )
    assert_error(
        http.post("/session/send", json={"session_id": unknown, "type": "sms"}),
        404,
        "ERROR_SESSION_NOT_FOUND",
    )
    assert_error(
        http.get("/session/channels", params={"session_id": unknown}),
        404,
        "ERROR_SESSION_NOT_FOUND",
    )


def test_session_channels_without_a_session(http: httpx.Client) -> None:
    channels = http.get("/session/channels").json()
    assert [c["type"] for c in channels] == ["whatsapp", "telegram", "sms", "email"]
    for channel in channels:
        assert set(channel) == SESSION_CHANNEL_KEYS
        assert channel["timeout"] == 0
        assert channel["image_url"].startswith("https://")


# -- the older api/v2 -------------------------------------------------------------------------


def test_v2_create_check_send_and_channel_check(http: httpx.Client) -> None:
    digits = fresh_phone()[2:]
    created = http.get(
        "/api/v2/message/create", params={"phone": "8" + digits, "type": "sms", "code": "4321"}
    )
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["success"] is True and body["type"] == "sms"
    assert body["message"] == "Sent to queue."
    session_id = body["session_id"]
    assert ULID_RE.match(session_id)
    [record] = http.get("/sandbox/messages", params={"to": "+7" + digits}).json()["messages"]
    assert (record["source"], record["code"]) == ("v2", "4321"), "8… is normalised to +7…"

    def check(code: str) -> Any:
        params = {"session_id": session_id, "code": code}
        return http.get("/api/v2/message/check", params=params).json()

    assert check("4321") == {"success": True, "session_id": session_id, "valid": True}
    assert check("0000")["valid"] is False

    again = http.get("/api/v2/message/send", params={"session_id": session_id, "type": "sms"})
    assert_error(again, 429, "ERROR_MESSAGE_ATTEMPT")
    resent = http.get(
        "/api/v2/message/send",
        params={"session_id": session_id, "type": "telegram", "code": "5555"},
    ).json()
    assert resent == {
        "success": True,
        "session_id": session_id,
        "type": "telegram",
        "message": "Sent to queue.",
    }
    assert check("5555")["valid"] is True

    active = http.get("/api/v2/channel/check", params={"session_id": session_id, "type": "sms"})
    assert active.json() == {
        "success": True,
        "session_id": session_id,
        "type": "sms",
        "is_active": True,
    }


@pytest.mark.parametrize("prefix", ["+7", "7", "8"])
def test_v2_accepts_its_phone_spellings(http: httpx.Client, prefix: str) -> None:
    digits = fresh_phone()[2:]
    response = http.get("/api/v2/message/create", params={"phone": prefix + digits})
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "whatsapp", "the default channel"
    [record] = http.get("/sandbox/messages", params={"to": "+7" + digits}).json()["messages"]
    assert record["channel"] == "whatsapp"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"phone": "99522966236"}, "phone"),
        ({"phone": "+89522966236"}, "phone"),
        ({"phone": "7952296623"}, "phone"),
        ({}, "phone"),
        ({"phone": "79522966236", "type": "email"}, "type"),
        ({"phone": "79522966236", "code": "12"}, "code"),
    ],
)
def test_v2_create_refuses_bad_parameters(
    http: httpx.Client, params: dict[str, str], field: str
) -> None:
    error = assert_error(
        http.get("/api/v2/message/create", params=params), 400, "ERROR_BAD_REQUEST"
    )
    assert field in error["error_params"]


def test_v2_magic_phone_is_refused_like_manual_send(http: httpx.Client) -> None:
    phone = magic_phone(telegram="13")[1:]
    response = http.get("/api/v2/message/create", params={"phone": phone, "type": "telegram"})
    assert_error(response, 403, "ERROR_CHANNEL_NOT_ALLOWED_COUNTRY")


def test_v2_unknown_session(http: httpx.Client) -> None:
    params = {"session_id": "01K8N1VMPN0EE389K72YW0CBM2", "code": "1234"}
    assert_error(http.get("/api/v2/message/check", params=params), 404, "ERROR_SESSION_NOT_FOUND")
    assert_error(
        http.get("/api/v2/message/check", params={"session_id": "x"}), 400, "ERROR_BAD_REQUEST"
    )


# -- the record and the counters ------------------------------------------------------------------


def test_record_filters_and_clearing_keeps_the_id_counter(http: httpx.Client) -> None:
    to = fresh_phone()
    ids = [send(http, to, "sms", code="9999").json()["message_id"] for _ in range(3)]
    mine = http.get("/sandbox/messages", params={"to": to}).json()["messages"]
    assert [m["message_id"] for m in mine] == ids
    assert set(mine[0]) >= {
        "message_id",
        "to",
        "channel",
        "code",
        "provider_id",
        "callback_url",
        "outcome",
        "received_at",
        "callbacks",
    }
    later = http.get("/sandbox/messages", params={"since_id": ids[0]}).json()["messages"]
    assert [m["message_id"] for m in later] == ids[1:]
    assert http.get(f"/sandbox/messages/{ids[1]}").json()["message_id"] == ids[1]
    assert_error(http.get("/sandbox/messages", params={"since_id": "x"}), 400, "ERROR_BAD_REQUEST")

    assert http.delete("/sandbox/messages").json()["deleted"] >= 3
    assert http.get("/sandbox/messages").json() == {"messages": []}
    assert_error(http.get(f"/sandbox/messages/{ids[1]}"), 404, "ERROR_MESSAGE_NOT_FOUND")
    assert send(http, to, "sms").json()["message_id"] == ids[-1] + 1


def test_stats_count_requests_and_answers(http: httpx.Client) -> None:
    before = http.get("/sandbox/stats").json()
    send(http, fresh_phone(), "sms")
    send(http, "+7952", "sms")
    after = http.get("/sandbox/stats").json()
    sends = "POST /manual/send"
    assert after["requests"][sends] == before["requests"].get(sends, 0) + 2
    assert after["responses"]["400"] == before["responses"].get("400", 0) + 1
    assert after["sends"]["accepted"] == before["sends"]["accepted"] + 1
    assert set(after["callbacks"]) >= {"sent", "failed"}


# -- the command ------------------------------------------------------------------------------


def test_kodmobi_sandbox_command_serves() -> None:
    port = free_port()
    env = {**os.environ, "KODMOBI_API_KEY": "from-env"}
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "sandbox", "--port", str(port), "--seed", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert process.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=20).strip()
        except queue.Empty:
            pytest.fail("kodmobi sandbox printed nothing within 20 s")
        assert line == f"sandbox listening on http://127.0.0.1:{port}", process.stderr
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/manual/channels", headers={"x-api-key": "from-env"}).is_success
        denied = httpx.get(url + "/manual/channels", headers={"x-api-key": "sandbox-key"})
        assert denied.status_code == 401
        config = httpx.get(url + "/sandbox/config", headers={"x-api-key": "from-env"}).json()
        assert config["seed"] == 1
    finally:
        process.terminate()
        process.wait(timeout=10)
