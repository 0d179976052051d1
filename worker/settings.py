"""Process settings from the environment (DESIGN §2), validated once at start."""

from __future__ import annotations

import ipaddress
import re
import sys
from functools import lru_cache
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.rules import PHONE_CHANNELS


def normalise_database_url(url: str) -> str:
    """Accept the spellings platforms hand out and point SQLAlchemy at psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith("postgresql+psycopg://"):
        return url
    raise ValueError("must start with postgres://, postgresql:// or postgresql+psycopg://")


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


#: Our own secrets (API tokens, CALLBACK_SECRET, CODE_KEY) and the kod.mobi key are at
#: least this long: a short one is guessable, and too short to scrub from logs safely.
MIN_SECRET_LENGTH = 16
#: A producer's name in `API_TOKENS` (`name:token`); a bare token belongs to `default`.
PRODUCER_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DEFAULT_PRODUCER = "default"


class ProducerToken(BaseModel):
    """One `API_TOKENS` entry: the producer a bearer token speaks for (issue 13)."""

    producer: str
    token: SecretStr


def is_loopback_host(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves the machine."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DatabaseSettings(BaseSettings):
    """What `alembic upgrade head` (the release process) needs, and nothing more."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", hide_input_in_errors=True
    )

    database_url: str = Field(alias="DATABASE_URL", repr=False)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return normalise_database_url(value)


class Settings(DatabaseSettings):
    """Everything the web, worker and clock processes read from the environment."""

    redis_url: str = Field(alias="REDIS_URL", repr=False)
    kodmobi_api_key: SecretStr = Field(alias="KODMOBI_API_KEY", min_length=MIN_SECRET_LENGTH)
    # Before the URLs, whose validator reads it.
    #: Hosts besides loopback that KODMOBI_BASE_URL / PUBLIC_BASE_URL may reach over plain
    #: http (a private compose network); everything else must be https.
    insecure_http_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (), alias="INSECURE_HTTP_HOSTS"
    )
    kodmobi_base_url: str = Field("https://api.kod.mobi", alias="KODMOBI_BASE_URL")
    public_base_url: str = Field(alias="PUBLIC_BASE_URL")
    callback_secret: SecretStr = Field(alias="CALLBACK_SECRET", min_length=MIN_SECRET_LENGTH)
    api_tokens: Annotated[list[ProducerToken], NoDecode] = Field(
        default_factory=list, alias="API_TOKENS"
    )
    #: Comma-separated: the first key encrypts, every key decrypts (rotation, issue 13).
    code_key: Annotated[list[SecretStr], NoDecode] = Field(alias="CODE_KEY", min_length=1)
    default_channels: Annotated[tuple[str, ...], NoDecode] = Field(
        PHONE_CHANNELS, alias="DEFAULT_CHANNELS"
    )
    delivery_timeout_s: float = Field(60.0, alias="DELIVERY_TIMEOUT_S", gt=0, allow_inf_nan=False)
    code_ttl_s: float = Field(300.0, alias="CODE_TTL_S", gt=0, allow_inf_nan=False)
    #: Tokens that sign in to the operations console at /ops (DESIGN §12).
    ops_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, alias="OPS_TOKENS"
    )
    #: Messages, attempts and callback events older than this are deleted (DESIGN §12).
    retention_days: float = Field(30.0, alias="RETENTION_DAYS", gt=0, allow_inf_nan=False)
    #: Where the worker and the clock expose their metrics (the web serves GET /metrics).
    metrics_port: int | None = Field(None, alias="METRICS_PORT", ge=1, le=65535)
    log_format: str = Field("json", alias="LOG_FORMAT", pattern="^(json|console)$")
    log_level: str = Field(
        "INFO", alias="LOG_LEVEL", pattern="^(?i)(debug|info|warning|error|critical)$"
    )

    # Tuning knobs beyond the contract; the defaults suit the Procfile.
    kodmobi_connect_timeout_s: float = Field(3.0, alias="KODMOBI_CONNECT_TIMEOUT_S", gt=0)
    kodmobi_read_timeout_s: float = Field(10.0, alias="KODMOBI_READ_TIMEOUT_S", gt=0)
    kodmobi_max_concurrency: int = Field(64, alias="KODMOBI_MAX_CONCURRENCY", ge=1)
    broker_namespace: str = Field("dramatiq", alias="BROKER_NAMESPACE", min_length=1)
    sweep_interval_s: float = Field(1.0, alias="SWEEP_INTERVAL_S", gt=0)
    retry_max_backoff_s: float = Field(30.0, alias="RETRY_MAX_BACKOFF_S", gt=0)
    recipient_limit: int = Field(5, alias="RECIPIENT_LIMIT", ge=0)
    recipient_window_s: float = Field(600.0, alias="RECIPIENT_WINDOW_S", gt=0)
    channel_cooldown_s: float = Field(60.0, alias="CHANNEL_COOLDOWN_S", ge=0)
    db_pool_size: int = Field(40, alias="DB_POOL_SIZE", ge=1)
    #: How long after an attempt's deadline its callback URL still works: a "delivered"
    #: may come late (issue 13). Past it the URL answers 404, like a forged one.
    callback_grace_s: float = Field(3600.0, alias="CALLBACK_GRACE_S", ge=0, allow_inf_nan=False)
    #: Serve /docs, /redoc and /openapi.json (off by default: issue 13).
    api_docs: bool = Field(False, alias="API_DOCS")

    # Outcome events (issue 10, DESIGN §11).
    notify_url: str | None = Field(None, alias="NOTIFY_URL")
    webhook_secret: SecretStr | None = Field(None, alias="WEBHOOK_SECRET")
    webhook_retry_horizon_s: float = Field(86400.0, alias="WEBHOOK_RETRY_HORIZON_S", gt=0)
    #: Two tries of one delivery are never further apart than this.
    webhook_max_backoff_s: float = Field(3600.0, alias="WEBHOOK_MAX_BACKOFF_S", gt=0)
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (), alias="WEBHOOK_ALLOWED_HOSTS"
    )
    webhook_timeout_s: float = Field(10.0, alias="WEBHOOK_TIMEOUT_S", gt=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("insecure_http_hosts", mode="before")
    @classmethod
    def _hosts_csv(cls, value: Any) -> Any:
        split = _split_csv(value)
        return tuple(h.lower() for h in split) if isinstance(split, list) else split

    @field_validator("kodmobi_base_url", "public_base_url")
    @classmethod
    def _http_url(cls, value: str, info: ValidationInfo) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with https://")
        if value.startswith("http://"):
            # The API key, codes and callback tokens travel in these requests.
            host = urlsplit(value).hostname
            allowed = info.data.get("insecure_http_hosts", ())
            if not is_loopback_host(host) and (host or "").lower() not in allowed:
                raise ValueError("must be https:// (plain http only for loopback hosts)")
        return value.rstrip("/")

    @field_validator("ops_tokens", "code_key", mode="before")
    @classmethod
    def _secret_list(cls, value: Any) -> Any:
        secrets = _split_csv(value)
        if isinstance(secrets, list) and any(len(s) < MIN_SECRET_LENGTH for s in secrets):
            # Never echo the entry: it is a secret.
            raise ValueError(f"each entry must be at least {MIN_SECRET_LENGTH} characters")
        return secrets

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _tokens(cls, value: Any) -> Any:
        entries = _split_csv(value)
        if not isinstance(entries, list):
            return entries
        parsed = []
        for entry in entries:
            if not isinstance(entry, str):
                parsed.append(entry)
                continue
            name, sep, token = entry.partition(":")
            if not sep or not PRODUCER_PATTERN.fullmatch(name):
                name, token = DEFAULT_PRODUCER, entry
            # Never echo the entry: it is a secret.
            if len(token) < MIN_SECRET_LENGTH:
                raise ValueError(f"each token must be at least {MIN_SECRET_LENGTH} characters")
            parsed.append({"producer": name, "token": token})
        if len({p["token"] if isinstance(p, dict) else p for p in parsed}) != len(parsed):
            raise ValueError("a token is listed twice")
        return parsed

    @field_validator("notify_url")
    @classmethod
    def _notify_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        from worker.webhooks import secret_key

        if value is None or not value.get_secret_value():
            return None
        secret_key(value.get_secret_value())  # raises ValueError, never echoing the secret
        return value

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _webhook_hosts_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @model_validator(mode="after")
    def _webhooks_signed(self) -> Settings:
        if self.notify_url and self.webhook_secret is None:
            raise ValueError("WEBHOOK_SECRET is missing (required with NOTIFY_URL)")
        return self

    @field_validator("default_channels", mode="before")
    @classmethod
    def _channels_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("default_channels")
    @classmethod
    def _channels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in value if c not in PHONE_CHANNELS]
        if unknown or not value or len(set(value)) != len(value):
            raise ValueError(f"must be distinct names among {', '.join(PHONE_CHANNELS)}")
        return value


class SettingsError(SystemExit):
    """A required setting is missing or malformed; the message names the variable."""


def _explain(exc: ValidationError, model: type[BaseSettings]) -> str:
    aliases = {name: (f.alias or name).upper() for name, f in model.model_fields.items()}
    problems = []
    for error in exc.errors():
        if not error["loc"]:  # a rule across settings: its message names the variables
            problems.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        field = str(error["loc"][0])
        variable = aliases.get(field, field.upper())
        if error["type"] == "missing":
            problems.append(f"{variable} is missing")
        else:
            # The message never carries the input: secrets stay out of it.
            problems.append(f"{variable} is malformed ({error['msg']})")
    return "kodmobi: bad settings: " + "; ".join(problems)


def _load(model: type[DatabaseSettings]) -> Any:
    try:
        return model()  # type: ignore[call-arg]  # pydantic-settings reads the environment
    except ValidationError as exc:
        raise SettingsError(_explain(exc, model)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; a bad environment stops the process here."""
    settings: Settings = _load(Settings)
    return settings


def get_database_url() -> str:
    """Just DATABASE_URL, for migrations, which need nothing else."""
    settings: DatabaseSettings = _load(DatabaseSettings)
    return settings.database_url


def fail(message: str) -> NoReturn:
    """Stop the process with one line on stderr."""
    print(message, file=sys.stderr)
    raise SystemExit(2)
