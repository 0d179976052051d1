"""`kodmobi demo` (`make demo`): the whole system, and a batch of codes that shows every path.

Runs `kodmobi dev` (embedded Postgres and Redis, the sandbox, web, worker, clock),
sends codes over HTTP and as raw Dramatiq messages to recipients the sandbox treats
in known ways (docs/sandbox.md), shows a live table of each message's attempts,
and exits 0 once every message is final with the outcome it should have.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from worker.dev import DevOptions, DevSystem
from worker.embedded import default_root, free_port
from worker.logging import mask_recipient
from worker.rules import MESSAGE_FINAL

FINAL = MESSAGE_FINAL
#: The demo's deadline for a delivery callback: short, so the silent path shows quickly.
DEMO_DELIVERY_TIMEOUT_S = "3"


def _magic(telegram: int, whatsapp: int = 0, sms: int = 0) -> str:
    return f"+79990{telegram:02d}{whatsapp:02d}{sms:02d}"


@dataclass
class Case:
    title: str
    body: dict[str, Any]
    expect_status: str
    expect_path: list[tuple[str, str]]
    via: str = "http"  # or "dramatiq"
    key: str = ""
    message_id: str | None = None
    last: dict[str, Any] | None = None


def cases() -> list[Case]:
    happy = f"+79991{uuid.uuid4().int % 10**6:06d}"
    chain = ["telegram", "whatsapp", "sms"]
    return [
        Case(
            "delivered first time",
            {"to": happy, "channels": chain},
            "delivered",
            [("telegram", "delivered")],
        ),
        Case(
            "email, delivered",
            {"to": f"demo-{uuid.uuid4().hex[:6]}@example.com"},
            "delivered",
            [("email", "delivered")],
        ),
        Case(
            "raw Dramatiq message",
            {"to": f"+79991{uuid.uuid4().int % 10**6:06d}", "channels": ["whatsapp", "sms"]},
            "delivered",
            [("whatsapp", "delivered")],
            via="dramatiq",
        ),
        Case(
            "telegram refuses -> whatsapp",
            {"to": _magic(10), "channels": chain},
            "delivered",
            [("telegram", "error"), ("whatsapp", "delivered")],
        ),
        Case(
            "failure callback -> whatsapp",
            {"to": _magic(1), "channels": chain},
            "delivered",
            [("telegram", "failed"), ("whatsapp", "delivered")],
            via="dramatiq",
        ),
        Case(
            "silence past deadline -> whatsapp",
            {"to": _magic(2), "channels": chain},
            "delivered",
            [("telegram", "timed_out"), ("whatsapp", "delivered")],
        ),
        Case(
            "kod.mobi 500s, retried, -> sms",
            {"to": _magic(0, 20), "channels": ["whatsapp", "sms"]},
            "delivered",
            [("whatsapp", "error"), ("sms", "delivered")],
        ),
        Case(
            "every channel fails",
            {"to": _magic(1, 13, 1), "channels": chain},
            "failed",
            [("telegram", "failed"), ("whatsapp", "error"), ("sms", "failed")],
        ),
        Case(
            "recipient blocked",
            {"to": _magic(14), "channels": chain},
            "failed",
            [("telegram", "error")],
        ),
        Case(
            "bad input (7-digit code)",
            {"to": happy, "code": "1234567"},
            "rejected",
            [],
            via="dramatiq",
        ),
    ]


def _submit(case: Case, api: httpx.Client, broker: Any) -> None:
    if case.via == "http":
        case.key = uuid.uuid4().hex
        response = api.post("/v1/messages", json=case.body, headers={"Idempotency-Key": case.key})
        response.raise_for_status()
        case.message_id = response.json()["id"]
        return
    import dramatiq

    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="kodmobi", actor_name="send_code", args=(), kwargs=case.body, options={}
    )
    broker.enqueue(message)
    case.key = message.message_id


def _poll(case: Case, api: httpx.Client) -> None:
    if case.last is not None and case.last["status"] in FINAL:
        return
    if case.message_id is not None:
        response = api.get(f"/v1/messages/{case.message_id}")
    else:
        response = api.get("/v1/messages", params={"idempotency_key": case.key})
    if response.status_code == 200:
        case.last = response.json()
        case.message_id = case.last["id"]


def _path(case: Case) -> list[tuple[str, str]]:
    return [(a["channel"], a["status"]) for a in (case.last or {}).get("attempts", [])]


def _shown_path(case: Case) -> str:
    steps = []
    for a in (case.last or {}).get("attempts", []):
        tries = f" ({a['tries']} tries)" if a["tries"] > 1 else ""
        steps.append(f"{a['channel']}:{a['status']}{tries}")
    return " -> ".join(steps) or "-"


def _ok(case: Case) -> bool:
    return (
        case.last is not None
        and case.last["status"] == case.expect_status
        and _path(case) == case.expect_path
    )


def render(all_cases: list[Case], elapsed: float) -> str:
    lines = [
        f"kodmobi demo  {elapsed:5.1f}s   (sandbox stands in for kod.mobi; logs in .kodmobi/logs/)",
        "one row per case: how it was sent, to whom (masked), the message's status, and its"
        " attempts as channel:status in order",
        "",
        f"{'case':<36} {'via':<8} {'to':<18} {'status':<10} attempts",
        "-" * 110,
    ]
    for case in all_cases:
        status = case.last["status"] if case.last else "(waiting)"
        attempts = _shown_path(case)
        mark = ""
        if status in FINAL:
            mark = "  ok" if _ok(case) else "  UNEXPECTED"
        to = mask_recipient(str(case.body.get("to", "")))
        lines.append(f"{case.title:<36} {case.via:<8} {to:<18} {status:<10} {attempts}{mark}")
        if case.last and case.last.get("failure_reason") and status in FINAL:
            lines.append(
                f"{'':<36} {'':<8} {'':<18} {'':<10} reason: {case.last['failure_reason']}"
            )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this long")


def run(args: argparse.Namespace) -> int:
    root = default_root()
    options = DevOptions(
        root=root,
        web_port=free_port(),
        worker_processes=2,
        worker_threads=8,
        log_dir=root / "logs",
        sandbox_args=["--callback-delay-ms", "400"],
        extra_env={
            "DELIVERY_TIMEOUT_S": DEMO_DELIVERY_TIMEOUT_S,
            # The demo sends to the same sandbox numbers on every run.
            "RECIPIENT_LIMIT": "0",
            "CHANNEL_COOLDOWN_S": "0",
            "LOG_LEVEL": "INFO",
        },
    )
    interactive = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    print(
        "kodmobi demo: starting Postgres, Redis, the sandbox, web, worker and clock ...", flush=True
    )
    with DevSystem(options) as dev:
        from worker.broker import build_broker

        broker = build_broker(dev.env["REDIS_URL"], dev.env.get("BROKER_NAMESPACE", "dramatiq"))
        api = httpx.Client(
            base_url=dev.api_url, headers={"Authorization": f"Bearer {dev.api_token}"}, timeout=10
        )
        all_cases = cases()
        started = time.monotonic()
        for case in all_cases:
            _submit(case, api, broker)
        print(
            f"kodmobi demo: console at {dev.console_url} (ops token {dev.ops_token}) "
            f"while the demo runs",
            flush=True,
        )
        shown: dict[str, str] = {}
        while True:
            dev.check_alive()
            for case in all_cases:
                _poll(case, api)
            table = render(all_cases, time.monotonic() - started)
            done = all(c.last is not None and c.last["status"] in FINAL for c in all_cases)
            if interactive:
                sys.stdout.write("\x1b[H\x1b[2J" + table + "\n")
                sys.stdout.flush()
            else:
                # Not a terminal: one labelled line per case whose row changed.
                for case in all_cases:
                    row = _row(case)
                    if shown.get(case.title) != row:
                        shown[case.title] = row
                        print(f"[{time.monotonic() - started:5.1f}s] {row}", flush=True)
            if done or time.monotonic() - started > args.timeout:
                break
            time.sleep(0.25)
        api.close()
        broker.close()
    print()
    print(table)
    print()
    unexpected = [c.title for c in all_cases if not _ok(c)]
    if not done:
        print(f"demo: not every message was final after {args.timeout:g}s", file=sys.stderr)
        return 1
    if unexpected:
        print(f"demo: unexpected outcome for: {', '.join(unexpected)}", file=sys.stderr)
        return 1
    print(f"demo: all {len(all_cases)} messages final, each as expected. Logs: {options.log_dir}")
    print(
        "demo: to browse these messages in the operations console, run `kodmobi dev` here and "
        "open http://127.0.0.1:8000/ops (it prints the address and a dev ops token; the "
        f"token is OPS_TOKENS in {root / 'dev.env'})"
    )
    return 0


def _row(case: Case) -> str:
    status = case.last["status"] if case.last else "(waiting)"
    return f"{case.title:<36} {status:<10} {_shown_path(case)}"
