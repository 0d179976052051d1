"""kod.mobi's refusals and failures: one exception class per DESIGN §7 row, decided once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import respx

from worker.embedded import free_port
from worker.kodmobi import Action, KodMobiClient, KodMobiError, decide, is_retryable
from worker.kodmobi.errors import (
    AccountError,
    ChannelUnavailableError,
    ConnectionFailedError,
    ProtocolError,
    RecipientBlockedError,
    RequestRefusedError,
    ResponseTimeoutError,
    ServerError,
    ThrottledError,
    TransientError,
)

BASE_URL = "https://kodmobi.test"
API_KEY = "unit-test-api-key"
PHONE = "+79522966236"


def error_body(
    status: int, sys_message: str, error: str = "Something went wrong."
) -> dict[str, Any]:
    """kod.mobi's published error body."""
    return {
        "success": False,
        "error": error,
        "error_params": {"field": "to"},
        "status": status,
        "sys_message": sys_message,
    }


@pytest.fixture
def kodmobi() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE_URL, assert_all_called=False) as router:
        yield router


@pytest.fixture
def client() -> Iterator[KodMobiClient]:
    with KodMobiClient(BASE_URL, API_KEY) as kodmobi_client:
        yield kodmobi_client


def send(client: KodMobiClient) -> Any:
    return client.manual_send(PHONE, "telegram", code="1234")


def refusal(client: KodMobiClient) -> KodMobiError:
    with pytest.raises(KodMobiError) as caught:
        send(client)
    return caught.value


# Every row of DESIGN §7's table that kod.mobi states with a sys_message.
SYS_MESSAGE_ROWS = [
    (400, "ERROR_USER_NOT_AUTHORIZE_ON_CHANNEL", ChannelUnavailableError, Action.FALLBACK),
    (400, "ERROR_PROJECT_HAS_NO_CHANNEL", ChannelUnavailableError, Action.FALLBACK),
    (400, "ERROR_PROJECT_HAS_NO_CHANNELS", ChannelUnavailableError, Action.FALLBACK),
    (403, "ERROR_CHANNEL_NOT_ALLOWED_COUNTRY", ChannelUnavailableError, Action.FALLBACK),
    (403, "ERROR_PHONE_BLOCKED", RecipientBlockedError, Action.FAIL),
    (403, "ERROR_BLOCKED", RecipientBlockedError, Action.FAIL),
    (429, "ERROR_MESSAGE_ATTEMPT", ThrottledError, Action.RETRY),
    (400, "ERROR_MESSAGE_ATTEMPT", ThrottledError, Action.RETRY),
    (400, "ERROR_WRONG_BALANCE", AccountError, Action.RETRY),
    (403, "ERROR_ACCESS_DENIED", AccountError, Action.RETRY),
    (401, "ERROR_ACCESS_DENIED", AccountError, Action.RETRY),
    (400, "ERROR_BAD_REQUEST", RequestRefusedError, Action.FALLBACK),
    (404, "ERROR_MESSAGE_NOT_FOUND", RequestRefusedError, Action.FALLBACK),
    (409, "ERROR_CONFLICT", RequestRefusedError, Action.FALLBACK),
    (500, "ERROR_INTERNAL", ServerError, Action.RETRY),
]


@pytest.mark.parametrize(
    ("status", "sys_message", "error_class", "action"),
    SYS_MESSAGE_ROWS,
    ids=[f"{row[0]}-{row[1]}" for row in SYS_MESSAGE_ROWS],
)
def test_an_error_body_maps_to_its_class_and_decision(
    kodmobi: respx.MockRouter,
    client: KodMobiClient,
    status: int,
    sys_message: str,
    error_class: type[KodMobiError],
    action: Action,
) -> None:
    # Given kod.mobi refuses the send with its error body
    route = kodmobi.post("/manual/send").respond(
        status, json=error_body(status, sys_message, error="Refused for a reason.")
    )

    # When the worker sends a code
    error = refusal(client)

    # Then the refusal comes out as the row's class, carrying what kod.mobi said
    assert type(error) is error_class
    assert error.status_code == status
    assert error.sys_message == sys_message
    assert error.message == "Refused for a reason."
    assert error.error_params == {"field": "to"}
    assert error.retry_after is None
    assert error.reason == sys_message
    # And the one decision function gives the row's action
    assert decide(error) is action
    assert is_retryable(error) is (action is Action.RETRY)
    # And the client itself did not retry a refusal
    assert route.call_count == 1


BARE_STATUS_ROWS = [
    (429, ThrottledError, Action.RETRY),
    (401, AccountError, Action.RETRY),
    (400, RequestRefusedError, Action.FALLBACK),
    (403, RequestRefusedError, Action.FALLBACK),
    (404, RequestRefusedError, Action.FALLBACK),
    (409, RequestRefusedError, Action.FALLBACK),
    (422, RequestRefusedError, Action.FALLBACK),
    (500, ServerError, Action.RETRY),
    (502, ServerError, Action.RETRY),
    (503, ServerError, Action.RETRY),
    (504, ServerError, Action.RETRY),
]


@pytest.mark.parametrize(("status", "error_class", "action"), BARE_STATUS_ROWS)
@pytest.mark.parametrize(
    "body",
    [b"", b"<html><body>Bad Gateway</body></html>", b'["not", "an", "object"]'],
    ids=["empty", "html", "json-list"],
)
def test_a_status_without_an_error_body_maps_by_status(
    kodmobi: respx.MockRouter,
    client: KodMobiClient,
    status: int,
    error_class: type[KodMobiError],
    action: Action,
    body: bytes,
) -> None:
    # Given kod.mobi (or a proxy in front of it) answers a bare HTTP status
    kodmobi.post("/manual/send").respond(status, content=body)

    # When the worker sends a code
    error = refusal(client)

    # Then the status alone picks the class, and the message names the status
    assert type(error) is error_class
    assert error.status_code == status
    assert error.sys_message is None
    assert error.message == f"kod.mobi answered HTTP {status}"
    assert error.reason == f"http_{status}"
    assert decide(error) is action


def test_a_5xx_with_a_json_body_keeps_what_kodmobi_said(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given kod.mobi fails inside and says so in its error body
    kodmobi.post("/manual/send").respond(
        503, json=error_body(503, "ERROR_SERVICE_UNAVAILABLE", error="Try again later.")
    )

    # When the worker sends a code
    error = refusal(client)

    # Then it is a retryable server error with kod.mobi's words kept
    assert isinstance(error, ServerError)
    assert isinstance(error, TransientError)
    assert error.status_code == 503
    assert error.sys_message == "ERROR_SERVICE_UNAVAILABLE"
    assert error.message == "Try again later."
    assert decide(error) is Action.RETRY


def test_a_channel_sys_message_wins_over_a_5xx_status(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given kod.mobi names a channel refusal, whatever the HTTP status
    kodmobi.post("/manual/send").respond(500, json=error_body(500, "ERROR_PROJECT_HAS_NO_CHANNEL"))

    # When the worker sends a code
    error = refusal(client)

    # Then the worker falls back instead of hammering a channel that cannot work
    assert isinstance(error, ChannelUnavailableError)
    assert decide(error) is Action.FALLBACK


def test_an_error_body_with_unexpected_types_still_maps_by_status(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given an error body whose fields are not the documented types
    kodmobi.post("/manual/send").respond(
        400, json={"success": False, "error": {"nested": 1}, "error_params": [], "sys_message": 7}
    )

    # When the worker sends a code
    error = refusal(client)

    # Then nothing crashes: the status decides and the odd fields are dropped
    assert isinstance(error, RequestRefusedError)
    assert error.sys_message is None
    assert error.message == "kod.mobi answered HTTP 400"
    assert error.error_params == {}


# -- Retry-After ----------------------------------------------------------------------


def test_retry_after_in_seconds_is_carried(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given kod.mobi throttles and says when to come back, in seconds
    kodmobi.post("/manual/send").respond(
        429,
        json=error_body(429, "ERROR_MESSAGE_ATTEMPT", error="Too many attempts."),
        headers={"Retry-After": "17"},
    )

    # When the worker sends a code
    error = refusal(client)

    # Then the wait comes with the error, to be honoured by the actor
    assert isinstance(error, ThrottledError)
    assert error.retry_after == 17.0
    assert decide(error) is Action.RETRY


def test_retry_after_as_an_http_date_becomes_seconds_from_now(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given kod.mobi says when to come back as an HTTP date two minutes ahead
    when = datetime.now(UTC) + timedelta(seconds=120)
    kodmobi.post("/manual/send").respond(
        429, headers={"Retry-After": format_datetime(when, usegmt=True)}
    )

    # When the worker sends a code
    error = refusal(client)

    # Then the wait is about two minutes (HTTP dates have one-second resolution)
    assert isinstance(error, ThrottledError)
    assert error.retry_after is not None
    assert 115.0 <= error.retry_after <= 121.0


def test_retry_after_as_a_date_with_minus_zero_zone_is_read_as_utc(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given an HTTP date in the older "-0000" spelling, a minute ahead
    when = datetime.now(UTC) + timedelta(seconds=60)
    kodmobi.post("/manual/send").respond(
        429, headers={"Retry-After": when.strftime("%a, %d %b %Y %H:%M:%S -0000")}
    )

    # When the worker sends a code
    error = refusal(client)

    # Then it is still a throttle with a wait of about a minute
    assert isinstance(error, ThrottledError)
    assert error.retry_after is not None
    assert 55.0 <= error.retry_after <= 61.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("0", 0.0),
        ("-5", 0.0),
        ("2.5", 2.5),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("soon", None),
    ],
    ids=["zero", "negative", "fraction", "date-in-the-past", "garbage"],
)
def test_retry_after_never_goes_negative_and_ignores_garbage(
    kodmobi: respx.MockRouter, client: KodMobiClient, header: str, expected: float | None
) -> None:
    # Given a throttle whose Retry-After is odd
    kodmobi.post("/manual/send").respond(429, headers={"Retry-After": header})

    # When the worker sends a code
    error = refusal(client)

    # Then the wait is never negative, and unreadable means "not said"
    assert isinstance(error, ThrottledError)
    assert error.retry_after == expected


# -- network failures -----------------------------------------------------------------


@pytest.mark.parametrize("failure", [httpx.ConnectError, httpx.ConnectTimeout])
def test_a_connect_failure_is_retried_once_then_raised(
    kodmobi: respx.MockRouter, client: KodMobiClient, failure: type[Exception]
) -> None:
    # Given kod.mobi cannot be reached at all
    route = kodmobi.post("/manual/send").mock(side_effect=failure)

    # When the worker sends a code
    with pytest.raises(ConnectionFailedError) as caught:
        send(client)

    # Then the client tried exactly twice (the request never left, so it is safe)
    assert route.call_count == 2
    # And the caller is told to retry later
    assert decide(caught.value) is Action.RETRY
    assert is_retryable(caught.value)


def test_a_connect_failure_followed_by_an_answer_succeeds(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given the first connection fails and the second gets through
    route = kodmobi.post("/manual/send").mock(
        side_effect=[
            httpx.ConnectError("connection refused"),
            httpx.Response(200, json={"message": "Sent to queue.", "message_id": 41}),
        ]
    )

    # When the worker sends a code
    answer = send(client)

    # Then the send is accepted after the one free second try
    assert answer.message_id == 41
    assert route.call_count == 2


def test_a_real_refused_connection_raises_connection_failed() -> None:
    # Given nothing listens on the port kod.mobi is expected on
    base_url = f"http://127.0.0.1:{free_port()}"

    # When the worker sends a code
    with (
        KodMobiClient(base_url, API_KEY, connect_timeout_s=1) as client,
        pytest.raises(ConnectionFailedError) as caught,
    ):
        send(client)

    # Then the failure is a transient, retryable one
    assert decide(caught.value) is Action.RETRY


@pytest.mark.parametrize("failure", [httpx.ReadTimeout, httpx.WriteTimeout])
def test_a_timeout_after_sending_is_not_retried(
    kodmobi: respx.MockRouter, client: KodMobiClient, failure: type[Exception]
) -> None:
    # Given kod.mobi takes the request but does not answer in time
    route = kodmobi.post("/manual/send").mock(side_effect=failure)

    # When the worker sends a code
    with pytest.raises(ResponseTimeoutError) as caught:
        send(client)

    # Then the client does not send again (kod.mobi may have accepted it)
    assert route.call_count == 1
    # And the decision is left to the caller: retry with backoff
    assert decide(caught.value) is Action.RETRY


def test_a_broken_connection_mid_answer_is_transient_and_not_retried(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given the connection breaks while kod.mobi answers
    route = kodmobi.post("/manual/send").mock(side_effect=httpx.RemoteProtocolError)

    # When the worker sends a code
    with pytest.raises(TransientError) as caught:
        send(client)

    # Then it is a retryable transient error, and the client sent once
    assert route.call_count == 1
    assert decide(caught.value) is Action.RETRY


def test_a_5xx_is_not_retried_by_the_client(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given kod.mobi answers 500
    route = kodmobi.post("/manual/send").respond(500)

    # When the worker sends a code
    with pytest.raises(ServerError):
        send(client)

    # Then the backoff belongs to the actor: the client asked once
    assert route.call_count == 1


# -- answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"<html>maintenance</html>",
        b"",
        b'{"message": "Sent to queue."}',
        b'{"message_id": "not-a-number"}',
        b"[]",
    ],
    ids=["html", "empty", "missing-message-id", "wrong-type", "list"],
)
def test_an_unreadable_2xx_answer_is_a_protocol_error(
    kodmobi: respx.MockRouter, client: KodMobiClient, content: bytes
) -> None:
    # Given kod.mobi says 200 but the body is not a ManualSendResponse
    kodmobi.post("/manual/send").respond(200, content=content)

    # When the worker sends a code
    with pytest.raises(ProtocolError) as caught:
        send(client)

    # Then it is a transient protocol error carrying the status
    assert caught.value.status_code == 200
    assert decide(caught.value) is Action.RETRY


def test_an_answer_with_unknown_fields_is_accepted_and_kept(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given kod.mobi adds fields it never documented
    kodmobi.post("/manual/send").respond(
        200,
        json={
            "message": "Sent to queue.",
            "code": "aes256:8fd2:da4b:5832",
            "message_id": 7,
            "queue_position": 3,
            "price": {"amount": "1.20", "currency": "RUB"},
        },
    )

    # When the worker sends a code
    answer = send(client)

    # Then the documented fields are typed and the new ones are kept
    assert answer.message_id == 7
    assert answer.code == "aes256:8fd2:da4b:5832"
    assert answer.model_extra == {
        "queue_position": 3,
        "price": {"amount": "1.20", "currency": "RUB"},
    }


def test_a_list_answer_with_unknown_fields_is_accepted_and_kept(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given the channel list carries undocumented fields at every level
    kodmobi.get("/manual/channels").respond(
        200,
        json=[
            {
                "name": "Telegram",
                "type": "telegram",
                "priority": 1,
                "providers": [
                    {"id": 3, "name": "bot", "type": "telegram", "is_system": True, "region": "eu"}
                ],
            }
        ],
    )

    # When the worker lists the channels
    channels = client.manual_channels()

    # Then they are read, with the extra fields kept
    assert [c.type for c in channels] == ["telegram"]
    assert channels[0].model_extra == {"priority": 1}
    assert channels[0].providers[0].id == 3
    assert channels[0].providers[0].model_extra == {"region": "eu"}


def test_an_error_body_with_unknown_fields_still_maps(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given an error body with an extra field
    body = error_body(403, "ERROR_PHONE_BLOCKED") | {"trace_id": "abc"}
    kodmobi.post("/manual/send").respond(403, json=body)

    # When the worker sends a code
    error = refusal(client)

    # Then the refusal is still recognised
    assert isinstance(error, RecipientBlockedError)
    assert decide(error) is Action.FAIL


def test_every_request_carries_the_api_key_and_a_json_body(
    kodmobi: respx.MockRouter, client: KodMobiClient
) -> None:
    # Given kod.mobi accepts the send
    route = kodmobi.post("/manual/send").respond(200, json={"message_id": 1})

    # When the worker sends a code with a callback URL
    client.manual_send(
        PHONE, "sms", code="1234", provider_id=2, callback_url="https://w.test/cb/1/t"
    )

    # Then kod.mobi sees the key header and the documented body
    request = route.calls.last.request
    assert request.headers["x-api-key"] == API_KEY
    assert json.loads(request.content) == {
        "to": PHONE,
        "channel": "sms",
        "code": "1234",
        "provider_id": 2,
        "callback_url": "https://w.test/cb/1/t",
    }


# -- the decision itself --------------------------------------------------------------


def test_every_error_class_is_a_kodmobi_error_with_its_own_action() -> None:
    # Given one instance of every class of the error tree
    expected = {
        ChannelUnavailableError: Action.FALLBACK,
        RecipientBlockedError: Action.FAIL,
        ThrottledError: Action.RETRY,
        AccountError: Action.RETRY,
        RequestRefusedError: Action.FALLBACK,
        ServerError: Action.RETRY,
        ConnectionFailedError: Action.RETRY,
        ResponseTimeoutError: Action.RETRY,
        ProtocolError: Action.RETRY,
    }

    # When each is decided / Then each has the action of its row
    for cls, action in expected.items():
        error = cls("x")
        assert isinstance(error, KodMobiError)
        assert decide(error) is action, cls.__name__
        assert is_retryable(error) is (action is Action.RETRY), cls.__name__


def test_a_failure_that_is_not_kodmobis_verdict_is_retried() -> None:
    # Given a bug or a database hiccup, not an answer from kod.mobi
    error = RuntimeError("database went away")

    # When decided / Then the work is tried again rather than falling back
    assert decide(error) is Action.RETRY
    assert is_retryable(error)
