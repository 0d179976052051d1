"""The pure delivery rules of worker/rules.py: status order, the fallback chain, retry
timing, and the callback status words (DESIGN §4, §5, §6, §7)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import rules

# The running system's threads (Dramatiq's consumers, the retry jitter) draw from the global
# `random` while Hypothesis generates, which it takes for a strategy using `random`.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
)

NOW = datetime(2025, 10, 28, 9, 22, 48, tzinfo=UTC)
FAR = NOW + timedelta(days=1)

message_statuses = st.sampled_from(rules.MESSAGE_STATUSES)
attempt_statuses = st.sampled_from(rules.ATTEMPT_STATUSES)

# -- statuses only move forward ------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "new"),
    [
        ("queued", "sending"),
        ("queued", "sent"),
        ("queued", "rejected"),
        ("sending", "sent"),
        ("sending", "failed"),
        ("sent", "delivered"),
        ("sent", "failed"),
        ("sent", "expired"),
    ],
)
def test_a_message_moves_forward(current: str, new: str) -> None:
    assert rules.message_can_move(current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        ("sending", "queued"),
        ("sent", "sending"),
        ("sent", "queued"),
        ("sent", "sent"),
        ("delivered", "failed"),
        ("delivered", "sent"),
        ("failed", "delivered"),
        ("expired", "delivered"),
        ("rejected", "queued"),
    ],
)
def test_a_message_never_moves_back_or_out_of_a_final_status(current: str, new: str) -> None:
    assert not rules.message_can_move(current, new)


@given(current=message_statuses, new=message_statuses)
def test_message_moves_are_a_strict_order(current: str, new: str) -> None:
    # Never both ways, never to itself, never out of a final status
    assert not (rules.message_can_move(current, new) and rules.message_can_move(new, current))
    assert not rules.message_can_move(current, current)
    if current in rules.MESSAGE_FINAL:
        assert not rules.message_can_move(current, new)
    # Every open status can reach every final one
    if current not in rules.MESSAGE_FINAL and new in rules.MESSAGE_FINAL:
        assert rules.message_can_move(current, new)


@given(path=st.lists(message_statuses, max_size=12))
def test_following_only_allowed_moves_ends_in_at_most_one_final_status(path: list[str]) -> None:
    status, seen = "queued", ["queued"]
    for new in path:
        if rules.message_can_move(status, new):
            status = new
            seen.append(new)
    assert len(set(seen)) == len(seen)  # nothing visited twice
    assert sum(s in rules.MESSAGE_FINAL for s in seen) <= 1
    if status in rules.MESSAGE_FINAL:
        assert seen[-1] == status


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [
        ("queued", "sending", True),
        ("sending", "accepted", True),
        ("queued", "accepted", True),  # a progress callback for a send we never saw answered
        ("queued", "delivered", True),
        ("accepted", "delivered", True),
        ("accepted", "failed", True),
        ("accepted", "timed_out", True),
        ("sending", "error", True),
        ("sending", "queued", True),  # the one step back: a try to be made again
        ("accepted", "queued", False),
        ("accepted", "sending", False),
        ("accepted", "accepted", False),
        ("delivered", "failed", False),
        ("failed", "delivered", False),
        ("timed_out", "delivered", False),
        ("error", "queued", False),
    ],
)
def test_attempt_moves(current: str, new: str, allowed: bool) -> None:
    assert rules.attempt_can_move(current, new) is allowed


@given(current=attempt_statuses, new=attempt_statuses)
def test_attempt_moves_are_forward_but_for_sending_back_to_queued(current: str, new: str) -> None:
    if current in rules.ATTEMPT_FINAL:
        assert not rules.attempt_can_move(current, new)
    if rules.attempt_can_move(current, new) and rules.attempt_can_move(new, current):
        assert {current, new} == {"sending", "queued"}
    assert not rules.attempt_can_move(current, current)


# -- the fallback chain --------------------------------------------------------------


def test_next_channel_walks_the_chain_then_stops() -> None:
    chain = ["telegram", "whatsapp", "sms"]
    assert [rules.next_channel(chain, seq) for seq in (1, 2, 3, 4)] == [
        "whatsapp", "sms", None, None,
    ]
    assert rules.next_channel(["email"], 1) is None


@given(
    chain=st.lists(st.sampled_from(["sms", "whatsapp", "telegram", "email"]), min_size=1,
                   max_size=4, unique=True),
)
def test_next_channel_after_each_attempt_is_the_rest_of_the_chain(chain: list[str]) -> None:
    followed = []
    seq = 1
    while (channel := rules.next_channel(chain, seq)) is not None:
        followed.append(channel)
        seq += 1
    assert [chain[0], *followed] == chain


# -- retry timing --------------------------------------------------------------------


def _plan(
    tries: int,
    *,
    retry_after_s: float | None = None,
    expires_at: datetime = FAR,
    max_backoff_s: float = 30.0,
    limited_tries: bool = True,
    seed: int = 0,
) -> rules.RetryPlan:
    return rules.plan_retry(
        now=NOW,
        tries=tries,
        expires_at=expires_at,
        retry_after_s=retry_after_s,
        max_backoff_s=max_backoff_s,
        limited_tries=limited_tries,
        rng=random.Random(seed),
    )


def _delay(plan: rules.RetryPlan) -> float:
    assert plan.at is not None
    return (plan.at - NOW).total_seconds()


def test_transient_errors_get_a_limited_number_of_tries() -> None:
    assert rules.TRANSIENT_TRIES > 1
    assert all(_plan(t).allowed for t in range(1, rules.TRANSIENT_TRIES))
    assert not _plan(rules.TRANSIENT_TRIES).allowed
    assert not _plan(rules.TRANSIENT_TRIES + 5).allowed


def test_throttling_and_account_errors_are_retried_as_long_as_the_code_lives() -> None:
    assert _plan(rules.TRANSIENT_TRIES + 50, limited_tries=False).allowed


@given(
    tries=st.integers(min_value=1, max_value=60),
    max_backoff_s=st.floats(min_value=0.1, max_value=120),
    seed=st.integers(),
)
def test_backoff_is_exponential_with_full_jitter_under_the_cap(
    tries: int, max_backoff_s: float, seed: int
) -> None:
    cap = min(max_backoff_s, rules.BASE_BACKOFF_S * 2 ** (tries - 1))
    delay = _delay(_plan(tries, max_backoff_s=max_backoff_s, limited_tries=False, seed=seed))
    assert cap / 2 - 1e-6 <= delay <= cap + 1e-6


def test_backoff_doubles_try_after_try() -> None:
    caps = [rules.BASE_BACKOFF_S * 2 ** (t - 1) for t in range(1, 6)]
    for tries, cap in enumerate(caps, start=1):
        delays = [_delay(_plan(tries, limited_tries=False, seed=s)) for s in range(200)]
        assert cap / 2 <= min(delays) and max(delays) <= cap
        assert max(delays) - min(delays) > cap / 4  # jittered, not fixed


@given(
    tries=st.integers(min_value=1, max_value=20),
    retry_after_s=st.floats(min_value=0, max_value=3600),
    seed=st.integers(),
)
def test_retry_after_is_a_floor(tries: int, retry_after_s: float, seed: int) -> None:
    plan = _plan(tries, retry_after_s=retry_after_s, limited_tries=False, seed=seed)
    assert _delay(plan) >= retry_after_s - 1e-6


def test_a_retry_after_longer_than_the_backoff_is_honoured_exactly() -> None:
    assert _delay(_plan(1, retry_after_s=7.0)) == pytest.approx(7.0)


@given(
    tries=st.integers(min_value=1, max_value=30),
    retry_after_s=st.none() | st.floats(min_value=0, max_value=120),
    ttl_left_s=st.floats(min_value=0, max_value=120),
    seed=st.integers(),
)
def test_no_retry_is_planned_at_or_after_the_code_expires(
    tries: int, retry_after_s: float | None, ttl_left_s: float, seed: int
) -> None:
    expires_at = NOW + timedelta(seconds=ttl_left_s)
    plan = _plan(
        tries, retry_after_s=retry_after_s, expires_at=expires_at, limited_tries=False, seed=seed
    )
    if plan.at is not None:
        assert NOW < plan.at < expires_at


def test_the_ttl_cuts_off_a_retry_that_would_land_after_it() -> None:
    soon = NOW + timedelta(seconds=2)
    assert not _plan(1, retry_after_s=5.0, expires_at=soon, limited_tries=False).allowed
    assert _plan(1, retry_after_s=1.0, expires_at=soon, limited_tries=False).allowed
    assert not _plan(1, expires_at=NOW).allowed


# -- callback status words -----------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "parsed"),
    [
        ("delivered", "delivered"),
        ("read", "delivered"),
        ("seen", "delivered"),
        ("success", "delivered"),
        ("ok", "delivered"),
        ("failed", "failed"),
        ("error", "failed"),
        ("undelivered", "failed"),
        ("rejected", "failed"),
        ("expired", "failed"),
        ("blocked", "failed"),
        ("sent", "progress"),
        ("queued", "progress"),
        ("accepted", "progress"),
        ("pending", "progress"),
        ("sending", "progress"),
        ("DELIVERED", "delivered"),
        ("  Failed\n", "failed"),
        ("Sent", "progress"),
        ("", "unknown"),
        ("deliver", "unknown"),
        ("delivered!", "unknown"),
        ("not delivered", "unknown"),
        ("200", "unknown"),
    ],
)
def test_callback_status_words(word: str, parsed: str) -> None:
    assert rules.parse_callback_status(word) == parsed


def test_the_three_word_sets_do_not_overlap() -> None:
    words = [rules.CALLBACK_DELIVERED, rules.CALLBACK_FAILED, rules.CALLBACK_PROGRESS]
    assert sum(len(w) for w in words) == len(set().union(*words))


CALLBACK_TABLE = (
    (rules.CALLBACK_DELIVERED, "delivered"),
    (rules.CALLBACK_FAILED, "failed"),
    (rules.CALLBACK_PROGRESS, "progress"),
)
KNOWN_WORDS = sorted(rules.CALLBACK_DELIVERED | rules.CALLBACK_FAILED | rules.CALLBACK_PROGRESS)


def looked_up(word: str) -> str:
    """The outcome the word table gives a received word: trimmed, lower-cased, else unknown."""
    key = word.strip().lower()
    return next((parsed for words, parsed in CALLBACK_TABLE if key in words), "unknown")


blanks = st.text(alphabet=" \t\n\r", max_size=3)


@st.composite
def dressed(draw: st.DrawFn, word: str) -> str:
    """The word with its letters' case drawn one by one and blanks either side."""
    upper = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    cased = "".join(c.upper() if up else c for c, up in zip(word, upper, strict=True))
    return draw(blanks) + cased + draw(blanks)


# Any text, known words as they are, and known words dressed in case and blanks: the last
# two reach every row of the table, which plain text almost never does.
known_words = st.sampled_from(KNOWN_WORDS)
received_words = st.one_of(st.text(max_size=20), known_words, known_words.flatmap(dressed))


@given(word=received_words)
def test_any_word_parses_as_the_table_says(word: str) -> None:
    assert rules.parse_callback_status(word) == looked_up(word)


@given(word=known_words, data=st.data())
def test_case_and_blanks_around_a_known_word_change_nothing(word: str, data: st.DataObject) -> None:
    parsed = rules.parse_callback_status(data.draw(dressed(word)))
    assert parsed == rules.parse_callback_status(word)
    assert parsed != "unknown"
