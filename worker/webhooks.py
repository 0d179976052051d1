"""Outbound webhooks per the Standard Webhooks specification: sign, check where it goes, send.

    WebhookError            a try that did not end in a 2xx: retried until the horizon
    ├── HostRefused         the URL's host is not one we may call (WEBHOOK_ALLOWED_HOSTS)
    └── (HTTP status, timeout, refused connection, …: the message says which)

A producer's receiver verifies us with the `standardwebhooks` library as it is:
`webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`.
The host check happens after DNS resolution and the connection goes to the address
checked, so a name that resolves to a private address (or changes between the check and
the call) cannot aim us at internal services."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

#: The prefix Standard Webhooks secrets carry.
SECRET_PREFIX = "whsec_"  # noqa: S105  # a prefix, not a secret

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookError(Exception):
    """A try that did not succeed; the message is what the delivery records as its error."""

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class HostRefused(WebhookError):
    """The URL is not http(s), or its host resolves to an address we may not call."""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_…` secret; ValueError (without the secret) when malformed."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("must start with whsec_")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("must hold at least 16 bytes of key")
    return key


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one try."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass(frozen=True)
class HostPolicy:
    """Public addresses only, plus what WEBHOOK_ALLOWED_HOSTS names: host names, addresses
    or networks (`127.0.0.1`, `10.0.0.0/8`, `hooks.internal`)."""

    names: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def from_setting(cls, entries: tuple[str, ...]) -> HostPolicy:
        names: set[str] = set()
        networks: list[Network] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(entry.lower().rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def allows(self, address: Address) -> bool:
        if any(address in network for network in self.networks):
            return True
        return address.is_global and not address.is_multicast

    def resolve(self, url: str) -> tuple[str, str, Address]:
        """`(scheme, host, address to connect to)`; HostRefused when not allowed."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HostRefused("only http(s) URLs with a host are called")
        host = parts.hostname.lower().rstrip(".")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise HostRefused(f"cannot resolve {host}: {exc}") from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        if not addresses:
            raise HostRefused(f"cannot resolve {host}")
        if host not in self.names:
            refused = [a for a in addresses if not self.allows(a)]
            if refused:
                raise HostRefused(f"{host} resolves to {refused[0]}, not a public address")
        return parts.scheme, host, addresses[0]


def check_url(url: str) -> str | None:
    """Why `url` can never be a webhook URL (checked at intake), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError on a bad port
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "must name a host"
    if parts.username or parts.password:
        return "must not carry credentials"
    return None


class WebhookSender:
    """Sends one signed POST per call. Any 2xx is success; anything else raises
    WebhookError. Redirects are not followed (they could lead past the host check)."""

    def __init__(self, secret: str, policy: HostPolicy, timeout_s: float) -> None:
        self._key = secret_key(secret)
        self._policy = policy
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            follow_redirects=False,
            headers={"user-agent": "kodmobi-worker-webhooks/1"},
        )

    def send(self, url: str, webhook_id: str, body: bytes) -> int:
        """POST `body` to `url`; returns the HTTP status of a success."""
        scheme, host, address = self._policy.resolve(url)
        parts = urlsplit(url)
        ip = f"[{address}]" if address.version == 6 else str(address)
        netloc = f"{ip}:{parts.port}" if parts.port else ip
        pinned = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
        timestamp = int(time.time())
        headers = {
            "host": parts.netloc.rpartition("@")[2],
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._key, webhook_id, timestamp, body),
        }
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        try:
            response = self._client.post(
                pinned, content=body, headers=headers, extensions=extensions
            )
        except httpx.TimeoutException as exc:
            raise WebhookError(f"timeout: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise WebhookError(f"{type(exc).__name__}: {str(exc)[:200]}") from None
        if not 200 <= response.status_code < 300:
            raise WebhookError(f"HTTP {response.status_code}", http_status=response.status_code)
        return response.status_code

    def close(self) -> None:
        self._client.close()
