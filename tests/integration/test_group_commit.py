"""Callbacks written in group commits: batches decide each callback against the rows as
the ones before it left them, and one bad item fails alone."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tests.support.callbacks import Awaiting, awaiting_callback
from tests.support.db import connect
from tests.support.system import System
from worker.rules import CallbackOutcome
from worker.usecases.callbacks import CallbackData, apply_batch
from worker.usecases.group_commit import GroupCommit


def callback(status: str, kodmobi_message_id: int | None) -> CallbackData:
    return CallbackData(
        method="POST",
        content_type="application/json",
        raw_body=f'{{"status": "{status}"}}',
        headers={},
        status_word=status,
        kodmobi_message_id=kodmobi_message_id,
    )


def events(system: System, attempt_id: str) -> list[dict[str, Any]]:
    with connect(system) as conn:
        return conn.execute(
            "SELECT status_word, outcome, applied, duplicates FROM callback_events "
            "WHERE attempt_id = %s ORDER BY id",
            (attempt_id,),
        ).fetchall()


def test_one_batch_sees_a_repeat_and_a_stale_failure_after_delivered(system: System) -> None:
    # Given a message waiting for its telegram callback
    waiting = awaiting_callback(system, Awaiting)
    kid = waiting.kodmobi_message_id
    # When one batch holds delivered, the same delivered again, then a late "failed"
    results = apply_batch(
        system.root.ctx,
        [
            (waiting.attempt_id, callback("delivered", kid)),
            (waiting.attempt_id, callback("delivered", kid)),
            (waiting.attempt_id, callback("failed", kid)),
        ],
    )
    # Then the first applies, the repeat is a duplicate, the failure is stale
    assert results == [
        CallbackOutcome.DELIVERED,
        CallbackOutcome.DUPLICATE,
        CallbackOutcome.STALE,
    ]
    # And the message is delivered on telegram, with no fallback to whatsapp
    message = waiting.message()
    assert message["status"] == "delivered"
    assert [a["channel"] for a in message["attempts"]] == ["telegram"]
    assert events(system, waiting.attempt_id) == [
        {"status_word": "delivered", "outcome": "delivered", "applied": True, "duplicates": 1},
        {"status_word": "failed", "outcome": "stale", "applied": False, "duplicates": 0},
    ]


def test_a_batch_of_several_attempts_applies_each_and_skips_the_unknown(
    system: System,
) -> None:
    # Given two messages waiting for callbacks, and an attempt id nobody has
    first = awaiting_callback(system, Awaiting)
    second = awaiting_callback(system, Awaiting)
    # When one batch carries a failure for the first, delivery for the second, and the
    # unknown attempt in between
    results = apply_batch(
        system.root.ctx,
        [
            (first.attempt_id, callback("failed", first.kodmobi_message_id)),
            ("01ARZ3NDEKTSV4RRFFQ69G5FAV", callback("delivered", None)),
            (second.attempt_id, callback("delivered", second.kodmobi_message_id)),
        ],
    )
    # Then each gets its own outcome, in order
    assert results == [CallbackOutcome.FAILED, None, CallbackOutcome.DELIVERED]
    # And the failure fell back to whatsapp, which delivers
    assert system.wait_final(first.message_id)["status"] == "delivered"
    assert [a["channel"] for a in first.message()["attempts"]] == ["telegram", "whatsapp"]
    assert second.message()["status"] == "delivered"


def test_group_commit_batches_concurrent_items_and_fails_a_bad_one_alone() -> None:
    # Given a writer whose batches take a while, and one item that always fails
    batches: list[list[int]] = []
    release = threading.Event()

    def apply(items: list[int]) -> list[int]:
        batches.append(items)
        release.wait(5)
        if 13 in items:
            raise ValueError("bad item")
        return [i * 10 for i in items]

    writer: GroupCommit[int, int] = GroupCommit(apply, threads=1)

    async def main() -> list[Any]:
        tasks = [asyncio.create_task(writer.submit(0))]
        while not batches:  # the first item is being written
            await asyncio.sleep(0.005)
        tasks += [asyncio.create_task(writer.submit(i)) for i in range(1, 20)]
        await asyncio.sleep(0.2)
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        # When twenty items arrive while the first batch is being written
        results = asyncio.run(main())
    finally:
        writer.close()
    # Then they shared a few batches, not twenty transactions
    assert batches[0] == [0]
    assert batches[1] == list(range(1, 20))
    # And every item got its own result (the failed batch was retried item by item),
    # except the bad one, which failed alone
    assert batches[2:] == [[i] for i in range(1, 20)]
    assert [r for i, r in enumerate(results) if i != 13] == [
        i * 10 for i in range(20) if i != 13
    ]
    assert isinstance(results[13], ValueError)


@pytest.mark.parametrize("size", [1, 2])
def test_a_closed_writer_stops_its_threads(size: int) -> None:
    writer: GroupCommit[int, int] = GroupCommit(lambda items: items, threads=size)
    assert asyncio.run(writer.submit(7)) == 7
    writer.close()
    assert not any(t.name.startswith("group-commit") for t in threading.enumerate())
