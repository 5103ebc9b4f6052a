"""The per-source budget of log lines (meshsshd/log_budget.py), on an injected clock."""

from __future__ import annotations

from meshsshd.log_budget import LogBudget


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_one_line_a_second_counting_what_was_held():
    clock = Clock()
    budget = LogBudget(burst=3, rate=1.0, clock=clock)
    assert [budget.take("a") for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.take("b") == 0   # another source has its own budget
    clock.now = 1.0
    assert budget.take("a") == 2   # written, with the two held back before it
    assert budget.take("a") is None


def test_idle_sources_are_forgotten_at_the_cap():
    clock = Clock()
    budget = LogBudget(burst=2, rate=1.0, clock=clock, max_keys=2)
    budget.take("a")
    budget.take("b")
    clock.now = 5.0
    budget.take("c")
    assert set(budget._buckets) == {"c"}
