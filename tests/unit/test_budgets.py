"""Budgets per UTC period and max_parallel slots, on a Clock, in one process's memory."""

from __future__ import annotations

from datetime import UTC, datetime

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.auth import Principal
from llmproxy.config import ApiKey, Budget
from llmproxy.errors import APIError
from llmproxy.limits import Admission, MemoryLimiter, period_bounds


def at(text: str) -> float:
    """The epoch seconds of an ISO UTC time."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def iso(when: float | None) -> str | None:
    return None if when is None else datetime.fromtimestamp(when, UTC).isoformat()[:19]


def spender(
    period: str, usd: float = 1.0, rpm: int | None = None, tpm: int | None = None
) -> Principal:
    budget = Budget(usd, period)
    key = ApiKey(name="team", key="sk-secret-team", budget=budget, rpm=rpm, tpm=tpm)
    return Principal("team", key)


class PeriodTests(SynchronousTestCase):
    def test_each_period_starts_at_its_utc_boundary(self) -> None:
        wednesday = at("2024-03-13T15:30:00")
        cases = {
            "day": ("2024-03-13T00:00:00", "2024-03-14T00:00:00"),
            "week": ("2024-03-11T00:00:00", "2024-03-18T00:00:00"),  # from Monday
            "month": ("2024-03-01T00:00:00", "2024-04-01T00:00:00"),
        }
        for period, (start, following) in cases.items():
            bounds = period_bounds(period, wednesday)
            assert (iso(bounds[0]), iso(bounds[1])) == (start, following), period
        assert period_bounds("total", wednesday) == (0.0, None)

    def test_edges_of_weeks_and_years(self) -> None:
        sunday_night = at("2024-03-17T23:59:59")
        assert iso(period_bounds("week", sunday_night)[0]) == "2024-03-11T00:00:00"
        monday = at("2024-03-18T00:00:00")
        assert iso(period_bounds("week", monday)[0]) == "2024-03-18T00:00:00"
        assert iso(period_bounds("week", 0.0)[0]) == "1969-12-29T00:00:00"  # a Thursday's week
        new_year = period_bounds("month", at("2023-12-31T23:59:59"))
        assert (iso(new_year[0]), iso(new_year[1])) == (
            "2023-12-01T00:00:00",
            "2024-01-01T00:00:00",
        )
        leap = period_bounds("month", at("2024-02-29T12:00:00"))
        assert iso(leap[1]) == "2024-03-01T00:00:00"


class BudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = MemoryLimiter(self.clock)

    def start_at(self, text: str) -> None:
        self.clock.advance(at(text) - self.clock.seconds())

    def admit(self, who: Principal) -> Admission:
        return self.successResultOf(Deferred.fromCoroutine(self.limiter.admit(who)))

    def refused(self, who: Principal) -> APIError:
        return self.failureResultOf(Deferred.fromCoroutine(self.limiter.admit(who)), APIError).value

    def charge(self, who: Principal, usd: float | None, tokens: int = 0) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.limiter.charge(who, tokens, usd)))

    def state(self, who: Principal) -> dict[str, object] | None:
        assert who.key is not None
        return self.successResultOf(Deferred.fromCoroutine(self.limiter.budget_state(who.key)))

    def test_a_daily_budget_refuses_until_midnight_utc(self) -> None:
        who = spender("day")
        self.start_at("2024-03-13T15:30:00")
        self.clock.advance(0.25)
        self.admit(who)
        self.charge(who, 0.75)
        self.admit(who)  # under the budget: admitted
        self.charge(who, 0.25)  # now exactly at it
        over = self.refused(who)
        assert over.status == 429
        assert over.payload()["error"] == {
            "message": "Key 'team' has used its budget of 1 USD per day.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
        assert "sk-secret-team" not in over.message
        # 8h30m less a quarter second to midnight, rounded up.
        assert over.headers == {"Retry-After": "30600"}
        self.clock.advance(30599.5)
        self.refused(who)  # the advice was not too long
        self.clock.advance(0.25)  # midnight: a new day
        self.admit(who)

    def test_a_weekly_budget_resets_on_monday(self) -> None:
        who = spender("week", usd=5)
        self.start_at("2024-03-13T12:00:00")  # a Wednesday
        self.charge(who, 6.0)
        assert self.refused(who).headers["Retry-After"] == str(4 * 86400 + 43200)
        self.start_at("2024-03-17T23:59:59")
        assert self.refused(who).headers["Retry-After"] == "1"
        self.start_at("2024-03-18T00:00:00")
        self.admit(who)

    def test_a_monthly_budget_from_december_to_january(self) -> None:
        who = spender("month", usd=2)
        self.start_at("2023-12-31T12:00:00")
        self.charge(who, 2.5)
        assert self.refused(who).headers["Retry-After"] == "43200"
        assert self.state(who) == {
            "usd": 2,
            "period": "month",
            "spent_usd": 2.5,
            "resets_at": "2024-01-01T00:00:00Z",
        }
        self.clock.advance(43200)
        self.admit(who)
        assert self.state(who) == {
            "usd": 2,
            "period": "month",
            "spent_usd": 0.0,
            "resets_at": "2024-02-01T00:00:00Z",
        }

    def test_a_total_budget_never_resets_and_has_no_retry_after(self) -> None:
        who = spender("total", usd=0.5)
        self.start_at("2024-03-13T12:00:00")
        self.charge(who, 0.5)
        over = self.refused(who)
        assert over.code == "insufficient_quota" and "Retry-After" not in over.headers
        assert "0.5 USD in total" in over.message
        self.clock.advance(400 * 86400)
        self.refused(who)
        assert self.state(who) == {
            "usd": 0.5,
            "period": "total",
            "spent_usd": 0.5,
            "resets_at": None,
        }

    def test_only_priced_answers_count(self) -> None:
        who = spender("day", usd=0.01)
        self.charge(who, None, tokens=10_000)  # unpriced: no cost, and no guess
        self.charge(who, 0.0)
        self.admit(who)
        self.charge(who, 0.01)
        self.refused(who)

    def test_a_budget_refusal_of_a_rate_limited_key_carries_its_headers(self) -> None:
        who = spender("day", rpm=10, tpm=1000)
        self.admit(who)
        self.charge(who, 1.0, tokens=100)
        over = self.refused(who)
        assert over.code == "insufficient_quota"
        assert over.headers["x-ratelimit-remaining-requests"] == "9"  # it counted nothing
        assert over.headers["x-ratelimit-remaining-tokens"] == "900"
        assert over.headers["Retry-After"] == "86400"

    def test_keys_without_a_budget_have_no_state(self) -> None:
        key = ApiKey(name="free", key="k")
        assert self.successResultOf(Deferred.fromCoroutine(self.limiter.budget_state(key))) is None


class ParallelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.limiter = MemoryLimiter(Clock())

    def admit(self, who: Principal) -> Admission:
        return self.successResultOf(Deferred.fromCoroutine(self.limiter.admit(who)))

    def refused(self, who: Principal) -> APIError:
        return self.failureResultOf(Deferred.fromCoroutine(self.limiter.admit(who)), APIError).value

    def test_the_n_plus_first_is_refused_until_one_is_released(self) -> None:
        who = Principal("team", ApiKey(name="team", key="k", max_parallel=2))
        first, second = self.admit(who), self.admit(who)
        over = self.refused(who)
        assert over.status == 429 and over.code == "concurrency_limit_exceeded"
        assert over.type == "rate_limit_error" and over.headers == {"Retry-After": "1"}
        assert "'team'" in over.message and "at most 2" in over.message
        first.release()
        third = self.admit(who)
        self.refused(who)
        second.release()
        third.release()
        self.admit(who)
        self.admit(who)
        self.refused(who)

    def test_release_is_idempotent(self) -> None:
        who = Principal("team", ApiKey(name="team", key="k", max_parallel=2))
        first = self.admit(who)
        self.admit(who)
        first.release()
        first.release()  # frees one slot, once
        self.admit(who)
        self.refused(who)

    def test_keys_have_slots_of_their_own(self) -> None:
        one = Principal("one", ApiKey(name="one", key="1", max_parallel=1))
        two = Principal("two", ApiKey(name="two", key="2", max_parallel=1))
        self.admit(one)
        self.admit(two)
        self.refused(one)

    def test_a_refused_slot_does_not_count_a_request(self) -> None:
        who = Principal("team", ApiKey(name="team", key="k", rpm=2, max_parallel=1))
        first = self.admit(who)
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        over = self.refused(who)
        assert over.code == "concurrency_limit_exceeded"
        assert over.headers["x-ratelimit-remaining-requests"] == "1"
        first.release()
        assert self.admit(who).headers["x-ratelimit-remaining-requests"] == "0"

    def test_a_request_refused_by_rpm_takes_no_slot(self) -> None:
        who = Principal("team", ApiKey(name="team", key="k", rpm=1, max_parallel=2))
        self.admit(who)
        assert self.refused(who).code == "rate_limit_exceeded"
        assert self.refused(who).code == "rate_limit_exceeded"  # not concurrency: no slot leaked

    def test_releasing_without_a_slot_is_harmless(self) -> None:
        Admission().release()
        self.admit(Principal("anonymous")).release()
