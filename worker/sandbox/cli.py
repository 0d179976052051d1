"""`kodmobi sandbox`: serve the kod.mobi imitation with uvicorn, one flag per config knob."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import MISSING, fields
from typing import Any

import uvicorn

from worker.sandbox.config import CALLBACK_STYLES, SandboxConfig

HELP = {
    "seed": "seed of the random draws (rates, codes): same seed, same run",
    "latency_ms": "milliseconds added to every kod.mobi answer",
    "error_5xx_rate": "probability that a send is answered HTTP 500",
    "throttle_429_rate": "probability that a send is answered 429 ERROR_MESSAGE_ATTEMPT",
    "slow_rate": "probability that a send is answered only after --slow-ms (still accepted)",
    "slow_ms": "delay of a slow answer, milliseconds",
    "callback_delay_ms": "delay between accepting a send and its callback, milliseconds",
    "failure_callback_rate": 'probability that the final callback says "failed"',
    "lost_callback_rate": "probability that no callback is sent at all",
    "duplicate_callback_rate": "probability that the final callback is sent twice",
    "out_of_order_rate": 'probability of the final callback followed by a stale "sent"',
    "progress_callbacks": 'send a "sent" progress callback before the final one',
    "callback_style": "how callbacks are sent: JSON POST, form POST or GET with a query string",
    "callback_retries": "retries of a callback that meets a connection error or a 5xx, 1 s apart",
    "magic_slow_ms": "delay of the slow magic outcome 03, milliseconds",
    "manual_channel_timeout_s": "per recipient and channel timeout of manual/send (0: none)",
    "record_limit": "accepted sends kept for GET /sandbox/messages (0: all)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8099, help="port to listen on (0: any free)")
    parser.add_argument(
        "--api-key",
        dest="api_key",
        default=os.environ.get("KODMOBI_API_KEY") or "sandbox-key",
        help="the x-api-key the sandbox accepts (default: $KODMOBI_API_KEY or sandbox-key)",
    )
    for field in fields(SandboxConfig):
        if field.name == "api_key":
            continue
        flag = "--" + field.name.replace("_", "-")
        default: Any = field.default if field.default is not MISSING else None
        options: dict[str, Any] = {"dest": field.name, "default": default}
        options["help"] = f"{HELP.get(field.name, field.name)} (default: {default})"
        # Annotations are strings here (`from __future__ import annotations` in config.py).
        kind = str(field.type)
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif field.name == "callback_style":
            options["choices"] = CALLBACK_STYLES
        elif kind.startswith("int"):
            options["type"] = int
        elif kind == "float":
            options["type"] = float
        parser.add_argument(flag, **options)


class _Server(uvicorn.Server):
    """Says where it listens once it really does, so that a parent process can wait for it."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            port = self.config.port
            for server in self.servers:
                for sock in server.sockets:
                    port = sock.getsockname()[1]
            print(f"sandbox listening on http://{self.config.host}:{port}", flush=True)


def run(args: argparse.Namespace) -> int:
    from worker.sandbox.app import create_app

    try:
        config = SandboxConfig(**{f.name: getattr(args, f.name) for f in fields(SandboxConfig)})
    except ValueError as exc:
        print(f"kodmobi sandbox: bad setting: {exc}", file=sys.stderr)
        return 2
    uv_config = uvicorn.Config(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    _Server(uv_config).run()
    return 0
