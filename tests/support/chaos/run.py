"""`run_chaos`: start everything, send, break things, drain, and measure."""

from __future__ import annotations

import secrets
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import redis

from tests.support.chaos.analysis import analyse
from tests.support.chaos.cluster import Cluster
from tests.support.chaos.faults import plan_faults, run_faults
from tests.support.chaos.hooks import HookReceiver, ReplyConsumer, new_secret
from tests.support.chaos.model import ChaosParams, ChaosReport, Echo, FaultEvent, Subscribers
from tests.support.chaos.notify import (
    check_subscriber,
    read_outbox,
    replies_as_receipts,
    subscriptions,
    wait_events,
)
from tests.support.chaos.outcome import collect, read_broker, read_slots, save, wait_final
from tests.support.chaos.producers import Producers, plan_sends
from tests.support.chaos.sampler import Sampler


def run_chaos(params: ChaosParams, workdir: Path, echo: Echo | None = None) -> ChaosReport:
    """Start everything in `workdir`, send, break things, drain, and measure."""
    say: Echo = echo or (lambda _line: None)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    report = ChaosReport(params=params, workdir=workdir)
    started = time.monotonic()
    cluster = Cluster(params, workdir, say)
    producers: Producers | None = None
    stop_faults = threading.Event()
    fault_thread: threading.Thread | None = None
    sampler: Sampler | None = None
    hooks: HookReceiver | None = None
    replies: ReplyConsumer | None = None
    hook_thread: threading.Thread | None = None
    try:
        if params.notify_share > 0:
            secret = new_secret()
            hooks = HookReceiver(params, secret)
            hooks.start()
            cluster.extra_env = {"WEBHOOK_SECRET": secret, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
        say(f"chaos: starting Postgres, Redis, sandbox, web, {params.worker_processes} workers,"
            f" clock in {workdir}")  # fmt: skip
        cluster.start()
        if hooks is not None:
            replies = ReplyConsumer(cluster.redis_url, cluster.namespace)
            replies.start()
        producers = Producers(cluster, params, secrets.token_hex(4))
        sends = plan_sends(params, hooks.url if hooks is not None else None)
        report.sent_http = sum(s.via == "http" for s in sends)
        report.sent_dramatiq = len(sends) - report.sent_http
        t0 = time.monotonic()
        cluster.t0 = t0
        sampler = Sampler(cluster, workdir / "samples.jsonl")
        sampler.start()
        fault_thread = threading.Thread(
            target=run_faults,
            args=(cluster, plan_faults(params), t0, report.faults, stop_faults, say),
            kwargs={"intake_busy": producers.intake_busy},
            name="faults",
            daemon=True,
        )
        fault_thread.start()
        if hooks is not None and params.receiver_down_s > 0:
            hook_thread = threading.Thread(
                target=_receiver_outage,
                args=(hooks, params, t0, report.faults, stop_faults, say),
                name="receiver-outage",
                daemon=True,
            )
            hook_thread.start()
        say(f"chaos: sending {len(sends)} messages at {params.send_rate:g}/s")
        producers.run(sends, t0)
        report.sending_s = time.monotonic() - t0
        fault_thread.join()
        if hook_thread is not None:
            hook_thread.join()
        say(f"chaos: all sent in {report.sending_s:.1f}s; waiting for every message to be final")
        report.last_fault_s = max((f.ended_s for f in report.faults), default=0.0)
        report.accepted_http = sum(v[0] == "http" for v in producers.accepted.values())
        report.accepted_dramatiq = len(producers.accepted) - report.accepted_http
        report.not_accepted = list(producers.not_accepted)
        report.http_retries = producers.http_retries
        report.enqueue_retries = producers.enqueue_retries
        start_bound = t0 + max(report.last_fault_s, report.sending_s)
        drained, when = wait_final(
            cluster.database_url,
            producers.accepted.keys(),
            start_bound + params.drain_bound_s,
            say,
        )
        report.drained = drained
        if drained:
            report.drain_after_last_fault_s = max(0.0, when - t0 - report.last_fault_s)
            report.drain_after_last_send_s = max(0.0, when - t0 - report.sending_s)
        if hooks is not None and replies is not None:
            _wait_and_check_events(report, cluster, producers, hooks, replies, start_bound, say)
        last_fault_at = max((f.ended_at for f in report.faults), default=None)
        try:
            report.slots = read_slots(cluster.redis_url, cluster.namespace, last_fault_at)
        except redis.RedisError as exc:
            report.slots_error = f"{type(exc).__name__}: {exc}"
            say(f"chaos: cannot read the kod.mobi call slots: {report.slots_error}")
        report.broker = read_broker(cluster.redis_url, cluster.namespace)
        # Stragglers (a duplicated callback, a stale "sent") land before we read.
        time.sleep(1.0)
        outcome = collect(cluster, list(producers.accepted))
        save(workdir / "outcome.json", outcome)
        analyse(report, outcome, producers, cluster.log_dir)
        report.crashes = list(cluster.crashes)
        report.restarts = cluster.restarts()
    finally:
        if sampler is not None:
            sampler.stop()
            report.peak_callbacks_pending = sampler.peak_callbacks_pending
        stop_faults.set()
        if fault_thread is not None:
            fault_thread.join(timeout=60)
        if hook_thread is not None:
            hook_thread.join(timeout=60)
        if replies is not None:
            replies.stop()
        if hooks is not None:
            hooks.stop()
        if producers is not None:
            producers.close()
        cluster.stop()
    report.run_s = time.monotonic() - started
    return report


def _receiver_outage(
    hooks: HookReceiver,
    params: ChaosParams,
    t0: float,
    faults: list[FaultEvent],
    stop: threading.Event,
    say: Echo,
) -> None:
    """The webhook receiver away once, mid-run (a fault of its own, beside the plan)."""
    at = params.receiver_down_at_s
    if at < 0:
        at = params.messages / params.send_rate / 5
    if stop.wait(max(0.0, t0 + at - time.monotonic())):
        return
    started = time.monotonic() - t0
    started_at = datetime.now(UTC)
    say(f"chaos: t={started:.1f}s webhook receiver down for {params.receiver_down_s:g}s …")
    target = hooks.take_down(params.receiver_down_s)
    ended = time.monotonic() - t0
    ended_at = datetime.now(UTC)
    faults.append(
        FaultEvent("receiver_down", target, started, ended, ended_at, started_at=started_at)
    )
    say(f"chaos: t={ended:.1f}s webhook receiver back")


def _wait_and_check_events(
    report: ChaosReport,
    cluster: Cluster,
    producers: Producers,
    hooks: HookReceiver,
    replies: ReplyConsumer,
    start_bound: float,
    say: Echo,
) -> None:
    """Wait (within the same drain bound) until every subscribed event is out and the reply
    queue is consumed, then check each subscriber against the outbox."""
    params = report.params
    notify_of = dict(producers.notify_of)
    keys = list(notify_of)

    def heard() -> int:
        with replies.lock:
            return len({str(e.get("id")) for _at, e in replies.events})

    say(f"chaos: waiting for the events of {len(keys)} subscribed messages")
    drained, when = wait_events(
        cluster.database_url, keys, heard, start_bound + params.drain_bound_s, say
    )
    # A last duplicate (a redelivered reply, a slow try) lands before we read.
    time.sleep(1.0)
    outbox = read_outbox(cluster.database_url, keys)
    report.unsequenced_events = outbox.unsequenced
    with hooks.lock:
        hook_receipts = list(hooks.receipts)
    with replies.lock:
        reply_receipts = replies_as_receipts(list(replies.events))
    for target, receipts in (("webhook", hook_receipts), ("dramatiq", reply_receipts)):
        found = check_subscriber(
            target, subscriptions(notify_of, target), outbox.events, outbox.status, receipts
        )
        states = outbox.states.get(target, {})
        found.pending = states.get("pending", 0)
        found.dead = states.get("dead", 0)
        found.tries = outbox.tries.get(target, {})
        found.drained = drained
        if drained:
            found.drain_after_last_fault_s = max(0.0, when - cluster.t0 - report.last_fault_s)
        report.subscribers.append(found)
    if not keys:
        report.subscribers.append(Subscribers(target="any", drained=False))
