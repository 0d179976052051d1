"""Codes encrypted at rest, unguessable callback tokens, request fingerprints."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_NONCE_BYTES = 12
#: Marks a ciphertext that names its key: marker, key id, nonce, AES-GCM output.
_KEYED = b"\x01"
_KEY_ID_BYTES = 4
_EXPIRY = re.compile(r"[0-9]{1,12}")


def _derive(secret: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(
        secret.encode()
    )


class CodeBox:
    """AES-256-GCM under keys derived from CODE_KEY; the message id is bound in as AAD,
    so a ciphertext copied onto another row does not decrypt.

    CODE_KEY may list several keys (issue 13): the first seals, every one opens, and
    each ciphertext starts with the id of the key that sealed it, so a rotation never
    breaks a code in flight. Ciphertexts from before key ids (nonce first) are opened
    by trying each key."""

    def __init__(self, code_keys: str | Sequence[str]) -> None:
        keys = [code_keys] if isinstance(code_keys, str) else list(code_keys)
        if not keys:
            raise ValueError("at least one code key")
        self._keys: list[tuple[bytes, AESGCM]] = [
            (_derive(k, b"kodmobi-worker key id v1")[:_KEY_ID_BYTES],
             AESGCM(_derive(k, b"kodmobi-worker code v1")))
            for k in keys
        ]
        self._fingerprint_keys = [_derive(k, b"kodmobi-worker fingerprint v1") for k in keys]

    def seal(self, code: str, message_id: str) -> bytes:
        key_id, aead = self._keys[0]
        nonce = os.urandom(_NONCE_BYTES)
        return _KEYED + key_id + nonce + aead.encrypt(nonce, code.encode(), message_id.encode())

    def open(self, sealed: bytes, message_id: str) -> str:
        """The code; raises InvalidTag when no listed key sealed it for this message."""
        aad = message_id.encode()
        if sealed[:1] == _KEYED:
            key_id = sealed[1 : 1 + _KEY_ID_BYTES]
            body = sealed[1 + _KEY_ID_BYTES :]
            for kid, aead in self._keys:
                if hmac.compare_digest(kid, key_id):
                    with contextlib.suppress(InvalidTag):
                        return aead.decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], aad).decode()
        # A ciphertext sealed before key ids (or whose nonce happens to start with the
        # marker byte): try every key.
        for _, aead in self._keys:
            with contextlib.suppress(InvalidTag):
                return aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], aad).decode()
        raise InvalidTag()

    def fingerprint(self, canonical_request: bytes) -> str:
        """Keyed, so a stored fingerprint does not let anyone brute-force the code in it."""
        return self.fingerprints(canonical_request)[0]

    def fingerprints(self, canonical_request: bytes) -> list[str]:
        """The request's fingerprint under every key, newest first: a request recorded
        before a rotation still matches itself."""
        return [
            hmac.new(k, canonical_request, hashlib.sha256).hexdigest()
            for k in self._fingerprint_keys
        ]


def draw_code(length: int = 6) -> str:
    """A code from the OS's CSPRNG; leading zeros allowed."""
    return "".join(secrets.choice("0123456789") for _ in range(length))


def callback_token(callback_secret: str, attempt_id: str, expires_at: int) -> str:
    """`{expires_at}.{mac}`: the Unix second after which the URL is dead, and
    HMAC-SHA256(CALLBACK_SECRET, `attempt_id.expires_at`), base64url without padding.

    The expiry is signed with the attempt (issue 13): whoever once saw a callback URL
    cannot use it after the attempt's deadline and grace."""
    signed = f"{attempt_id}.{expires_at}".encode()
    digest = hmac.new(callback_secret.encode(), signed, hashlib.sha256).digest()
    return f"{expires_at}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"


def verify_callback_token(
    callback_secret: str, attempt_id: str, token: str, now: float | None = None
) -> bool:
    """Constant-time; fails closed on anything malformed and on an expired token."""
    expiry, sep, _ = token.partition(".")
    if not sep or not _EXPIRY.fullmatch(expiry):
        return False
    expected = callback_token(callback_secret, attempt_id, int(expiry))
    genuine = hmac.compare_digest(expected.encode(), token.encode("utf-8", "replace"))
    return genuine and (time.time() if now is None else now) < int(expiry)


def codes_equal(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))
