"""Schemathesis against the running web app's own OpenAPI schema: no 5xx, answers as documented,
and requests that break the schema refused with a 4xx (`negative_data_rejection`).

The schema is read from the running app's `/openapi.json`. Schemathesis's lazy pytest
loader (`schemathesis.pytest.from_fixture`) breaks on pytest 9 (`Function._nodeid`), so
each operation gets its own test that runs Hypothesis over `operation.as_strategy()`;
`test_the_operation_list_is_the_schema` keeps that list honest.

Inputs the fuzzing once broke the app with (NUL characters, NaN metadata, non-ASCII
digits, a body that is not UTF-8) are pinned below as deterministic tests.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.system import API_TOKEN, System, running_system, unique_phone

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
MAX_EXAMPLES = 40
POSITIVE_CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
#: Invalid data must also be refused: `negative_data_rejection` fails on any answer outside
#: 400/401/403/404/405/406/409/415/422/428/429, so a 2xx to a broken request is a failure.
NEGATIVE_CHECKS = [*POSITIVE_CHECKS, negative_data_rejection]

OPERATIONS = [
    ("POST", "/v1/messages"),
    ("GET", "/v1/messages"),
    ("GET", "/v1/messages/{message_id}"),
    ("POST", "/v1/messages/{message_id}/check"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/callbacks/kodmobi/{attempt_id}/{token}"),
    ("POST", "/callbacks/kodmobi/{attempt_id}/{token}"),
    ("GET", "/v1/events"),
    ("GET", "/v1/events/{event_id}"),
    ("POST", "/v1/events/{event_id}/redeliver"),
]
#: Operations with constraints a request can break (the others take free-form strings only).
NEGATABLE = [
    ("POST", "/v1/messages"),
    ("GET", "/v1/messages"),
    ("POST", "/v1/messages/{message_id}/check"),
    ("GET", "/v1/events"),
]


@pytest.fixture(scope="module")
def system(pg_server_url: str, redis_url: str, template_db: str) -> Iterator[System]:
    """This module's system serves its schema (API_DOCS is off by default: issue 13)."""
    with running_system(
        pg_server_url, redis_url, template=template_db, extra_env={"API_DOCS": "true"}
    ) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(system: System) -> Iterator[schemathesis.BaseSchema]:
    loaded = schemathesis.openapi.from_url(f"{system.web_url}/openapi.json", timeout=10)
    loaded.config.update(base_url=system.web_url, headers=AUTH)
    yield loaded


def _fuzz(
    operation: Any, mode: GenerationMode, checks: list[Any], message_id: str | None = None
) -> None:
    cases = operation.as_strategy(generation_mode=mode)
    if message_id is not None:
        # A random id meets a 404 before its body is read, and 404 passes for a refusal: aim
        # the body-breaking cases at a message that exists, so the body has to be refused.
        cases = cases.filter(lambda case: not case.meta.is_negative_at(ParameterLocation.PATH))
        cases = cases.map(lambda case: _aimed(case, message_id))

    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=AUTH, checks=checks, timeout=10)

    run()


def _aimed(case: schemathesis.Case, message_id: str) -> schemathesis.Case:
    case.path_parameters = {"message_id": message_id}
    return case


@pytest.fixture(scope="module")
def message_id(system: System) -> str:
    """A message that exists, so requests about it are judged on their body."""
    response = system.api.post("/v1/messages", json={"to": unique_phone(), "code": "4321"})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_the_operation_list_is_the_schema(api_schema: schemathesis.BaseSchema) -> None:
    # Given the schema the running app publishes
    published = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    # Then every operation in it is fuzzed below, and nothing fuzzed below is missing from it
    assert published == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_any_valid_request_gets_a_documented_answer(
    api_schema: schemathesis.BaseSchema, method: str, path: str
) -> None:
    # Given any request this operation's schema allows, with a valid bearer token
    # When it reaches the running web app
    # Then no 5xx, and the status code and body are among the documented ones
    _fuzz(api_schema[path][method], GenerationMode.POSITIVE, POSITIVE_CHECKS)


@pytest.mark.parametrize(("method", "path"), NEGATABLE)
def test_any_invalid_request_is_refused_without_a_server_error(
    api_schema: schemathesis.BaseSchema, message_id: str, method: str, path: str
) -> None:
    # Given requests that break this operation's schema (wrong types, missing fields, …)
    # When they reach the running web app
    # Then each is refused with a 4xx, never a 5xx, and the answer has its documented body
    about = message_id if "{message_id}" in path else None
    _fuzz(api_schema[path][method], GenerationMode.NEGATIVE, NEGATIVE_CHECKS, about)


def test_real_requests_get_documented_answers(
    api_schema: schemathesis.BaseSchema, system: System
) -> None:
    # Given requests that succeed (random ones rarely carry a valid phone number)
    send = api_schema["/v1/messages"]["POST"]
    key = uuid.uuid4().hex
    body = {"to": unique_phone(), "channels": ["sms"], "code": "4321", "metadata": {"k": 1}}
    accepted = send.Case(body=body, headers={"Idempotency-Key": key})
    # When they are made, then each answer matches its documented status and body
    created = accepted.call_and_validate(headers=AUTH, checks=POSITIVE_CHECKS)
    assert created.status_code == 202
    message_id = created.json()["id"]
    replay = send.Case(body=body, headers={"Idempotency-Key": key})
    assert replay.call_and_validate(headers=AUTH, checks=POSITIVE_CHECKS).status_code == 200
    conflict = send.Case(body={**body, "code": "9999"}, headers={"Idempotency-Key": key})
    assert conflict.call_and_validate(headers=AUTH, checks=POSITIVE_CHECKS).status_code == 409
    system.wait_final(message_id)
    get = api_schema["/v1/messages/{message_id}"]["GET"].Case(
        path_parameters={"message_id": message_id}
    )
    assert get.call_and_validate(headers=AUTH, checks=POSITIVE_CHECKS).json()["attempts"]
    find = api_schema["/v1/messages"]["GET"].Case(query={"idempotency_key": key})
    assert find.call_and_validate(headers=AUTH, checks=POSITIVE_CHECKS).json()["id"] == message_id
    check = api_schema["/v1/messages/{message_id}/check"]["POST"].Case(
        path_parameters={"message_id": message_id}, body={"code": "4321"}
    )
    assert check.call_and_validate(headers=AUTH, checks=POSITIVE_CHECKS).json() == {
        "valid": True,
        "reason": None,
    }
    wrong_token = send.Case(body=body)
    refused = wrong_token.call_and_validate(
        headers={"Authorization": "Bearer wrong-token"}, checks=POSITIVE_CHECKS
    )
    assert refused.status_code == 401


# -- inputs the fuzzing found, pinned --------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("GET", "/v1/messages", {"params": {"idempotency_key": "a\x00b"}}),
        ("GET", "/v1/messages/a%00b", {}),
        ("POST", "/v1/messages/a%00b/check", {"json": {"code": "1234"}}),
        ("POST", "/v1/messages", {"json": {"to": "+79991000000", "metadata": {"a": "\x00"}}}),
        ("POST", "/v1/messages", {"json": {"to": "+79991000000", "metadata": {"\x00": 1}}}),
    ],
    ids=["find-by-key", "get-by-id", "check-by-id", "metadata-value", "metadata-key"],
)
def test_nul_character_is_refused_not_a_server_error(
    system: System, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    # Given a NUL character in a key, an id or metadata
    # When it is sent to the API
    response = system.api.request(method, path, **kwargs)
    # Then it is refused as not found or invalid, not answered with a server error
    assert response.status_code in (404, 422), response.text


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_metadata_with_a_non_json_number_is_refused(system: System, number: str) -> None:
    # Given metadata holding a number JSON does not have
    body = json.dumps({"to": unique_phone(), "metadata": {"a": "N"}}).replace('"N"', number)
    # When it is posted
    response = system.api.post(
        "/v1/messages", content=body, headers={"Content-Type": "application/json"}
    )
    # Then it is refused naming metadata
    assert response.status_code == 422, response.text
    assert "metadata" in json.dumps(response.json())


@pytest.mark.parametrize("code", ["١٢٣٤", "１２３４", "۱۲۳۴۵۶"])
def test_code_of_non_ascii_digits_is_refused(system: System, code: str) -> None:
    # Given a code written with digits from another script
    # When it is posted
    response = system.api.post("/v1/messages", json={"to": unique_phone(), "code": code})
    # Then it is refused naming the code, as DESIGN §3 says: 4–6 digits
    assert response.status_code == 422, response.text
    assert "code" in json.dumps(response.json())


@pytest.mark.parametrize(
    ("url", "operation_path"),
    [("/v1/messages", "/v1/messages"), ("/v1/messages/x/check", "/v1/messages/{message_id}/check")],
)
def test_unparseable_body_gets_a_documented_status(
    api_schema: schemathesis.BaseSchema, system: System, url: str, operation_path: str
) -> None:
    # Given a JSON-typed body that is not even UTF-8
    # When it is posted
    response = httpx.post(
        f"{system.web_url}{url}",
        content=b'{"to": "\xc3\x28"}',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    # Then its status is one the schema documents for that operation
    documented = set(api_schema.raw_schema["paths"][operation_path]["post"]["responses"])
    assert str(response.status_code) in documented, response.text
