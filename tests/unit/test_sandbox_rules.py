"""The sandbox's pure rules: input checks, magic recipients, outcomes, config and CLI flags."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

import pytest

from worker.sandbox import cli
from worker.sandbox.config import SandboxConfig
from worker.sandbox.plainhttp import _parse_head
from worker.sandbox.rules import (
    MAGIC_OUTCOMES,
    check_callback_url,
    check_code,
    check_recipient,
    check_v2_phone,
    decrypt_code,
    encrypt_code,
    magic_code,
    random_outcome,
)


@pytest.mark.parametrize(
    ("to", "channel", "expected"),
    [
        ("+79990010203", "telegram", "01"),
        ("+79990010203", "whatsapp", "02"),
        ("+79990010203", "sms", "03"),
        ("+79522966236", "sms", None),
        ("+799900102031", "sms", None),
        ("user+o14@example.com", "email", "14"),
        ("user+x+o05-test@example.com", "email", "05"),
        ("user@example.com", "email", None),
        ("user@ex+o01.com", "email", None),
    ],
)
def test_magic_code(to: str, channel: str, expected: str | None) -> None:
    assert magic_code(to, channel) == expected


def test_every_documented_outcome_exists() -> None:
    assert set(MAGIC_OUTCOMES) == {f"{n:02d}" for n in [*range(7), *range(10, 22)]}
    assert MAGIC_OUTCOMES["16"].error is not None
    assert MAGIC_OUTCOMES["16"].error.retry_after == 1
    assert MAGIC_OUTCOMES["21"].error is not None and MAGIC_OUTCOMES["21"].error.raw_body


@pytest.mark.parametrize(
    ("phone", "expected"),
    [
        ("79522966236", "+79522966236"),
        ("+79522966236", "+79522966236"),
        ("89522966236", "+79522966236"),
    ],
)
def test_v2_phone_is_normalised(phone: str, expected: str) -> None:
    assert check_v2_phone(phone) == expected


@pytest.mark.parametrize(
    "phone", ["99522966236", "+89522966236", "7952296623", "795229662361", "7952296623a", None]
)
def test_v2_phone_refused(phone: Any) -> None:
    with pytest.raises(ValueError):
        check_v2_phone(phone)


@pytest.mark.parametrize(
    "to", ["+7952", "79522966236", "+7 952 296 62 36", "+70000000000", "a@b", "", 5, None, []]
)
def test_bad_recipients(to: Any) -> None:
    with pytest.raises(ValueError):
        check_recipient(to)


@pytest.mark.parametrize("to", ["+79522966236", "+12025550123", "a.b+c@example.co.uk"])
def test_good_recipients(to: str) -> None:
    assert check_recipient(to) == to


@pytest.mark.parametrize("code", ["123", "1234567", "12a4", "١٢٣٤", True, 1.5, None])
def test_bad_codes(code: Any) -> None:
    with pytest.raises(ValueError):
        check_code(code)


@pytest.mark.parametrize("url", ["ftp://x", "http://", "not a url", "http://h:99999/", 5])
def test_bad_callback_urls(url: Any) -> None:
    with pytest.raises(ValueError):
        check_callback_url(url)


def test_code_round_trips_through_the_aes256_answer() -> None:
    encrypted = encrypt_code("012345", "key", bytes(range(16)), 12345678)
    assert encrypted.startswith("aes256:000102030405060708090a0b0c0d0e0f:")
    assert encrypted.endswith(":12345678")
    assert decrypt_code(encrypted, "key") == "012345"


@pytest.mark.parametrize(
    ("flags", "callbacks", "name"),
    [
        ({}, ("delivered",), "delivered"),
        ({"failed": True}, ("failed",), "failed"),
        ({"lost": True, "failed": True}, (), "lost"),
        ({"duplicated": True}, ("delivered", "delivered"), "delivered+duplicated"),
        ({"out_of_order": True}, ("delivered", "sent"), "delivered+out_of_order"),
        ({"progress": True}, ("sent", "delivered"), "delivered"),
        ({"slow": True, "failed": True}, ("failed",), "slow+failed"),
    ],
)
def test_random_outcome_combinations(
    flags: dict[str, bool], callbacks: tuple[str, ...], name: str
) -> None:
    options = dict.fromkeys(
        ("slow", "lost", "failed", "duplicated", "out_of_order", "progress"), False
    )
    outcome = random_outcome(**{**options, **flags})
    assert outcome.callbacks == callbacks
    assert outcome.name == name


def test_config_update_is_all_or_nothing() -> None:
    config = SandboxConfig()
    updated, problems = config.updated({"error_5xx_rate": 0.5, "nope": 1, "callback_style": "x"})
    assert updated is None and set(problems) == {"nope", "callback_style"}
    updated, problems = config.updated({"error_5xx_rate": 0.5, "seed": 3})
    assert problems == {} and updated is not None
    assert (updated.error_5xx_rate, updated.seed) == (0.5, 3)
    assert config.error_5xx_rate == 0


def test_config_refuses_bad_values_at_construction() -> None:
    with pytest.raises(ValueError, match="throttle_429_rate"):
        SandboxConfig(throttle_429_rate=1.5)


def test_cli_has_one_flag_per_config_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KODMOBI_API_KEY", "env-key")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--error-5xx-rate",
            "0.1",
            "--callback-delay-ms",
            "200",
            "--seed",
            "1",
            "--progress-callbacks",
            "--callback-style",
            "form",
            "--record-limit",
            "0",
        ]
    )
    assert (args.host, args.port) == ("127.0.0.1", 8099)
    config = SandboxConfig(**{f.name: getattr(args, f.name) for f in fields(SandboxConfig)})
    assert config.api_key == "env-key"
    assert (config.error_5xx_rate, config.callback_delay_ms, config.seed) == (0.1, 200.0, 1)
    assert config.progress_callbacks is True and config.callback_style == "form"
    assert config.record_limit == 0


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", (200, True, 2, False)),
        (b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n", (204, False, None, False)),
        (b"HTTP/1.0 200 OK\r\n\r\n", (200, False, None, False)),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", (200, True, None, False)),
        (b"HTTP/1.1 503 x\r\nTransfer-Encoding: chunked\r\n\r\n", (503, True, None, True)),
    ],
)
def test_parse_response_head(head: bytes, expected: tuple[Any, ...]) -> None:
    assert _parse_head(head) == expected


@pytest.mark.parametrize("head", [b"SSH-2.0\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n"])
def test_garbled_response_head(head: bytes) -> None:
    with pytest.raises(ValueError):
        _parse_head(head)
