"""Issue 13, the parts that need no server: expiring callback tokens, CODE_KEY rotation,
settings that refuse short secrets and cleartext, logs that mask every phone spelling."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator

import pytest
from cryptography.exceptions import InvalidTag
from sqlalchemy import create_engine, text

from worker.db import make_engine
from worker.logging import configure_logging
from worker.schemas import SendRequest, canonical_recipient
from worker.security import CodeBox, callback_token, verify_callback_token
from worker.settings import Settings, get_settings

SECRET = "callback-secret-0123456789abcdef"
OLD_KEY = "old-code-key-0123456789abcdef"
NEW_KEY = "new-code-key-fedcba9876543210"
MESSAGE_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


# -- callback tokens that expire --------------------------------------------------


def test_a_callback_token_works_until_its_expiry_and_not_after() -> None:
    token = callback_token(SECRET, MESSAGE_ID, 2_000_000_000)
    assert verify_callback_token(SECRET, MESSAGE_ID, token, now=1_999_999_999)
    assert not verify_callback_token(SECRET, MESSAGE_ID, token, now=2_000_000_000)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: str(int(t.split(".")[0]) + 1) + "." + t.split(".")[1],  # expiry pushed
        lambda t: t.split(".")[1],  # expiry dropped
        lambda t: "x" + t,
        lambda t: t + "\x00",
    ],
)
def test_a_tampered_callback_token_fails(tamper: object) -> None:
    token = callback_token(SECRET, MESSAGE_ID, 2_000_000_000)
    forged = tamper(token)  # type: ignore[operator]
    assert not verify_callback_token(SECRET, MESSAGE_ID, forged, now=1_000_000_000)


def test_a_token_for_another_attempt_fails() -> None:
    token = callback_token(SECRET, MESSAGE_ID, 2_000_000_000)
    assert not verify_callback_token(SECRET, "01ARZ3NDEKTSV4RRFFQ69G5FAW", token, now=0)


# -- CODE_KEY rotation --------------------------------------------------------------


def test_a_code_sealed_before_a_rotation_still_opens() -> None:
    # Given a code sealed under the old key
    sealed = CodeBox([OLD_KEY]).seal("123456", MESSAGE_ID)
    # When CODE_KEY becomes "new,old"
    rotated = CodeBox([NEW_KEY, OLD_KEY])
    # Then the code in flight opens, and new codes are sealed under the new key alone
    assert rotated.open(sealed, MESSAGE_ID) == "123456"
    fresh = rotated.seal("654321", MESSAGE_ID)
    assert CodeBox([NEW_KEY]).open(fresh, MESSAGE_ID) == "654321"
    with pytest.raises(InvalidTag):
        CodeBox([OLD_KEY]).open(fresh, MESSAGE_ID)


def test_a_ciphertext_names_its_key() -> None:
    a = CodeBox([NEW_KEY]).seal("1234", MESSAGE_ID)
    b = CodeBox([NEW_KEY, OLD_KEY]).seal("1234", MESSAGE_ID)
    c = CodeBox([OLD_KEY]).seal("1234", MESSAGE_ID)
    assert a[:5] == b[:5] != c[:5]


def test_a_ciphertext_from_before_key_ids_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    # The format of the code base before issue 13: nonce, then AES-GCM output.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from worker.security import _derive

    nonce = os.urandom(12)
    legacy = nonce + AESGCM(_derive(OLD_KEY, b"kodmobi-worker code v1")).encrypt(
        nonce, b"4321", MESSAGE_ID.encode()
    )
    assert CodeBox([NEW_KEY, OLD_KEY]).open(legacy, MESSAGE_ID) == "4321"


def test_a_fingerprint_from_before_a_rotation_still_matches() -> None:
    old = CodeBox([OLD_KEY]).fingerprint(b"request")
    assert old in CodeBox([NEW_KEY, OLD_KEY]).fingerprints(b"request")


# -- settings -------------------------------------------------------------------------

BASE = {
    "DATABASE_URL": "postgresql://u@h/db",
    "REDIS_URL": "redis://h:6379/0",
    "KODMOBI_API_KEY": "kmk-live-api-key-7Hq2",
    "PUBLIC_BASE_URL": "https://worker.example.com",
    "CALLBACK_SECRET": SECRET,
    "CODE_KEY": OLD_KEY,
    "API_TOKENS": "producer-token-aaa111",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    names = {(f.alias or n).upper() for n, f in Settings.model_fields.items()}
    for key in list(os.environ):
        if key.upper() in names:
            monkeypatch.delenv(key)
    for key, value in BASE.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def _stops(variable: str, *secrets: str) -> None:
    with pytest.raises(SystemExit) as caught:
        get_settings()
    message = str(caught.value.code)
    assert variable in message and "\n" not in message, message
    for secret in secrets:
        assert secret not in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("API_TOKENS", "short-tok"),
        ("API_TOKENS", "producer-token-aaa111,alpha:short"),
        ("API_TOKENS", "producer-token-aaa111,producer-token-aaa111"),
        ("CODE_KEY", "short-key"),
        ("CODE_KEY", f"{OLD_KEY},tiny"),
        ("CALLBACK_SECRET", "short-secret"),
        ("KODMOBI_API_KEY", "abc"),
    ],
)
def test_a_short_or_repeated_secret_stops_the_process_naming_it(
    env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    env.setenv(variable, value)
    _stops(variable, value, "short", "tiny")


def test_api_tokens_name_their_producer(env: pytest.MonkeyPatch) -> None:
    env.setenv(
        "API_TOKENS", "bare-token-0123456789,alpha:alpha-token-0123456789,b.2:b-tok-0123456789ab"
    )
    tokens = [(t.producer, t.token.get_secret_value()) for t in get_settings().api_tokens]
    assert tokens == [
        ("default", "bare-token-0123456789"),
        ("alpha", "alpha-token-0123456789"),
        ("b.2", "b-tok-0123456789ab"),
    ]


def test_code_key_lists_several_keys_first_first(env: pytest.MonkeyPatch) -> None:
    env.setenv("CODE_KEY", f"{NEW_KEY}, {OLD_KEY}")
    assert [k.get_secret_value() for k in get_settings().code_key] == [NEW_KEY, OLD_KEY]


@pytest.mark.parametrize("variable", ["KODMOBI_BASE_URL", "PUBLIC_BASE_URL"])
@pytest.mark.parametrize(
    "url", ["http://api.kod.mobi", "http://10.0.0.5:8000", "http://worker.example.com/", "ftp://x"]
)
def test_cleartext_to_a_non_loopback_host_stops_the_process(
    env: pytest.MonkeyPatch, variable: str, url: str
) -> None:
    env.setenv(variable, url)
    _stops(variable)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8099", "http://127.8.9.10", "http://[::1]:8000", "http://localhost"]
)
def test_cleartext_to_loopback_is_allowed(env: pytest.MonkeyPatch, url: str) -> None:
    env.setenv("KODMOBI_BASE_URL", url)
    env.setenv("PUBLIC_BASE_URL", url)
    settings = get_settings()
    assert settings.kodmobi_base_url == settings.public_base_url == url


def test_insecure_http_hosts_lets_a_compose_network_use_http(env: pytest.MonkeyPatch) -> None:
    env.setenv("INSECURE_HTTP_HOSTS", "sandbox,web")
    env.setenv("KODMOBI_BASE_URL", "http://sandbox:8099")
    env.setenv("PUBLIC_BASE_URL", "http://web:8000")
    assert get_settings().public_base_url == "http://web:8000"


def test_api_docs_are_off_unless_asked(env: pytest.MonkeyPatch) -> None:
    assert get_settings().api_docs is False
    env.setenv("API_DOCS", "true")
    get_settings.cache_clear()
    assert get_settings().api_docs is True


# -- canonical recipients and bounded metadata ---------------------------------------


def test_emails_are_canonical_lower_case_and_phones_stay_e164() -> None:
    assert canonical_recipient("Victim@Example.com") == "victim@example.com"
    assert canonical_recipient(SendRequest(to="8 (952) 296-62-36").to) == "+79522966236"


@pytest.mark.parametrize(
    "metadata",
    [
        {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}},
        {"a": [[[[[[[[[1]]]]]]]]]},
        {"k": list(range(300))},
    ],
)
def test_metadata_too_deep_or_too_many_items_is_refused(metadata: dict[str, object]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as raised:
        SendRequest(to="+79522966236", metadata=metadata)
    assert raised.value.errors()[0]["loc"] == ("metadata",)


# -- logs never carry a phone number or a secret --------------------------------------

PHONES = (
    "8 (952) 296-62-03",
    "+7 952 296 62 03",
    "+7 (952) 296-62-03",
    "8-952-296-62-03",
    "7.952.296.62.03",
    "+79522966203",
    "89522966203",
    "%2B79522966203",  # URL-encoded, as in an access log line
)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("json", "INFO", secrets=[SECRET], stream=stream)
    yield stream
    logging.getLogger().handlers[:] = []


def _digits_leaked(text: str) -> bool:
    """The middle digits of the number (`2966`), in any spelling, anywhere in the text."""
    squeezed = "".join(c for c in text if c.isdigit() or c == "\n")
    return "9522966" in squeezed or "2966" in squeezed


@pytest.mark.parametrize("phone", PHONES)
def test_dramatiqs_own_failure_line_masks_the_phone_in_any_spelling(
    log_stream: io.StringIO, phone: str
) -> None:
    # When Dramatiq logs a failed message as it does, with its arguments in the text
    try:
        raise ValueError(f"boom for {phone}")
    except ValueError:
        logging.getLogger("dramatiq.worker.WorkerThread").error(
            "Failed to process message %s with unhandled exception.",
            f"send_code(to={phone!r}, code='123456')",
            exc_info=True,
        )
    text = log_stream.getvalue()
    # Then no spelling of the number survives, nor the code
    assert not _digits_leaked(text), text
    assert "123456" not in text


def test_sqlalchemys_own_error_lines_carry_no_parameters(log_stream: io.StringIO) -> None:
    # Given the engine as the service builds it (no database needed to fail binding)
    engine = make_engine("postgresql+psycopg://u@127.0.0.1:1/db")
    assert engine.hide_parameters is True
    # When a statement fails with a phone among its parameters, and it is logged
    sqlite = create_engine("sqlite://", hide_parameters=True)
    with sqlite.connect() as conn:
        try:
            conn.execute(
                text("INSERT INTO nowhere VALUES (:recipient)"), {"recipient": "+79522966203"}
            )
        except Exception as exc:  # noqa: BLE001 - any DBAPI error will do
            logging.getLogger("sqlalchemy.engine").error("statement failed", exc_info=exc)
            assert "hide_parameters" in str(exc)
    # Then the recipient is nowhere in the line
    text_out = log_stream.getvalue()
    assert "statement failed" in text_out
    assert not _digits_leaked(text_out), text_out


def test_short_secrets_are_scrubbed_from_16_characters(log_stream: io.StringIO) -> None:
    logging.getLogger("any").warning("env dump: %s", SECRET)
    line = json.loads(log_stream.getvalue().splitlines()[-1])
    assert SECRET not in json.dumps(line)
