"""Codes encrypted at rest, unguessable callback tokens, request fingerprints."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_NONCE_BYTES = 12


def _derive(secret: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(
        secret.encode()
    )


class CodeBox:
    """AES-256-GCM under a key derived from CODE_KEY; the message id is bound in as AAD,
    so a ciphertext copied onto another row does not decrypt."""

    def __init__(self, code_key: str) -> None:
        self._aead = AESGCM(_derive(code_key, b"kodmobi-worker code v1"))
        self._fingerprint_key = _derive(code_key, b"kodmobi-worker fingerprint v1")

    def seal(self, code: str, message_id: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, code.encode(), message_id.encode())

    def open(self, sealed: bytes, message_id: str) -> str:
        nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        return self._aead.decrypt(nonce, ciphertext, message_id.encode()).decode()

    def fingerprint(self, canonical_request: bytes) -> str:
        """Keyed, so a stored fingerprint does not let anyone brute-force the code in it."""
        return hmac.new(self._fingerprint_key, canonical_request, hashlib.sha256).hexdigest()


def draw_code(length: int = 6) -> str:
    """A code from the OS's CSPRNG; leading zeros allowed."""
    return "".join(secrets.choice("0123456789") for _ in range(length))


def callback_token(callback_secret: str, attempt_id: str) -> str:
    """HMAC-SHA256(CALLBACK_SECRET, attempt_id), base64url without padding (DESIGN §5)."""
    digest = hmac.new(callback_secret.encode(), attempt_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def verify_callback_token(callback_secret: str, attempt_id: str, token: str) -> bool:
    """Constant-time; fails closed on anything malformed."""
    expected = callback_token(callback_secret, attempt_id)
    return hmac.compare_digest(expected.encode(), token.encode("utf-8", "replace"))


def codes_equal(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))
