"""`run_chaos`: start everything, send, break things, drain, and measure."""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

import redis

from tests.support.chaos.analysis import analyse
from tests.support.chaos.cluster import Cluster
from tests.support.chaos.faults import plan_faults, run_faults
from tests.support.chaos.model import ChaosParams, ChaosReport, Echo
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
    try:
        say(f"chaos: starting Postgres, Redis, sandbox, web, {params.worker_processes} workers,"
            f" clock in {workdir}")  # fmt: skip
        cluster.start()
        producers = Producers(cluster, params, secrets.token_hex(4))
        sends = plan_sends(params)
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
        say(f"chaos: sending {len(sends)} messages at {params.send_rate:g}/s")
        producers.run(sends, t0)
        report.sending_s = time.monotonic() - t0
        fault_thread.join()
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
        if producers is not None:
            producers.close()
        cluster.stop()
    report.run_s = time.monotonic() - started
    return report
