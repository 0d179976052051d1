"""`make chaos`: the full fault-injection run; prints a table of figures.

Exits 0 only if nothing was lost, every message reached a final status within the
drain bound, fallback order held and statuses agree with attempts; and through our own
outages (issue 12) no callback was answered non-2xx outside the Postgres+Redis window, no
code was sent twice because of us, and no log holds a traceback or an unmasked recipient.
The workdir (logs of every process, the embedded servers' data) is kept for whoever needs
to look closer.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.chaos import ChaosParams, format_report, run_chaos  # noqa: E402

HELP = {
    "messages": "codes to send",
    "http_share": "share sent through POST /v1/messages; the rest as raw Dramatiq messages",
    "worker_processes": "worker processes (separate process groups)",
    "worker_kills": "SIGKILLs of a worker's process group (then restarted)",
    "redis_restarts": "Redis restarts",
    "postgres_restarts": "Postgres restarts placed by the clock alone",
    "callback_pg_restarts": "Postgres restarts placed while callbacks are arriving",
    "intake_pg_restarts": "Postgres restarts placed while POST /v1/messages are in flight",
    "placed_pg_downtime_s": "seconds Postgres stays down in a placed restart",
    "pg_outages": "long Postgres outages (callbacks go to the Redis spool)",
    "pg_outage_s": "seconds a long Postgres outage lasts",
    "both_down": "outages of Postgres and Redis together (callbacks answered 503)",
    "both_down_s": "seconds Postgres and Redis stay down together",
    "callback_retries": "tries kod.mobi (the sandbox) repeats a callback answered non-2xx",
    "respelled_share": "share of phones written as people write them, for the log scan",
    "send_rate": "messages per second",
    "drain_bound_s": "seconds after the last fault (or send) by which all must be final",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = ChaosParams()
    for f in fields(ChaosParams):
        default = getattr(defaults, f.name)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=type(default),
            default=default,
            help=f"{HELP.get(f.name, f.name.replace('_', ' '))} (default: {default})",
        )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / ".kodmobi" / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}",
        help="where the servers' data and every process's log go",
    )
    args = parser.parse_args(argv)
    params = ChaosParams(**{f.name: getattr(args, f.name) for f in fields(ChaosParams)})
    report = run_chaos(params, args.workdir, echo=lambda line: print(line, file=sys.stderr))
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
