"""End to end: intake on all three producer paths (DESIGN §3) — idempotency, input rules,
authentication, reading, health, and the code check."""

from __future__ import annotations

import uuid
from typing import Any

import dramatiq
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ulid import ULID

from tests.support.db import connect
from tests.support.system import API_TOKEN, System, unique_phone
from worker.web.app import create_app

# The running system's threads (Dramatiq's consumers, the retry jitter) draw from the global
# `random` while Hypothesis generates, which it takes for a strategy using `random`.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

#: placeholder for a fresh recipient in the bad-input table below
TO = "<to>"


def _with_to(body: Any, to: str) -> Any:
    if isinstance(body, dict):
        return {k: (to if v == TO else v) for k, v in body.items()}
    return body


def _messages_to(system: System, recipient: str) -> int:
    with connect(system) as conn:
        row = conn.execute("SELECT count(*) AS n FROM messages WHERE recipient = %s", (recipient,))
        return int(row.fetchone()["n"])  # type: ignore[index]


def _drain(system: System) -> None:
    """Wait until the worker has run every send_code / deliver_attempt queued so far."""
    system.broker.join("kodmobi", interval=20, timeout=20_000)


def _delivered(system: System, channels: list[str] | None = None) -> tuple[str, str]:
    """A message delivered over HTTP: (id, the code the recipient got)."""
    to = unique_phone()
    created = system.api.post("/v1/messages", json={"to": to, "channels": channels or ["sms"]})
    assert created.status_code == 202, created.text
    message_id = created.json()["id"]
    assert system.wait_final(message_id)["status"] == "delivered"
    return message_id, system.sandbox_sends(to)[0]["code"]


def _other_code(code: str) -> str:
    return "0000" if code != "0000" else "1111"


# -- idempotency: HTTP ---------------------------------------------------------------


def test_http_same_key_same_body_returns_the_same_message_and_sends_once(system: System) -> None:
    # Given a producer that posts a code with an Idempotency-Key
    to = unique_phone()
    key = uuid.uuid4().hex
    body = {"to": to, "channels": ["telegram", "sms"], "metadata": {"user": 42}}
    first = system.api.post("/v1/messages", json=body, headers={"Idempotency-Key": key})
    # When it posts the very same request again (a retry after a lost answer), twice
    again = system.api.post("/v1/messages", json=body, headers={"Idempotency-Key": key})
    system.wait_final(first.json()["id"])
    later = system.api.post("/v1/messages", json=body, headers={"Idempotency-Key": key})
    # Then the first is accepted (202), the repeats answer 200 with the same message
    assert first.status_code == 202, first.text
    assert again.status_code == 200, again.text
    assert later.status_code == 200, later.text
    assert again.json()["id"] == later.json()["id"] == first.json()["id"]
    assert again.json()["expires_at"] == first.json()["expires_at"]
    assert later.json()["status"] == "delivered"
    # And the recipient got exactly one code
    _drain(system)
    assert len(system.sandbox_sends(to)) == 1
    assert _messages_to(system, to) == 1
    assert system.by_key(key)["id"] == first.json()["id"]  # type: ignore[index]


def test_http_same_key_other_body_is_a_conflict(system: System) -> None:
    # Given a message accepted under a key
    to, other = unique_phone(), unique_phone()
    key = uuid.uuid4().hex
    first = system.api.post("/v1/messages", json={"to": to}, headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    # When the key comes back with another body (another recipient, another code)
    conflicts = [
        system.api.post("/v1/messages", json={"to": other}, headers={"Idempotency-Key": key}),
        system.api.post(
            "/v1/messages", json={"to": to, "code": "1234"}, headers={"Idempotency-Key": key}
        ),
        system.api.post(
            "/v1/messages", json={"to": to, "channels": ["sms"]}, headers={"Idempotency-Key": key}
        ),
    ]
    # Then each is refused with 409, and only the first message goes out
    assert [r.status_code for r in conflicts] == [409, 409, 409], [r.text for r in conflicts]
    assert system.wait_final(first.json()["id"])["status"] == "delivered"
    _drain(system)
    assert system.sandbox_sends(other) == []
    assert len(system.sandbox_sends(to)) == 1


def test_http_without_a_key_every_post_is_a_new_message(system: System) -> None:
    # Given a producer that posts the same body twice without Idempotency-Key
    to = unique_phone()
    body = {"to": to, "channels": ["whatsapp"]}
    first = system.api.post("/v1/messages", json=body)
    second = system.api.post("/v1/messages", json=body)
    # Then these are two messages, each accepted and each sent
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["id"] != second.json()["id"]
    assert system.wait_final(first.json()["id"])["status"] == "delivered"
    assert system.wait_final(second.json()["id"])["status"] == "delivered"
    assert len(system.sandbox_sends(to)) == 2


def test_http_idempotency_key_header_must_not_be_empty_or_huge(system: System) -> None:
    to = unique_phone()
    for key in ("", "k" * 256):
        response = system.api.post(
            "/v1/messages", json={"to": to}, headers={"Idempotency-Key": key}
        )
        assert response.status_code == 422, response.text
    assert system.sandbox_sends(to) == []


# -- idempotency: Dramatiq -----------------------------------------------------------


def _raw(**kwargs: Any) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name="kodmobi", actor_name="send_code", args=(), kwargs=kwargs, options={}
    )


def test_dramatiq_message_delivered_twice_sends_once(system: System) -> None:
    # Given one producer message that the broker delivers twice at once
    to = unique_phone()
    message = _raw(to=to, channels=["telegram"])
    system.broker.enqueue(message)
    system.broker.enqueue(message)
    # When the worker has run both
    final = system.wait_key_final(message.message_id)
    _drain(system)
    # Then there is one message, delivered once
    assert final["status"] == "delivered"
    assert len(final["attempts"]) == 1
    assert _messages_to(system, to) == 1
    assert len(system.sandbox_sends(to)) == 1


def test_dramatiq_message_redelivered_after_it_was_sent_sends_nothing_more(
    system: System,
) -> None:
    # Given a producer message already delivered
    to = unique_phone()
    message = _raw(to=to, channels=["sms"], code="2468")
    system.broker.enqueue(message)
    first = system.wait_key_final(message.message_id)
    assert first["status"] == "delivered"
    # When the same message (same message id) is enqueued again later
    system.broker.enqueue(message)
    _drain(system)
    # Then nothing changes: one message, one send
    again = system.by_key(message.message_id)
    assert again is not None
    assert (again["id"], again["status"], len(again["attempts"])) == (
        first["id"],
        "delivered",
        1,
    )
    assert [s["code"] for s in system.sandbox_sends(to)] == ["2468"]


def test_dramatiq_explicit_idempotency_key_joins_two_producer_messages(system: System) -> None:
    # Given two different Dramatiq messages carrying the same idempotency_key
    to = unique_phone()
    key = f"signup-{uuid.uuid4().hex}"
    one = system.send_raw(to=to, channels=["whatsapp"], code="1357", idempotency_key=key)
    two = system.send_raw(to=to, channels=["whatsapp"], code="1357", idempotency_key=key)
    assert one != two
    # When the worker has run both
    final = system.wait_key_final(key)
    _drain(system)
    # Then there is one message under that key (not under either message id), sent once
    assert final["status"] == "delivered" and final["idempotency_key"] == key
    assert system.by_key(one) is None and system.by_key(two) is None
    assert _messages_to(system, to) == 1
    assert len(system.sandbox_sends(to)) == 1


def test_dramatiq_explicit_key_reused_with_another_body_sends_nothing_new(
    system: System,
) -> None:
    # Given a message recorded under a key
    to, other = unique_phone(), unique_phone()
    key = f"signup-{uuid.uuid4().hex}"
    system.send_raw(to=to, channels=["sms"], idempotency_key=key)
    first = system.wait_key_final(key)
    # When another producer message reuses the key for another recipient
    system.send_raw(to=other, channels=["sms"], idempotency_key=key)
    _drain(system)
    # Then the recorded message is untouched and the other recipient gets nothing
    assert system.by_key(key) == first
    assert system.sandbox_sends(other) == []
    assert _messages_to(system, other) == 0


# -- input rules ---------------------------------------------------------------------

#: (body, the fields a 422 / a rejection must name). TO is replaced by a fresh phone.
BAD_INPUT = [
    pytest.param({"channels": ["sms"]}, {"to"}, id="missing-to"),
    pytest.param({"to": "12345"}, {"to"}, id="short-phone"),
    pytest.param({"to": "+7999abc4567"}, {"to"}, id="letters-in-phone"),
    pytest.param({"to": "+7000"}, {"to"}, id="phone-too-short"),
    pytest.param({"to": "+1234567890123456"}, {"to"}, id="phone-too-long"),
    pytest.param({"to": "+70000000000"}, {"to"}, id="invalid-phone"),
    pytest.param({"to": "user@"}, {"to"}, id="malformed-email"),
    pytest.param({"to": 79522966236}, {"to"}, id="phone-as-number"),
    pytest.param({"to": "user@example.com", "channels": ["sms"]}, {"channels"}, id="email-sms"),
    pytest.param(
        {"to": "user@example.com", "channels": ["email", "telegram"]},
        {"channels"},
        id="email-telegram",
    ),
    pytest.param({"to": TO, "channels": ["email"]}, {"channels"}, id="phone-email-channel"),
    pytest.param({"to": TO, "channels": ["pigeon"]}, {"channels"}, id="unknown-channel"),
    pytest.param({"to": TO, "channels": ["sms", "sms"]}, {"channels"}, id="repeated-channel"),
    pytest.param({"to": TO, "channels": []}, {"channels"}, id="no-channels"),
    pytest.param({"to": TO, "channels": "sms"}, {"channels"}, id="channels-as-string"),
    pytest.param({"to": TO, "code": "123"}, {"code"}, id="3-digit-code"),
    pytest.param({"to": TO, "code": "1234567"}, {"code"}, id="7-digit-code"),
    pytest.param({"to": TO, "code": "12a4"}, {"code"}, id="non-digit-code"),
    pytest.param({"to": TO, "code": "12 34"}, {"code"}, id="code-with-space"),
    pytest.param({"to": TO, "code": 1234}, {"code"}, id="code-as-number"),
    pytest.param(
        {"to": TO, "code": "\u0661\u0662\u0663\u0664"},
        {"code"},
        id="non-ascii-digits-code",
    ),
    pytest.param({"to": TO, "foo": 1}, {"foo"}, id="unknown-field"),
    pytest.param({"to": TO, "ttl_s": 9}, {"ttl_s"}, id="ttl-too-short"),
    pytest.param({"to": TO, "ttl_s": 86401}, {"ttl_s"}, id="ttl-too-long"),
    pytest.param({"to": TO, "ttl_s": 30.5}, {"ttl_s"}, id="ttl-fraction"),
    pytest.param({"to": TO, "provider_id": 0}, {"provider_id"}, id="provider-id-zero"),
    pytest.param({"to": TO, "metadata": {"blob": "x" * 5000}}, {"metadata"}, id="huge-metadata"),
    pytest.param({"to": TO, "metadata": ["a"]}, {"metadata"}, id="metadata-not-object"),
    pytest.param(
        {"to": "12345", "code": "1", "ttl_s": 1, "bar": True},
        {"to", "code", "ttl_s", "bar"},
        id="several-bad-fields",
    ),
]


def _named_fields(response: httpx.Response) -> set[str]:
    return {
        str(error["loc"][1]) if len(error["loc"]) > 1 else str(error["loc"][0])
        for error in response.json()["detail"]
    }


@pytest.mark.parametrize(("body", "fields"), BAD_INPUT)
def test_http_bad_input_is_422_naming_each_bad_field(
    system: System, body: dict[str, Any], fields: set[str]
) -> None:
    # Given a request that breaks DESIGN §3's input rules
    to = unique_phone()
    # When it is posted
    response = system.api.post("/v1/messages", json=_with_to(body, to))
    # Then it is refused with 422 naming exactly the bad fields, and nothing is sent
    assert response.status_code == 422, response.text
    assert _named_fields(response) == fields, response.text
    assert system.sandbox_sends(to) == []


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        pytest.param(b'{"to": "+79522966236",', "application/json", id="truncated-json"),
        pytest.param(b"to=+79522966236", "application/x-www-form-urlencoded", id="form"),
        pytest.param(b"hello", "text/plain", id="text"),
        pytest.param(
            b"\xff\xfe\x00",
            "application/json",
            id="not-utf8",
        ),
        pytest.param(b"", "application/json", id="empty"),
        pytest.param(b"[]", "application/json", id="json-array"),
        pytest.param(b'"+79522966236"', "application/json", id="json-string"),
        pytest.param(b"null", "application/json", id="json-null"),
        pytest.param(b"42", "application/json", id="json-number"),
    ],
)
def test_http_body_that_is_not_a_json_object_is_422_naming_the_body(
    system: System, content: bytes, content_type: str
) -> None:
    response = system.api.post(
        "/v1/messages", content=content, headers={"content-type": content_type}
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"


@pytest.mark.parametrize(
    "written",
    ["8{rest}", "7{rest}", "+7{rest}", "8 ({r3}) {r3b}-{r2}-{r2b}", " 7{rest} "],
)
def test_http_russian_numbers_written_7_or_8_are_normalised_to_plus_7(
    system: System, written: str
) -> None:
    # Given a Russian number written the way kod.mobi's older API takes it
    e164 = unique_phone()
    rest = e164[2:]
    to = written.format(rest=rest, r3=rest[:3], r3b=rest[3:6], r2=rest[6:8], r2b=rest[8:])
    # When it is posted
    response = system.api.post("/v1/messages", json={"to": to, "channels": ["sms"]})
    # Then it is accepted, recorded and sent as +7…
    assert response.status_code == 202, response.text
    final = system.wait_final(response.json()["id"])
    assert (final["to"], final["status"]) == (e164, "delivered")
    assert len(system.sandbox_sends(e164)) == 1


def test_http_email_recipient_defaults_to_the_email_channel(system: System) -> None:
    to = f"user.{uuid.uuid4().hex[:8]}@Example.COM"
    response = system.api.post("/v1/messages", json={"to": to})
    assert response.status_code == 202, response.text
    assert response.json()["channels"] == ["email"]
    final = system.wait_final(response.json()["id"])
    assert final["status"] == "delivered"
    assert final["to"] == to.replace("Example.COM", "example.com")


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=st.dictionaries(
        st.sampled_from(["to", "channels", "code", "provider_id", "ttl_s", "metadata", "x"]),
        _json_values,
        max_size=6,
    )
    | _json_values
)
def test_http_intake_never_fails_with_a_server_error(system: System, body: Any) -> None:
    # Given any JSON at all
    response = system.api.post("/v1/messages", json=body)
    # Then it is either accepted or refused naming fields of the body, never a 5xx
    assert response.status_code in (202, 422), response.text
    if response.status_code == 422:
        for error in response.json()["detail"]:
            assert error["loc"][0] == "body"
            assert len(error["loc"]) == 1 or isinstance(body, dict)
            assert "input" not in error  # the input may hold a code: never echoed


# -- input rules: Dramatiq -----------------------------------------------------------


def _reason_fields(reason: str) -> set[str]:
    """The fields `describe_errors` names: `field[.index]: problem; field: problem`."""
    return {part.split(":")[0].split(".")[0].strip() for part in reason.split("; ")}


def _assert_rejected_and_never_sent(system: System, key: str, to: str) -> dict[str, Any]:
    rejected = system.wait_key_final(key)
    _drain(system)
    again = system.by_key(key)
    assert rejected["status"] == "rejected", rejected
    assert rejected["attempts"] == []
    assert again == rejected, "a rejected message must stay as it was (never retried)"
    assert system.sandbox_sends(to) == []
    return rejected


@pytest.mark.parametrize(("body", "fields"), BAD_INPUT)
def test_dramatiq_bad_input_is_rejected_with_a_reason_and_never_retried(
    system: System, body: dict[str, Any], fields: set[str]
) -> None:
    # Given a producer that enqueues send_code with input breaking DESIGN §3
    to = unique_phone()
    # When the worker takes it
    key = system.send_raw(**_with_to(body, to))
    # Then it is recorded as rejected, under its message id, with a reason naming each bad
    # field; it is never sent, and it stays rejected
    rejected = _assert_rejected_and_never_sent(system, key, to)
    assert fields <= _reason_fields(rejected["failure_reason"]), rejected["failure_reason"]


def test_dramatiq_positional_arguments_are_rejected(system: System) -> None:
    to = unique_phone()
    message = dramatiq.Message(
        queue_name="kodmobi", actor_name="send_code", args=(to, ["sms"]), kwargs={}, options={}
    )
    system.broker.enqueue(message)
    rejected = _assert_rejected_and_never_sent(system, message.message_id, to)
    assert "positional" in rejected["failure_reason"]


@pytest.mark.parametrize("key", [12345, "", "k" * 256, ["a"]], ids=["int", "empty", "long", "list"])
def test_dramatiq_bad_idempotency_key_is_rejected_under_the_message_id(
    system: System, key: Any
) -> None:
    to = unique_phone()
    message_id = system.send_raw(to=to, channels=["sms"], idempotency_key=key)
    rejected = _assert_rejected_and_never_sent(system, message_id, to)
    assert "idempotency_key" in _reason_fields(rejected["failure_reason"])


def test_dramatiq_russian_number_written_with_8_is_sent_to_plus_7(system: System) -> None:
    e164 = unique_phone()
    key = system.send_raw(to="8" + e164[2:], channels=["telegram"])
    final = system.wait_key_final(key)
    assert (final["status"], final["to"]) == ("delivered", e164)
    assert len(system.sandbox_sends(e164)) == 1


# -- authentication, reading, health -------------------------------------------------


@pytest.fixture(scope="module")
def delivered(system: System) -> tuple[str, str]:
    """A message delivered over HTTP: (id, the code the recipient got)."""
    return _delivered(system)


def _v1_operations(system: System) -> list[tuple[str, str]]:
    """Every /v1 route the app publishes: (method, path)."""
    # The schema is not served (API_DOCS is off): read it from the app itself.
    spec = create_app(system.root).openapi()
    return [
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        if path.startswith("/v1")
        for method in operations
    ]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong-token",
        f"Bearer {API_TOKEN}x",
        f"Bearer {API_TOKEN[:-1]}",
        f"Basic {API_TOKEN}",
        API_TOKEN,
    ],
    ids=["none", "empty", "no-token", "wrong", "longer", "shorter", "basic", "bare"],
)
def test_every_v1_route_needs_a_valid_bearer_token(
    system: System, delivered: tuple[str, str], authorization: str | None
) -> None:
    # Given a real message, so that only the token can stand in the way
    message_id, code = delivered
    operations = _v1_operations(system)
    assert {path for _, path in operations} >= {
        "/v1/messages",
        "/v1/messages/{message_id}",
        "/v1/messages/{message_id}/check",
    }
    headers = {} if authorization is None else {"Authorization": authorization}
    recipient = unique_phone()
    with httpx.Client(base_url=system.web_url, headers=headers, timeout=10) as anonymous:
        for method, path in operations:
            # When any /v1 route is called without a valid token
            response = anonymous.request(
                method,
                path.replace("{message_id}", message_id),
                params={"idempotency_key": message_id},
                json={"to": recipient, "code": code},
            )
            # Then it is 401 with a Bearer challenge
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    # And nothing happened behind the door: no check was counted, no message was created
    with connect(system) as conn:
        row = conn.execute("SELECT check_count FROM messages WHERE id = %s", (message_id,))
        assert row.fetchone() == {"check_count": 0}
    assert _messages_to(system, recipient) == 0


def test_get_an_unknown_message_is_404(system: System) -> None:
    assert system.api.get(f"/v1/messages/{ULID()}").status_code == 404
    assert system.api.get("/v1/messages/not-an-id").status_code == 404
    assert system.api.get("/v1/messages", params={"idempotency_key": "nobody"}).status_code == 404


def test_get_shows_the_message_with_every_attempt(system: System) -> None:
    to = unique_phone()
    key = uuid.uuid4().hex
    created = system.api.post(
        "/v1/messages",
        json={"to": to, "channels": ["telegram", "sms"], "metadata": {"order": "A-1"}},
        headers={"Idempotency-Key": key},
    ).json()
    final = system.wait_final(created["id"])
    assert system.by_key(key) == final
    assert final["idempotency_key"] == key
    assert final["metadata"] == {"order": "A-1"}
    assert final["channels"] == ["telegram", "sms"]
    assert [(a["seq"], a["channel"], a["status"]) for a in final["attempts"]] == [
        (1, "telegram", "delivered"),
    ]
    # and never the code itself
    assert not [k for k in final if "code" in k]
    assert not [k for a in final["attempts"] for k in a if "code" in k and k != "error_code"]


def test_health_and_readiness_need_no_token(system: System) -> None:
    healthz = httpx.get(f"{system.web_url}/healthz", timeout=10)
    readyz = httpx.get(f"{system.web_url}/readyz", timeout=10)
    assert (healthz.status_code, healthz.json()) == (200, {"status": "ok"})
    assert readyz.status_code == 200, readyz.text
    assert readyz.json() == {"ready": True, "postgres": "ok", "redis": "ok"}


# -- the code check ------------------------------------------------------------------


def _check(system: System, message_id: str, code: Any) -> httpx.Response:
    return system.api.post(f"/v1/messages/{message_id}/check", json={"code": code})


def test_check_allows_five_tries_then_refuses_even_the_right_code(system: System) -> None:
    # Given a delivered code and a user who keeps guessing wrong
    message_id, code = _delivered(system)
    wrong = _other_code(code)
    answers = [_check(system, message_id, wrong).json() for _ in range(5)]
    # When the sixth try is the right code
    sixth = _check(system, message_id, code)
    # Then five were mismatches and the sixth is refused
    assert answers == [{"valid": False, "reason": "mismatch"}] * 5
    assert sixth.status_code == 200
    assert sixth.json() == {"valid": False, "reason": "too_many_checks"}


def test_a_code_is_valid_once(system: System) -> None:
    message_id, code = _delivered(system)
    assert _check(system, message_id, code).json() == {"valid": True, "reason": None}
    assert _check(system, message_id, code).json() == {"valid": False, "reason": "already_used"}


def test_the_code_given_by_the_producer_is_the_one_sent_and_checked(system: System) -> None:
    to = unique_phone()
    created = system.api.post(
        "/v1/messages", json={"to": to, "channels": ["whatsapp"], "code": "0042"}
    ).json()
    system.wait_final(created["id"])
    assert [s["code"] for s in system.sandbox_sends(to)] == ["0042"]
    assert _check(system, created["id"], "0042").json() == {"valid": True, "reason": None}


@pytest.mark.parametrize(
    "body",
    [
        {"code": "123"},
        {"code": "1234567"},
        {"code": "12a4"},
        {"code": 1234},
        {},
        {"code": None},
        {"code": "1234", "extra": 1},
    ],
    ids=["3-digits", "7-digits", "non-digit", "number", "missing", "null", "extra-field"],
)
def test_check_with_a_malformed_code_is_422(system: System, body: dict[str, Any]) -> None:
    created = system.api.post("/v1/messages", json={"to": unique_phone()}).json()
    response = system.api.post(f"/v1/messages/{created['id']}/check", json=body)
    assert response.status_code == 422, response.text
    assert all("input" not in error for error in response.json()["detail"])


def test_check_of_an_unknown_message_is_404(system: System) -> None:
    assert _check(system, str(ULID()), "123456").status_code == 404


def test_check_after_the_code_expired_is_refused(system: System) -> None:
    # Given a delivered code whose TTL has since passed
    message_id, code = _delivered(system)
    with connect(system) as conn:
        conn.execute(
            "UPDATE messages SET expires_at = now() - interval '1 second' WHERE id = %s",
            (message_id,),
        )
    # When the user types the right code
    response = _check(system, message_id, code)
    # Then it is not valid: the code expired
    assert response.json() == {"valid": False, "reason": "expired"}


def test_check_of_a_rejected_message_is_never_valid(system: System) -> None:
    key = system.send_raw(to=unique_phone(), code="12")
    rejected = system.wait_key_final(key)
    assert _check(system, rejected["id"], "1234").json()["valid"] is False


# -- the Python producer API ---------------------------------------------------------


def test_python_send_code_is_delivered_and_checked(system: System) -> None:
    from worker import check_code, send_code

    # Given a service sharing the code base
    to = unique_phone()
    # When it sends a code with Python
    accepted = send_code(to, channels=["telegram", "sms"], metadata={"via": "python"})
    # Then it gets the message's id, status, chain and expiry at once
    assert accepted.id and accepted.status == "queued"
    assert accepted.channels == ["telegram", "sms"]
    assert accepted.expires_at is not None
    final = system.wait_final(accepted.id)
    assert final["status"] == "delivered" and final["metadata"] == {"via": "python"}
    code = system.sandbox_sends(to)[0]["code"]
    # And check_code tells the right code from a wrong one
    wrong = check_code(accepted.id, _other_code(code))
    assert (wrong.valid, wrong.reason) == (False, "mismatch")
    right = check_code(accepted.id, code)
    assert right.valid is True
    again = check_code(accepted.id, code)
    assert (again.valid, again.reason) == (False, "already_used")


def test_python_send_code_is_idempotent_by_key(system: System) -> None:
    import worker
    from worker import send_code

    to = unique_phone()
    key = f"py-{uuid.uuid4().hex}"
    first = send_code(to, channels=["sms"], code="9876", idempotency_key=key)
    same = send_code(to, channels=["sms"], code="9876", idempotency_key=key)
    assert same.id == first.id
    with pytest.raises(worker.IdempotencyConflict):
        send_code(to, channels=["sms"], code="1111", idempotency_key=key)
    with pytest.raises(worker.IdempotencyConflict):
        send_code(unique_phone(), channels=["sms"], code="9876", idempotency_key=key)
    assert system.wait_final(first.id)["status"] == "delivered"
    _drain(system)
    assert [s["code"] for s in system.sandbox_sends(to)] == ["9876"]


@pytest.mark.parametrize(
    ("to", "kwargs", "field"),
    [
        ("12345", {}, "to"),
        ("user@example.com", {"channels": ["sms"]}, "channels"),
        (TO, {"channels": ["email"]}, "channels"),
        (TO, {"channels": ["pigeon"]}, "channels"),
        (TO, {"channels": ["sms", "sms"]}, "channels"),
        (TO, {"code": "123"}, "code"),
        (TO, {"code": "1234567"}, "code"),
        (TO, {"code": 1234}, "code"),
        (TO, {"ttl_s": 5}, "ttl_s"),
        (TO, {"metadata": {"blob": "x" * 5000}}, "metadata"),
    ],
    ids=[
        "phone",
        "email-sms",
        "phone-email",
        "unknown-channel",
        "repeated",
        "3-digits",
        "7-digits",
        "code-number",
        "ttl",
        "metadata",
    ],
)
def test_python_send_code_refuses_bad_input_naming_the_field(
    system: System, to: str, kwargs: dict[str, Any], field: str
) -> None:
    import worker
    from worker import send_code

    recipient = unique_phone() if to == TO else to
    with pytest.raises(worker.InvalidRequest) as refused:
        send_code(recipient, **kwargs)
    assert isinstance(refused.value, ValueError)
    assert field in _reason_fields(str(refused.value)), str(refused.value)
    assert system.sandbox_sends(recipient) == []
