"""Request bodies bounded before anything else runs: authentication, routing, parsing.

An ASGI middleware, outermost, so a 100 MB body without a token is refused from its
`Content-Length` (or once the streamed bytes pass the limit) with 413, before FastAPI
reads and parses it (issue 13). At most `limit` bytes are ever held; the app downstream
gets the buffered body replayed."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The producer API's bodies are a few hundred bytes; 16 KiB is plenty (issue 13).
API_MAX_BODY_BYTES = 16 * 1024
#: kod.mobi's callbacks: DESIGN §6 allows up to 64 KiB.
CALLBACK_MAX_BODY_BYTES = 64 * 1024
CALLBACK_PREFIX = "/callbacks/"


def body_limit_for(path: str) -> int:
    return CALLBACK_MAX_BODY_BYTES if path.startswith(CALLBACK_PREFIX) else API_MAX_BODY_BYTES


class BodyLimit:
    """413 for a body over its route's limit, 400 for a malformed Content-Length."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int] = body_limit_for) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = _content_length(scope)
        if declared == -1:
            await _answer(send, 400, "malformed Content-Length")
            return
        if declared is not None and declared > limit:
            await _answer(send, 413, f"body over {limit // 1024} KiB")
            return
        # Read the body here, up to the limit; past it, stop reading and answer.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _answer(send, 413, f"body over {limit // 1024} KiB")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    """The declared length, None when absent, -1 when malformed."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            if not text.isdigit() or len(text) > 18:
                return -1
            return int(text)
    return None


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is never read: the connection cannot be reused.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
