"""The suite's budget re-planner, driven by a fake clock: it shrinks what is left when the machine runs behind."""
import pytest

from kim_plugins.suite.core import Replanner
from kim_plugins.suite.pairs import Cost


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _run(costs, planned, pace, deadline, min_iters=2):
    """Run the pairs through a replanner; each takes ``pace`` x its estimate at the iterations it was given."""
    clock = FakeClock()
    rp = Replanner(deadline, clock=clock, min_iters=min_iters)
    given = []
    for i, (cost, n) in enumerate(zip(costs, planned)):
        g = rp.iters_for(f"p{i}", n, costs[i:])
        given.append(g)
        clock.now += pace[i] * (cost.fixed_s + cost.iters_s * g / n)
        rp.done(cost, n, g)
    return rp, given, clock.now - 1000.0


def test_on_pace_or_faster_nothing_is_shrunk_or_grown():
    costs = [Cost(10, 30), Cost(10, 30), Cost(0, 20)]
    for pace in (1.0, 0.5):
        rp, given, end = _run(costs, [100, 100, 50], [pace] * 3, deadline=120)
        assert given == [100, 100, 50] and not any(d.shrunk for d in rp.decisions)
        assert end <= 120
        assert all(d.reason.startswith("within the budget") for d in rp.decisions)


def test_a_slowdown_shrinks_the_iterations_of_what_is_left_to_end_on_time():
    costs = [Cost(10, 30), Cost(10, 30), Cost(0, 20)]
    # the first pair runs at half speed (80 s for an estimated 40 s) and so does everything after it
    rp, given, end = _run(costs, [100, 100, 50], [2.0, 2.0, 2.0], deadline=120)
    # before p1: pace 2, 40 s left for fixed 10 + iterations 50 -> (40 / 2 - 10) / 50 = 0.2 of the iterations
    assert given == [100, 20, 10]
    assert [d.pace for d in rp.decisions] == [1.0, 2.0, 2.0]
    assert end == pytest.approx(120.0)  # would have been 80 + 2 * 60 = 200 s without re-planning
    d = rp.decisions[1]
    assert d.shrunk and (d.planned_iters, d.given_iters) == (100, 20) and d.at_s == pytest.approx(80.0)
    assert d.needed_s == pytest.approx(120.0) and d.left_s == pytest.approx(40.0)
    assert "behind" in d.reason and "x0.20" in d.reason
    table = rp.table()
    assert "| p1 | 1.3 | 100 | 20 | behind: at 2.00x the plan's pace" in table


def test_hopeless_overrun_floors_at_min_iters():
    costs = [Cost(0, 100), Cost(50, 50)]
    rp, given, _ = _run(costs, [200, 200], [3.0, 3.0], deadline=210, min_iters=2)
    assert given == [200, 2]  # after p0 (300 s) nothing is left: the floor, never a model/batch/seed change
    assert rp.decisions[1].left_s < 0
    rp, given, _ = _run(costs, [2, 2], [3.0, 3.0], deadline=1, min_iters=2)
    assert given == [2, 2] and all(d.reason.endswith("at the floor already") for d in rp.decisions)


def test_no_budget_never_shrinks():
    import math

    rp, given, _ = _run([Cost(1, 1000)], [400], [10.0], deadline=math.inf)
    assert given == [400]
