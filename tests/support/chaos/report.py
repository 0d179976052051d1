"""The chaos run's table of figures, with a check mark on each that can fail."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from tests.support.chaos.model import ChaosReport
from worker.call_slots import SLOT_TTL_MS


def _pct(rate: float) -> str:
    return f"{rate * 100:g}%"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _mark(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def _outage_rows(report: ChaosReport, row: Callable[..., None]) -> None:
    """Issue 12: what kod.mobi's callbacks and the producers met during our outages."""
    answers = report.callback_answers
    row("callback tries (sandbox record)", answers.tries)
    row("  answered non-2xx outside the both-down window", len(answers.refused),
        _mark(not answers.refused))  # fmt: skip
    row("  answered 503 while Postgres+Redis were down", answers.both_down_503,
        "expected" if not answers.both_down_other
        else f"FAIL ({len(answers.both_down_other)} not 503)")  # fmt: skip
    second = report.second_codes
    row("codes sent twice caused by our outages", len(report.outage_duplicates),
        _mark(not report.outage_duplicates))  # fmt: skip
    row("  next channel after a delivered in time", len(second.ours))
    row("  one attempt sent twice, unexplained", len(report.unexplained_duplicates))
    row("next channel after a 503 while both were down", len(second.both_down),
        "expected: kod.mobi does not retry")  # fmt: skip
    row("next channel explained by kod.mobi's slowness", sum(second.explained.values()))
    for reason, count in second.explained.items():
        row(f"  {reason}", count)
    row("intake 503 + Retry-After (retried, same key)", report.intake_503,
        _mark(not report.intake_503_without_retry_after)
        + (f" ({report.intake_503_without_retry_after} without Retry-After)"
           if report.intake_503_without_retry_after else ""))  # fmt: skip
    row("intake answered other 5xx", len(report.intake_5xx), _mark(not report.intake_5xx))
    logs = report.logs
    if logs is None:
        row("tracebacks in logs", "not scanned", "FAIL")
        row("unmasked recipients in logs", "not scanned", "FAIL")
        return
    scanned = f" ({logs.lines} lines in {logs.files} logs)"
    row("tracebacks in logs", f"{logs.traceback_count}"
        + (f" ({_counts(logs.tracebacks)})" if logs.tracebacks else scanned),
        _mark(not logs.traceback_count))  # fmt: skip
    row("unmasked recipients in logs", f"{len(logs.unmasked)}{scanned}",
        _mark(not logs.unmasked))  # fmt: skip


def _subscriber_rows(report: ChaosReport, row: Callable[..., None]) -> None:
    """Issue 10: what the webhook receiver and the reply queue heard."""
    for s in report.subscribers:
        name = {"webhook": "webhooks", "dramatiq": "Dramatiq replies"}.get(s.target, s.target)
        row(f"{name}: subscribed messages / events", f"{s.messages} / {s.expected}")
        row("  events received", f"{s.received} of {s.expected}",
            _mark(s.received == s.expected))  # fmt: skip
        row("  events lost", len(s.lost), _mark(not s.lost))
        row("  final messages without their final event", len(s.missing_final),
            _mark(not s.missing_final))  # fmt: skip
        if s.target == "webhook":
            row("  signatures refused by standardwebhooks", len(s.unverified),
                _mark(not s.unverified))  # fmt: skip
            row("  receiver answers", _counts(s.answers))
        row("  repeats (same event again)", s.repeats)
        row("  id mismatches (webhook-id / unknown event)", len(s.id_mismatches),
            _mark(not s.id_mismatches))  # fmt: skip
        row("  per-message order", f"{len(s.order_violations)} violations",
            _mark(not s.order_violations))  # fmt: skip
        row("  timestamps behind an earlier event's", len(s.timestamp_inversions),
            "outbox order kept; see details" if s.timestamp_inversions else "")  # fmt: skip
        row("  our tries (dispatcher record)", _counts(s.tries))
        row("  deliveries pending / dead at the end", f"{s.pending} / {s.dead}",
            _mark(not s.pending and not s.dead))  # fmt: skip
        row("  events drained after the last fault",
            "-" if s.drain_after_last_fault_s is None
            else f"{s.drain_after_last_fault_s:.1f} s", _mark(s.drained))  # fmt: skip
    if report.subscribers:
        row("events never sequenced", report.unsequenced_events,
            _mark(not report.unsequenced_events))  # fmt: skip


def format_report(report: ChaosReport) -> str:
    p = report.params
    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: object, check: str = "") -> None:
        rows.append((name, str(value), check))

    bound = f"bound {p.drain_bound_s:g} s after the last fault or send"
    row("messages sent (http / dramatiq)", f"{report.sent} ({report.sent_http} / "
        f"{report.sent_dramatiq}, {report.expected_rejected} malformed)")  # fmt: skip
    row(
        "accepted (http 202/200 / enqueued)",
        f"{report.accepted} ({report.accepted_http} / {report.accepted_dramatiq})",
        _mark(not report.not_accepted and report.accepted == report.sent),
    )
    row("producer retries (http / enqueue)", f"{report.http_retries} / {report.enqueue_retries}")
    row("reached a final status", f"{report.final} of {report.accepted}",
        f"{_mark(report.drained and report.final == report.accepted)} ({bound})")  # fmt: skip
    row("lost (missing or not final)", len(report.lost), _mark(not report.lost))
    row("message statuses", _counts(report.status_counts))
    row("messages in the database", report.messages_in_database)
    row("attempts", f"{report.attempts} ({_counts(report.attempt_status_counts)})")
    row("late deliveries applied", report.late_deliveries)
    row("kod.mobi sends (sandbox record)", report.sandbox_sends)
    row(
        "  of unknown attempts",
        report.unknown_sandbox_sends,
        _mark(not report.unknown_sandbox_sends),
    )
    dup_reasons = Counter(d.reason for d in report.duplicates if d.explained)
    unexplained = report.unexplained_duplicates
    row("attempts sent more than once", len(report.duplicates),
        "all explained" if not unexplained else f"{len(unexplained)} unexplained")  # fmt: skip
    for reason, count in dup_reasons.most_common():
        row(f"  {reason}", count)
    row("  unexplained", len(unexplained))
    row("fallback order respected", f"{len(report.order_violations)} violations",
        _mark(not report.order_violations))  # fmt: skip
    row("statuses consistent with attempts", f"{len(report.consistency_violations)} violations",
        _mark(not report.consistency_violations))  # fmt: skip
    _outage_rows(report, row)
    _subscriber_rows(report, row)
    row("time to drain after the last fault",
        "-" if report.drain_after_last_fault_s is None
        else f"{report.drain_after_last_fault_s:.1f} s", _mark(report.drained))  # fmt: skip
    row("time to drain after the last send",
        "-" if report.drain_after_last_send_s is None
        else f"{report.drain_after_last_send_s:.1f} s")  # fmt: skip
    row("sending took", f"{report.sending_s:.1f} s at {p.send_rate:g}/s")
    row("total run time", f"{report.run_s:.1f} s")
    for fault in report.faults:
        inside = ""
        if fault.started_at is not None:
            inside = (f"; inside: {fault.callbacks_during} callbacks, {fault.intake_during}"
                      f" intake requests ({fault.intake_503_during} answered 503)")  # fmt: skip
        row(f"fault at t={fault.started_s:.1f}s", f"{fault.kind} {fault.target}"
            f" ({fault.ended_s - fault.started_s:.1f} s{inside})")  # fmt: skip
    row("restarts", _counts(report.restarts))
    row("unexpected exits (crashes)", len(report.crashes), _mark(not report.crashes))
    slots = report.slots
    if slots is None:
        row("kod.mobi call slots held when idle", "unknown",
            f"FAIL ({report.slots_error or 'not read'})")  # fmt: skip
    else:
        aged = (f" (+{slots.before_last_fault} taken before the last fault: they age out"
                f" after {SLOT_TTL_MS // 1000} s)") if slots.before_last_fault else ""  # fmt: skip
        row("kod.mobi call slots held when idle", f"{slots.leaked}{aged}", _mark(not slots.leaked))
    if report.broker is not None:
        b = report.broker
        row(
            "broker when drained (queued/delayed/unacked/dead)",
            f"{b.queued} / {b.delayed} / {b.unacked} / {b.dead_lettered}",
        )
    row(
        "dead consumer threads in live workers",
        ", ".join(report.dead_consumer_threads) or "0",
    )
    row("peak sandbox callback backlog", report.peak_callbacks_pending)
    sandbox_responses = report.sandbox_stats.get("responses", {})
    row("sandbox answers", _counts(sandbox_responses))
    row("sandbox callbacks", _counts(report.sandbox_stats.get("callbacks", {})))

    faults = Counter(f.kind for f in report.faults)
    postgres_kinds = ("postgres_restart", "postgres_restart_callbacks", "postgres_restart_intake")
    width = max(len(r[0]) for r in rows)
    vwidth = min(60, max(len(r[1]) for r in rows))
    lines = [
        f"kodmobi chaos run: {p.messages} messages, {p.worker_processes} worker processes,"
        f" {faults['worker_kill']} worker kills, {faults['redis_restart']} Redis restart(s),"
        f" {sum(faults[k] for k in postgres_kinds)} Postgres restart(s)"
        f" ({faults['postgres_restart_callbacks']} placed during callbacks,"
        f" {faults['postgres_restart_intake']} during intake; {p.placed_pg_downtime_s:g} s),"
        f" {faults['postgres_outage']} Postgres outage(s) of {p.pg_outage_s:g} s,"
        f" {faults['both_down']} Redis+Postgres outage(s) of {p.both_down_s:g} s",
        f"sandbox: {_pct(p.error_5xx_rate)} 5xx, {_pct(p.throttle_429_rate)} 429,"
        f" {_pct(p.slow_rate)} slow ({p.slow_ms} ms; read timeout {p.read_timeout_s:g} s),"
        f" {_pct(p.failure_callback_rate)} failure, {_pct(p.lost_callback_rate)} lost,"
        f" {_pct(p.duplicate_callback_rate)} duplicated, {_pct(p.out_of_order_rate)}"
        f" out-of-order callbacks, {p.callback_retries} callback retries;"
        f" delivery timeout {p.delivery_timeout_s:g} s",
        *(
            [
                f"notify on {_pct(p.notify_share)} of messages; webhook receiver:"
                f" {_pct(p.receiver_500_rate)} 500, {_pct(p.receiver_slow_rate)} slow"
                f" ({p.receiver_slow_ms} ms; webhook timeout {p.webhook_timeout_s:g} s),"
                f" down {p.receiver_down_s:g} s once"
            ]
            if report.subscribers
            else []
        ),
        "",
        f"{'figure'.ljust(width)}  {'value'.ljust(vwidth)}  check",
        f"{'-' * width}  {'-' * vwidth}  -----",
    ]
    lines += [f"{n.ljust(width)}  {v.ljust(vwidth)}  {c}".rstrip() for n, v, c in rows]
    details: list[str] = []
    stranded = report.broker.stranded if report.broker else {}
    for title, items in (
        ("lost", report.lost),
        ("not accepted", report.not_accepted),
        ("fallback order", report.order_violations),
        ("consistency", report.consistency_violations),
        ("crashes", report.crashes),
        ("unacked in live workers when drained", [f"{k}: {v}" for k, v in stranded.items()]),
        ("unexplained duplicates", [f"{d.attempt_id} ({d.message_id}): {d.reason}"
                                    for d in unexplained]),
        ("callbacks answered non-2xx", report.callback_answers.refused),
        ("callbacks answered non-503 while both were down",
         report.callback_answers.both_down_other),
        ("second codes caused by our outages", report.second_codes.ours),
        ("second codes after a 503 while both were down", report.second_codes.both_down),
        ("intake answered 5xx other than 503", report.intake_5xx),
        ("tracebacks in logs", report.logs.traceback_samples if report.logs else []),
        ("unmasked recipients in logs", report.logs.unmasked if report.logs else []),
        *(
            item
            for sub in report.subscribers
            for item in (
                (f"{sub.target}: events lost", sub.lost),
                (f"{sub.target}: final events missing", sub.missing_final),
                (f"{sub.target}: signatures refused", sub.unverified),
                (f"{sub.target}: id mismatches", sub.id_mismatches),
                (f"{sub.target}: order", sub.order_violations),
                (f"{sub.target}: timestamps behind an earlier event's", sub.timestamp_inversions),
            )
        ),
    ):  # fmt: skip
        if items:
            details.append(f"{title} ({len(items)}):")
            details += [f"  {item}" for item in items[:20]]
            if len(items) > 20:
                details.append(f"  … and {len(items) - 20} more")
    if report.duplicates:
        lines += [
            "",
            "A duplicate: one attempt (one callback URL) that kod.mobi accepted more than once.",
            f"'slow answer': the sandbox accepted the send but answered after {p.slow_ms} ms, past",
            f"our {p.read_timeout_s:g} s read timeout; a timeout is transient (DESIGN §7), so"
            " the worker sent",
            "the attempt again, and its retry came before the slow send's callback.",
            "'late answer under load': the same for an answer not drawn slow that still came late.",
        ]
    if details:
        lines += ["", *details]
    lines += ["", f"result: {'PASS' if report.ok else 'FAIL'}; logs in {report.workdir / 'logs'}"]
    return "\n".join(lines)
