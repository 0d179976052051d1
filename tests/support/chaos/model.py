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
    #: malformed raw Dramatiq messages among the rest: they must end `rejected`
    invalid_messages: int = 5
    worker_processes: int = 2
    worker_threads: int = 8
    worker_kills: int = 2
    redis_restarts: int = 1
    postgres_restarts: int = 1
    #: a killed worker stays down this long before it is started again
    kill_downtime_s: float = 1.0
    #: a restarted Redis / Postgres stays down this long (0: stop and start at once)
    redis_downtime_s: float = 0.0
    postgres_downtime_s: float = 0.0
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
    #: (worker_kill, redis_restart, postgres_restart; @s after the first send, @+s after the
    #: end of the fault before)
    fault_plan: str = ""


@dataclass
class FaultEvent:
    kind: str  # worker_kill | redis_restart | postgres_restart
    target: str
    started_s: float
    ended_s: float
    #: wall clock at the end, to compare with database timestamps
    ended_at: datetime


@dataclass
class Duplicate:
    """An attempt that kod.mobi (the sandbox) accepted more than once."""

    attempt_id: str
    message_id: str | None
    sends: list[dict[str, Any]]
    reason: str
    explained: bool


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
    def ok(self) -> bool:
        """Nothing lost, everything final in time, order and consistency hold, no process
        crashed, and no kod.mobi call slot is held once idle (an unreadable count fails)."""
        return (
            not self.lost
            and self.drained
            and self.final == self.accepted
            and not self.not_accepted
            and not self.order_violations
            and not self.consistency_violations
            and not self.crashes
            and self.slots is not None
            and self.slots.leaked == 0
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
