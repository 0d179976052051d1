"""The worker's metrics mode, set before anything imports prometheus_client (issue 11).

`dramatiq worker.actors` runs several processes per host (2 x 16 threads in the
Procfile): one port each would collide, and a scrape would see one process at a time.
So the worker runs prometheus_client's multiprocess mode: every process writes its
counters to files in one directory, and Dramatiq's Prometheus middleware serves the
sum of all of them (its `dramatiq_*` series and our `kodmobi_*`) on METRICS_PORT from a
process of its own. prometheus_client picks its value storage when first imported, so
this runs first in worker.actors, before any import that reaches worker.metrics."""

from __future__ import annotations

import os
import sys
import tempfile

#: Where the worker's processes keep their metrics when PROMETHEUS_MULTIPROC_DIR is unset.
DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "kodmobi-worker-metrics")
#: Dramatiq's exposition port when METRICS_PORT is unset (its own default).
DEFAULT_PORT = "9191"
#: Dramatiq's middleware reads these lower-case variables only.
DRAMATIQ_DIR = "dramatiq_prom_db"
DRAMATIQ_PORT = "dramatiq_prom_port"


def prepare_worker() -> str:
    """Point prometheus_client and Dramatiq's middleware at one directory and METRICS_PORT;
    returns the directory. Files of earlier processes are kept: counters summed over them
    never go backwards (a deploy starts on a fresh directory; `kodmobi dev` clears it)."""
    env = os.environ
    directory = env.get("PROMETHEUS_MULTIPROC_DIR") or env.get(DRAMATIQ_DIR) or DEFAULT_DIR
    os.makedirs(directory, exist_ok=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = directory
    env[DRAMATIQ_DIR] = directory
    env[DRAMATIQ_PORT] = env.get("METRICS_PORT") or env.get(DRAMATIQ_PORT) or DEFAULT_PORT
    return directory


#: The Procfile's worker runs this in a process of its own (`--fork-function`).
FORK_FUNCTION = "worker.metrics_setup:serve_worker_metrics"


def serve_worker_metrics() -> int:
    """The worker host's one metrics endpoint: every worker process's counters (theirs
    and Dramatiq's), summed from the multiprocess directory, on METRICS_PORT.

    Ours rather than the middleware's own exposition fork: that one reads its port and
    directory from `dramatiq_prom_*` variables when Dramatiq's main process imports it,
    before anything of ours runs, so METRICS_PORT could not reach it."""
    directory = prepare_worker()
    port = int(os.environ[DRAMATIQ_PORT])
    host = os.environ.get("METRICS_HOST", "0.0.0.0")  # noqa: S104 - Prometheus scrapes it

    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    try:
        _server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        # Another worker on this host already serves the directory, or the port is
        # someone else's: the worker runs on, without this endpoint.
        print(f"kodmobi worker: metrics not served on {host}:{port}: {exc}", file=sys.stderr)
        return 0
    thread.join()
    return 0
