"""A message held waiting for a delivery callback that only the test will send."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from tests.support.db import connect
from tests.support.system import System, callback_token_for, magic_phone
from tests.support.waiting import wait_for


@dataclass
class Awaiting:
    """A message whose telegram attempt kod.mobi accepted and stays silent about (magic 02);
    whatsapp (magic `whatsapp`, 00 delivers) would take over if a failure moved it on."""

    system: System
    message_id: str
    attempt_id: str
    kodmobi_message_id: int

    @property
    def token(self) -> str:
        return callback_token_for(self.attempt_id)

    def message(self) -> dict[str, Any]:
        return self.system.message(self.message_id)


A = TypeVar("A", bound=Awaiting)


def awaiting_callback(system: System, kind: type[A], *, whatsapp: int = 0) -> A:
    """Given a message over telegram (silent), then whatsapp: its accepted telegram attempt."""
    to = magic_phone(telegram=2, whatsapp=whatsapp)
    created = system.api.post("/v1/messages", json={"to": to, "channels": ["telegram", "whatsapp"]})
    assert created.status_code == 202, created.text
    message_id = created.json()["id"]

    def accepted() -> dict[str, Any] | None:
        attempts = system.message(message_id)["attempts"]
        return attempts[0] if attempts and attempts[0]["status"] == "accepted" else None

    attempt = wait_for(accepted, "accepted attempt")
    # Hold the silent attempt open: its callbacks are the test's to send, not the
    # deadline's (DELIVERY_TIMEOUT_S is 2 s in this system).
    with connect(system) as conn:
        conn.execute(
            "UPDATE attempts SET deadline = now() + interval '1 hour' WHERE id = %s",
            (attempt["id"],),
        )
    return kind(system, message_id, attempt["id"], attempt["kodmobi_message_id"])
