"""`make bench`: plan the figures, run each --runs times, print the table."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
import psutil

from scripts import benchkit
from scripts.benchkit.callbacks import run_callbacks
from scripts.benchkit.common import (
    FIGURES,
    LATENCY_RATE,
    PROCESSES,
    ROOT,
    SLOW_KODMOBI_MS,
    THREADS,
    WORKER_POLL_MS,
    log,
)
from scripts.benchkit.infra import Infra
from scripts.benchkit.latency import run_latency
from scripts.benchkit.measure import wait_for_quiet
from scripts.benchkit.profile import print_profiles, summarize_profile
from scripts.benchkit.report import build_rows, headline, print_details, print_table
from scripts.benchkit.throughput import run_limit, run_throughput


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dramatiq": dramatiq.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _count_lines(directory: Path, pattern: str, needle: str) -> int:
    count = 0
    for path in directory.glob(pattern):
        with contextlib.suppress(OSError), open(path, errors="replace") as fh:
            count += sum(1 for line in fh if needle in line)
    return count


def code_revision() -> str:
    """The commit under test, and whether worker/ has uncommitted changes on top of it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "worker", "benchmarks"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "?"
    return head + (" (+ uncommitted changes in worker/ or benchmarks/)" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(benchkit.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median over runs)")
    parser.add_argument("--messages", type=int, default=None, help="codes per throughput run")
    parser.add_argument("--limit-messages", type=int, default=None, help="no-op messages")
    parser.add_argument("--callbacks", type=int, default=None, help="callbacks per run")
    parser.add_argument("--concurrency", type=int, default=64, help="callback connections")
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument("--quick", action="store_true", help="smaller numbers: a smoke run")
    parser.add_argument(
        "--only", action="append", choices=FIGURES, help="run only this figure (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other processes to go idle (0: don't)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the runs, one extra e2e run with py-spy on the workers and one callbacks "
        "run with py-spy on web (not counted in the table); folded stacks go to DIR",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    n_e2e = args.messages or (1000 if quick else 5000)
    n_limit = args.limit_messages or (4000 if quick else 20000)
    n_callbacks = args.callbacks or (1000 if quick else 5000)
    latency_s = args.latency_seconds or (5.0 if quick else 15.0)
    wanted = set(args.only or FIGURES)
    if "memory" in wanted:
        # Memory is sampled during these runs.
        wanted |= {"e2e", "latency-bound"}
    if "e2e" in wanted and args.only and "limit" not in wanted:
        log("note: the e2e/limit ratio needs the limit figure too (add --only limit)")

    workdir = Path(tempfile.mkdtemp(prefix="kodmobi-bench-"))
    infra = Infra(workdir)
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    profiles: dict[str, Any] = {}
    started = time.time()
    info = machine()
    info["code"] = code_revision()
    try:
        infra.start()
        info.update(infra.versions())
        plan: list[tuple[str, Callable[[str], dict[str, Any]]]] = []
        if "limit" in wanted:
            plan.append(("limit", lambda label: run_limit(infra, n_limit, label)))
        if "e2e" in wanted:
            plan.append(("e2e", lambda label: run_throughput(infra, n_e2e, 0, label)))
        if "e2e-notify" in wanted:
            plan.append(
                ("e2e-notify", lambda label: run_throughput(infra, n_e2e, 0, label, notify=True))
            )
        if "latency-bound" in wanted:
            plan.append(
                (
                    "latency-bound",
                    lambda label: run_throughput(infra, n_e2e, SLOW_KODMOBI_MS, label),
                )
            )
        if "latency" in wanted:
            plan.append(("latency", lambda label: run_latency(infra, latency_s, label)))
        if "callbacks" in wanted:
            plan.append(
                (
                    "callbacks",
                    lambda label: run_callbacks(infra, n_callbacks, args.concurrency, label),
                )
            )
        for figure, run in plan:
            for i in range(1, args.runs + 1):
                if args.quiet_wait > 0:
                    wait_for_quiet(args.quiet_wait)
                log(f"{figure} run {i}/{args.runs}")
                result = run(f"{figure}-{i}")
                results[figure].append(result)
                log(f"{figure} run {i}: {headline(figure, result)}")
        if "memory" in wanted:
            results["memory"] = []
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            log("profiling: e2e with py-spy on the worker processes")
            worker_out = args.profile / "worker-e2e.folded"
            run_throughput(infra, n_e2e, 0, "profile-e2e", profile=worker_out)
            profiles["worker-e2e"] = summarize_profile(worker_out)
            log("profiling: callbacks with py-spy on web")
            web_out = args.profile / "web-callbacks.folded"
            run_callbacks(infra, n_callbacks, args.concurrency, "profile-cb", profile=web_out)
            profiles["web-callbacks"] = summarize_profile(web_out)
    finally:
        infra.stop()

    if args.json:
        payload = {"machine": info, "results": results, "profiles": profiles}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    print()
    print(
        f"kodmobi-worker bench: {info['cpus']} CPUs ({info['cpu_model']}), "
        f"{info['memory_gb']} GB, Python {info['python']}, dramatiq {info['dramatiq']}, "
        f"Postgres {info.get('postgres', '?')}, Redis {info.get('redis', '?')} "
        f"({'embedded' if infra.embedded else 'DATABASE_URL/REDIS_URL'}); "
        f"load average at start {info['loadavg_at_start']}"
    )
    print(
        f"settings (from the Procfile): worker {PROCESSES} processes x {THREADS} threads, "
        f"dramatiq_worker_timeout={WORKER_POLL_MS} ms; web: 1 uvicorn process "
        "(--no-access-log); clock running during e2e/latency runs; RECIPIENT_LIMIT=0 "
        "CHANNEL_COOLDOWN_S=0; LOG_LEVEL=WARNING (logging cost is not what we measure); "
        "sandbox callbacks at once; "
        f"runs={args.runs}, codes per throughput run={n_e2e}, no-op messages={n_limit}, "
        f"callbacks per run={n_callbacks} over {args.concurrency} connections, latency "
        f"{LATENCY_RATE:g} codes/s for {latency_s:g}s (half HTTP, half raw enqueue)"
    )
    print(
        f"servers: Postgres {info.get('postgres_settings', '?')}; Redis "
        f"{info.get('redis_settings', '?')}"
        + (" (embedded, as `kodmobi dev` runs them)" if infra.embedded else "")
    )
    code_end = code_revision()
    print(f"code: {info['code']}" + ("" if code_end == info["code"] else f" -> {code_end}"))
    if code_end != info["code"]:
        print(
            "WARNING: worker/ changed while the bench ran: runs may have measured different code."
        )
    print(
        "method: backlogs are staged in Redis and released (RENAME) once both worker processes "
        "poll, so worker start-up is not timed; limit ends when every message is acked "
        "(the queue's .msgs hash is empty), e2e when Postgres counts N messages delivered."
    )
    print()
    print_table(build_rows(results))
    if "latency-bound" in results:
        ceiling = PROCESSES * THREADS / (SLOW_KODMOBI_MS / 1000)
        print(
            f"\nnote: with one kod.mobi call per worker thread, {PROCESSES}x{THREADS} threads and "
            f"{SLOW_KODMOBI_MS} ms answers cap the latency-bound figure at {ceiling:.0f} msg/s."
        )
    if "latency" in results:
        formats = {tuple(r["received_at_format"]) for r in results["latency"]}
        print(
            "note: latency = sandbox `received_at` (wall clock, ISO 8601 with millisecond "
            "precision, truncated) minus the producer's time.time() before the call; "
            f"received_at lengths seen: {sorted(formats)}"
        )
    noise = {
        figure: [r["cpu_cores"].get("other", 0.0) for r in runs]
        for figure, runs in results.items()
        if runs and "cpu_cores" in runs[0]
    }
    if noise:
        worst = max(max(v) for v in noise.values())
        print(
            "\nother processes on this machine used (cores, per run): "
            + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in noise.items())
            + (
                f"\nWARNING: up to {worst:.2f} of {info['cpus']} cores went to other processes "
                "during the runs: the figures above are lower than on an idle machine."
                if worst > 0.3
                else ""
            )
        )
    access_lines = _count_lines(workdir / "logs", "*-web.log", '"uvicorn.access"')
    if access_lines:
        print(
            f"note: the web processes wrote {access_lines:,} uvicorn access-log lines despite "
            "--no-access-log and LOG_LEVEL=WARNING: that logging is part of the web figures."
        )
    print_details(results)
    if profiles:
        print_profiles(profiles, args.profile)
    print(f"\nlogs of every process: {workdir / 'logs'}; took {time.time() - started:.0f}s")
    return 0
