"""A smaller chaos run in every `make test`: a worker SIGKILLed, Redis restarted and
Postgres restarted while kod.mobi's callbacks arrive (issue 12), while a few hundred codes
go through the Procfile's processes and a misbehaving sandbox."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.support.chaos import ChaosParams, ChaosReport, format_report, run_chaos

SMALL = ChaosParams(
    messages=250,
    worker_processes=2,
    worker_kills=1,
    redis_restarts=1,
    postgres_restarts=0,
    callback_pg_restarts=1,
    intake_pg_restarts=0,
    pg_outages=0,
    both_down=0,
    invalid_messages=3,
    send_rate=25.0,
    # Callbacks come a second after each send, so the ones for sends made just before
    # the Postgres restart arrive during it (sends stop while Postgres is down).
    callback_delay_ms=1000,
    drain_bound_s=120.0,
    # Issue 10, cheaply: notify on a fifth of the codes, the receiver away for 4 s.
    notify_share=0.2,
    receiver_down_s=4.0,
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
    assert kinds == ["postgres_restart_callbacks", "receiver_down", "redis_restart", "worker_kill"]
    assert report.restarts.get("redis") == 1
    assert report.restarts.get("postgres") == 1
    assert sum(n for name, n in report.restarts.items() if name.startswith("worker-")) == 1
    assert report.sandbox_stats["responses"].get("500", 0) > 0  # the sandbox misbehaved
    # the Postgres restart really met callbacks arriving
    (restart,) = [f for f in report.faults if f.kind == "postgres_restart_callbacks"]
    assert restart.callbacks_during > 0, format_report(report)


@pytest.mark.slow
def test_postgres_restarted_during_callbacks_refuses_none_and_sends_no_code_twice(
    report: ChaosReport,
) -> None:
    # Given Postgres restarted (3 s down) while kod.mobi's callbacks arrive
    # Then every callback try was answered 2xx (waited out or spooled), and no user got a
    # code again on another channel because of it
    assert report.callback_answers.tries > 0
    assert report.callback_answers.refused == [], format_report(report)
    assert report.outage_duplicates == [], format_report(report)
    assert report.intake_5xx == [], format_report(report)


@pytest.mark.slow
def test_the_logs_hold_no_traceback_and_no_unmasked_recipient(report: ChaosReport) -> None:
    assert report.logs is not None and report.logs.files >= 5
    assert report.logs.tracebacks == {}, format_report(report)
    assert report.logs.unmasked == [], format_report(report)
    assert report.ok, format_report(report)


@pytest.mark.slow
def test_subscribers_heard_every_event_verified_and_in_order(report: ChaosReport) -> None:
    assert {s.target for s in report.subscribers} == {"webhook", "dramatiq"}
    for s in report.subscribers:
        assert s.ok, format_report(report)
        assert s.expected > 0


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
    notify_share=0.0,
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
    from tests.support.chaos.model import LogFindings, SlotsHeld

    def report_with(slots: SlotsHeld | None) -> ChaosReport:
        report = ChaosReport(
            params=SMALL, workdir=tmp_path, drained=True, slots=slots, logs=LogFindings()
        )
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


# -- the issue 12 checks (no servers): each must be able to fail ---------------------------------


def test_the_log_scan_finds_tracebacks_and_recipients_in_any_spelling(tmp_path: Path) -> None:
    from tests.support.chaos.logscan import scan_logs

    # Given logs with masked recipients only
    (tmp_path / "web.log").write_text(
        '{"event": "x", "recipient": "+7999***0123", "to": "c***@example.com"}\n'
        '{"event": "y", "timestamp": "2025-10-28T09:22:48.950Z", "port": 45123}\n'
    )
    recipients = ["+79991000123", "chaos.7@example.com", "8 (999) 100-02-50"]
    clean = scan_logs(tmp_path, recipients)
    assert (clean.files, clean.lines, clean.tracebacks, clean.unmasked) == (1, 2, {}, [])
    # When a worker's log prints them as written, and a traceback
    (tmp_path / "worker-1.log").write_text(
        "send_code(to='8 (999) 100-01-23')\n"
        '{"event": "z", "detail": "+7 999 100 02 50"}\n'
        '{"event": "w", "who": "chaos.7@example.com"}\n'
        "Traceback (most recent call last):\n"
        '{"event": "e", "exception": "Traceback (most recent call last):\\n  ..."}\n'
    )
    found = scan_logs(tmp_path, recipients)
    # Then every spelling and the email are found, and both tracebacks
    assert len(found.unmasked) == 3, found.unmasked
    assert found.tracebacks == {"worker-1": 2}


def _fault(kind: str, start: str, end: str) -> Any:
    from datetime import datetime

    from tests.support.chaos.model import FaultEvent

    started, ended = datetime.fromisoformat(start), datetime.fromisoformat(end)
    return FaultEvent(kind, kind, 0.0, 1.0, ended, started_at=started)


def _send(attempt: str, kodmobi_id: int, status: str, *answers: tuple[str, str]) -> dict:
    return {
        "message_id": kodmobi_id,
        "callback_url": f"http://web/callbacks/kodmobi/{attempt}/token",
        "callbacks": [
            {"status": status, "answers": [{"at": at, "result": r} for at, r in answers]}
        ],
    }


def test_callbacks_answered_non_2xx_count_unless_503_while_both_were_down() -> None:
    from tests.support.chaos.analysis import classify_callback_answers

    both = _fault("both_down", "2025-01-01T00:00:10+00:00", "2025-01-01T00:00:15+00:00")
    sends = [
        _send("a1", 1, "delivered", ("2025-01-01T00:00:01Z", "202")),
        _send("a2", 2, "delivered", ("2025-01-01T00:00:02Z", "500")),
        _send("a3", 3, "delivered", ("2025-01-01T00:00:12Z", "503")),
        _send("a4", 4, "failed", ("2025-01-01T00:00:13Z", "500")),
    ]
    found = classify_callback_answers(sends, [both])
    assert found.tries == 4
    assert [r.split()[0] for r in found.refused] == ["a2"]
    assert found.both_down_503 == 1
    assert [r.split()[0] for r in found.both_down_other] == ["a4"]


def test_a_next_channel_after_a_delivered_in_time_is_ours_and_fails_the_run(
    tmp_path: Path,
) -> None:
    from datetime import datetime

    from tests.support.chaos.analysis import classify_second_codes
    from tests.support.chaos.model import LogFindings

    def attempt(aid: str, seq: int, deadline: str) -> dict:
        return {
            "id": aid, "seq": seq, "channel": f"ch{seq}", "reason": "no final callback",
            "deadline": datetime.fromisoformat(deadline), "finished_at": None,
        }  # fmt: skip

    both = _fault("both_down", "2025-01-01T00:01:00+00:00", "2025-01-01T00:01:05+00:00")
    day = "2025-01-01T00:"
    attempts = {
        "in-time": [attempt("a1", 1, f"{day}00:05+00:00"), attempt("b1", 2, f"{day}00:09+00:00")],
        "late": [attempt("a2", 1, f"{day}00:05+00:00"), attempt("b2", 2, f"{day}00:09+00:00")],
        "both-down": [attempt("a3", 1, f"{day}01:05+00:00"), attempt("b3", 2, f"{day}01:09+00:00")],
    }
    sandbox = {
        "a1": [_send("a1", 1, "delivered", ("2025-01-01T00:00:02Z", "202"))],
        "b1": [_send("b1", 2, "delivered", ("2025-01-01T00:00:07Z", "200"))],
        "a2": [_send("a2", 3, "delivered", ("2025-01-01T00:00:06Z", "200"))],
        "b2": [_send("b2", 4, "delivered", ("2025-01-01T00:00:07Z", "200"))],
        "a3": [_send("a3", 5, "delivered", ("2025-01-01T00:01:01Z", "503"))],
        "b3": [_send("b3", 6, "delivered", ("2025-01-01T00:01:07Z", "200"))],
    }
    found = classify_second_codes(attempts, sandbox, [both])
    assert [o.split(":")[0] for o in found.ours] == ["in-time"]
    assert [o.split(":")[0] for o in found.both_down] == ["both-down"]
    assert found.explained == {"kod.mobi's delivered after the deadline": 1}
    report = ChaosReport(params=SMALL, workdir=tmp_path, drained=True, logs=LogFindings())
    from tests.support.chaos.model import SlotsHeld

    report.slots = SlotsHeld()
    assert report.ok
    report.second_codes = found
    assert not report.ok
    assert re.search(r"codes sent twice caused by our outages +1 +FAIL", format_report(report))


# -- the issue 10 checks (no servers): a broken build must fail each ---------------------------


def test_the_subscriber_check_fails_on_a_bad_signature_a_new_id_a_lost_event_and_order() -> None:
    from datetime import UTC, datetime, timedelta

    from tests.support.chaos.hooks import Receipt
    from tests.support.chaos.notify import check_subscriber

    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    types = ["message.sending", "message.sent", "message.delivered"]
    events = {
        "k": [
            {"id": f"e{n}", "type": t, "created_at": t0 + timedelta(seconds=n)}
            for n, t in enumerate(types)
        ]
    }
    status = {"k": "delivered"}
    subscribed = {"k": set(types)}

    def receipt(seq: int, event: str, answer: str = "200", **kw: Any) -> Receipt:
        fields = {"webhook_id": event, "verified": True} | kw
        return Receipt(seq, float(seq), fields["webhook_id"], fields["verified"], answer,
                       {"id": event})  # fmt: skip

    good = [receipt(0, "e0", "500"), receipt(1, "e0"), receipt(2, "e1"), receipt(3, "e2")]
    found = check_subscriber("webhook", subscribed, events, status, good)
    found.drained = True
    assert found.ok and found.repeats == 1 and found.received == 3
    # signed with another secret
    bad = check_subscriber("webhook", subscribed, events, status,
                           [*good[:3], receipt(3, "e2", "401", verified=False)])  # fmt: skip
    assert bad.unverified and bad.lost and bad.missing_final
    # a new webhook-id on a repeat
    renamed = check_subscriber("webhook", subscribed, events, status,
                               [*good, receipt(4, "e2", webhook_id="other")])  # fmt: skip
    assert renamed.id_mismatches
    # an event dropped
    dropped = check_subscriber("webhook", subscribed, events, status, good[:3])
    assert dropped.lost and dropped.missing_final
    # a later event before an earlier one was taken
    ahead = check_subscriber("webhook", subscribed, events, status,
                             [receipt(0, "e1"), receipt(1, "e0"), receipt(2, "e2")])  # fmt: skip
    assert ahead.order_violations
