"""A busy control plane (429, 5xx) makes the node pause its requests: the server's
Retry-After read as untrusted input, a doubling pause with a random spread without one, and
never more than an hour whatever the server or the clock says (pure logic)."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner.errors import AuthError, EdgepinError, ServiceUnavailableError
from provisioner.node import client
from provisioner.node.decide import BACKOFF_FIRST, BACKOFF_MAX, back_off, quiet
from provisioner.node.model import Counters

pytestmark = pytest.mark.unit

NOW = 1_800_000_000.0


@settings(max_examples=500)
@given(st.text(max_size=60) | st.none())
def test_any_retry_after_is_a_pause_of_at_most_an_hour_or_none(value: str | None) -> None:
    pause = client.parse_retry_after(value, NOW)
    assert pause is None or 0.0 <= pause <= client.RETRY_AFTER_MAX


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert client.parse_retry_after("120", NOW) == 120.0
    assert client.parse_retry_after(" 0 ", NOW) == 0.0
    assert client.parse_retry_after("99999999", NOW) == client.RETRY_AFTER_MAX
    date = email.utils.formatdate(NOW + 300, usegmt=True)
    assert client.parse_retry_after(date, NOW) == pytest.approx(300.0)
    assert client.parse_retry_after(email.utils.formatdate(NOW - 50, usegmt=True), NOW) == 0.0
    for bad in ("-5", "1.5", "soon", "", "Wed, 99 Foo 2026 00:00:00 GMT", "١٢"):
        assert client.parse_retry_after(bad, NOW) is None, bad


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_a_busy_answer_carries_the_pause_the_server_asked_for(status: int) -> None:
    with pytest.raises(ServiceUnavailableError) as info:
        client.check(status, "glance", "image x", headers={"Retry-After": "42"})
    assert info.value.fields["busy"] is True
    assert info.value.fields["retry_after"] == pytest.approx(42.0, abs=1)
    with pytest.raises(ServiceUnavailableError) as info:
        client.check(status, "glance", "image x", headers={})
    assert info.value.fields["busy"] is True and info.value.fields["retry_after"] is None


def test_other_answers_are_not_busy() -> None:
    for status in (400, 409, 418):
        with pytest.raises(ServiceUnavailableError) as info:
            client.check(status, "glance", "image x", headers={"Retry-After": "42"})
        assert "busy" not in info.value.fields
    with pytest.raises(AuthError):
        client.check(401, "keystone", "x", headers={"Retry-After": "42"})


def busy(retry_after: float | None = None) -> EdgepinError:
    return ServiceUnavailableError(
        "server error 503", status=503, busy=True, retry_after=retry_after
    )


@settings(max_examples=500)
@given(
    streak=st.integers(min_value=-5, max_value=10**6),
    spread=st.floats(min_value=0, max_value=1),
    retry_after=st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(),
    now=st.floats(min_value=0, max_value=4e9),
)
def test_a_pause_is_never_longer_than_an_hour_and_never_in_the_past(
    streak: int, spread: float, retry_after: float | None, now: float
) -> None:
    until, n = back_off(streak, busy(retry_after), now, spread)  # type: ignore[arg-type]
    assert until is not None and now <= until <= now + BACKOFF_MAX
    assert 1 <= n <= 32


def test_without_retry_after_the_pause_doubles_with_a_spread_and_stops_at_an_hour() -> None:
    streak, pauses = 0, []
    for _ in range(10):
        until, streak = back_off(streak, busy(), NOW, 1.0)
        assert until is not None
        pauses.append(until - NOW)
    assert pauses[:3] == [BACKOFF_FIRST, 2 * BACKOFF_FIRST, 4 * BACKOFF_FIRST]
    assert pauses[-1] == BACKOFF_MAX
    low, _ = back_off(0, busy(), NOW, 0.0)
    assert low == NOW + BACKOFF_FIRST / 2  # the spread: between half and all of the pause


def test_retry_after_is_honoured_and_any_other_outcome_ends_the_pause() -> None:
    assert back_off(3, busy(7.0), NOW, 0.3) == (NOW + 7.0, 4)
    for other in (None, ServiceUnavailableError("unreachable"), AuthError("refused", status=401)):
        assert back_off(5, other, NOW, 0.3) == (None, 0)


def test_quiet_only_until_the_pause_ends_and_never_for_a_clock_that_jumped_back() -> None:
    assert quiet(NOW + 10, NOW)
    assert not quiet(None, NOW)
    assert not quiet(NOW - 1, NOW)
    assert not quiet(NOW + BACKOFF_MAX + 1, NOW)


def test_the_counters_keep_the_pause_and_a_damaged_one_is_dropped() -> None:
    c = Counters.from_dict({"quiet_until": NOW, "busy_streak": 3})
    assert (c.quiet_until, c.busy_streak) == (NOW, 3)
    c = Counters.from_dict({"quiet_until": "tomorrow", "busy_streak": -1})
    assert (c.quiet_until, c.busy_streak) == (None, 0)
