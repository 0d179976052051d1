"""The checks: nothing lost, fallback order, statuses consistent, duplicates explained; and
through our own outages (issue 12): how callbacks were answered, codes sent twice because
of us, what intake answered, and what the logs hold."""

from __future__ import annotations

import contextlib
import json
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.support.chaos.logscan import scan_logs
from tests.support.chaos.model import (
    FINAL,
    OPEN_ATTEMPT,
    CallbackAnswers,
    ChaosReport,
    Duplicate,
    FaultEvent,
    SecondCodes,
)
from tests.support.chaos.outcome import Outcome
from tests.support.chaos.producers import Producers, recipients
from worker.usecases.receive import CALLBACK_WAIT_S

#: A callback try that began this long before Postgres and Redis went away together may
#: still meet both away: the receiver first waits Postgres out (CALLBACK_WAIT_S), then
#: tries the spool. And one begun just as they came back may meet them still starting.
BOTH_DOWN_BEFORE = timedelta(seconds=CALLBACK_WAIT_S + 1.0)
BOTH_DOWN_AFTER = timedelta(seconds=1.0)
#: A `delivered` that kod.mobi began sending this close to the attempt's deadline may
#: lose the race with the clock's timeout through no outage of ours.
DEADLINE_RACE = timedelta(seconds=0.5)


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
    analyse_outages(report, outcome, producers, log_dir)


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def both_down_windows(faults: list[FaultEvent]) -> list[tuple[datetime, datetime]]:
    """When a callback try could meet Postgres and Redis both away."""
    return [
        (f.started_at - BOTH_DOWN_BEFORE, f.ended_at + BOTH_DOWN_AFTER)
        for f in faults
        if f.kind == "both_down" and f.started_at is not None
    ]


def _inside(at: datetime, windows: list[tuple[datetime, datetime]]) -> bool:
    return any(start <= at <= end for start, end in windows)


def classify_callback_answers(
    sends: list[dict[str, Any]], faults: list[FaultEvent]
) -> CallbackAnswers:
    """Every try of every callback kod.mobi made (the sandbox's record), by our answer."""
    windows = both_down_windows(faults)
    found = CallbackAnswers()
    for send in sends:
        for callback in send.get("callbacks", ()):
            for answer in callback.get("answers", ()):
                found.tries += 1
                result = str(answer["result"])
                if result.startswith("2"):
                    continue
                what = f"{attempt_of(send)} {callback['status']} at {answer['at']}: {result}"
                if not _inside(_when(answer["at"]), windows):
                    found.refused.append(what)
                elif result == "503":
                    found.both_down_503 += 1
                else:
                    found.both_down_other.append(what)
    return found


def classify_second_codes(
    attempts_by_message: dict[str, list[dict[str, Any]]],
    sandbox_by_attempt: dict[str, list[dict[str, Any]]],
    faults: list[FaultEvent],
) -> SecondCodes:
    """Messages where kod.mobi said an attempt was delivered and yet a later channel was
    sent: whose doing it was, by when kod.mobi began that `delivered` callback and for
    which of the attempt's sends."""
    windows = both_down_windows(faults)
    found = SecondCodes()
    explained: Counter[str] = Counter()
    for message_id, attempts in attempts_by_message.items():
        for n, attempt in enumerate(attempts[:-1]):
            if not any(sandbox_by_attempt.get(a["id"]) for a in attempts[n + 1 :]):
                continue  # no later channel reached kod.mobi: no second code
            sends = sorted(sandbox_by_attempt.get(attempt["id"], ()), key=lambda s: s["message_id"])
            told = [
                (send, answer)
                for send in sends
                for callback in send["callbacks"]
                if callback["status"] == "delivered"
                for answer in callback.get("answers", ())
            ]
            if not told:
                continue
            tries = [answer for _send, answer in told]
            first = min(_when(t["at"]) for t in tries)
            deadline = attempt.get("deadline")
            finished = attempt.get("finished_at")
            what = (
                f"{message_id}: {attempt['channel']} delivered at {first.isoformat()}"
                f" (deadline {deadline.isoformat() if deadline else '-'},"
                f" answered {[t['result'] for t in tries]}), then {attempts[n + 1]['channel']}"
            )
            if all(send is not sends[-1] for send, _answer in told):
                explained["a send timed out at our client, sent again"] += 1
            elif finished is not None and finished < first and attempt["status"] != "timed_out":
                # A failure callback, or our client's timeouts on kod.mobi's answers.
                explained["kod.mobi's own answers ended the attempt before its delivered"] += 1
            elif deadline is not None and first > deadline - DEADLINE_RACE:
                explained["kod.mobi's delivered after the deadline"] += 1
            elif all(t["result"] == "503" and _inside(_when(t["at"]), windows) for t in tries):
                found.both_down.append(what)
            else:
                found.ours.append(what)
            break  # one second code per message is enough to name it
    found.explained = dict(explained.most_common())
    return found


def fault_evidence(
    faults: list[FaultEvent], sends: list[dict[str, Any]], intake_log: list[tuple[float, str]]
) -> None:
    """Count, for each fault, the callback tries and the intake requests begun inside it:
    proof that a fault placed while callbacks arrive (or intake is busy) really met them."""
    tries = [
        _when(answer["at"])
        for send in sends
        for callback in send.get("callbacks", ())
        for answer in callback.get("answers", ())
    ]
    for fault in faults:
        if fault.started_at is None:
            continue
        start, end = fault.started_at, fault.ended_at
        fault.callbacks_during = sum(start <= at <= end for at in tries)
        inside = [r for t, r in intake_log if start.timestamp() <= t <= end.timestamp()]
        fault.intake_during = len(inside)
        fault.intake_503_during = inside.count("503")


def analyse_outages(
    report: ChaosReport, outcome: Outcome, producers: Producers, log_dir: Path
) -> None:
    """The issue 12 rows: callbacks' answers, second codes, intake answers, the logs."""
    sandbox_by_attempt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for send in outcome.sandbox_sends:
        attempt_id = attempt_of(send)
        if attempt_id is not None:
            sandbox_by_attempt[attempt_id].append(send)
    report.callback_answers = classify_callback_answers(outcome.sandbox_sends, report.faults)
    report.second_codes = classify_second_codes(outcome.attempts, sandbox_by_attempt, report.faults)
    fault_evidence(report.faults, outcome.sandbox_sends, producers.intake_log)
    statuses = [status for _t, status in producers.intake_log]
    report.intake_503 = statuses.count("503")
    report.intake_503_without_retry_after = producers.unavailable_without_retry_after
    report.intake_5xx = [
        f"{datetime.fromtimestamp(t).isoformat()}: HTTP {status}"
        for t, status in producers.intake_log
        if status.isdigit() and int(status) >= 500 and status != "503"
    ]
    report.logs = scan_logs(log_dir, recipients(producers.sends))
