"""The operations console over HTTP (issue 11 item 2): sign-in by OPS_TOKENS into an
HttpOnly SameSite=Strict cookie, sign-out, pages that escape whatever producers and
kod.mobi sent, never show a code, mask recipients, and never answer 500."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.system import System, callback_token_for, running_system, unique_phone

OPS_TOKEN = "ops-token-abcdefghijklmnopqrst"
SCRIPT = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def system(pg_server_url: str, redis_url: str, template_db: str) -> Iterator[System]:
    with running_system(
        pg_server_url, redis_url, template=template_db, extra_env={"OPS_TOKENS": OPS_TOKEN}
    ) as running:
        yield running


@pytest.fixture
def console(system: System) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.web_url, timeout=10, trust_env=False) as client:
        response = client.post("/ops/signin", data={"token": OPS_TOKEN})
        assert response.status_code == 303
        yield client


def test_pages_need_a_session_and_a_wrong_token_gets_none(system: System) -> None:
    with httpx.Client(base_url=system.web_url, timeout=10, trust_env=False) as client:
        # Given no session, the console sends us to sign in
        assert client.get("/ops").headers["location"] == "/ops/signin"
        assert client.get("/ops/lookup").status_code == 303
        # When a wrong token is given, Then it is refused and no cookie is set
        refused = client.post("/ops/signin", data={"token": "wrong"})
        assert refused.status_code == 401 and "not accepted" in refused.text
        assert "set-cookie" not in refused.headers
        # An API token is not an ops token
        assert client.post("/ops/signin", data={"token": "other-token-zzzzzzzz"}).status_code == 401
        # A forged cookie is not a session
        client.cookies.set("kodmobi_ops", "eyJ0IjoieCIsImV4cCI6OTk5OTk5OTk5OX0.forged", path="/ops")
        assert client.get("/ops").status_code == 303


def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_it(system: System) -> None:
    with httpx.Client(base_url=system.web_url, timeout=10, trust_env=False) as client:
        response = client.post("/ops/signin", data={"token": OPS_TOKEN})
        cookie = response.headers["set-cookie"]
        # Then the session cookie is HttpOnly, SameSite=Strict, scoped and expiring
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Path=/ops" in cookie and "Max-Age=" in cookie
        assert OPS_TOKEN not in cookie and OPS_TOKEN not in response.headers["location"]
        overview = client.get("/ops")
        assert overview.status_code == 200 and "Per channel" in overview.text
        assert "default-src 'none'" in overview.headers["content-security-policy"]
        # When signing out, Then the console asks for a token again
        client.post("/ops/signout")
        assert client.get("/ops").status_code == 303


def test_everything_from_producers_and_kodmobi_is_escaped_and_no_code_shown(
    system: System, console: httpx.Client
) -> None:
    # Given a message with a producer's <script> as recipient (rejected, stored as sent)
    key = f"key-{SCRIPT}"
    system.send_raw(to=SCRIPT, channels=["sms"])
    sent = system.api.post(
        "/v1/messages", json={"to": unique_phone(), "code": "482913"},
        headers={"Idempotency-Key": key},
    ).json()
    found = system.wait_final(sent["id"])
    attempt_id = found["attempts"][0]["id"]
    # And a callback whose body carries a <script> and a code
    token = callback_token_for(attempt_id)
    callback = httpx.post(
        f"{system.web_url}/callbacks/kodmobi/{attempt_id}/{token}",
        json={"status": SCRIPT, "code": "482913"}, timeout=10, trust_env=False,
    )
    assert callback.status_code == 200
    # When the message is looked up by its idempotency key
    page = console.post("/ops/lookup", data={"q": key})
    # Then the page shows it, escaped, and never the code
    assert page.status_code == 200
    assert SCRIPT not in page.text
    assert "&lt;script&gt;alert(" in page.text
    assert "482913" not in page.text
    # And the rejected <script> recipient is shown escaped on the overview and lookup
    rejected = console.post("/ops/lookup", data={"q": SCRIPT})
    assert SCRIPT not in rejected.text and rejected.status_code in (200, 404)
    assert SCRIPT not in console.get("/ops").text


def test_lookup_by_recipient_masks_it(system: System, console: httpx.Client) -> None:
    to = unique_phone()
    sent = system.api.post("/v1/messages", json={"to": to, "channels": ["telegram"]}).json()
    system.wait_final(sent["id"])
    page = console.post("/ops/lookup", data={"q": to})
    assert page.status_code == 200 and sent["id"] in page.text
    assert to not in page.text
    assert f"{to[:5]}***{to[-4:]}" in page.text
    by_id = console.get("/ops/lookup", params={"id": sent["id"]})
    assert by_id.status_code == 200 and "telegram" in by_id.text and to not in by_id.text


@pytest.mark.parametrize(
    ("query", "status", "says"),
    [
        ("01ARZ3NDEKTSV4RRFFQ69G5FAV", 404, "Nothing matches"),
        ("garbage \x7f ✓ '; DROP TABLE messages; --", 404, "Nothing matches"),
        ("x" * 10_000, 400, "at most 320"),
        ("   ", 400, "enter a message id"),
        ("\x00", 400, "NUL"),
    ],
    ids=["unknown-id", "garbage", "10KB", "blank", "nul"],
)
def test_bad_lookups_get_a_clear_page_never_a_500(
    console: httpx.Client, query: str, status: int, says: str
) -> None:
    page = console.post("/ops/lookup", data={"q": query})
    assert page.status_code == status, page.text[:500]
    assert says in page.text
    assert page.headers["content-type"].startswith("text/html")


def test_odd_requests_get_pages_not_500s(console: httpx.Client) -> None:
    assert console.get("/ops/lookup", params={"id": "not-an-id"}).status_code == 404
    unknown = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    assert console.get("/ops/lookup", params={"id": unknown}).status_code == 404
    assert console.post("/ops/lookup", content=b"\xff\xfe", headers={
        "content-type": "application/x-www-form-urlencoded"}).status_code < 500
    assert console.post("/ops/lookup", content=b"--x\r\n", headers={
        "content-type": "multipart/form-data; boundary=x"}).status_code < 500
    assert console.get("/ops/static/ops.css").status_code == 200


def test_metrics_endpoint_serves_counters_and_database_gauges(system: System) -> None:
    body = httpx.get(f"{system.web_url}/metrics", timeout=10, trust_env=False).text
    for name in ("kodmobi_queue_depth", "kodmobi_oldest_queued_seconds",
                 "kodmobi_open_attempts", "kodmobi_callbacks_total"):
        assert name in body
