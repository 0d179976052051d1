"""The `kodmobi` command: sandbox, dev, demo, sweep, send, status, purge, migrate."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

#: worker.settings.DEFAULT_PRODUCER, without importing pydantic at CLI start.
_DEFAULT_PRODUCER = "default"

Command = Callable[[argparse.Namespace], int]


# -- kodmobi sweep -------------------------------------------------------------------------


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--forever", action="store_true", help="sweep every --interval seconds")
    parser.add_argument(
        "--interval", type=float, default=None, help="seconds between sweeps (SWEEP_INTERVAL_S)"
    )


def _sweep(args: argparse.Namespace) -> int:
    from worker import wiring
    from worker.logging import get_logger
    from worker.usecases import retention
    from worker.usecases.events import EventDispatcher, broker_reply
    from worker.usecases.sweep import sweep

    log = get_logger("worker.clock")
    root = wiring.start("clock")
    interval = args.interval or root.settings.sweep_interval_s
    if not args.forever:
        report = sweep(root.ctx)
        print(
            json.dumps(
                {
                    "expired": report.expired,
                    "timed_out": report.timed_out,
                    "redispatched": report.redispatched,
                }
            )
        )
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if root.settings.metrics_port:
        from worker import metrics

        metrics.serve(root.settings.metrics_port)
    log.info("sweep.started", interval_s=interval, metrics_port=root.settings.metrics_port)
    next_purge = 0.0
    # Outcome events go out from a thread of their own (worker.usecases.events).
    dispatcher = EventDispatcher(root.ctx, broker_reply(root.broker))
    events_thread = threading.Thread(target=dispatcher.run, args=(stop,), name="events")
    events_thread.start()
    while not stop.is_set():
        try:
            sweep(root.ctx)
            # Retention's chores ride on the clock: codes are erased every round (their
            # window has just closed), old rows deleted once a minute.
            if time.monotonic() >= next_purge:
                retention.purge(root.ctx)
                next_purge = time.monotonic() + retention.PURGE_INTERVAL_S
            else:
                retention.erase_codes(root.ctx)
        except Exception as exc:  # database or Redis away: say so, and keep sweeping
            log.warning("sweep.failed", error=type(exc).__name__, detail=str(exc)[:300])
        stop.wait(interval)
    events_thread.join()
    dispatcher.close()
    log.info("sweep.stopped")
    return 0


# -- kodmobi send / status -----------------------------------------------------------------


def _send_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("to", help="E.164 phone number or email address")
    parser.add_argument("--channels", help="fallback chain, e.g. telegram,whatsapp,sms")
    parser.add_argument("--code", help="4 to 6 digits (drawn when absent)")
    parser.add_argument("--provider-id", type=int)
    parser.add_argument("--ttl", type=int, dest="ttl_s", help="code lifetime in seconds")
    parser.add_argument("--idempotency-key")
    parser.add_argument("--wait", action="store_true", help="wait until the message is final")


def _send(args: argparse.Namespace) -> int:
    import worker
    from worker import devstate

    devstate.adopt()
    try:
        accepted = worker.send_code(
            args.to,
            channels=args.channels.split(",") if args.channels else None,
            code=args.code,
            provider_id=args.provider_id,
            ttl_s=args.ttl_s,
            idempotency_key=args.idempotency_key,
        )
    except (worker.InvalidRequest, worker.IdempotencyConflict, worker.RateLimited) as exc:
        print(f"kodmobi: not sent: {exc}", file=sys.stderr)
        return 2
    print(f"{accepted.id}  {accepted.status}  channels={','.join(accepted.channels)}")
    if not args.wait:
        return 0
    from worker import wiring
    from worker.rules import MESSAGE_FINAL
    from worker.usecases import reads

    ctx = wiring.get().ctx
    while True:
        found = reads.get(ctx, accepted.id, _DEFAULT_PRODUCER)
        if found is not None and found.status in MESSAGE_FINAL:
            print(format_message(found.model_dump(mode="json")))
            return 0 if found.status == "delivered" else 1
        time.sleep(0.2)


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="message id, or an idempotency key with --key")
    parser.add_argument("--key", action="store_true", help="look up by idempotency key")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--producer", default=_DEFAULT_PRODUCER, help="the message's producer (API_TOKENS name)"
    )


def _status(args: argparse.Namespace) -> int:
    from worker import devstate, wiring

    devstate.adopt()
    from worker.usecases import reads

    ctx = wiring.get().ctx
    producer = args.producer
    found = (
        reads.find(ctx, args.id, producer) if args.key else reads.get(ctx, args.id, producer)
    )
    if found is None:
        print(f"kodmobi: no message {args.id}", file=sys.stderr)
        return 1
    data = found.model_dump(mode="json")
    print(json.dumps(data, indent=2) if args.json else format_message(data))
    return 0


def format_message(m: dict[str, Any]) -> str:
    """A message and its attempts, for a person at a terminal."""
    from worker.logging import mask_recipient

    lines = [
        f"message {m['id']}  to {mask_recipient(m['to'])}  status {m['status'].upper()}"
        + (f"  ({m['failure_reason']})" if m.get("failure_reason") else ""),
        f"  chain {' -> '.join(m['channels']) or '-'}   expires {m['expires_at']}",
    ]
    for a in m.get("attempts", []):
        detail = a.get("reason") or ""
        kid = a.get("kodmobi_message_id")
        lines.append(
            f"  #{a['seq']} {a['channel']:<9} {a['status']:<10} tries={a['tries']}"
            + (f" kod.mobi id={kid}" if kid else "")
            + (f"  {detail}" if detail else "")
        )
    return "\n".join(lines)


# -- kodmobi purge ------------------------------------------------------------------------


def _purge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="say what would go, and delete nothing"
    )


def _purge(args: argparse.Namespace) -> int:
    from worker import devstate, wiring
    from worker.usecases import retention

    devstate.adopt()
    ctx = wiring.get().ctx
    report = retention.purge(ctx, dry_run=args.dry_run)
    print(f"kodmobi purge (RETENTION_DAYS={ctx.settings.retention_days:g}): {report.describe()}")
    return 0


# -- kodmobi migrate ---------------------------------------------------------------------


def _migrate(_args: argparse.Namespace) -> int:
    from worker.migrate import upgrade
    from worker.settings import get_database_url

    upgrade(get_database_url())
    return 0


# -- the dispatcher ------------------------------------------------------------------------


def _module(name: str) -> Callable[[argparse.ArgumentParser], Command]:
    """Subcommands in their own module: imported only when chosen."""

    def register(parser: argparse.ArgumentParser) -> Command:
        mod = importlib.import_module(name)
        mod.add_arguments(parser)
        run: Command = mod.run
        return run

    return register


def _here(
    add: Callable[[argparse.ArgumentParser], None] | None, run: Command
) -> Callable[[argparse.ArgumentParser], Command]:
    def register(parser: argparse.ArgumentParser) -> Command:
        if add is not None:
            add(parser)
        return run

    return register


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Command]]] = {
    "dev": (
        "run the whole system on this machine (embedded servers, sandbox)",
        _module("worker.dev"),
    ),
    "demo": ("run the system and send codes that show every path", _module("worker.demo")),
    "sandbox": ("run the kod.mobi imitation (DESIGN §8)", _module("worker.sandbox.cli")),
    "sweep": (
        "re-dispatch lost attempts, time out silent ones, expire old messages",
        _here(_sweep_arguments, _sweep),
    ),
    "send": ("send a code", _here(_send_arguments, _send)),
    "status": ("show a message and its attempts", _here(_status_arguments, _status)),
    "purge": (
        "delete what is older than RETENTION_DAYS, erase finished codes (--dry-run: count)",
        _here(_purge_arguments, _purge),
    ),
    "migrate": ("apply database migrations (alembic upgrade head)", _here(None, _migrate)),
}


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(prog="kodmobi", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners: dict[str, Command] = {}
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (help_text, register) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            runners[name] = register(sub_parser)
    return parser, runners


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser, runners = build_parser(args_list)
    args = parser.parse_args(args_list)
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
