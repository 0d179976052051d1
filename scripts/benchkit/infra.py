"""Postgres and Redis for the whole bench, a migrated template database, the secrets."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis

from scripts.benchkit.common import (
    log,
)
from worker.embedded import EmbeddedPostgres, EmbeddedRedis


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _libpq_url(url: str) -> str:
    """psycopg wants postgresql://; DATABASE_URL may say postgres:// or postgresql+psycopg://."""
    for prefix in ("postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


class Infra:
    """Postgres and Redis for the whole bench, a migrated template database, the secrets."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.tag = f"{os.getpid()}{secrets.token_hex(3)}"
        self.postgres: EmbeddedPostgres | None = None
        self.redis_server: EmbeddedRedis | None = None
        self.pg_url = ""
        self.redis_url = ""
        self.template = f"kodmobi_bench_{self.tag}_tpl"
        self.databases: list[str] = []
        self.runs = 0
        self.secrets = {
            "KODMOBI_API_KEY": "sandbox-" + secrets.token_urlsafe(18),
            "CALLBACK_SECRET": secrets.token_urlsafe(32),
            "CODE_KEY": secrets.token_urlsafe(32),
            "API_TOKENS": "bench-" + secrets.token_urlsafe(24),
        }

    @property
    def embedded(self) -> bool:
        return self.postgres is not None

    def start(self) -> None:
        if os.environ.get("DATABASE_URL"):
            self.pg_url = _libpq_url(os.environ["DATABASE_URL"])
        else:
            log("starting embedded Postgres")
            self.postgres = EmbeddedPostgres(self.workdir / "postgres")
            self.pg_url = self.postgres.start()
        if os.environ.get("REDIS_URL"):
            self.redis_url = os.environ["REDIS_URL"]
        else:
            log("starting embedded Redis")
            self.redis_server = EmbeddedRedis(self.workdir / "redis")
            self.redis_url = self.redis_server.start()
        self.redis = redis.Redis.from_url(self.redis_url)
        self._admin(f'CREATE DATABASE "{self.template}"')
        self.databases.append(self.template)
        from worker.migrate import upgrade

        log("migrating the template database")
        upgrade(_with_database(self.pg_url, self.template))

    def _admin(self, *statements: str) -> None:
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]

    def _drop(self, name: str) -> None:
        self._admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()",
            f'DROP DATABASE IF EXISTS "{name}"',
        )

    @contextlib.contextmanager
    def fresh(self) -> Iterator[tuple[str, str]]:
        """A fresh migrated database and a Dramatiq namespace of its own: (db url, namespace)."""
        self.runs += 1
        name = f"kodmobi_bench_{self.tag}_{self.runs}"
        namespace = f"kodmobi-bench-{self.tag}-{self.runs}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        self.databases.append(name)
        try:
            yield _with_database(self.pg_url, name), namespace
        finally:
            with contextlib.suppress(Exception):
                self._drop(name)
                self.databases.remove(name)
            with contextlib.suppress(Exception):
                keys = list(self.redis.scan_iter(match=f"{namespace}:*", count=1000))
                for i in range(0, len(keys), 500):
                    self.redis.delete(*keys[i : i + 500])

    def stop(self) -> None:
        for name in list(self.databases):
            with contextlib.suppress(Exception):
                self._drop(name)
        if self.redis_server is not None:
            self.redis_server.stop()
        if self.postgres is not None:
            self.postgres.stop(mode="immediate")
        # The servers' data is of no use after the run; the processes' logs are kept.
        for name in ("postgres", "redis"):
            shutil.rmtree(self.workdir / name, ignore_errors=True)

    def server_pids(self) -> dict[str, int]:
        """Embedded servers' root pids, for CPU accounting (none for the machine's servers)."""
        pids: dict[str, int] = {}
        if self.postgres is not None:
            with contextlib.suppress(Exception):
                pid_file = self.postgres.pgdata / "postmaster.pid"
                pids["postgres"] = int(pid_file.read_text().split()[0])
        if self.redis_server is not None and self.redis_server.process is not None:
            pids["redis"] = self.redis_server.process.pid
        return pids

    def versions(self) -> dict[str, str]:
        """Server versions and the durability settings that weigh on every figure."""
        pg: dict[str, str] = {}
        with psycopg.connect(self.pg_url) as conn:
            for name in ("server_version", "fsync", "synchronous_commit", "max_connections"):
                row = conn.execute(f"SHOW {name}").fetchone()  # type: ignore[arg-type]
                pg[name] = str(row[0]) if row else "?"
        info: dict[str, Any] = self.redis.info("server")  # type: ignore[assignment]
        redis_conf: dict[str, str] = {}
        with contextlib.suppress(redis.RedisError):
            for name in ("appendonly", "appendfsync"):
                redis_conf.update(self.redis.config_get(name))  # type: ignore[arg-type]
        return {
            "postgres": pg.pop("server_version"),
            "postgres_settings": " ".join(f"{k}={v}" for k, v in pg.items()),
            "redis": str(info.get("redis_version", "?")),
            "redis_settings": " ".join(f"{k}={v}" for k, v in redis_conf.items()) or "?",
        }
