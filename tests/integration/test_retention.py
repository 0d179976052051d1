"""Retention (issue 11 item 4): rows older than RETENTION_DAYS go in small batches, codes
are erased once final and past their check window, counters never go backwards, and
`kodmobi purge --dry-run` says what would go and deletes nothing."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from tests.support.system import System, magic_phone, unique_phone
from worker import cli
from worker.usecases import retention


def _age(system: System, message_id: str, days: float) -> None:
    with system.root.ctx.tx() as s:
        s.execute(
            text(
                "UPDATE messages SET created_at = now() - make_interval(days => :d)"
                " WHERE id = :id"
            ),
            {"d": days, "id": message_id},
        )


def _count(system: System, table: str, message_id: str) -> int:
    column = {"messages": "id", "attempts": "message_id"}.get(table)
    with system.root.ctx.tx() as s:
        if column is None:
            query = ("SELECT count(*) FROM callback_events c JOIN attempts a ON a.id = c.attempt_id"
                     " WHERE a.message_id = :id")
        else:
            query = f"SELECT count(*) FROM {table} WHERE {column} = :id"
        return int(s.execute(text(query), {"id": message_id}).scalar_one())


def _counter_total() -> float:
    total = 0.0
    for family in REGISTRY.collect():
        if family.name in ("kodmobi_messages", "kodmobi_attempts", "kodmobi_callbacks"):
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def _send(system: System, to: str) -> str:
    response = system.api.post("/v1/messages", json={"to": to, "channels": ["telegram", "sms"]})
    message_id: str = response.json()["id"]
    system.wait_final(message_id)
    return message_id


def test_old_messages_go_with_attempts_and_callbacks_new_ones_stay(
    system: System, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given three old messages (one with a fallback: two attempts, two callbacks) and a new one
    old = [_send(system, unique_phone()), _send(system, unique_phone()),
           _send(system, magic_phone(1))]
    new = _send(system, unique_phone())
    for message_id in old:
        _age(system, message_id, 31)
    attempts = sum(_count(system, "attempts", m) for m in old)
    events = sum(_count(system, "callback_events", m) for m in old)
    assert attempts == 4 and events >= 4
    counters = _counter_total()

    # When `kodmobi purge --dry-run` runs
    monkeypatch.setenv("DATABASE_URL", system.db_url)
    assert cli.main(["purge", "--dry-run"]) == 0
    said = capsys.readouterr().out
    # Then it says what would go, and nothing went
    assert f"would delete 3 messages, {attempts} attempts and {events} callback events" in said
    assert all(_count(system, "messages", m) == 1 for m in old)

    # When the purge runs in batches of two
    report = retention.purge(system.root.ctx, batch=2)
    # Then the old messages are gone with their attempts and callback events
    assert (report.messages, report.attempts, report.callback_events) == (3, attempts, events)
    for message_id in old:
        assert _count(system, "messages", message_id) == 0
        assert _count(system, "attempts", message_id) == 0
        assert _count(system, "callback_events", message_id) == 0
    # And the new one is untouched, and still readable through the API
    assert _count(system, "attempts", new) == 1
    assert system.message(new)["status"] == "delivered"
    # And no counter went backwards
    assert _counter_total() >= counters
    # And a second run finds nothing
    assert retention.purge(system.root.ctx).messages == 0


def test_a_code_is_erased_once_final_and_past_its_check_window(system: System) -> None:
    # Given two delivered messages, one of them past its TTL
    done, live = _send(system, unique_phone()), _send(system, unique_phone())
    with system.root.ctx.tx() as s:
        s.execute(
            text("UPDATE messages SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": done},
        )
    # When the clock's erasure runs
    retention.erase_codes(system.root.ctx)
    # Then the expired message's ciphertext is gone, the live one's is kept
    with system.root.ctx.tx() as s:
        kept = dict(s.execute(text(
            "SELECT id, code_ciphertext IS NOT NULL FROM messages WHERE id IN (:a, :b)"),
            {"a": done, "b": live}).all())
    assert kept == {done: False, live: True}
    # And checking the erased code says it expired
    check = system.api.post(f"/v1/messages/{done}/check", json={"code": "123456"}).json()
    assert check == {"valid": False, "reason": "expired"}


def test_retention_days_is_a_setting_with_a_default_of_30() -> None:
    from tests.support.system import test_settings

    base = {
        "DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x", "KODMOBI_API_KEY": "k" * 16,
        "PUBLIC_BASE_URL": "https://x", "CALLBACK_SECRET": "s" * 16, "CODE_KEY": "c" * 16,
    }
    assert test_settings(**base).retention_days == 30
    assert test_settings(**base, RETENTION_DAYS="7").retention_days == 7
