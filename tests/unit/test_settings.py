"""Settings (DESIGN §2): defaults, URL spellings, one clear line for a bad variable, no secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.settings import Settings, get_database_url, get_settings

API_KEY = "kmk-live-api-key-7Hq2"
CALLBACK_SECRET = "cb-secret-0123456789abcdef"
CODE_KEY = "code-key-fedcba9876543210"
TOKENS = ("producer-token-aaa111", "producer-token-bbb222")
DB_PASSWORD = "pg-pass-Zq81x"
SECRET_VALUES = (API_KEY, CALLBACK_SECRET, CODE_KEY, *TOKENS, DB_PASSWORD)

MINIMAL_ENV = {
    "DATABASE_URL": f"postgresql://kodmobi:{DB_PASSWORD}@db.internal:5432/kodmobi",
    "REDIS_URL": "redis://redis.internal:6379/0",
    "KODMOBI_API_KEY": API_KEY,
    "PUBLIC_BASE_URL": "https://worker.example.com",
    "CALLBACK_SECRET": CALLBACK_SECRET,
    "API_TOKENS": ",".join(TOKENS),
    "CODE_KEY": CODE_KEY,
}
REQUIRED = (
    "DATABASE_URL",
    "REDIS_URL",
    "KODMOBI_API_KEY",
    "PUBLIC_BASE_URL",
    "CALLBACK_SECRET",
    "CODE_KEY",
)
ROOT = Path(__file__).resolve().parents[2]


def _setting_names() -> set[str]:
    return {(field.alias or name).upper() for name, field in Settings.model_fields.items()}


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A clean environment holding just MINIMAL_ENV, and no cached settings."""
    names = _setting_names()
    for key in list(os.environ):
        if key.upper() in names:  # the names are read case-insensitively
            monkeypatch.delenv(key)
    for key, value in MINIMAL_ENV.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def stopped_with() -> str:
    """Load settings expecting the process to stop; return the line it stops with."""
    with pytest.raises(SystemExit) as caught:
        get_settings()
    message = caught.value.code
    assert isinstance(message, str), "SystemExit must carry the message Python prints"
    return message


def assert_one_clear_line(message: str, variable: str) -> None:
    assert "\n" not in message
    assert variable in message
    for secret in SECRET_VALUES:
        assert secret not in message


# -- defaults and values --------------------------------------------------------------


def test_every_optional_variable_has_its_documented_default() -> None:
    # Given only the required variables (and API_TOKENS) are set
    # When the settings are read
    settings = get_settings()

    # Then each optional variable has DESIGN §2's default
    assert settings.kodmobi_base_url == "https://api.kod.mobi"
    assert settings.default_channels == ("telegram", "whatsapp", "sms")
    assert settings.delivery_timeout_s == 60
    assert settings.code_ttl_s == 300
    assert settings.log_format == "json"
    assert settings.log_level == "INFO"


def test_api_tokens_default_to_none_accepted(environment: pytest.MonkeyPatch) -> None:
    # Given no API_TOKENS
    environment.delenv("API_TOKENS")

    # When the settings are read / Then the process starts, accepting no bearer token
    assert get_settings().api_tokens == []


def test_every_variable_is_read_from_the_environment(environment: pytest.MonkeyPatch) -> None:
    # Given every DESIGN §2 variable set to a non-default value
    environment.setenv("INSECURE_HTTP_HOSTS", "sandbox")
    environment.setenv("KODMOBI_BASE_URL", "http://sandbox:8080/")
    environment.setenv("PUBLIC_BASE_URL", "https://worker.example.com/")
    environment.setenv("DEFAULT_CHANNELS", "sms, telegram")
    environment.setenv("DELIVERY_TIMEOUT_S", "12.5")
    environment.setenv("CODE_TTL_S", "120")
    environment.setenv("LOG_FORMAT", "console")
    environment.setenv("LOG_LEVEL", "debug")

    # When the settings are read
    settings = get_settings()

    # Then each value is taken, and base URLs lose their trailing slash
    assert settings.database_url == (
        f"postgresql+psycopg://kodmobi:{DB_PASSWORD}@db.internal:5432/kodmobi"
    )
    assert settings.redis_url == "redis://redis.internal:6379/0"
    assert settings.kodmobi_api_key.get_secret_value() == API_KEY
    assert settings.kodmobi_base_url == "http://sandbox:8080"
    assert settings.public_base_url == "https://worker.example.com"
    assert settings.callback_secret.get_secret_value() == CALLBACK_SECRET
    assert [k.get_secret_value() for k in settings.code_key] == [CODE_KEY]
    assert settings.default_channels == ("sms", "telegram")
    assert settings.delivery_timeout_s == 12.5
    assert settings.code_ttl_s == 120
    assert settings.log_format == "console"
    assert settings.log_level == "debug"


@pytest.mark.parametrize(
    ("raw", "tokens"),
    [
        ("only-one-token-0123", ["only-one-token-0123"]),
        (
            "a-token-0123456789, b-token-0123456789 ,,c-token-0123456789,",
            ["a-token-0123456789", "b-token-0123456789", "c-token-0123456789"],
        ),
        ("", []),
    ],
)
def test_api_tokens_are_comma_separated(
    environment: pytest.MonkeyPatch, raw: str, tokens: list[str]
) -> None:
    # Given API_TOKENS as a comma-separated list, with stray spaces and commas
    environment.setenv("API_TOKENS", raw)

    # When the settings are read
    settings = get_settings()

    # Then each token is accepted on its own
    assert [t.token.get_secret_value() for t in settings.api_tokens] == tokens
    assert {t.producer for t in settings.api_tokens} <= {"default"}


@pytest.mark.parametrize("scheme", ["postgres://", "postgresql://", "postgresql+psycopg://"])
def test_every_postgres_spelling_is_accepted_and_normalised(
    environment: pytest.MonkeyPatch, scheme: str
) -> None:
    # Given DATABASE_URL as a platform hands it out
    environment.setenv("DATABASE_URL", f"{scheme}u:{DB_PASSWORD}@h:5432/db?sslmode=require")

    # When the settings are read
    settings = get_settings()

    # Then SQLAlchemy is pointed at psycopg 3, the rest unchanged
    expected = f"postgresql+psycopg://u:{DB_PASSWORD}@h:5432/db?sslmode=require"
    assert settings.database_url == expected
    assert get_database_url() == expected


def test_migrations_need_only_the_database_url(environment: pytest.MonkeyPatch) -> None:
    # Given only DATABASE_URL, as the release process may have
    for key in MINIMAL_ENV:
        if key != "DATABASE_URL":
            environment.delenv(key)

    # When migrations ask for it / Then they get it, normalised
    assert get_database_url().startswith("postgresql+psycopg://")


def test_settings_are_read_once() -> None:
    # Given the settings were read
    first = get_settings()

    # When they are asked for again / Then it is the same object
    assert get_settings() is first


# -- a bad environment stops the process with one clear line ---------------------------


@pytest.mark.parametrize("variable", REQUIRED)
def test_a_missing_required_variable_stops_with_one_line_naming_it(
    environment: pytest.MonkeyPatch, variable: str
) -> None:
    # Given a required variable is not set
    environment.delenv(variable)

    # When the process reads its settings
    message = stopped_with()

    # Then it stops with one line naming the variable and no secret
    assert_one_clear_line(message, variable)
    assert "missing" in message


def test_a_database_url_is_required_for_migrations(environment: pytest.MonkeyPatch) -> None:
    # Given no DATABASE_URL
    environment.delenv("DATABASE_URL")

    # When migrations ask for it
    with pytest.raises(SystemExit) as caught:
        get_database_url()

    # Then they stop with one line naming it
    assert_one_clear_line(str(caught.value.code), "DATABASE_URL")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DELIVERY_TIMEOUT_S", "abc"),
        ("DELIVERY_TIMEOUT_S", "0"),
        ("CODE_TTL_S", "-5"),
        ("CODE_TTL_S", "five minutes"),
        ("DEFAULT_CHANNELS", "sms,fax"),
        ("DEFAULT_CHANNELS", "sms,sms"),
        ("DEFAULT_CHANNELS", "email"),
        ("DEFAULT_CHANNELS", ""),
        ("REDIS_URL", "http://x"),
        ("DATABASE_URL", f"mysql://kodmobi:{DB_PASSWORD}@db/kodmobi"),
        ("KODMOBI_BASE_URL", "api.kod.mobi"),
        ("PUBLIC_BASE_URL", "worker.example.com"),
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "loud"),
        ("KODMOBI_API_KEY", ""),
        ("CALLBACK_SECRET", "short-secret"),
        ("CODE_KEY", "short-key"),
    ],
)
def test_a_malformed_variable_stops_with_one_line_naming_it(
    environment: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    # Given a variable whose value cannot be used
    environment.setenv(variable, value)

    # When the process reads its settings
    message = stopped_with()

    # Then it stops with one line naming that variable, without its value or any secret
    assert_one_clear_line(message, variable)
    if value and variable in {"DATABASE_URL", "CALLBACK_SECRET", "CODE_KEY"}:
        assert value not in message


def test_several_bad_variables_are_all_named_on_one_line(
    environment: pytest.MonkeyPatch,
) -> None:
    # Given one missing and two malformed variables
    environment.delenv("KODMOBI_API_KEY")
    environment.setenv("REDIS_URL", "http://x")
    environment.setenv("DELIVERY_TIMEOUT_S", "abc")

    # When the process reads its settings
    message = stopped_with()

    # Then one line names all three, so one restart fixes them all
    for variable in ("KODMOBI_API_KEY", "REDIS_URL", "DELIVERY_TIMEOUT_S"):
        assert_one_clear_line(message, variable)


# -- secrets are never printed --------------------------------------------------------


def test_repr_and_str_of_the_settings_show_no_secret() -> None:
    # Given settings holding every kind of secret
    settings = get_settings()

    # When they are printed (a debugger, a log line, an error report)
    shown = [repr(settings), str(settings), f"{settings}", f"{settings!r}"]

    # Then no secret value is in the text, nor the database password
    for text in shown:
        for secret in SECRET_VALUES:
            assert secret not in text
    # And the non-secret values are still there to help
    assert "worker.example.com" in repr(settings)


def test_a_secret_is_only_revealed_on_purpose() -> None:
    settings = get_settings()
    assert API_KEY not in repr(settings.kodmobi_api_key)
    assert API_KEY not in str(settings.kodmobi_api_key)
    assert settings.kodmobi_api_key.get_secret_value() == API_KEY


# -- the real process -----------------------------------------------------------------


def test_a_process_without_the_api_key_exits_with_one_line_naming_it() -> None:
    # Given a process environment with everything but KODMOBI_API_KEY
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    env |= {k: v for k, v in MINIMAL_ENV.items() if k != "KODMOBI_API_KEY"}

    # When it starts and reads its settings
    result = subprocess.run(
        [sys.executable, "-c", "from worker.settings import get_settings; get_settings()"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Then it exits non-zero with exactly one stderr line naming the variable
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "KODMOBI_API_KEY" in lines[0]
    assert "Traceback" not in result.stderr
    for secret in SECRET_VALUES:
        assert secret not in result.stderr
        assert secret not in result.stdout
