"""The sandbox's Starlette app: kod.mobi's endpoints, the record and the control endpoints.

Longer than our ~400-line rule on purpose: one handler per endpoint of kod.mobi's pages
(seeds/), in the pages' order, so the imitation reads against them side by side; the
pure rules they share are in sandbox/rules.py, the state in sandbox/state.py."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.sandbox import rules
from worker.sandbox.config import SandboxConfig
from worker.sandbox.rules import ApiError, bad_request
from worker.sandbox.state import SandboxState, Session

log = logging.getLogger("worker.sandbox")

JSON = "application/json"


# -- answers ------------------------------------------------------------------------------


def _dumps(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def ok(data: Any) -> Response:
    return Response(_dumps(data), media_type=JSON)


def error_response(exc: ApiError) -> Response:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    if exc.raw_body is not None:
        return Response(exc.raw_body, exc.status, headers, media_type="text/html")
    return Response(_dumps(exc.body()), exc.status, headers, media_type=JSON)


_HTTP_ERRORS = {
    400: ("ERROR_BAD_REQUEST", "Bad request."),
    401: ("ERROR_UNAUTHORIZED", "Unauthorized."),
    404: ("ERROR_NOT_FOUND", "Not found."),
    405: ("ERROR_METHOD_NOT_ALLOWED", "Method not allowed."),
}


async def _on_api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    # Starlette's own 404 (unknown route) and 405 (wrong method), in kod.mobi's body.
    assert isinstance(exc, HTTPException)
    sys_message, text = _HTTP_ERRORS.get(exc.status_code, (f"ERROR_HTTP_{exc.status_code}", ""))
    params = {"path": request.url.path}
    if exc.status_code == 405:
        params = {"method": f"{request.method} not allowed"}
    response = error_response(ApiError(exc.status_code, sys_message, text or exc.detail, params))
    if exc.headers:
        response.headers.update(exc.headers)  # keeps 405's Allow
    return response


async def _on_crash(_request: Request, exc: Exception) -> Response:
    log.error("sandbox bug: %r", exc)
    return error_response(rules.internal_error())


# -- request helpers ----------------------------------------------------------------------


def _state(request: Request) -> SandboxState:
    state: SandboxState = request.app.state.sandbox
    return state


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > rules.MAX_BODY_BYTES:
        raise ApiError(413, "ERROR_PAYLOAD_TOO_LARGE", "Payload too large.", {"body": "too large"})
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad_request({"body": "must be a JSON object"}) from None
    if not isinstance(data, dict):
        raise bad_request({"body": "must be a JSON object"})
    return data


def _check(
    problems: dict[str, str], name: str, check: Callable[..., Any], value: Any, *args: Any
) -> Any:
    """Run one field's check; a problem is noted under the field's name, not raised."""
    try:
        return check(value, *args)
    except ValueError as exc:
        problems[name] = str(exc)
        return None


def _query(request: Request, name: str) -> str | None:
    # `?type=` says nothing: the seeds' own examples send empty parameters.
    return request.query_params.get(name) or None


def _session_channels(session: Session, now: float) -> list[dict[str, Any]]:
    return [_session_channel(session, channel, now) for channel in session.channels]


def _session_channel(session: Session, channel: str, now: float) -> dict[str, Any]:
    active = rules.magic_code(session.to, channel) not in rules.INACTIVE_CODES
    return rules.session_channel(channel, active, session.timeout(channel, now))


def _find_session(state: SandboxState, session_id: str, now: float) -> Session:
    session = state.find_session(session_id, now)
    if session is None:
        raise rules.session_not_found()
    return session


async def _hold(slow_s: float) -> None:
    if slow_s > 0:
        await asyncio.sleep(slow_s)


# -- kod.mobi endpoints -------------------------------------------------------------------


async def manual_send(request: Request) -> Response:
    state = _state(request)
    body = await _json_object(request)
    problems: dict[str, str] = {}
    to = _check(problems, "to", rules.check_recipient, body.get("to"))
    channel = _check(problems, "channel", rules.check_channel, body.get("channel"), to)
    code = body.get("code")
    if code is not None:
        code = _check(problems, "code", rules.check_code, code)
    provider_id = body.get("provider_id")
    if provider_id is not None:
        provider_id = _check(problems, "provider_id", rules.check_provider_id, provider_id, channel)
    callback_url = body.get("callback_url")
    if callback_url is not None:
        callback_url = _check(problems, "callback_url", rules.check_callback_url, callback_url)
    if problems:
        raise bad_request(problems)

    timeout_s = state.config.manual_channel_timeout_s
    if timeout_s:
        now = time.monotonic()
        until = state.manual_timeouts.get((to, channel), 0.0)
        if until > now:
            raise rules.throttled(int(until - now) + 1, {"channel": "sending timeout"})
    record, slow_s = state.accept_send(
        to,
        channel,
        code or state.draw_code(),
        provider_id=provider_id,
        callback_url=callback_url,
        source="manual",
    )
    if timeout_s:
        state.manual_timeouts[(to, channel)] = time.monotonic() + timeout_s
    answer = {
        "message": "Sent to queue.",
        "code": state.encrypt(record["code"]),
        "message_id": record["message_id"],
    }
    await _hold(slow_s)
    return ok(answer)


async def manual_channels(_request: Request) -> Response:
    return Response(_MANUAL_CHANNELS_BODY, media_type=JSON)


_MANUAL_CHANNELS_BODY = _dumps(rules.MANUAL_CHANNELS)


async def session_create(request: Request) -> Response:
    state = _state(request)
    body = await _json_object(request)
    problems: dict[str, str] = {}
    to = _check(problems, "to", rules.check_recipient, body.get("to"))
    channel = body.get("type")
    if channel is not None:
        channel = _check(problems, "type", rules.check_channel, channel, to)
    send = body.get("send")
    send = True if send is None else _check(problems, "send", rules.check_flag, send)
    if problems:
        raise bad_request(problems)

    now = time.monotonic()
    session = state.session_for(to, now)
    channel = channel or state.default_channel(to)
    slow_s = 0.0
    if send:
        if session is not None and (left := session.timeout(channel, now)):
            raise rules.throttled(left, {"type": "sending timeout"})
        code = session.code if session is not None else state.draw_code()
        record, slow_s = state.accept_send(
            to,
            channel,
            code,
            source="session",
            session_id=session.session_id if session else None,
        )
        if session is None:
            session = state.create_session(to, code, now)
            record["session_id"] = session.session_id
        session.sent_mono[channel] = now
        state.remember_channel(to, channel)
    elif session is None:
        session = state.create_session(to, state.draw_code(), now)
    answer = {
        "session_id": session.session_id,
        "session_expired_at": session.expired_at,
        "sent_to": channel if send else None,
        "channels": _session_channels(session, now),
    }
    await _hold(slow_s)
    return ok(answer)


async def session_send(request: Request) -> Response:
    state = _state(request)
    body = await _json_object(request)
    problems: dict[str, str] = {}
    session_id = _check(problems, "session_id", rules.check_ulid, body.get("session_id"))
    channel = _check(problems, "type", rules.check_channel, body.get("type"), None)
    if problems:
        raise bad_request(problems)
    now = time.monotonic()
    session = _find_session(state, session_id, now)
    _check(problems, "type", rules.check_channel, channel, session.to)
    if problems:
        raise bad_request(problems)
    if left := session.timeout(channel, now):
        raise rules.throttled(left, {"type": "sending timeout"})
    _, slow_s = state.accept_send(
        session.to, channel, session.code, source="session", session_id=session.session_id
    )
    session.sent_mono[channel] = now
    state.remember_channel(session.to, channel)
    answer = {
        "session_id": session.session_id,
        "session_expired_at": session.expired_at,
        "channel": _session_channel(session, channel, now),
    }
    await _hold(slow_s)
    return ok(answer)


async def session_channels(request: Request) -> Response:
    state = _state(request)
    raw_id = _query(request, "session_id")
    if raw_id is None:
        return ok([rules.session_channel(c, False, 0) for c in rules.ALL_SESSION_CHANNELS])
    problems: dict[str, str] = {}
    session_id = _check(problems, "session_id", rules.check_ulid, raw_id)
    if problems:
        raise bad_request(problems)
    now = time.monotonic()
    return ok(_session_channels(_find_session(state, session_id, now), now))


# -- the older api/v2 endpoints (GET, query parameters) -----------------------------------


def _v2_channel(problems: dict[str, str], value: str | None) -> str | None:
    if value is not None and value not in rules.V2_CHANNELS:
        problems["type"] = f"must be one of {', '.join(rules.V2_CHANNELS)}"
        return None
    return value


async def _v2_send(
    state: SandboxState, to: str, channel: str, code: str | None, session: Session | None
) -> tuple[Session, float]:
    """Send over the older API: create the session if needed, honour its channel timeout."""
    now = time.monotonic()
    if session is not None and (left := session.timeout(channel, now)):
        raise rules.throttled(left, {"type": "sending timeout"})
    code = code or (session.code if session is not None else state.draw_code())
    record, slow_s = state.accept_send(
        to, channel, code, source="v2", session_id=session.session_id if session else None
    )
    if session is None:
        session = state.create_session(to, code, now)
        record["session_id"] = session.session_id
    session.code = code  # the latest code sent is the one that checks
    session.sent_mono[channel] = now
    state.remember_channel(to, channel)
    return session, slow_s


async def v2_message_create(request: Request) -> Response:
    state = _state(request)
    problems: dict[str, str] = {}
    to = _check(problems, "phone", rules.check_v2_phone, _query(request, "phone"))
    channel = _v2_channel(problems, _query(request, "type"))
    code = _query(request, "code")
    if code is not None:
        code = _check(problems, "code", rules.check_code, code)
    if problems:
        raise bad_request(problems)
    channel = channel or state.default_channel(to)
    session = state.session_for(to, time.monotonic())
    session, slow_s = await _v2_send(state, to, channel, code, session)
    await _hold(slow_s)
    return ok(_v2_answer(session, channel))


async def v2_message_send(request: Request) -> Response:
    state = _state(request)
    problems: dict[str, str] = {}
    session_id = _check(problems, "session_id", rules.check_ulid, _query(request, "session_id"))
    channel = _v2_channel(problems, _query(request, "type"))
    code = _query(request, "code")
    if code is not None:
        code = _check(problems, "code", rules.check_code, code)
    if problems:
        raise bad_request(problems)
    session = _find_session(state, session_id, time.monotonic())
    channel = channel or state.default_channel(session.to)
    _check(problems, "type", rules.check_channel, channel, session.to)
    if problems:
        raise bad_request(problems)
    session, slow_s = await _v2_send(state, session.to, channel, code, session)
    await _hold(slow_s)
    return ok(_v2_answer(session, channel))


def _v2_answer(session: Session, channel: str) -> dict[str, Any]:
    return {
        "success": True,
        "session_id": session.session_id,
        "type": channel,
        "message": "Sent to queue.",
    }


async def v2_message_check(request: Request) -> Response:
    state = _state(request)
    problems: dict[str, str] = {}
    session_id = _check(problems, "session_id", rules.check_ulid, _query(request, "session_id"))
    code = _query(request, "code")
    if code is None:
        problems["code"] = "required"
    if problems:
        raise bad_request(problems)
    session = _find_session(state, session_id, time.monotonic())
    valid = hmac.compare_digest(str(code).encode(), session.code.encode())
    return ok({"success": True, "session_id": session.session_id, "valid": valid})


async def v2_channel_check(request: Request) -> Response:
    state = _state(request)
    problems: dict[str, str] = {}
    session_id = _check(problems, "session_id", rules.check_ulid, _query(request, "session_id"))
    channel = _query(request, "type")
    if channel is None:
        problems["type"] = f"required: one of {', '.join(rules.V2_CHANNELS)}"
    else:
        channel = _v2_channel(problems, channel)
    if problems:
        raise bad_request(problems)
    assert channel is not None
    session = _find_session(state, session_id, time.monotonic())
    active = (
        channel in session.channels
        and rules.magic_code(session.to, channel) not in rules.INACTIVE_CODES
    )
    return ok(
        {"success": True, "session_id": session.session_id, "type": channel, "is_active": active}
    )


# -- record and control endpoints -----------------------------------------------------------


def _int_query(problems: dict[str, str], request: Request, name: str) -> int | None:
    raw = _query(request, name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        problems[name] = "must be an integer"
        return None
    if value < 0:
        problems[name] = "must not be negative"
    return value


async def sandbox_messages(request: Request) -> Response:
    state = _state(request)
    if request.method == "DELETE":
        return ok({"deleted": state.clear_messages()})
    problems: dict[str, str] = {}
    since_id = _int_query(problems, request, "since_id")
    limit = _int_query(problems, request, "limit")
    if problems:
        raise bad_request(problems)
    messages = state.list_messages(_query(request, "to"), since_id, limit)
    return ok({"messages": messages})


async def sandbox_message(request: Request) -> Response:
    record = _state(request).by_id.get(request.path_params["message_id"])
    if record is None:
        raise ApiError(404, "ERROR_MESSAGE_NOT_FOUND", "Message not found.")
    return ok(record)


async def sandbox_stats(request: Request) -> Response:
    state = _state(request)
    return ok(state.stats.as_dict(state.callbacks.pending))


async def sandbox_config(request: Request) -> Response:
    state = _state(request)
    if request.method == "POST":
        changes = await _json_object(request)
        config, problems = state.config.updated(changes)
        if config is None:
            raise bad_request(problems)
        state.set_config(config, reseed="seed" in changes)
    return ok(state.config.as_dict())


ROUTES = [
    Route("/manual/send", manual_send, methods=["POST"]),
    Route("/manual/channels", manual_channels, methods=["GET"]),
    Route("/session/create", session_create, methods=["POST"]),
    Route("/session/send", session_send, methods=["POST"]),
    Route("/session/channels", session_channels, methods=["GET"]),
    Route("/api/v2/message/create", v2_message_create, methods=["GET"]),
    Route("/api/v2/message/send", v2_message_send, methods=["GET"]),
    Route("/api/v2/message/check", v2_message_check, methods=["GET"]),
    Route("/api/v2/channel/check", v2_channel_check, methods=["GET"]),
    Route("/sandbox/messages", sandbox_messages, methods=["GET", "DELETE"]),
    Route("/sandbox/messages/{message_id:int}", sandbox_message, methods=["GET"]),
    Route("/sandbox/stats", sandbox_stats, methods=["GET"]),
    Route("/sandbox/config", sandbox_config, methods=["GET", "POST"]),
]
_API_PATHS = frozenset(r.path for r in ROUTES if not r.path.startswith("/sandbox/"))


# -- the gate: key, latency and counters, in front of every route ------------------------------


class Gate:
    """Plain ASGI middleware (no per-request Request object): checks `x-api-key`, adds the
    configured latency, and counts requests and answers of the kod.mobi endpoints."""

    def __init__(self, app: ASGIApp, state: SandboxState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        path: str = scope["path"]
        control = path.startswith("/sandbox/")
        key = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                key = value
                break
        if not control:
            stats = state.stats
            endpoint = f"{scope['method']} {path}" if path in _API_PATHS else "other"
            stats.requests[endpoint] = stats.requests.get(endpoint, 0) + 1
            latency_ms = state.config.latency_ms
            if latency_ms:
                await asyncio.sleep(latency_ms / 1000)
            send = _counting(send, stats.responses)
        if key is None or not hmac.compare_digest(key, state.api_key_bytes):
            problem = "missing" if key is None else "invalid"
            refusal = ApiError(401, "ERROR_UNAUTHORIZED", "Unauthorized.", {"x-api-key": problem})
            await error_response(refusal)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except Exception:
            if not control:
                responses = state.stats.responses
                responses[500] = responses.get(500, 0) + 1
            raise


def _counting(send: Send, responses: dict[int, int]) -> Callable[[Message], Awaitable[None]]:
    async def counting_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status: int = message["status"]
            responses[status] = responses.get(status, 0) + 1
        await send(message)

    return counting_send


def create_app(config: SandboxConfig | None = None) -> Starlette:
    """The sandbox as an ASGI app; `app.state.sandbox` holds its config and record."""
    state = SandboxState(config or SandboxConfig())

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = Starlette(
        routes=ROUTES,
        exception_handlers={
            ApiError: _on_api_error,
            HTTPException: _on_http_exception,
            Exception: _on_crash,
        },
        lifespan=lifespan,
    )
    # kod.mobi answers a trailing slash with 404, not with a redirect.
    app.router.redirect_slashes = False
    app.state.sandbox = state
    app.add_middleware(Gate, state=state)
    return app
