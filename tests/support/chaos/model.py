"""What a chaos run is given (ChaosParams) and what it finds (ChaosReport)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from worker.rules import ATTEMPT_OPEN, MESSAGE_FINAL, PHONE_CHANNELS

FINAL = MESSAGE_FINAL
OPEN_ATTEMPT = frozenset(ATTEMPT_OPEN)
__all__ = ["FINAL", "OPEN_ATTEMPT", "PHONE_CHANNELS"]

Echo = Callable[[str], None]


@dataclass
class ChaosParams:
    """One chaos run. The defaults are the full run of `make chaos`."""

    messages: int = 1000
    #: share of the messages sent through `POST /v1/messages`; the rest are raw Dramatiq
    http_share: float = 0.5
    #: share of email recipients (their chain is `email` alone)
    email_share: float = 0.1
    #: share of phone recipients written as people write them (`8 (999) 100-01-23`,
    #: `+7 999 100 01 23`, `79991000123`), for the unmasked-recipient scan of the logs
    respelled_share: float = 0.2
    #: malformed raw Dramatiq messages among the rest: they must end `rejected`
    invalid_messages: int = 5
    worker_processes: int = 2
    worker_threads: int = 8
    worker_kills: int = 2
    redis_restarts: int = 1
    #: plain Postgres restarts, placed by the clock alone
    postgres_restarts: int = 0
    #: Postgres restarts placed while kod.mobi's callbacks are arriving (issue 12)
    callback_pg_restarts: int = 1
    #: Postgres restarts placed while producers' `POST /v1/messages` are in flight
    intake_pg_restarts: int = 1
    #: Postgres away long enough that the receiver spools callbacks in Redis
    pg_outages: int = 1
    #: Postgres and Redis away together: callbacks get 503, intake 503, enqueues fail
    both_down: int = 1
    #: a killed worker stays down this long before it is started again
    kill_downtime_s: float = 1.0
    #: a restarted Redis / Postgres stays down this long (0: stop and start at once)
    redis_downtime_s: float = 0.0
    postgres_downtime_s: float = 0.0
    #: Postgres stays down this long in a restart placed during callbacks or intake: about
    #: the 3 s restart of issue 12, within the receiver's wait (CALLBACK_WAIT_S)
    placed_pg_downtime_s: float = 3.0
    #: the long Postgres outage: past CALLBACK_WAIT_S, so callbacks go to the spool
    pg_outage_s: float = 12.0
    #: Postgres and Redis both away this long
    both_down_s: float = 5.0
    # The sandbox's misbehaviour.
    error_5xx_rate: float = 0.10
    throttle_429_rate: float = 0.05
    slow_rate: float = 0.05
    slow_ms: int = 3000
    failure_callback_rate: float = 0.20
    lost_callback_rate: float = 0.05
    duplicate_callback_rate: float = 0.10
    out_of_order_rate: float = 0.05
    callback_delay_ms: int = 50
    #: kod.mobi is assumed not to retry a callback: one answered non-2xx is lost
    callback_retries: int = 0
    seed: int = 1
    # The system's settings.
    delivery_timeout_s: float = 4.0
    code_ttl_s: float = 300.0
    #: below slow_ms, so that a slow answer times out at our client
    read_timeout_s: float = 2.0
    sweep_interval_s: float = 1.0
    # The producers.
    #: messages per second
    send_rate: float = 20.0
    producer_threads: int = 32
    #: a producer retrying through a fault gives up on one message after this long
    producer_give_up_s: float = 120.0
    #: every message must be final this long after the last fault (or the last send)
    drain_bound_s: float = 120.0
    #: an explicit schedule instead of the even spread, e.g. "postgres_restart@15,redis_restart@+1"
    #: (worker_kill, redis_restart, postgres_restart, postgres_restart_callbacks,
    #: postgres_restart_intake, postgres_outage, both_down; @s after the first send, @+s
    #: after the end of the fault before)
    fault_plan: str = ""
    # The producers' side of outcome events (issue 10).
    #: share of the messages that pass `notify` (a webhook, a Dramatiq reply, or both)
    notify_share: float = 0.3
    #: the chaos webhook receiver goes away (connections refused) once, this long
    receiver_down_s: float = 30.0
    #: when it goes away, s after the first send (negative: a fifth into the sending window)
    receiver_down_at_s: float = -1.0
    #: its answers: this share 500, this share slow (past WEBHOOK_TIMEOUT_S, then 200)
    receiver_500_rate: float = 0.10
    receiver_slow_rate: float = 0.05
    receiver_slow_ms: int = 2500
    #: our webhook client's timeout (WEBHOOK_TIMEOUT_S), below receiver_slow_ms
    webhook_timeout_s: float = 1.0


@dataclass
class FaultEvent:
    kind: str  # one of faults.FAULT_KINDS
    target: str
    started_s: float
    ended_s: float
    #: wall clock at the end, to compare with database timestamps
    ended_at: datetime
    #: wall clock at the start
    started_at: datetime | None = None
    #: callback tries kod.mobi began while this fault lasted (the sandbox's record)
    callbacks_during: int = 0
    #: producers' `POST /v1/messages` begun while it lasted, and how many of them got 503
    intake_during: int = 0
    intake_503_during: int = 0


@dataclass
class CallbackAnswers:
    """How our receiver answered kod.mobi's callback tries (the sandbox's record)."""

    tries: int = 0
    #: non-2xx answers (or connection errors) outside the both-down window: each a lost callback
    refused: list[str] = field(default_factory=list)
    #: 503s inside the window where Postgres and Redis were both away: expected
    both_down_503: int = 0
    #: other non-2xx answers inside that window (a 500 there is still a bug)
    both_down_other: list[str] = field(default_factory=list)


@dataclass
class SecondCodes:
    """Messages where kod.mobi told us a channel delivered, yet a later channel was tried:
    the user got the code twice."""

    #: kod.mobi's `delivered` came before that attempt's deadline, and we still moved on:
    #: caused by us (an outage that lost or held back the callback)
    ours: list[str] = field(default_factory=list)
    #: the `delivered` was answered 503 while Postgres and Redis were both away (kod.mobi
    #: does not retry); expected, see the README
    both_down: list[str] = field(default_factory=list)
    #: explained by kod.mobi's own slowness, by reason: its `delivered` came after the
    #: attempt's deadline; or it was for a send whose answer timed out at our client, so we
    #: sent again (a send kod.mobi accepted twice: we know the later one only); or the
    #: attempt ended on our client's timeouts before kod.mobi said anything
    explained: dict[str, int] = field(default_factory=dict)


@dataclass
class LogFindings:
    """What the scan of every process's log found."""

    files: int = 0
    lines: int = 0
    #: process -> traceback count (a `Traceback` line or a JSON `exception` holding one)
    tracebacks: dict[str, int] = field(default_factory=dict)
    #: `process: what` of every producer recipient (any spelling) or email left unmasked
    unmasked: list[str] = field(default_factory=list)
    #: a sample line per traceback, for the details
    traceback_samples: list[str] = field(default_factory=list)

    @property
    def traceback_count(self) -> int:
        return sum(self.tracebacks.values())


@dataclass
class Duplicate:
    """An attempt that kod.mobi (the sandbox) accepted more than once."""

    attempt_id: str
    message_id: str | None
    sends: list[dict[str, Any]]
    reason: str
    explained: bool


@dataclass
class Subscribers:
    """What one kind of subscriber (webhooks or a Dramatiq reply queue) heard, against the
    events the outbox holds for the messages that subscribed."""

    target: str  # webhook | dramatiq
    #: messages that subscribed, and the events of theirs they subscribed to (the outbox's)
    messages: int = 0
    expected: int = 0
    #: distinct events received (verified, for webhooks), and every try seen
    received: int = 0
    receipts: int = 0
    #: tries of an event seen more than once (a 500, a slow answer, a redelivery)
    repeats: int = 0
    #: final messages whose final event never arrived
    missing_final: list[str] = field(default_factory=list)
    #: subscribed events (outbox rows) never received
    lost: list[str] = field(default_factory=list)
    #: tries whose signature `standardwebhooks` refused
    unverified: list[str] = field(default_factory=list)
    #: tries whose webhook-id was not the event's id, or an event seen under two ids
    id_mismatches: list[str] = field(default_factory=list)
    #: an event received before an earlier one of its message was taken (answered 2xx)
    order_violations: list[str] = field(default_factory=list)
    #: a later event (outbox order) timestamped before an earlier one of its message: a
    #: transition whose time was taken before it waited for the message's lock (informational)
    timestamp_inversions: list[str] = field(default_factory=list)
    #: receiver answers (status or "slow", "refused" for tries in the down window)
    answers: dict[str, int] = field(default_factory=dict)
    #: what our dispatcher's tries met, from its own record ("ok", "HTTP 500", "timeout", …)
    tries: dict[str, int] = field(default_factory=dict)
    #: deliveries still pending or dead in the outbox at the end
    pending: int = 0
    dead: int = 0
    drained: bool = False
    drain_after_last_fault_s: float | None = None

    @property
    def ok(self) -> bool:
        return (
            self.drained
            and not self.missing_final
            and not self.lost
            and not self.unverified
            and not self.id_mismatches
            and not self.order_violations
            and self.pending == 0
            and self.dead == 0
            and self.received == self.expected
        )


@dataclass
class ChaosReport:
    params: ChaosParams
    workdir: Path
    sent_http: int = 0
    sent_dramatiq: int = 0
    accepted_http: int = 0
    accepted_dramatiq: int = 0
    #: producer sends that never got an acceptance (refused or gave up), with why
    not_accepted: list[str] = field(default_factory=list)
    http_retries: int = 0
    enqueue_retries: int = 0
    final: int = 0
    #: accepted but missing or not final at the bound
    lost: list[str] = field(default_factory=list)
    expected_rejected: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    attempt_status_counts: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    messages_in_database: int = 0
    sandbox_sends: int = 0
    sandbox_stats: dict[str, Any] = field(default_factory=dict)
    sandbox_outcomes: dict[str, int] = field(default_factory=dict)
    unknown_sandbox_sends: int = 0
    duplicates: list[Duplicate] = field(default_factory=list)
    order_violations: list[str] = field(default_factory=list)
    consistency_violations: list[str] = field(default_factory=list)
    late_deliveries: int = 0
    faults: list[FaultEvent] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    #: processes that exited without being killed by us (then restarted), with when
    crashes: list[str] = field(default_factory=list)
    sending_s: float = 0.0
    last_fault_s: float = 0.0
    drained: bool = False
    drain_after_last_fault_s: float | None = None
    drain_after_last_send_s: float | None = None
    run_s: float = 0.0
    #: kod.mobi call slots still taken once every message is final; None: could not be read
    slots: SlotsHeld | None = None
    #: why the slots could not be read
    slots_error: str = ""
    broker: BrokerLeftovers | None = None
    #: Dramatiq consumer threads that died inside a live worker process (from its log)
    dead_consumer_threads: list[str] = field(default_factory=list)
    #: most callbacks the sandbox had waiting or in flight at once (sampled each second)
    peak_callbacks_pending: int = 0
    callback_answers: CallbackAnswers = field(default_factory=CallbackAnswers)
    second_codes: SecondCodes = field(default_factory=SecondCodes)
    #: None until the logs were scanned (a report never scanned fails)
    logs: LogFindings | None = None
    #: producers' `POST /v1/messages` answered 503, and how many of those lacked Retry-After
    intake_503: int = 0
    intake_503_without_retry_after: int = 0
    #: producers' `POST /v1/messages` answered 5xx other than 503: never expected (issue 12)
    intake_5xx: list[str] = field(default_factory=list)
    #: outcome events (issue 10), by target; empty when no message passed `notify`
    subscribers: list[Subscribers] = field(default_factory=list)
    #: events in the outbox never given a feed position by the end
    unsequenced_events: int = 0

    @property
    def sent(self) -> int:
        return self.sent_http + self.sent_dramatiq

    @property
    def accepted(self) -> int:
        return self.accepted_http + self.accepted_dramatiq

    @property
    def unexplained_duplicates(self) -> list[Duplicate]:
        return [d for d in self.duplicates if not d.explained]

    @property
    def outage_duplicates(self) -> list[str]:
        """Codes sent twice because of us: an attempt kod.mobi accepted twice with no timeout
        of kod.mobi's to explain it, or a later channel tried after a `delivered` in time."""
        return [
            f"{d.attempt_id} ({d.message_id}): {d.reason}" for d in self.unexplained_duplicates
        ] + self.second_codes.ours

    @property
    def ok(self) -> bool:
        """Nothing lost, everything final in time, order and consistency hold, no process
        crashed, no kod.mobi call slot is held once idle (an unreadable count fails); and
        through our outages (issue 12): no callback answered non-2xx outside the both-down
        window (nor anything but 503 inside it), no code sent twice because of us, intake
        never 5xx but a 503 with Retry-After, and the logs scanned: no traceback, no
        recipient unmasked; and (issue 10) every subscriber heard every event it subscribed
        to, verified, under one webhook-id, in order, none pending or dead at the end."""
        logs = self.logs
        answers = self.callback_answers
        return (
            not answers.refused
            and not answers.both_down_other
            and not self.outage_duplicates
            and not self.intake_5xx
            and not self.intake_503_without_retry_after
            and logs is not None
            and logs.traceback_count == 0
            and not logs.unmasked
            and not self.lost
            and self.drained
            and self.final == self.accepted
            and not self.not_accepted
            and not self.order_violations
            and not self.consistency_violations
            and not self.crashes
            and self.slots is not None
            and self.slots.leaked == 0
            and all(s.ok for s in self.subscribers)
            and self.unsequenced_events == 0
        )


@dataclass
class BrokerLeftovers:
    """What the broker still holds once every message is final (or the bound passed)."""

    queued: int = 0
    delayed: int = 0
    #: fetched by a worker that is still alive and never acknowledged: Dramatiq gives these
    #: back only when that worker dies (or stops)
    unacked: int = 0
    dead_lettered: int = 0
    #: Dramatiq message id -> where it sits, for the unacked ones
    stranded: dict[str, str] = field(default_factory=dict)


@dataclass
class SlotsHeld:
    """The kod.mobi call slots (worker.call_slots.KodMobiSlots) still taken in Redis once every
    message is final. Nothing runs then, so none should be; but a slot taken by a worker we
    SIGKILLed mid-call, or one whose release met Redis down, stays until it ages out after
    SLOT_TTL_MS: that is by design, and only possible for a slot taken before the last fault."""

    #: taken after the last fault ended and never given back: a leak
    leaked: int = 0
    #: taken before the last fault ended: may be a killed call's; ages out
    before_last_fault: int = 0
