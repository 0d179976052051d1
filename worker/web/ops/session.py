"""The console's sign-in: a token from OPS_TOKENS, exchanged for a signed, expiring session
cookie (HttpOnly, SameSite=Strict). The cookie names the token by a fingerprint, so a
token taken out of OPS_TOKENS ends its sessions at once; the token itself is never put
in a cookie or a URL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

from pydantic import SecretStr

COOKIE = "kodmobi_ops"
#: A session lasts a working day.
SESSION_S = 8 * 3600


def _fingerprint(token: str) -> str:
    return hashlib.sha256(b"kodmobi ops token\0" + token.encode()).hexdigest()[:32]


class Sessions:
    def __init__(self, tokens: list[SecretStr], secret: str) -> None:
        self._tokens = [t.get_secret_value() for t in tokens if t.get_secret_value()]
        self._fingerprints = {_fingerprint(t) for t in self._tokens}
        self._key = hmac.new(secret.encode(), b"kodmobi ops session", hashlib.sha256).digest()

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def sign_in(self, given: str) -> str | None:
        """A cookie value for a right token, None for a wrong one (constant-time compare
        against every token)."""
        matched: str | None = None
        for token in self._tokens:
            if hmac.compare_digest(token.encode(), given.encode()):
                matched = token
        if matched is None or not given:
            return None
        return self.issue(matched)

    def issue(self, token: str, now: float | None = None) -> str:
        payload = json.dumps(
            {"t": _fingerprint(token), "exp": int((now or time.time()) + SESSION_S)},
            separators=(",", ":"),
        ).encode()
        body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
        return f"{body}.{self._sign(body)}"

    def valid(self, cookie: str | None, now: float | None = None) -> bool:
        if not cookie or "." not in cookie or len(cookie) > 512:
            return False
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(self._sign(body), signature):
            return False
        try:
            data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            return bool(
                data["t"] in self._fingerprints and float(data["exp"]) > (now or time.time())
            )
        except (ValueError, KeyError, TypeError):
            return False

    def _sign(self, body: str) -> str:
        digest = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
