"""Hostile callbacks: Hypothesis throws methods, bodies, content types, sizes and path
segments at `/callbacks/kodmobi/{attempt_id}/{token}` on the running web app.

Without the right token nothing may change; with it, garbage is stored or refused, never a
5xx, and no status moves backwards. Inputs the fuzzing once crashed the receiver with (NUL,
lone surrogates, an infinite message_id) are pinned as plain tests at the end.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from ulid import ULID

from tests.support.callbacks import Awaiting, awaiting_callback
from tests.support.db import connect
from tests.support.system import System, callback_token_for
from worker.rules import CALLBACK_DELIVERED, CALLBACK_FAILED, CALLBACK_PROGRESS
from worker.security import callback_token

# The sandbox and the in-process worker draw from `random` on their own threads while
# Hypothesis generates; Hypothesis notices the global state move and warns, wrongly here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning"
)

MAX_BODY = 64 * 1024
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]
MEANINGFUL = sorted(CALLBACK_DELIVERED | CALLBACK_FAILED | CALLBACK_PROGRESS)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))

ATTEMPT_RANK = {"queued": 0, "sending": 1, "accepted": 2}
MESSAGE_RANK = {"queued": 0, "sending": 1, "sent": 2}
FINAL_RANK = 3


# -- the system under attack ------------------------------------------------------------


class Waiting(Awaiting):
    """A silent attempt, its callback URL for any token, and what is stored about it."""

    def url(self, token: str | None = None, attempt_id: str | None = None) -> str:
        attempt = quote(self.attempt_id if attempt_id is None else attempt_id, safe="")
        token = quote(self.token if token is None else token, safe="")
        return f"{self.system.web_url}/callbacks/kodmobi/{attempt}/{token}"

    def snapshot(self) -> dict[str, list[str]]:
        """Every column of the message, its attempts and their callback events, as text."""
        with connect(self.system) as conn:
            return {
                table: [
                    row["r"]
                    for row in conn.execute(
                        f"SELECT to_jsonb(t)::text AS r FROM {table} t WHERE {where} ORDER BY 1",  # noqa: S608
                        (self.message_id,),
                    )
                ]
                for table, where in (
                    ("messages", "id = %s"),
                    ("attempts", "message_id = %s"),
                    (
                        "callback_events",
                        "attempt_id IN (SELECT id FROM attempts WHERE message_id = %s)",
                    ),
                )
            }

    def statuses(self) -> tuple[str, str]:
        with connect(self.system) as conn:
            row = conn.execute(
                "SELECT m.status AS m, a.status AS a FROM messages m"
                " JOIN attempts a ON a.message_id = m.id WHERE a.id = %s",
                (self.attempt_id,),
            ).fetchone()
        assert row is not None
        return row["m"], row["a"]

    def events(self) -> list[dict[str, Any]]:
        with connect(self.system) as conn:
            return conn.execute(
                "SELECT status_word, parsed_status, applied, outcome FROM callback_events"
                " WHERE attempt_id = %s ORDER BY id",
                (self.attempt_id,),
            ).fetchall()


@pytest.fixture
def waiting(system: System) -> Waiting:
    return awaiting_callback(system, Waiting)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as http:
        yield http


def _rank(status: str, ranks: dict[str, int]) -> int:
    return ranks.get(status, FINAL_RANK)


# -- what a hostile caller may send -----------------------------------------------------

#: Any text a URL, a header-free form or a query can carry (NUL included; lone surrogates
#: cannot be percent-encoded).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
#: JSON strings may also hold lone surrogates, as \\udXXX escapes.
JSON_TEXT = st.text(max_size=40)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
    JSON_TEXT,
)
JSON_ANY = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_TEXT, inner, max_size=4),
    max_leaves=12,
)
CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=latin-1",
            "application/vnd.kodmobi+json",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "multipart/form-data; boundary=zzz",
            "text/plain",
            "application/xml",
            "application/octet-stream",
            "",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.strip),
)


@dataclass
class Garbage:
    method: str
    body: bytes
    content_type: str | None
    query: dict[str, str]


def _status_value(meaningful: bool) -> st.SearchStrategy[Any]:
    """A status word: one of the table's (in any case, padded) or anything at all."""
    words = st.sampled_from(MEANINGFUL) if meaningful else st.nothing()
    padded = words.flatmap(lambda w: st.sampled_from([w, w.upper(), f" {w} ", w.title()]))
    return st.one_of(padded, padded, JSON_TEXT, JSON_ANY)


def _fields(meaningful: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A dict that may carry status/state/message_id, next to arbitrary other keys."""
    others = st.dictionaries(JSON_TEXT.filter(lambda k: k not in ("status", "state")), JSON_ANY)
    optional: dict[str, st.SearchStrategy[Any]] = {
        "message_id": st.one_of(st.integers(), JSON_TEXT, st.floats(), JSON_ANY)
    }
    if meaningful:
        optional.update(status=_status_value(True), state=_status_value(True))
    named = st.fixed_dictionaries({}, optional=optional)
    return st.builds(lambda a, b: {**a, **b}, others, named)


def _no_surrogates(text: str) -> str:
    return text.encode("utf-8", "replace").decode()


def _multipart(fields: dict[str, Any]) -> tuple[bytes, str]:
    request = httpx.Request(
        "POST",
        "http://x/",
        data={_no_surrogates(k): json.dumps(v) for k, v in fields.items()},
        files={"attachment": ("a.bin", b"\x01\x02")},
    )
    return request.read(), request.headers["content-type"]


@st.composite
def garbage(draw: st.DrawFn, *, meaningful: bool) -> Garbage:
    """One request: any method, any body shape, any (or a lying) content type."""
    kind = draw(st.sampled_from(["bytes", "json", "json-fields", "form", "multipart", "empty"]))
    content_type = draw(CONTENT_TYPES)
    fields = draw(_fields(meaningful))
    if kind == "bytes":
        body = draw(st.binary(max_size=2000))
    elif kind == "json":
        body = json.dumps(draw(JSON_ANY)).encode()
    elif kind == "json-fields":
        # Unescaped, a lone surrogate is not even UTF-8: the receiver must say 400, not crash.
        ascii_only = draw(st.booleans())
        body = json.dumps(fields, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    elif kind == "form":
        flat = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        body = urlencode(flat, encoding="utf-8", errors="surrogatepass").encode()
    elif kind == "multipart":
        body, real_type = _multipart(fields)
        content_type = draw(st.sampled_from([real_type, content_type]))
    else:
        body = b""
    query = draw(st.dictionaries(TEXT, TEXT, max_size=3))
    if meaningful and draw(st.booleans()):
        query["status"] = draw(_status_value(True).filter(lambda v: isinstance(v, str)))
    return Garbage(draw(st.sampled_from(METHODS)), body, content_type, query)


def _mentions_status(g: Garbage) -> bool:
    text = g.body.lower()
    return (
        b"status" in text
        or b"state" in text
        or any(k.lower() in ("status", "state") for k in g.query)
    )


def _send(http: httpx.Client, url: str, g: Garbage) -> httpx.Response:
    headers = {} if g.content_type is None else {"Content-Type": g.content_type}
    return http.request(
        g.method,
        url,
        params=g.query,
        content=g.body if g.method != "GET" else None,
        headers=headers,
    )


# -- forged tokens ------------------------------------------------------------------------


@st.composite
def forged_token(draw: st.DrawFn, real: str, others: str) -> str:
    """Near misses of the right token, another attempt's token, or anything at all."""
    forged = draw(
        st.one_of(
            st.just(others),
            st.just(callback_token("another-secret-0123456789abcdef", "x", 2**40)),
            st.integers(1, len(real) - 1).map(lambda n: real[:n]),
            st.sampled_from([real + "=", real + "==", real.swapcase(), real.lower(), real.upper()]),
            st.sampled_from([" " + real, real + " ", real + "%00", real + "\n", real + "\t"]),
            st.builds(
                lambda i, c: real[:i] + c + real[i + 1 :],
                st.integers(0, len(real) - 1),
                st.sampled_from("AZaz09-_"),
            ),
            TEXT.filter(bool),
        )
    )
    assume(forged != real)
    return forged


def test_forged_tokens_get_404_and_change_nothing(
    system: System, waiting: Waiting, client: httpx.Client
) -> None:
    # Given an attempt waiting for its callback, and a second attempt with its own token
    other = awaiting_callback(system, Waiting)
    before = waiting.snapshot(), other.snapshot()
    attempt_ids = st.sampled_from(
        [waiting.attempt_id, waiting.attempt_id.lower(), waiting.attempt_id + "0"]
    )

    @given(
        token=forged_token(waiting.token, other.token),
        attempt_id=attempt_ids,
        request=garbage(meaningful=True),
    )
    @FUZZ
    def run(token: str, attempt_id: str, request: Garbage) -> None:
        # When anyone without the right token calls back, with any method and body
        # (even "delivered" or "failed", and even the bodies that crash the receiver)
        response = _send(client, waiting.url(token=token, attempt_id=attempt_id), request)
        # Then the answer is 404 (405 for methods the route does not take), never 5xx
        expected = {404} if request.method in ("GET", "POST") else {404, 405}
        if "/" in token:  # Starlette's trailing-slash redirect, before any route runs
            expected.add(307)
        assert response.status_code in expected, (response.status_code, response.text)

    run()
    # And not a row changed: not the message, its attempts, nor their callback events
    assert (waiting.snapshot(), other.snapshot()) == before
    # (the snapshot does see a genuine callback: the test could fail)
    assert client.post(waiting.url(), json={"status": "delivered"}).status_code == 200
    assert waiting.snapshot() != before[0]


@given(attempt_id=TEXT, token=TEXT, method=st.sampled_from(METHODS), signed=st.booleans())
@FUZZ
def test_any_path_segments_are_404_or_405(
    system: System, attempt_id: str, token: str, method: str, signed: bool
) -> None:
    # Given arbitrary path segments (and sometimes the right token for a made-up attempt id)
    if signed:
        token = callback_token_for(attempt_id)
    assume(attempt_id not in ("", ".", "..") and token not in ("", ".", ".."))
    url = f"{system.web_url}/callbacks/kodmobi/{quote(attempt_id, safe='')}/{quote(token, safe='')}"
    # When anything is called there
    response = httpx.request(method, url, json={"status": "delivered"}, timeout=10)
    # Then it is 404 (405 for methods the route does not take): no such attempt, never 5xx;
    # a segment holding "/" may instead meet Starlette's trailing-slash redirect (307)
    expected = {404} if method in ("GET", "POST") else {404, 405}
    if "/" in attempt_id + token:
        expected.add(307)
    assert response.status_code in expected, (response.status_code, response.text)


# -- the right token, garbage bodies ----------------------------------------------------


def test_garbage_without_a_status_is_stored_or_refused_and_applies_nothing(
    waiting: Waiting, client: httpx.Client
) -> None:
    # Given an attempt waiting for its callback
    before = waiting.statuses()
    assert before == ("sent", "accepted")

    @given(request=garbage(meaningful=False))
    @FUZZ
    def run(request: Garbage) -> None:
        assume(not _mentions_status(request))
        # When kod.mobi's URL receives any body, method and content type with no status in it
        response = _send(client, waiting.url(), request)
        # Then it is stored (200), refused as unreadable (400) or by method (405), never 5xx
        allowed = {200, 400} if request.method in ("GET", "POST") else {405}
        assert response.status_code in allowed, (response.status_code, response.text)
        if response.status_code == 200:
            assert response.json()["outcome"] in ("unknown_status", "duplicate")
        # And nothing is applied: the attempt still waits
        assert waiting.statuses() == before

    run()
    stored = waiting.events()
    assert stored, "no garbage was stored at all: the fuzzing never reached the receiver"
    assert not any(e["applied"] for e in stored)


def test_garbage_with_any_status_never_moves_a_status_backwards(
    system: System, client: httpx.Client
) -> None:
    # Given a few attempts waiting for their callbacks
    pool = [awaiting_callback(system, Waiting) for _ in range(3)]

    @given(request=garbage(meaningful=True), index=st.integers(0, len(pool) - 1))
    @FUZZ
    def run(request: Garbage, index: int) -> None:
        target = pool[index]
        message_before, attempt_before = target.statuses()
        # When its URL receives garbage that may carry a status word, meaningful or not
        response = _send(client, target.url(), request)
        # Then the answer is 200, 400, 405 or 413, never a 5xx
        allowed = {200, 400, 413} if request.method in ("GET", "POST") else {405}
        assert response.status_code in allowed, (response.status_code, response.text)
        # And neither the message nor the attempt moved backwards, nor left a final status
        message_after, attempt_after = target.statuses()
        assert _rank(attempt_after, ATTEMPT_RANK) >= _rank(attempt_before, ATTEMPT_RANK)
        assert _rank(message_after, MESSAGE_RANK) >= _rank(message_before, MESSAGE_RANK)
        if _rank(attempt_before, ATTEMPT_RANK) == FINAL_RANK:
            assert attempt_after == attempt_before
        if _rank(message_before, MESSAGE_RANK) == FINAL_RANK:
            assert message_after == message_before
        # (the message may move on by itself: a failure falls back to whatsapp, which delivers)
        if attempt_after != attempt_before:
            assert response.status_code == 200 and response.json()["outcome"] in (
                "progress",
                "delivered",
                "failed",
                "late_delivery",
            )

    run()
    # And only a meaningful status word was ever applied
    for target in pool:
        for event in target.events():
            if event["applied"]:
                assert event["parsed_status"] in ("delivered", "failed", "progress"), event


# -- sizes and lying lengths ------------------------------------------------------------


def test_bodies_over_64_kib_are_413_and_stored_nowhere(
    waiting: Waiting, client: httpx.Client
) -> None:
    # Given a waiting attempt
    before = waiting.snapshot()

    @given(size=st.integers(MAX_BODY + 1, 4 * MAX_BODY), chunked=st.booleans())
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    def run(size: int, chunked: bool) -> None:
        body = b'{"status": "delivered", "pad": "' + b"x" * size + b'"}'
        # When a body over 64 KiB arrives, its length declared or streamed in chunks
        content: Any = (
            iter([body[i : i + 8192] for i in range(0, len(body), 8192)]) if chunked else body
        )
        response = client.post(
            waiting.url(), content=content, headers={"Content-Type": "application/json"}
        )
        # Then it is 413
        assert response.status_code == 413, response.text

    run()
    # And nothing was stored or applied
    assert waiting.snapshot() == before


def _raw(system: System, path: str, head: bytes, body: bytes, *, close_write: bool) -> bytes:
    """Send bytes as they are, and return the status line of the first answer (b'' if none)."""
    where = urlsplit(system.web_url)
    assert where.hostname is not None and where.port is not None
    with socket.create_connection((where.hostname, where.port), timeout=3) as sock:
        sock.sendall(head.replace(b"{path}", path.encode()) + body)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while b"\r\n" not in received:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        except TimeoutError:
            return b""
    return received.split(b"\r\n")[0]


@pytest.mark.parametrize(
    ("content_length", "close_write", "answers"),
    [
        (b"5", False, {b"HTTP/1.1 400 Bad Request"}),  # shorter than the body
        (b"500", True, {b""}),  # longer: the caller gives up, nobody is there to answer
        (b"99999999999", False, {b"HTTP/1.1 413 Request Entity Too Large"}),
        (b"-1", False, {b"HTTP/1.1 400 Bad Request"}),
        (b"abc", False, {b"HTTP/1.1 400 Bad Request"}),
        (b"3\r\nContent-Length: 4", False, {b"HTTP/1.1 400 Bad Request"}),
        (b"3\r\nTransfer-Encoding: chunked", False, {b"HTTP/1.1 400 Bad Request"}),
    ],
    ids=["short", "long-then-close", "huge", "negative", "not-a-number", "twice", "with-chunked"],
)
def test_a_lying_content_length_is_refused_and_changes_nothing(
    system: System, waiting: Waiting, content_length: bytes, close_write: bool, answers: set[bytes]
) -> None:
    # Given a waiting attempt
    target = waiting
    before = target.snapshot()
    path = urlsplit(target.url()).path
    head = (
        b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + content_length + b"\r\n\r\n"
    )
    # When a callback declares a length its body does not have
    status_line = _raw(system, path, head, b'{"status": "delivered"}', close_write=close_write)
    # Then it is refused (or, when the caller hangs up first, simply dropped), never a 5xx
    assert status_line in answers
    # And nothing about the attempt changed, and the receiver still serves the next caller
    assert target.snapshot() == before
    assert httpx.get(f"{system.web_url}/healthz", timeout=10).status_code == 200


# -- inputs the fuzzing once crashed the receiver with (500s, fixed in 48b80f1) -------------


@pytest.mark.parametrize(
    ("method", "body", "content_type", "query"),
    [
        pytest.param("POST", b"\x00", "text/plain", {}, id="nul-byte-body"),
        pytest.param("POST", b'{"status": "x\\u0000"}', "application/json", {}, id="nul-status"),
        pytest.param(
            "POST", b"status=\x00", "application/x-www-form-urlencoded", {}, id="nul-form"
        ),
        pytest.param("GET", b"", None, {"status": "x\x00"}, id="nul-in-query"),
        pytest.param("POST", b'{"status": "\\ud800"}', "application/json", {}, id="surrogate"),
        pytest.param("POST", b'{"state": "\\udfff"}', "application/json", {}, id="surrogate-state"),
        pytest.param("POST", b'{"status": "x", "message_id": Infinity}', None, {}, id="inf-id"),
        pytest.param("POST", b'{"status": "x", "message_id": -Infinity}', None, {}, id="-inf-id"),
        pytest.param("POST", b'{"status": "x", "message_id": NaN}', None, {}, id="nan-id"),
        pytest.param("POST", b'{"status": "x", "message_id": 1e400}', None, {}, id="huge-id"),
    ],
)
def test_poisoned_callbacks_with_a_valid_token_are_stored_not_a_server_error(
    waiting: Waiting,
    client: httpx.Client,
    method: str,
    body: bytes,
    content_type: str | None,
    query: dict[str, str],
) -> None:
    # Given a waiting attempt and its genuine callback URL
    g = Garbage(method, body, content_type, query)
    # When the callback carries a character or number Postgres or int() cannot take
    response = _send(client, waiting.url(), g)
    # Then it is stored as an unknown status, and the attempt still waits
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "unknown_status"
    assert waiting.statuses() == ("sent", "accepted")
    [event] = waiting.events()
    assert event["applied"] is False


def test_an_attempt_id_with_nul_and_its_token_is_404(client: httpx.Client, system: System) -> None:
    # Given a made-up attempt id holding NUL, signed as if it were ours
    attempt_id = "a\x00b"
    token = callback_token_for(attempt_id)
    url = f"{system.web_url}/callbacks/kodmobi/{quote(attempt_id)}/{token}"
    # When a callback arrives for it, then there is no such attempt
    assert client.post(url, json={"status": "delivered"}).status_code == 404


def test_unknown_attempt_with_a_fitting_token_changes_nothing(
    system: System, client: httpx.Client
) -> None:
    # Given an attempt id that does not exist, signed as if it did
    unknown = str(ULID())
    url = f"{system.web_url}/callbacks/kodmobi/{unknown}/{callback_token_for(unknown)}"
    # When a callback arrives for it, then it is 404 and nothing is stored for it
    assert client.post(url, json={"status": "delivered"}).status_code == 404
    with connect(system) as conn:
        stored = conn.execute(
            "SELECT count(*) AS n FROM callback_events WHERE attempt_id = %s", (unknown,)
        ).fetchone()
    assert stored is not None and stored["n"] == 0
