"""The fault plan (even spread or explicit) and the thread that carries it out."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from tests.support.chaos.cluster import Cluster
from tests.support.chaos.model import ChaosParams, Echo, FaultEvent


@dataclass(frozen=True)
class PlannedFault:
    at_s: float
    kind: str
    index: int
    #: `at_s` counts from the end of the fault before, not from the first send
    after_previous: bool = False


def plan_faults(params: ChaosParams) -> list[PlannedFault]:
    """(seconds after the first send, kind, index): spread evenly over the sending window,
    kinds interleaved so that no two faults of one kind are next to each other; or as
    `fault_plan` says."""
    if params.fault_plan:
        return _explicit_plan(params.fault_plan)
    queues = {
        "worker_kill": params.worker_kills,
        "redis_restart": params.redis_restarts,
        "postgres_restart": params.postgres_restarts,
    }
    kinds: list[str] = []
    done: Counter[str] = Counter()
    while len(kinds) < sum(queues.values()):
        for kind, count in queues.items():
            if done[kind] < count:
                kinds.append(kind)
                done[kind] += 1
    window = params.messages / params.send_rate
    plan = []
    seen: Counter[str] = Counter()
    for n, kind in enumerate(kinds):
        plan.append(PlannedFault(window * (n + 1) / (len(kinds) + 1), kind, seen[kind]))
        seen[kind] += 1
    return plan


FAULT_KINDS = ("worker_kill", "redis_restart", "postgres_restart")


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


def run_faults(
    cluster: Cluster,
    plan: list[PlannedFault],
    t0: float,
    events: list[FaultEvent],
    stop: threading.Event,
    echo: Echo,
) -> None:
    actions: dict[str, Callable[[int], str]] = {
        "worker_kill": cluster.kill_worker,
        "redis_restart": lambda _i: cluster.restart_redis(),
        "postgres_restart": lambda _i: cluster.restart_postgres(),
    }
    previous_end = 0.0
    for fault in plan:
        kind = fault.kind
        at = fault.at_s + (previous_end if fault.after_previous else 0.0)
        if stop.wait(max(0.0, t0 + at - time.monotonic())):
            return
        started = time.monotonic() - t0
        echo(f"chaos: t={started:.1f}s {kind} …")
        target = actions[kind](fault.index)
        ended = previous_end = time.monotonic() - t0
        events.append(FaultEvent(kind, target, started, ended, datetime.now(UTC)))
        echo(f"chaos: t={ended:.1f}s {kind} {target} done ({ended - started:.1f}s)")
