"""kod.mobi's delivery callbacks (DESIGN §6): authenticated by the token in the URL."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from worker import metrics
from worker.logging import get_logger
from worker.schemas import db_text, is_ulid
from worker.security import verify_callback_token
from worker.usecases.callbacks import CallbackData
from worker.usecases.receive import SPOOLED, UNAVAILABLE
from worker.wiring import Root

router = APIRouter(tags=["callbacks"])
log = get_logger("worker.callbacks")

MAX_BODY_BYTES = 64 * 1024
#: Retry-After when neither Postgres nor Redis can keep a callback (issue 12).
CALLBACK_RETRY_AFTER_S = 5
_INTEGER = re.compile(r"-?[0-9]{1,19}")
_HEADERS_KEPT = ("content-type", "user-agent", "x-forwarded-for", "x-request-id")


class Unreadable(Exception):
    pass


def _reply(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def _read_body(request: Request) -> bytes | None:
    """The body, or None when it is over MAX_BODY_BYTES (checked before reading all of it)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > MAX_BODY_BYTES:
                return None
        except ValueError:
            raise Unreadable("bad content-length") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _fields(request: Request, body: bytes) -> dict[str, Any]:
    """Query string, overlaid with a JSON or form body when there is one."""
    fields: dict[str, Any] = dict(request.query_params)
    if request.method == "GET" or not body.strip():
        return fields
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        request._body = body  # let Starlette parse what we already read
        try:
            form = await request.form()
        except StarletteHTTPException as exc:  # no boundary, a broken part
            raise Unreadable(f"malformed multipart form ({exc.detail})") from None
        fields.update({k: v for k, v in form.items() if isinstance(v, str)})
        return fields
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Unreadable("body is not UTF-8") from None
    if content_type == "application/x-www-form-urlencoded":
        fields.update(parse_qsl(text, keep_blank_values=True))
        return fields
    try:
        parsed = json.loads(text)
    except RecursionError:
        # 5,000 nested `[` exhaust the parser's recursion: unreadable, not a 500.
        raise Unreadable("JSON nested too deeply") from None
    except ValueError:
        if content_type.endswith("json"):
            raise Unreadable("malformed JSON") from None
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False)
        if not pairs:
            raise Unreadable("neither JSON nor a form") from None
        fields.update(pairs)
        return fields
    if not isinstance(parsed, dict):
        raise Unreadable("JSON body is not an object")
    fields.update(parsed)
    return fields


def _status_word(fields: dict[str, Any]) -> str:
    value = fields.get("status", fields.get("state"))
    if value is None or isinstance(value, dict | list):
        return ""
    return db_text(str(value).strip().lower()[:64])


def _message_id(fields: dict[str, Any]) -> int | None:
    """kod.mobi's message id when it is a whole number that fits a bigint, else None."""
    value = fields.get("message_id")
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if -(2**63) <= value < 2**63 else None


@router.api_route(
    "/callbacks/kodmobi/{attempt_id}/{token}",
    methods=["GET", "POST"],
    responses={
        200: {"description": "stored (and applied when it moves the attempt forward)"},
        202: {"description": "Postgres is away: kept in the spool, applied once it is back"},
        400: {"description": "unreadable body"},
        404: {"description": "unknown attempt or wrong token"},
        413: {"description": "body over 64 KiB"},
        503: {"description": "Postgres and Redis both away: send it again after Retry-After"},
    },
)
async def kodmobi_callback(attempt_id: str, token: str, request: Request) -> JSONResponse:
    """A delivery status for one attempt. A wrong token changes nothing."""
    root: Root = request.app.state.root
    secret = root.settings.callback_secret.get_secret_value()
    if not is_ulid(attempt_id) or not verify_callback_token(secret, attempt_id, token):
        log.warning("callback.rejected", attempt_id=db_text(attempt_id[:64]), reason="bad token")
        metrics.callback(metrics.REJECTED)
        return _reply(404, "not found")
    try:
        body = await _read_body(request)
        if body is None:
            log.warning("callback.rejected", attempt_id=attempt_id, reason="too large")
            metrics.callback(metrics.UNREADABLE)
            return _reply(413, "body over 64 KiB")
        fields = await _fields(request, body)
    except Unreadable as exc:
        log.warning("callback.rejected", attempt_id=attempt_id, reason=str(exc))
        metrics.callback(metrics.UNREADABLE)
        return _reply(400, f"unreadable callback: {exc}")
    data = CallbackData(
        method=request.method,
        content_type=db_text(request.headers.get("content-type", ""))[:255] or None,
        raw_body=db_text(body.decode("utf-8", "replace") if body else str(request.url.query)),
        headers={k: db_text(v) for k, v in request.headers.items() if k in _HEADERS_KEPT},
        status_word=_status_word(fields),
        kodmobi_message_id=_message_id(fields),
    )
    outcome = await request.app.state.callbacks.submit((attempt_id, data))
    metrics.callback(metrics.REJECTED if outcome is None else outcome)
    if outcome == UNAVAILABLE:
        response = _reply(503, "temporarily unavailable")
        response.headers["Retry-After"] = str(CALLBACK_RETRY_AFTER_S)
        return response
    if outcome == SPOOLED:
        return JSONResponse({"ok": True, "outcome": outcome}, status_code=202)
    if outcome is None:
        return _reply(404, "not found")
    return JSONResponse({"ok": True, "outcome": outcome})


class CallbackShortcut:
    """ASGI middleware taking kod.mobi's callbacks straight to `kodmobi_callback`, past
    FastAPI's routing, dependency and exception layers: the web process's hot path
    (issue 9). The route above stays declared, for the schema and for any path this
    does not take (a trailing slash, another method), which FastAPI answers as before."""

    PREFIX = "/callbacks/kodmobi/"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in ("GET", "POST")
            and scope["path"].startswith(self.PREFIX)
        ):
            parts = scope["path"][len(self.PREFIX) :].split("/")
            if len(parts) == 2 and parts[0] and parts[1]:
                try:
                    response = await kodmobi_callback(parts[0], parts[1], Request(scope, receive))
                except StarletteHTTPException as exc:  # as FastAPI's own layer answers it
                    response = _reply(exc.status_code, str(exc.detail))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
