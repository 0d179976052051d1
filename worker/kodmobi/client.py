"""A typed, pooled, thread-safe httpx client for kod.mobi, with explicit timeouts."""

from __future__ import annotations

import time
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from worker import metrics
from worker.kodmobi import errors
from worker.kodmobi.models import (
    Channel,
    ManualChannel,
    ManualSendResponse,
    SessionChannel,
    SessionCreateResponse,
    SessionSendResponse,
    V2Response,
)

T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT_S = 3.0
DEFAULT_READ_TIMEOUT_S = 10.0


class KodMobiClient:
    """One instance per process, shared by every thread: httpx pools the connections.

    Errors come out as `worker.kodmobi.errors.KodMobiError` subclasses. The client
    retries at most once, and only when the request surely never left (connect
    errors); everything else is the caller's decision (`errors.decide`).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        max_connections: int = 64,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"x-api-key": api_key, "accept": "application/json"},
            timeout=httpx.Timeout(
                connect=connect_timeout_s,
                read=read_timeout_s,
                write=read_timeout_s,
                pool=read_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=30.0,
            ),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KodMobiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the endpoints ------------------------------------------------------------

    def manual_send(
        self,
        to: str,
        channel: Channel | str,
        *,
        code: str | None = None,
        provider_id: int | None = None,
        callback_url: str | None = None,
    ) -> ManualSendResponse:
        """`POST /manual/send`: send `code` (or kod.mobi's own) to `to` over `channel`."""
        body: dict[str, Any] = {"to": to, "channel": channel}
        if code is not None:
            body["code"] = code
        if provider_id is not None:
            body["provider_id"] = provider_id
        if callback_url is not None:
            body["callback_url"] = callback_url
        return self._call("POST", "/manual/send", ManualSendResponse, json=body)

    def manual_channels(self) -> list[ManualChannel]:
        """`GET /manual/channels`: the project's channels with their providers."""
        return self._call("GET", "/manual/channels", list[ManualChannel])

    def session_create(
        self, to: str, *, type: Channel | str | None = None, send: bool | None = None
    ) -> SessionCreateResponse:
        """`POST /session/create`: create (or return) the recipient's session."""
        body: dict[str, Any] = {"to": to}
        if type is not None:
            body["type"] = type
        if send is not None:
            body["send"] = send
        return self._call("POST", "/session/create", SessionCreateResponse, json=body)

    def session_send(self, session_id: str, type: Channel | str) -> SessionSendResponse:
        """`POST /session/send`: send the session's code again over `type`."""
        body = {"session_id": session_id, "type": type}
        return self._call("POST", "/session/send", SessionSendResponse, json=body)

    def session_channels(self, session_id: str | None = None) -> list[SessionChannel]:
        """`GET /session/channels`: channels, with per-session state when given one."""
        params = {"session_id": session_id} if session_id else None
        return self._call("GET", "/session/channels", list[SessionChannel], params=params)

    def v2_message_create(
        self, phone: str, *, type: str | None = None, code: str | None = None
    ) -> V2Response:
        """`GET /api/v2/message/create` (older API): phone starts with 7, +7 or 8."""
        params = _params(phone=phone, type=type, code=code)
        return self._call("GET", "/api/v2/message/create", V2Response, params=params)

    def v2_message_send(
        self, session_id: str, *, type: str | None = None, code: str | None = None
    ) -> V2Response:
        """`GET /api/v2/message/send` (older API)."""
        params = _params(session_id=session_id, type=type, code=code)
        return self._call("GET", "/api/v2/message/send", V2Response, params=params)

    def v2_message_check(self, session_id: str, code: str) -> V2Response:
        """`GET /api/v2/message/check` (older API)."""
        params = _params(session_id=session_id, code=code)
        return self._call("GET", "/api/v2/message/check", V2Response, params=params)

    def v2_channel_check(self, session_id: str, type: str) -> V2Response:
        """`GET /api/v2/channel/check` (older API)."""
        params = _params(session_id=session_id, type=type)
        return self._call("GET", "/api/v2/channel/check", V2Response, params=params)

    # -- plumbing -----------------------------------------------------------------

    def _call(self, method: str, path: str, model: type[T], **kwargs: Any) -> T:
        started = time.perf_counter()
        try:
            response = self._send(method, path, **kwargs)
        except errors.KodMobiError as exc:
            metrics.api_request(path, None, exc.sys_message, time.perf_counter() - started)
            raise
        if response.status_code >= 400:
            error = errors.from_response(response)
            metrics.api_request(
                path, response.status_code, error.sys_message, time.perf_counter() - started
            )
            raise error
        metrics.api_request(path, response.status_code, None, time.perf_counter() - started)
        try:
            answer: T = _adapter(model).validate_json(response.content)
            return answer
        except ValidationError as exc:
            raise errors.ProtocolError(
                f"unreadable answer from {path}: {exc.error_count()} problem(s)",
                status_code=response.status_code,
            ) from None

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for try_number in (1, 2):
            try:
                return self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                # The request never left: one immediate second try is free of risk.
                if try_number == 2:
                    raise errors.ConnectionFailedError(f"cannot reach kod.mobi: {exc}") from None
            except httpx.TimeoutException as exc:
                raise errors.ResponseTimeoutError(f"kod.mobi did not answer: {exc}") from None
            except httpx.TransportError as exc:
                raise errors.TransientError(f"transport error: {exc}") from None
        raise AssertionError("unreachable")


def _params(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}


_adapters: dict[Any, TypeAdapter[Any]] = {}


def _adapter(model: Any) -> TypeAdapter[Any]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        key: Any = model
    else:
        key = repr(model)
    adapter = _adapters.get(key)
    if adapter is None:
        adapter = _adapters[key] = TypeAdapter(model)
    return adapter
