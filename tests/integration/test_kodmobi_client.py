"""The kod.mobi client against the sandbox over real loopback sockets: endpoints and refusals."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.servers import serve
from worker.kodmobi import Action, KodMobiClient, decide
from worker.kodmobi.errors import (
    AccountError,
    ChannelUnavailableError,
    ConnectionFailedError,
    KodMobiError,
    RecipientBlockedError,
    RequestRefusedError,
    ResponseTimeoutError,
    ServerError,
    ThrottledError,
)
from worker.sandbox.app import create_app
from worker.sandbox.config import SandboxConfig
from worker.sandbox.rules import decrypt_code

API_KEY = "sandbox-key"
_numbers = itertools.count(1_000_000)


def fresh_phone() -> str:
    """A real-looking phone nobody else in this module uses (sessions are per recipient)."""
    return f"+7952{next(_numbers):07d}"


def magic_phone(telegram: str = "00", whatsapp: str = "00", sms: str = "00") -> str:
    """`+79990TTWWSS`: the outcome the sandbox gives each channel (docs/sandbox.md)."""
    return f"+79990{telegram}{whatsapp}{sms}"


@pytest.fixture(scope="module")
def sandbox_url() -> Iterator[str]:
    with serve(create_app(SandboxConfig(api_key=API_KEY, seed=7))) as url:
        yield url


@pytest.fixture
def client(sandbox_url: str) -> Iterator[KodMobiClient]:
    with KodMobiClient(sandbox_url, API_KEY, read_timeout_s=5) as kodmobi:
        yield kodmobi


def recorded_sends(sandbox_url: str, to: str) -> list[dict[str, Any]]:
    """What the sandbox says it delivered to `to` (GET /sandbox/messages)."""
    answer = httpx.get(
        f"{sandbox_url}/sandbox/messages", params={"to": to}, headers={"x-api-key": API_KEY}
    )
    answer.raise_for_status()
    messages: list[dict[str, Any]] = answer.json()["messages"]
    return messages


# -- every endpoint -------------------------------------------------------------------


def test_manual_send_is_accepted_and_delivered(sandbox_url: str, client: KodMobiClient) -> None:
    # Given a recipient
    to = fresh_phone()

    # When the worker sends our code over telegram
    answer = client.manual_send(to, "telegram", code="4821")

    # Then kod.mobi accepts it with a message id and the code, encrypted
    assert answer.message_id > 0
    assert answer.message == "Sent to queue."
    assert answer.code is not None and answer.code.startswith("aes256:")
    assert decrypt_code(answer.code, API_KEY) == "4821"
    # And the sandbox delivered exactly that send
    [sent] = recorded_sends(sandbox_url, to)
    assert sent["message_id"] == answer.message_id
    assert (sent["channel"], sent["code"]) == ("telegram", "4821")


def test_manual_send_passes_provider_and_callback_url_and_the_callback_comes(
    sandbox_url: str, client: KodMobiClient
) -> None:
    # Given a receiver listening for delivery callbacks
    received: list[dict[str, Any]] = []
    arrived = threading.Event()

    async def callback(request: Request) -> Response:
        received.append(await request.json())
        arrived.set()
        return Response(status_code=204)

    receiver = Starlette(routes=[Route("/cb/{attempt}/{token}", callback, methods=["POST"])])
    to = fresh_phone()
    with serve(receiver) as receiver_url:
        # When the worker sends over sms through a named provider, with a callback URL
        answer = client.manual_send(
            to, "sms", code="0937", provider_id=5, callback_url=f"{receiver_url}/cb/01ATT/tok"
        )

        # Then kod.mobi calls back with the final status of that message
        assert arrived.wait(timeout=10), "no callback arrived"
    assert received[0]["message_id"] == answer.message_id
    assert received[0]["status"] == "delivered"
    [sent] = recorded_sends(sandbox_url, to)
    assert sent["provider_id"] == 5


def test_manual_send_to_an_email_address(client: KodMobiClient) -> None:
    # Given an email recipient / When a code is sent by email
    answer = client.manual_send("alice@example.com", "email", code="123456", provider_id=1)

    # Then it is accepted
    assert answer.message_id > 0


def test_manual_channels_lists_channels_with_their_providers(client: KodMobiClient) -> None:
    # When the worker asks which channels and providers the project has
    channels = client.manual_channels()

    # Then every channel comes with provider ids that manual_send takes
    by_type = {channel.type: channel for channel in channels}
    assert set(by_type) == {"sms", "whatsapp", "telegram", "email"}
    for channel in channels:
        assert channel.providers, channel.type
        assert all(isinstance(p.id, int) for p in channel.providers)
    assert 5 in {p.id for p in by_type["sms"].providers}


def test_session_create_send_and_channels(sandbox_url: str, client: KodMobiClient) -> None:
    # Given a recipient without a session
    to = fresh_phone()

    # When a session is created with a send over telegram
    created = client.session_create(to, type="telegram", send=True)

    # Then the session exists, was sent to telegram, and lists the phone channels
    assert created.sent_to == "telegram"
    assert created.session_expired_at is not None
    assert {c.type for c in created.channels} == {"telegram", "whatsapp", "sms"}
    telegram = next(c for c in created.channels if c.type == "telegram")
    assert telegram.timeout is not None and telegram.timeout > 0

    # When the same code is sent again over sms
    resent = client.session_send(created.session_id, "sms")

    # Then it went out on sms, in the same session, with the same code
    assert resent.session_id == created.session_id
    assert resent.channel is not None and resent.channel.type == "sms"
    codes = {sent["code"] for sent in recorded_sends(sandbox_url, to)}
    assert len(codes) == 1

    # When the session's channels are listed
    channels = client.session_channels(created.session_id)

    # Then both used channels are in their sending timeout, the unused one is not
    timeouts = {c.type: c.timeout for c in channels}
    assert timeouts["telegram"] and timeouts["sms"]
    assert timeouts["whatsapp"] == 0


def test_session_create_without_sending(sandbox_url: str, client: KodMobiClient) -> None:
    # Given a recipient / When a session is only created
    to = fresh_phone()
    created = client.session_create(to, send=False)

    # Then nothing was sent
    assert created.session_id
    assert created.sent_to is None
    assert recorded_sends(sandbox_url, to) == []


def test_session_channels_without_a_session_lists_every_channel(client: KodMobiClient) -> None:
    # When the channels are asked for without a session
    channels = client.session_channels()

    # Then all four channels are listed
    assert {c.type for c in channels} == {"sms", "whatsapp", "telegram", "email"}


def test_the_older_v2_api_creates_sends_and_checks(sandbox_url: str, client: KodMobiClient) -> None:
    # Given a Russian number written the older API's way, starting with 8
    local = fresh_phone().removeprefix("+7")

    # When a code is created over telegram
    created = client.v2_message_create(f"8{local}", type="telegram", code="5190")

    # Then a session exists and the code went to the number in +7 form
    assert created.success is True
    assert created.session_id
    assert created.type == "telegram"
    assert [s["code"] for s in recorded_sends(sandbox_url, f"+7{local}")] == ["5190"]

    # When it is sent again over sms
    sent = client.v2_message_send(created.session_id, type="sms")
    assert sent.success is True
    assert sent.type == "sms"

    # Then the right code checks and a wrong one does not (an undocumented field, kept)
    assert client.v2_message_check(created.session_id, "5190").valid is True
    assert client.v2_message_check(created.session_id, "0000").valid is False

    # And the channel check says whether the recipient is active there
    checked = client.v2_channel_check(created.session_id, "telegram")
    assert checked.success is True
    assert checked.type == "telegram"
    assert checked.is_active is True


def test_v2_channel_check_reports_an_inactive_channel(client: KodMobiClient) -> None:
    # Given a recipient telegram cannot reach (outcome 10 on telegram)
    created = client.v2_message_create(
        magic_phone(telegram="10").removeprefix("+"), type="whatsapp"
    )

    # When telegram is checked / Then it is not active
    checked = client.v2_channel_check(created.session_id, "telegram")
    assert checked.is_active is False


# -- refusals, as the worker sees them ------------------------------------------------

MAGIC_REFUSALS = [
    ("10", ChannelUnavailableError, "ERROR_USER_NOT_AUTHORIZE_ON_CHANNEL", Action.FALLBACK),
    ("11", ChannelUnavailableError, "ERROR_PROJECT_HAS_NO_CHANNEL", Action.FALLBACK),
    ("12", ChannelUnavailableError, "ERROR_PROJECT_HAS_NO_CHANNELS", Action.FALLBACK),
    ("13", ChannelUnavailableError, "ERROR_CHANNEL_NOT_ALLOWED_COUNTRY", Action.FALLBACK),
    ("14", RecipientBlockedError, "ERROR_PHONE_BLOCKED", Action.FAIL),
    ("15", RecipientBlockedError, "ERROR_BLOCKED", Action.FAIL),
    ("16", ThrottledError, "ERROR_MESSAGE_ATTEMPT", Action.RETRY),
    ("17", AccountError, "ERROR_WRONG_BALANCE", Action.RETRY),
    ("18", AccountError, "ERROR_ACCESS_DENIED", Action.RETRY),
    ("19", RequestRefusedError, "ERROR_BAD_REQUEST", Action.FALLBACK),
    ("20", ServerError, "ERROR_INTERNAL", Action.RETRY),
    ("21", ServerError, None, Action.RETRY),
]


@pytest.mark.parametrize("channel", ["telegram", "whatsapp", "sms"])
@pytest.mark.parametrize(
    ("outcome", "error_class", "sys_message", "action"),
    MAGIC_REFUSALS,
    ids=[row[0] for row in MAGIC_REFUSALS],
)
def test_a_sandbox_refusal_maps_to_its_class_and_decision(
    sandbox_url: str,
    client: KodMobiClient,
    channel: str,
    outcome: str,
    error_class: type[KodMobiError],
    sys_message: str | None,
    action: Action,
) -> None:
    # Given a recipient whose outcome on this channel is a refusal, and delivery elsewhere
    to = magic_phone(**{channel: outcome})
    before = len(recorded_sends(sandbox_url, to))

    # When the worker sends over that channel
    with pytest.raises(KodMobiError) as caught:
        client.manual_send(to, channel, code="2468")

    # Then the refusal comes out as the class of DESIGN §7's row, with the decision
    error = caught.value
    assert type(error) is error_class
    assert error.sys_message == sys_message
    assert decide(error) is action
    assert error.status_code is not None
    if outcome == "16":
        assert error.status_code == 429
        assert error.retry_after == 1.0
    elif outcome == "20":
        assert error.status_code == 500
    elif outcome == "21":
        assert error.status_code == 503
        assert error.message == "kod.mobi answered HTTP 503"
    else:
        assert 400 <= error.status_code < 500
        assert error.message  # kod.mobi's own words, for the failure reason
    # And nothing was sent
    assert len(recorded_sends(sandbox_url, to)) == before


def test_outcomes_are_per_channel(client: KodMobiClient) -> None:
    # Given a recipient telegram cannot reach but sms can
    to = magic_phone(telegram="10", sms="00")

    # When telegram refuses / Then sms still delivers: fallback makes sense
    with pytest.raises(ChannelUnavailableError):
        client.manual_send(to, "telegram", code="1357")
    assert client.manual_send(to, "sms", code="1357").message_id > 0


def test_resending_a_session_too_soon_is_throttled_with_a_wait(client: KodMobiClient) -> None:
    # Given a session that just sent over sms
    created = client.session_create(fresh_phone(), type="sms")

    # When sms is asked again at once
    with pytest.raises(ThrottledError) as caught:
        client.session_send(created.session_id, "sms")

    # Then the worker is told to wait out the channel's timeout
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 60
    assert decide(caught.value) is Action.RETRY


def test_an_unknown_session_is_refused(client: KodMobiClient) -> None:
    # When a session that does not exist is used
    with pytest.raises(RequestRefusedError) as caught:
        client.session_send("01K8N1VMPN0EE389K72YW0CBM2", "sms")

    # Then it is a 404 refusal naming the problem
    assert caught.value.status_code == 404
    assert caught.value.sys_message == "ERROR_SESSION_NOT_FOUND"


def test_bad_input_is_refused_naming_the_field(client: KodMobiClient) -> None:
    # When the worker sends a code that is too short
    with pytest.raises(RequestRefusedError) as caught:
        client.manual_send(fresh_phone(), "sms", code="12")

    # Then kod.mobi's 400 names the field, and the worker would fall back
    assert caught.value.status_code == 400
    assert caught.value.sys_message == "ERROR_BAD_REQUEST"
    assert "code" in caught.value.error_params
    assert decide(caught.value) is Action.FALLBACK


def test_a_wrong_api_key_is_an_account_problem(sandbox_url: str) -> None:
    # Given a client with the wrong key
    # When it sends
    with (
        KodMobiClient(sandbox_url, "not-the-key") as client,
        pytest.raises(AccountError) as caught,
    ):
        client.manual_send(fresh_phone(), "sms", code="1234")

    # Then it is a 401 that retrying (and alerting) fits, not falling back
    assert caught.value.status_code == 401
    assert decide(caught.value) is Action.RETRY


@pytest.mark.parametrize(
    ("config", "error_class", "status"),
    [
        ({"error_5xx_rate": 1.0}, ServerError, 500),
        ({"throttle_429_rate": 1.0}, ThrottledError, 429),
    ],
    ids=["5xx", "429"],
)
def test_configured_failure_rates_reach_the_worker_as_transient_errors(
    config: dict[str, Any], error_class: type[KodMobiError], status: int
) -> None:
    # Given a sandbox that fails every ordinary send
    # When the worker sends
    with (
        serve(create_app(SandboxConfig(api_key=API_KEY, seed=1, **config))) as url,
        KodMobiClient(url, API_KEY) as client,
        pytest.raises(error_class) as caught,
    ):
        client.manual_send(fresh_phone(), "sms", code="1234")

    # Then it is retryable, with the status kod.mobi answered
    assert caught.value.status_code == status
    assert decide(caught.value) is Action.RETRY


def test_a_slow_answer_times_out_once_and_is_not_sent_twice() -> None:
    # Given a sandbox that holds back the answer for a slow recipient (outcome 03 on sms)
    to = magic_phone(sms="03")
    with serve(create_app(SandboxConfig(api_key=API_KEY, magic_slow_ms=1500))) as url:
        with KodMobiClient(url, API_KEY, read_timeout_s=0.3) as client:
            # When the worker gives up waiting
            started = time.monotonic()
            with pytest.raises(ResponseTimeoutError) as caught:
                client.manual_send(to, "sms", code="1234")
            waited = time.monotonic() - started

        # Then it gave up after its read timeout, and the send was made exactly once
        assert waited < 1.4
        assert decide(caught.value) is Action.RETRY
        assert len(recorded_sends(url, to)) == 1


def test_a_stopped_sandbox_is_a_connection_failure() -> None:
    # Given kod.mobi went away
    with serve(create_app(SandboxConfig(api_key=API_KEY))) as url:
        pass

    # When the worker sends
    with (
        KodMobiClient(url, API_KEY, connect_timeout_s=1) as client,
        pytest.raises(ConnectionFailedError) as caught,
    ):
        client.manual_send(fresh_phone(), "sms", code="1234")

    # Then it is a transient failure to retry
    assert decide(caught.value) is Action.RETRY
