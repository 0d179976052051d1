"""The fault plan (spread over the sending window, or explicit) and the thread that carries
it out; a fault may wait for its moment (callbacks arriving, intake busy) before it starts."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from tests.support.chaos.cluster import Cluster
from tests.support.chaos.model import ChaosParams, Echo, FaultEvent

FAULT_KINDS = (
    "worker_kill",
    "redis_restart",
    "postgres_restart",
    "postgres_restart_callbacks",
    "postgres_restart_intake",
    "postgres_outage",
    "both_down",
)
#: A placed fault waits at most this long for its moment, then starts anyway (the report
#: shows how many callbacks and intake requests its window really saw).
PLACEMENT_WAIT_S = 10.0


@dataclass(frozen=True)
class PlannedFault:
    at_s: float
    kind: str
    index: int
    #: `at_s` counts from the end of the fault before, not from the first send
    after_previous: bool = False


def _counts(params: ChaosParams) -> dict[str, int]:
    return {
        "worker_kill": params.worker_kills,
        "redis_restart": params.redis_restarts,
        "postgres_restart": params.postgres_restarts,
        "postgres_restart_callbacks": params.callback_pg_restarts,
        "postgres_restart_intake": params.intake_pg_restarts,
        "postgres_outage": params.pg_outages,
        "both_down": params.both_down,
    }


def expected_length_s(params: ChaosParams, kind: str) -> float:
    """About how long a fault lasts, servers' stop and start included."""
    return {
        "worker_kill": params.kill_downtime_s + 0.5,
        "redis_restart": params.redis_downtime_s + 0.5,
        "postgres_restart": params.postgres_downtime_s + 1.5,
        "postgres_restart_callbacks": params.placed_pg_downtime_s + 1.5,
        "postgres_restart_intake": params.placed_pg_downtime_s + 1.5,
        "postgres_outage": params.pg_outage_s + 1.5,
        "both_down": params.both_down_s + 2.0,
    }[kind]


def plan_faults(params: ChaosParams) -> list[PlannedFault]:
    """Kinds interleaved so that no two faults of one kind are next to each other, with
    even gaps between them over the sending window (each counted from the end of the
    fault before, so that long outages do not pile up); or as `fault_plan` says."""
    if params.fault_plan:
        return _explicit_plan(params.fault_plan)
    queues = _counts(params)
    kinds: list[str] = []
    done: Counter[str] = Counter()
    while len(kinds) < sum(queues.values()):
        for kind, count in queues.items():
            if done[kind] < count:
                kinds.append(kind)
                done[kind] += 1
    if not kinds:
        return []
    window = params.messages / params.send_rate
    busy = sum(expected_length_s(params, kind) for kind in kinds)
    gap = max(1.0, (window - busy) / (len(kinds) + 1))
    plan = []
    seen: Counter[str] = Counter()
    for kind in kinds:
        plan.append(PlannedFault(gap, kind, seen[kind], after_previous=True))
        seen[kind] += 1
    return plan


def _explicit_plan(text: str) -> list[PlannedFault]:
    """`kind@seconds` after the first send, or `kind@+seconds` after the fault before."""
    plan = []
    seen: Counter[str] = Counter()
    for item in text.split(","):
        kind, _, at = item.strip().partition("@")
        if kind not in FAULT_KINDS or not at:
            raise ValueError(f"fault_plan: {item!r} is not one of {FAULT_KINDS} @ seconds")
        relative = at.startswith("+")
        plan.append(PlannedFault(float(at.lstrip("+")), kind, seen[kind], relative))
        seen[kind] += 1
    return plan


def _wait_until(condition: Callable[[], bool], stop: threading.Event) -> None:
    deadline = time.monotonic() + PLACEMENT_WAIT_S
    while time.monotonic() < deadline and not stop.is_set():
        if condition():
            return
        time.sleep(0.05)


def run_faults(
    cluster: Cluster,
    plan: list[PlannedFault],
    t0: float,
    events: list[FaultEvent],
    stop: threading.Event,
    echo: Echo,
    intake_busy: Callable[[], bool] = lambda: True,
) -> None:
    p = cluster.params
    placed = p.placed_pg_downtime_s
    actions: dict[str, Callable[[int], str]] = {
        "worker_kill": cluster.kill_worker,
        "redis_restart": lambda _i: cluster.restart_redis(),
        "postgres_restart": lambda _i: cluster.restart_postgres(),
        "postgres_restart_callbacks": lambda _i: cluster.restart_postgres(placed),
        "postgres_restart_intake": lambda _i: cluster.restart_postgres(placed),
        "postgres_outage": lambda _i: cluster.restart_postgres(p.pg_outage_s),
        "both_down": lambda _i: cluster.take_both_down(p.both_down_s),
    }
    moments: dict[str, Callable[[], bool]] = {
        "postgres_restart_callbacks": cluster.callbacks_arriving,
        "postgres_restart_intake": intake_busy,
    }
    previous_end = 0.0
    for fault in plan:
        kind = fault.kind
        at = fault.at_s + (previous_end if fault.after_previous else 0.0)
        if stop.wait(max(0.0, t0 + at - time.monotonic())):
            return
        if kind in moments:
            _wait_until(moments[kind], stop)
        started = time.monotonic() - t0
        started_at = datetime.now(UTC)
        echo(f"chaos: t={started:.1f}s {kind} …")
        target = actions[kind](fault.index)
        ended = previous_end = time.monotonic() - t0
        events.append(
            FaultEvent(kind, target, started, ended, datetime.now(UTC), started_at=started_at)
        )
        echo(f"chaos: t={ended:.1f}s {kind} {target} done ({ended - started:.1f}s)")
