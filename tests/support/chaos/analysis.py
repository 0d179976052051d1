"""The checks: nothing lost, fallback order, statuses consistent, duplicates explained."""

from __future__ import annotations

import contextlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.support.chaos.model import FINAL, OPEN_ATTEMPT, ChaosReport, Duplicate
from tests.support.chaos.outcome import Outcome
from tests.support.chaos.producers import Producers


def attempt_of(send: dict[str, Any]) -> str | None:
    """The attempt id in a sandbox send's `/callbacks/kodmobi/{attempt_id}/{token}`."""
    url = send.get("callback_url") or ""
    parts = urlsplit(url).path.strip("/").split("/")
    if len(parts) == 4 and parts[:2] == ["callbacks", "kodmobi"]:
        return parts[2]
    return None


def check_order(message: dict[str, Any], attempts: list[dict[str, Any]]) -> list[str]:
    """Attempts have seq 1..n on the chain's first n channels, in order, and each one
    ended before the next began: never two open at once."""
    problems = []
    mid = message["id"]
    seqs = [a["seq"] for a in attempts]
    if seqs != list(range(1, len(attempts) + 1)):
        problems.append(f"{mid}: attempt seqs {seqs}")
    channels = [a["channel"] for a in attempts]
    if channels != list(message["channels"])[: len(channels)]:
        problems.append(f"{mid}: channels {channels} not a prefix of chain {message['channels']}")
    for earlier, later in zip(attempts, attempts[1:], strict=False):
        if earlier["status"] in OPEN_ATTEMPT or earlier["finished_at"] is None:
            problems.append(f"{mid}: attempt {earlier['seq']} still {earlier['status']}")
        elif earlier["finished_at"] > later["created_at"]:
            problems.append(f"{mid}: attempt {earlier['seq']} ended after {later['seq']} began")
    if sum(a["status"] in OPEN_ATTEMPT for a in attempts) > 1:
        problems.append(f"{mid}: more than one open attempt")
    return problems


def check_consistency(
    message: dict[str, Any],
    attempts: list[dict[str, Any]],
    events: dict[str, list[dict[str, Any]]],
    sandbox_by_attempt: dict[str, list[dict[str, Any]]],
) -> list[str]:
    """A final message has no open attempt; delivered ⇔ an attempt delivered (or a late
    delivery recorded) and the sandbox really sent a `delivered` callback; failed and
    expired have no delivered attempt; rejected has no attempt at all."""
    problems = []
    mid, status = message["id"], message["status"]
    statuses = [a["status"] for a in attempts]
    if status in FINAL and any(s in OPEN_ATTEMPT for s in statuses):
        problems.append(f"{mid}: {status} with an open attempt {statuses}")
    delivered_attempt = "delivered" in statuses
    late = any(e["outcome"] == "late_delivery" for a in attempts for e in events.get(a["id"], ()))
    if status == "delivered":
        if not (delivered_attempt or late):
            problems.append(f"{mid}: delivered, but no attempt delivered {statuses}")
        told = any(
            cb["status"] == "delivered"
            for a in attempts
            for send in sandbox_by_attempt.get(a["id"], ())
            for cb in send["callbacks"]
        )
        if not told:
            problems.append(f"{mid}: delivered, but kod.mobi never said so")
    elif status in ("failed", "expired") and delivered_attempt:
        problems.append(f"{mid}: {status} with a delivered attempt {statuses}")
    elif status == "rejected" and attempts:
        problems.append(f"{mid}: rejected with {len(attempts)} attempts")
    if status != "delivered" and late:
        problems.append(f"{mid}: {status} though a late delivery was applied")
    return problems


def classify_duplicates(
    sandbox_by_attempt: dict[str, list[dict[str, Any]]],
    message_of_attempt: dict[str, str],
    retry_errors: dict[str, list[str]],
) -> list[Duplicate]:
    """Every attempt kod.mobi accepted more than once, and why, from the sandbox's own
    record (was the earlier send a slow answer?) and our workers' retry log lines."""
    found = []
    for attempt_id, sends in sandbox_by_attempt.items():
        if len(sends) < 2:
            continue
        sends = sorted(sends, key=lambda s: s["message_id"])
        earlier = sends[:-1]
        timeouts = sum("ResponseTimeoutError" in e for e in retry_errors.get(attempt_id, ()))
        if all(s["outcome"].startswith("slow") for s in earlier):
            reason = "slow answer timed out at our client, retried"
            explained = True
        elif timeouts >= len(earlier):
            reason = "late answer under load timed out at our client, retried"
            explained = True
        else:
            reason = (
                f"unexplained: earlier outcomes {[s['outcome'] for s in earlier]},"
                f" our retries {retry_errors.get(attempt_id, [])}"
            )
            explained = False
        found.append(
            Duplicate(
                attempt_id,
                message_of_attempt.get(attempt_id),
                [
                    {k: s.get(k) for k in ("message_id", "channel", "outcome", "received_at")}
                    for s in sends
                ],
                reason,
                explained,
            )
        )
    return found


def dead_consumer_threads(log_dir: Path) -> list[str]:
    """Dramatiq consumer threads that died while their worker process kept running (a
    dead `kodmobi.DQ` consumer never promotes a delayed message again)."""
    found = []
    for path in sorted(log_dir.glob("worker-*.log")):
        consumer = "?"
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if "Consumer encountered an unexpected error" in line:
                    with contextlib.suppress(ValueError):
                        logger = str(json.loads(line).get("logger", "?"))
                        consumer = logger.partition("ConsumerThread(")[2].rstrip(")") or logger
                elif line.startswith("Exception in thread"):
                    found.append(f"{path.stem}: {consumer}")
    return found


def retry_errors_from_logs(log_dir: Path) -> dict[str, list[str]]:
    """attempt id -> the errors our workers retried it after (`attempt.retry_scheduled`)."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in log_dir.glob("worker-*.log"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if "attempt.retry_scheduled" not in line:
                    continue
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    found[record.get("attempt_id", "")].append(str(record.get("error")))
    return dict(found)


def analyse(report: ChaosReport, outcome: Outcome, producers: Producers, log_dir: Path) -> None:
    accepted = producers.accepted
    report.messages_in_database = outcome.messages_in_database
    report.expected_rejected = len(producers.expected_rejected)
    statuses: Counter[str] = Counter()
    for key, (via, http_id) in accepted.items():
        message = outcome.messages.get(key)
        if message is None:
            where = report.broker.stranded.get(key) if report.broker else None
            report.lost.append(
                f"{via} {key}: no message in the database" + (f"; {where}" if where else "")
            )
            continue
        statuses[message["status"]] += 1
        if http_id is not None and message["id"] != http_id:
            report.consistency_violations.append(
                f"{key}: answered id {http_id}, recorded {message['id']}"
            )
        if message["status"] not in FINAL:
            report.lost.append(f"{via} {key}: still {message['status']} at the bound")
        if (key in producers.expected_rejected) != (message["status"] == "rejected"):
            report.consistency_violations.append(
                f"{message['id']}: {message['status']}, but the input was"
                f" {'malformed' if key in producers.expected_rejected else 'valid'}"
            )
    report.status_counts = dict(statuses.most_common())
    report.final = sum(n for s, n in statuses.items() if s in FINAL)

    message_of_attempt: dict[str, str] = {}
    attempt_statuses: Counter[str] = Counter()
    for attempts in outcome.attempts.values():
        for a in attempts:
            message_of_attempt[a["id"]] = a["message_id"]
            attempt_statuses[a["status"]] += 1
    report.attempts = sum(attempt_statuses.values())
    report.attempt_status_counts = dict(attempt_statuses.most_common())

    sandbox_by_attempt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    outcomes: Counter[str] = Counter()
    for send in outcome.sandbox_sends:
        outcomes[send["outcome"]] += 1
        attempt_id = attempt_of(send)
        if attempt_id is None or attempt_id not in message_of_attempt:
            report.unknown_sandbox_sends += 1
            continue
        sandbox_by_attempt[attempt_id].append(send)
    report.sandbox_sends = len(outcome.sandbox_sends)
    report.sandbox_outcomes = dict(outcomes.most_common())
    report.sandbox_stats = outcome.sandbox_stats

    for message in outcome.messages.values():
        attempts = outcome.attempts.get(message["id"], [])
        if message["status"] != "rejected":
            report.order_violations += check_order(message, attempts)
        report.consistency_violations += check_consistency(
            message, attempts, outcome.events, sandbox_by_attempt
        )
        report.late_deliveries += sum(
            e["outcome"] == "late_delivery"
            for a in attempts
            for e in outcome.events.get(a["id"], ())
        )
    report.dead_consumer_threads = dead_consumer_threads(log_dir)
    report.duplicates = classify_duplicates(
        sandbox_by_attempt, message_of_attempt, retry_errors_from_logs(log_dir)
    )
