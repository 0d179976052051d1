"""A smaller chaos run in every `make test`: a worker SIGKILLed and Redis restarted while
a few hundred codes go through the Procfile's processes and a misbehaving sandbox."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.chaos import ChaosParams, ChaosReport, format_report, run_chaos

SMALL = ChaosParams(
    messages=250,
    worker_processes=2,
    worker_kills=1,
    redis_restarts=1,
    postgres_restarts=0,
    invalid_messages=3,
    send_rate=25.0,
    drain_bound_s=120.0,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> ChaosReport:
    workdir = Path(tmp_path_factory.mktemp("chaos"))
    result = run_chaos(SMALL, workdir)
    print(format_report(result))  # shown by `pytest -rA` or on failure
    return result


@pytest.mark.slow
def test_every_accepted_message_reaches_a_final_status_within_the_bound(
    report: ChaosReport,
) -> None:
    # Given a worker killed and Redis restarted while sending
    # Then every message producers got an acceptance for is final, none lost
    assert report.sent == SMALL.messages
    assert report.not_accepted == []
    assert report.accepted == SMALL.messages
    assert report.lost == [], format_report(report)
    assert report.drained, format_report(report)
    assert report.final == report.accepted
    assert report.status_counts.get("rejected", 0) == report.expected_rejected
    assert report.crashes == [], format_report(report)


@pytest.mark.slow
def test_fallback_order_and_statuses_hold(report: ChaosReport) -> None:
    assert report.order_violations == [], format_report(report)
    assert report.consistency_violations == [], format_report(report)
    assert report.unknown_sandbox_sends == 0


@pytest.mark.slow
def test_every_attempt_sent_twice_to_kodmobi_is_explained(report: ChaosReport) -> None:
    assert report.unexplained_duplicates == [], format_report(report)


@pytest.mark.slow
def test_the_faults_really_happened(report: ChaosReport) -> None:
    kinds = sorted(f.kind for f in report.faults)
    assert kinds == ["redis_restart", "worker_kill"]
    assert report.restarts.get("redis") == 1
    assert sum(n for name, n in report.restarts.items() if name.startswith("worker-")) == 1
    assert report.sandbox_stats["responses"].get("500", 0) > 0  # the sandbox misbehaved


# -- a Redis restart shortly after a Postgres outage ---------------------------------------------

#: Postgres away for 4 s used to make `send_code` fail and Dramatiq schedule its retries as
#: delayed messages, held in a worker's memory; a Redis restart then made that consumer drop
#: them (dramatiq/worker.py resets its delay queue on a connection error) while they stayed
#: in the live worker's ack set: lost. `send_code` now waits out the database in place
#: (worker.db.retry_on_disconnect), so the message stays in flight and is never delayed.
COMBINED = ChaosParams(
    messages=150,
    send_rate=25.0,
    worker_kills=0,
    postgres_downtime_s=4.0,
    # Down long enough that every worker's consumers surely see it (a shorter blip can slip
    # between two polls, and redis-py then reconnects without anyone noticing).
    redis_downtime_s=2.0,
    fault_plan="postgres_restart@1.5,redis_restart@+1",
    drain_bound_s=40.0,
)


@pytest.mark.slow
def test_a_redis_restart_after_a_postgres_outage_loses_no_producer_message(
    tmp_path: Path,
) -> None:
    report = run_chaos(COMBINED, tmp_path)
    print(format_report(report))
    assert report.accepted == COMBINED.messages
    assert report.lost == [], format_report(report)


# -- the checks themselves (no servers): a check that cannot fail proves nothing ---------------


def _attempt(seq: int, channel: str, status: str, created: int, finished: int | None) -> dict:
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    return {
        "id": f"a{seq}",
        "seq": seq,
        "channel": channel,
        "status": status,
        "created_at": t0 + timedelta(seconds=created),
        "finished_at": None if finished is None else t0 + timedelta(seconds=finished),
    }


def test_the_order_check_catches_a_skipped_channel_and_overlapping_attempts() -> None:
    from tests.support.chaos import check_order

    message = {"id": "m", "channels": ["telegram", "whatsapp", "sms"]}
    good = [_attempt(1, "telegram", "timed_out", 0, 4), _attempt(2, "whatsapp", "delivered", 4, 5)]
    assert check_order(message, good) == []
    skipped = [_attempt(1, "telegram", "failed", 0, 1), _attempt(2, "sms", "delivered", 1, 2)]
    assert check_order(message, skipped)
    overlapping = [
        _attempt(1, "telegram", "failed", 0, 3),
        _attempt(2, "whatsapp", "queued", 1, None),
    ]
    assert check_order(message, overlapping)
    both_open = [
        _attempt(1, "telegram", "accepted", 0, None),
        _attempt(2, "whatsapp", "queued", 1, None),
    ]
    assert check_order(message, both_open)


def test_the_consistency_check_catches_statuses_that_disagree_with_attempts() -> None:
    from tests.support.chaos import check_consistency

    delivered_send = {"a1": [{"callbacks": [{"status": "delivered"}]}]}
    ok = [_attempt(1, "sms", "delivered", 0, 1)]
    assert check_consistency({"id": "m", "status": "delivered"}, ok, {}, delivered_send) == []
    # delivered, but kod.mobi never said so
    assert check_consistency({"id": "m", "status": "delivered"}, ok, {}, {})
    # failed with a delivered attempt
    assert check_consistency({"id": "m", "status": "failed"}, ok, {}, delivered_send)
    # final with an open attempt
    still_open = [_attempt(1, "sms", "accepted", 0, None)]
    assert check_consistency({"id": "m", "status": "expired"}, still_open, {}, {})
    # rejected with attempts
    assert check_consistency({"id": "m", "status": "rejected"}, ok, {}, {})
    # delivered through a late delivery on a timed-out attempt is fine
    late = [_attempt(1, "sms", "timed_out", 0, 4)]
    events = {"a1": [{"outcome": "late_delivery"}]}
    assert check_consistency({"id": "m", "status": "delivered"}, late, events, delivered_send) == []


def test_duplicates_are_explained_only_by_a_slow_answer_or_a_client_timeout() -> None:
    from tests.support.chaos import classify_duplicates

    sends = {
        "slow": [
            {"message_id": 1, "outcome": "slow+delivered"},
            {"message_id": 2, "outcome": "delivered"},
        ],
        "twice": [
            {"message_id": 3, "outcome": "delivered"},
            {"message_id": 4, "outcome": "failed"},
        ],
        "once": [{"message_id": 5, "outcome": "delivered"}],
    }
    found = {d.attempt_id: d for d in classify_duplicates(sends, {}, {})}
    assert set(found) == {"slow", "twice"}
    assert found["slow"].explained
    assert not found["twice"].explained
    timed_out = classify_duplicates(sends, {}, {"twice": ["ResponseTimeoutError"]})
    assert all(d.explained for d in timed_out)


# -- the call slots check: Redis as the workers use it, and the verdict ------------------------


def test_the_slots_check_sees_a_slot_held_and_none_once_given_back(
    redis_url: str, broker_namespace: str
) -> None:
    import redis

    from tests.support.chaos.outcome import read_slots, slots_key
    from worker.call_slots import KodMobiSlots

    # Given the workers' own slot limiter on Redis
    client = redis.Redis.from_url(redis_url)
    slots = KodMobiSlots(client, 4, namespace=broker_namespace)
    try:
        # When a call holds a slot, the check counts it as held (no fault happened)
        with slots():
            assert read_slots(redis_url, broker_namespace, None).leaked == 1
        # Then once the call is done none is held
        assert read_slots(redis_url, broker_namespace, None).leaked == 0
    finally:
        client.delete(slots_key(broker_namespace))
        client.close()


def test_a_slot_taken_before_the_last_fault_ages_out_and_is_not_a_leak(
    redis_url: str, broker_namespace: str
) -> None:
    from datetime import UTC, datetime, timedelta

    import redis

    from tests.support.chaos.outcome import read_slots, slots_key

    # Given a slot a SIGKILLed worker took just before the fault, and one taken after it
    client = redis.Redis.from_url(redis_url)
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    key = slots_key(broker_namespace)
    client.zadd(key, {"killed-mid-call": now_ms - 5_000, "leaked": now_ms - 1_000})
    try:
        fault_ended = datetime.now(UTC) - timedelta(seconds=3)
        held = read_slots(redis_url, broker_namespace, fault_ended)
    finally:
        client.delete(key)
        client.close()
    # Then only the later one is a leak
    assert (held.leaked, held.before_last_fault) == (1, 1)


def test_slots_held_when_idle_or_unreadable_fail_the_run(tmp_path: Path) -> None:
    from tests.support.chaos.model import SlotsHeld

    def report_with(slots: SlotsHeld | None) -> ChaosReport:
        report = ChaosReport(params=SMALL, workdir=tmp_path, drained=True, slots=slots)
        report.slots_error = "" if slots else "ConnectionError: refused"
        return report

    assert report_with(SlotsHeld()).ok
    assert report_with(SlotsHeld(before_last_fault=2)).ok
    leaked = report_with(SlotsHeld(leaked=1))
    assert not leaked.ok
    assert re.search(r"call slots held when idle +1 +FAIL", format_report(leaked))
    unknown = report_with(None)
    assert not unknown.ok
    assert "FAIL (ConnectionError: refused)" in format_report(unknown)
