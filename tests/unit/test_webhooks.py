"""Webhook signing (Standard Webhooks), where webhooks may go, and their settings."""

from __future__ import annotations

import ipaddress
import time

import pytest
from standardwebhooks import Webhook
from standardwebhooks.exceptions import WebhookVerificationError

from tests.support.receiver import WEBHOOK_SECRET
from worker.settings import SettingsError, _load
from worker.usecases.events import backoff_s
from worker.webhooks import HostPolicy, HostRefused, check_url, secret_key, sign

_ENV = {
    "DATABASE_URL": "postgresql://db.internal/k",
    "REDIS_URL": "redis://redis.internal:6379/0",
    "KODMOBI_API_KEY": "k" * 16,
    "PUBLIC_BASE_URL": "https://worker.example.com",
    "CALLBACK_SECRET": "c" * 16,
    "CODE_KEY": "k" * 16,
}


def test_signature_verifies_with_the_reference_library() -> None:
    # Given a body signed as we sign it
    body = b'{"id":"01J","type":"message.delivered"}'
    ts = int(time.time())
    headers = {
        "webhook-id": "01J",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret_key(WEBHOOK_SECRET), "01J", ts, body),
    }
    # Then standardwebhooks accepts it as it is, and refuses a changed body
    assert Webhook(WEBHOOK_SECRET).verify(body, headers) is not None
    with pytest.raises(WebhookVerificationError):
        Webhook(WEBHOOK_SECRET).verify(body + b" ", headers)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://10.1.2.3/",
        "http://169.254.169.254/",
        "http://[::1]/",
        "http://192.168.0.5:8080/",
        "http://localhost/",
    ],
)
def test_private_and_loopback_addresses_are_refused_by_default(url: str) -> None:
    with pytest.raises(HostRefused):
        HostPolicy().resolve(url)


def test_public_addresses_and_allowed_hosts_pass() -> None:
    assert HostPolicy().resolve("https://8.8.8.8/hook")[2] == ipaddress.ip_address("8.8.8.8")
    allowed = HostPolicy.from_setting(("127.0.0.1", "10.0.0.0/8"))
    assert allowed.resolve("http://127.0.0.1:9/x")[1] == "127.0.0.1"
    assert allowed.resolve("http://10.9.9.9/x")[1] == "10.9.9.9"
    with pytest.raises(HostRefused):
        allowed.resolve("http://192.168.1.1/x")


def test_only_http_urls_with_a_host_are_taken() -> None:
    assert check_url("https://example.com/h") is None
    assert check_url("ftp://example.com/h") is not None
    assert check_url("https:///nohost") is not None
    assert check_url("https://user:pw@example.com/") is not None
    with pytest.raises(HostRefused):
        HostPolicy().resolve("file:///etc/passwd")


def test_backoff_grows_with_jitter() -> None:
    assert 0.5 <= backoff_s(1) <= 1.0
    assert 8.0 <= backoff_s(5) <= 16.0
    assert backoff_s(100) <= 3600.0


def test_notify_url_needs_a_well_formed_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import Settings

    for key, value in _ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("NOTIFY_URL", "https://hooks.example.com/k")
    with pytest.raises(SettingsError, match="WEBHOOK_SECRET is missing"):
        _load(Settings)
    monkeypatch.setenv("WEBHOOK_SECRET", "whsec_not-base64!!")
    with pytest.raises(SettingsError) as caught:
        _load(Settings)
    assert "WEBHOOK_SECRET is malformed" in str(caught.value)
    assert "not-base64" not in str(caught.value)
    monkeypatch.setenv("WEBHOOK_SECRET", WEBHOOK_SECRET)
    assert _load(Settings).notify_url == "https://hooks.example.com/k"


def test_backoff_steps_are_capped_by_the_setting() -> None:
    assert all(backoff_s(t, max_s=8.0) <= 8.0 for t in range(1, 40))
    assert backoff_s(30, max_s=8.0) >= 4.0
