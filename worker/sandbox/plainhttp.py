"""A lean keep-alive HTTP/1.1 client for the sandbox's plain-http callbacks.

Why not httpx here: its async connection pool costs about 1 ms of CPU per request
on our machines (and more when many requests queue for a connection), so it caps
callbacks near 500/s, while the sandbox must stand in for kod.mobi at thousands of
sends a second. This client writes each request in one `write`, reads the answer
(Content-Length, chunked, or up to EOF) and keeps the connection for the next one,
about 50 µs a request. https:// URLs still go through the shared httpx client.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from urllib.parse import SplitResult

#: open connections per host at most; further callbacks to that host wait their turn
MAX_CONNECTIONS_PER_HOST = 256
CONNECT_TIMEOUT_S = 2.0
#: for writing the request and reading the whole answer
READ_TIMEOUT_S = 5.0
#: a larger answer body is not read: the connection is dropped instead
MAX_BODY_BYTES = 1 << 20

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class CallbackHttpError(Exception):
    """A callback got no HTTP answer; `str(exc)` is a short name like httpx's classes."""


class PlainHttpClient:
    """Per-host pools of idle connections, with a cap on connections per host."""

    def __init__(self, user_agent: str = "kodmobi-sandbox") -> None:
        self._user_agent = user_agent.encode()
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}

    async def request(
        self, method: str, url: SplitResult, body: bytes = b"", content_type: str | None = None
    ) -> int:
        """Send one request to an http:// URL; its HTTP status, or CallbackHttpError."""
        host = url.hostname or ""
        port = url.port or 80
        key = (host, port)
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        head = [
            f"{method} {target} HTTP/1.1".encode(),
            b"host: " + url.netloc.rpartition("@")[2].encode(),
            b"user-agent: " + self._user_agent,
            b"accept: */*",
        ]
        if method != "GET" or body:
            head.append(b"content-length: " + str(len(body)).encode())
        if content_type:
            head.append(b"content-type: " + content_type.encode())
        message = b"\r\n".join(head) + b"\r\n\r\n" + body

        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(MAX_CONNECTIONS_PER_HOST)
        async with slots:
            connection = self._take_idle(key)
            if connection is not None:
                try:
                    return await self._exchange(key, connection, message)
                except _StaleConnection:
                    pass  # the server closed it while idle: nothing was processed, try anew
            connection = await self._connect(host, port)
            try:
                return await self._exchange(key, connection, message)
            except _StaleConnection:
                raise CallbackHttpError("RemoteProtocolError") from None

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for _, writer in connections:
                writer.close()
        self._idle.clear()

    # -- plumbing -------------------------------------------------------------------------

    def _take_idle(self, key: tuple[str, int]) -> Connection | None:
        idle = self._idle.get(key)
        while idle:
            reader, writer = idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    async def _connect(self, host: str, port: int) -> Connection:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
        except TimeoutError:
            raise CallbackHttpError("ConnectTimeout") from None
        except OSError:
            raise CallbackHttpError("ConnectError") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def _exchange(self, key: tuple[str, int], connection: Connection, message: bytes) -> int:
        reader, writer = connection
        keep = False
        got_bytes = False
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                writer.write(message)
                await writer.drain()
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial:
                        raise _StaleConnection from None
                    raise
                got_bytes = True
                status, keep, length, chunked = _parse_head(head)
                if chunked:
                    await _read_chunked(reader)
                elif length is not None:
                    if length > MAX_BODY_BYTES:
                        keep = False
                    else:
                        await reader.readexactly(length)
                elif status not in (204, 304) and not 100 <= status < 200:
                    # No length: the body runs to the end of the connection.
                    keep = False
                    await reader.read(MAX_BODY_BYTES)
        except _StaleConnection:
            writer.close()
            raise
        except TimeoutError:
            writer.close()
            raise CallbackHttpError("ReadTimeout") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            writer.close()
            if not got_bytes:
                raise _StaleConnection from exc
            raise CallbackHttpError("ReadError") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            writer.close()
            raise CallbackHttpError("RemoteProtocolError") from None
        except OSError:
            writer.close()
            raise CallbackHttpError("ReadError") from None
        if keep:
            self._idle.setdefault(key, []).append(connection)
        else:
            writer.close()
        return status


class _StaleConnection(Exception):
    """The connection was closed before any answer: safe to send on a fresh one."""


def _parse_head(head: bytes) -> tuple[int, bool, int | None, bool]:
    """(status, keep-alive, content-length, chunked) of a response head; ValueError if garbled."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if not version.startswith(b"HTTP/1."):
        raise ValueError("not HTTP/1.x")
    status = int(rest[:3])
    keep = version == b"HTTP/1.1"
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
            if length < 0:
                raise ValueError("negative content-length")
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            token = value.strip().lower()
            keep = token == b"keep-alive" or (keep and token != b"close")
    return status, keep, length, chunked


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    total = 0
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            return
        total += size
        if total > MAX_BODY_BYTES:
            raise ValueError("answer too large")
        await reader.readexactly(size + 2)
