"""Prometheus metrics (issue 11): the `kodmobi_*` series (contract names, DESIGN §12) and
the small calls that record them, placed where each event happens.

Recording is one call per event (`message_final`, `fallback`, `api_request`, …) so the
points that record can move with the code around them. Counters live in process memory,
or in PROMETHEUS_MULTIPROC_DIR's files in the worker (worker.metrics_setup); deleting rows
(retention) never touches them, so they never go backwards.

How each process exposes them:
- web: `GET /metrics` (worker.web.ops.metrics), with the gauges computed from Postgres
  at scrape time (`DatabaseGauges`);
- worker: Dramatiq's Prometheus middleware serves every process of the host, its own
  `dramatiq_*` series and ours, from one multiprocess directory on METRICS_PORT;
- clock: `serve(METRICS_PORT)`, its own registry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker import rules

#: kod.mobi answers in tens to hundreds of ms; a slow one in seconds.
API_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: A code someone waits for: seconds to a minute or two (then it is late).
DELIVERY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0)

MESSAGES = Counter(
    "kodmobi_messages",
    "Messages reaching each final status.",
    ["source", "status"],
)
ATTEMPTS = Counter(
    "kodmobi_attempts",
    "Attempts by final outcome (delivered, failed, timed_out, error).",
    ["channel", "outcome"],
)
FALLBACKS = Counter(
    "kodmobi_fallbacks",
    "Fallbacks from one channel to the next (`none` when the chain is spent).",
    ["from_channel", "to_channel", "reason"],
)
API_REQUESTS = Counter(
    "kodmobi_api_requests",
    "Calls to kod.mobi by endpoint, HTTP status (`error` when none) and sys_message.",
    ["endpoint", "status", "sys_message"],
)
API_SECONDS = Histogram(
    "kodmobi_api_request_seconds",
    "Time a kod.mobi call took.",
    ["endpoint"],
    buckets=API_BUCKETS,
)
CALLBACKS = Counter(
    "kodmobi_callbacks",
    "Delivery callbacks received, by what became of them.",
    ["outcome"],
)
TIME_TO_DELIVERED = Histogram(
    "kodmobi_time_to_delivered_seconds",
    "From intake to the delivered callback, by the channel that delivered.",
    ["channel"],
    buckets=DELIVERY_BUCKETS,
)
RETENTION_DELETED = Counter(
    "kodmobi_retention_deleted",
    "Rows deleted by retention (RETENTION_DAYS).",
    ["table"],
)
CODES_ERASED = Counter(
    "kodmobi_codes_erased",
    "Code ciphertexts erased once their message was final and its check window over.",
)

# -- the fallback reasons (contract label values) -----------------------------------------

REFUSED = "refused"
FAILURE_CALLBACK = "failure_callback"
TIMEOUT = "timeout"
RETRIES_EXHAUSTED = "retries_exhausted"


def fallback_reason(status: str, reason: str) -> str:
    """The label of a fallback, from how its attempt ended (worker.usecases.transitions)."""
    if status == rules.TIMED_OUT:
        return TIMEOUT
    if status == rules.FAILED:
        return FAILURE_CALLBACK
    if reason.startswith("retries exhausted"):
        return RETRIES_EXHAUSTED
    return REFUSED


# -- callback outcomes, in the five words of the issue (plus `ignored`) ------------------

APPLIED = "applied"
STALE = "stale"
DUPLICATE = "duplicate"
REJECTED = "rejected"
UNREADABLE = "unreadable"
IGNORED = "ignored"

_CALLBACK_LABEL: dict[str, str] = {
    rules.CallbackOutcome.PROGRESS: APPLIED,
    rules.CallbackOutcome.DELIVERED: APPLIED,
    rules.CallbackOutcome.LATE_DELIVERY: APPLIED,
    rules.CallbackOutcome.FAILED: APPLIED,
    rules.CallbackOutcome.PROGRESS_NOTED: STALE,
    rules.CallbackOutcome.STALE: STALE,
    rules.CallbackOutcome.DUPLICATE: DUPLICATE,
    rules.CallbackOutcome.UNKNOWN_STATUS: IGNORED,
    rules.CallbackOutcome.MESSAGE_ID_MISMATCH: IGNORED,
}


# -- recording: one call per event ---------------------------------------------------------


def message_final(source: str, status: str) -> None:
    MESSAGES.labels(source or "unknown", status).inc()


def attempt_final(channel: str, outcome: str) -> None:
    ATTEMPTS.labels(channel, outcome).inc()


def fallback(from_channel: str, to_channel: str | None, reason: str) -> None:
    FALLBACKS.labels(from_channel, to_channel or "none", reason).inc()


def api_request(endpoint: str, status: int | None, sys_message: str | None, seconds: float) -> None:
    API_REQUESTS.labels(endpoint, str(status) if status else "error", sys_message or "").inc()
    API_SECONDS.labels(endpoint).observe(seconds)


def callback(outcome: str) -> None:
    """`outcome`: a CallbackOutcome, or one of REJECTED / UNREADABLE."""
    CALLBACKS.labels(_CALLBACK_LABEL.get(outcome, outcome)).inc()


def delivered(channel: str, seconds: float) -> None:
    TIME_TO_DELIVERED.labels(channel).observe(max(0.0, seconds))


def retention_deleted(table: str, rows: int) -> None:
    if rows:
        RETENTION_DELETED.labels(table).inc(rows)


def codes_erased(count: int) -> None:
    if count:
        CODES_ERASED.inc(count)


# -- gauges from Postgres, at scrape time -----------------------------------------------


class DatabaseGauges(Collector):
    """`kodmobi_queue_depth`, `kodmobi_oldest_queued_seconds` and `kodmobi_open_attempts`,
    read from Postgres when scraped (three cheap, indexed queries; see ops_queries).
    A database that cannot answer yields no samples rather than a failed scrape."""

    def __init__(self, read: Callable[[], Any]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            backlog = self._read()
        except Exception:
            return
        yield GaugeMetricFamily(
            "kodmobi_queue_depth",
            "Attempts queued and due (not waiting out a retry backoff).",
            value=backlog.depth,
        )
        yield GaugeMetricFamily(
            "kodmobi_oldest_queued_seconds",
            "Age of the oldest due queued attempt (0 when none).",
            value=backlog.oldest_s,
        )
        open_attempts = GaugeMetricFamily(
            "kodmobi_open_attempts", "Attempts not yet final, by status.", labels=["status"]
        )
        for status in rules.ATTEMPT_OPEN:
            open_attempts.add_metric([status], backlog.open_attempts.get(status, 0))
        yield open_attempts


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition(extra: Collector | None = None) -> tuple[bytes, str]:
    """This process's metrics in the text format (all of the host's in multiprocess mode),
    plus `extra` when given; `(body, content type)`."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    if extra is not None:
        gauges = CollectorRegistry(auto_describe=False)
        gauges.register(extra)
        body += generate_latest(gauges)
    return body, CONTENT_TYPE_LATEST


def serve(port: int) -> Any:
    """Expose this process's metrics on `port` (the clock's METRICS_PORT); a daemon thread.
    METRICS_HOST narrows the interface (`kodmobi dev`: loopback)."""
    from prometheus_client import start_http_server

    host = os.environ.get("METRICS_HOST", "0.0.0.0")  # noqa: S104 - Prometheus scrapes it
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server
