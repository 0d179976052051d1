"""The chaos run: the Procfile's processes against real Postgres, Redis and a misbehaving
sandbox, while workers are SIGKILLed and the servers restarted; then the figures.

`scripts/chaos.py` (`make chaos`) runs the full version and
tests/integration/test_chaos_small.py a smaller one in `make test`. Every process is a
real OS process (its own session, so a kill takes its whole group), and Postgres and
Redis are always our own embedded servers in `workdir`: never the machine's, even when
DATABASE_URL / REDIS_URL are set.

The drain bound. After the last fault a message may still need, in the worst case:
Dramatiq's dead-worker heartbeat (20 s) before a killed worker's unacknowledged messages
go back on the queue, the sweeper's re-dispatch delay for an attempt whose hand-off was
lost (20 s), and then its whole chain: per channel up to 4 transient tries (each a read
timeout plus backoff of at most 2 s) and the delivery timeout, about 3 × 17 s for three
channels with the defaults below. That is about 90 s; the default bound is 120 s,
counted from the last fault or the last send, whichever came later.

The modules: `model` (what a run is given and finds), `cluster` (the processes, from
worker.processes, and the faults they suffer), `producers`, `faults` (the plan and its
thread), `outcome` (reading Postgres, the sandbox's record, Redis), `analysis` (the
checks), `sampler` (CPU and callback backlog each second), `run` (`run_chaos`), `report`
(the table).
"""

from tests.support.chaos.analysis import check_consistency, check_order, classify_duplicates
from tests.support.chaos.model import ChaosParams, ChaosReport
from tests.support.chaos.report import format_report
from tests.support.chaos.run import run_chaos

__all__ = [
    "ChaosParams",
    "ChaosReport",
    "check_consistency",
    "check_order",
    "classify_duplicates",
    "format_report",
    "run_chaos",
]
