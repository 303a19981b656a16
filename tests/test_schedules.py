"""DP-ZOSO's stagewise schedule: doubling stages, halving lr, geometric λ."""

from __future__ import annotations

import math

import pytest

from dpzo_engine.core.errors import ConfigError
from dpzo_engine.zo.schedules import StageSchedule


def test_stages_double_and_cover_all_steps():
    s = StageSchedule(total_steps=70, stages=3, lr=1.0, zo_eps_start=1e-3)
    assert s.base_length == 10
    assert s.boundaries == (0, 10, 30)
    assert [s.stage_length(i) for i in range(3)] == [10, 20, 40]
    # a remainder goes to the last stage: the stages still cover exactly T steps
    r = StageSchedule(total_steps=75, stages=3, lr=1.0, zo_eps_start=1e-3)
    assert r.boundaries == (0, 10, 30) and [r.stage_length(i) for i in range(3)] == [10, 20, 45]
    assert sum(r.stage_length(i) for i in range(3)) == 75
    assert [r.stage_of(t) for t in (0, 9, 10, 29, 30, 74)] == [0, 0, 1, 1, 2, 2]
    assert [t for t in range(75) if r.is_stage_start(t)] == [0, 10, 30]


def test_smallest_schedule_is_one_step_per_unit():
    s = StageSchedule(total_steps=7, stages=3, lr=1.0, zo_eps_start=1.0)
    assert s.boundaries == (0, 1, 3) and [s.stage_length(i) for i in range(3)] == [1, 2, 4]


def test_lr_halves_and_lambda_is_geometric():
    s = StageSchedule(total_steps=150, stages=4, lr=0.08, zo_eps_start=1e-2, zo_eps_end=1e-5)
    lrs = [s.stage_lr(i) for i in range(4)]
    assert lrs == [0.08, 0.04, 0.02, 0.01]
    lams = [s.stage_zo_eps(i) for i in range(4)]
    assert lams[0] == 1e-2 and lams[-1] == 1e-5  # endpoints exact
    ratios = [lams[i + 1] / lams[i] for i in range(3)]
    assert all(r == pytest.approx(0.1, rel=1e-12) for r in ratios)  # constant ratio (1e-5/1e-2)^(1/3)
    for step in range(150):
        stage = s.stage_of(step)
        assert s.at(step) == (lrs[stage], lams[stage])


def test_lambda_can_grow_and_stay_constant():
    up = StageSchedule(total_steps=7, stages=3, lr=1.0, zo_eps_start=1e-4, zo_eps_end=1e-2)
    assert [up.stage_zo_eps(i) for i in range(3)] == pytest.approx([1e-4, 1e-3, 1e-2], rel=1e-12)
    flat = StageSchedule(total_steps=7, stages=3, lr=1.0, zo_eps_start=1e-3)
    assert {flat.stage_zo_eps(i) for i in range(3)} == {1e-3}
    one = StageSchedule(total_steps=5, stages=1, lr=0.3, zo_eps_start=2e-3, zo_eps_end=1e-6)
    assert one.boundaries == (0,) and one.at(4) == (0.3, 2e-3)  # one stage: the start values


def test_public_code_formula_is_not_what_we_do():
    """Their κ = (λ_end − λ_start)^(1/S) is undefined for a shrinking λ; ours is geometric."""
    start, end, stages = 1e-3, 1e-5, 3
    with pytest.raises(ValueError):
        math.pow(end - start, 1 / stages)  # negative base, fractional power
    s = StageSchedule(total_steps=7, stages=stages, lr=1.0, zo_eps_start=start, zo_eps_end=end)
    assert [s.stage_zo_eps(i) for i in range(3)] == pytest.approx([1e-3, 1e-4, 1e-5], rel=1e-12)


def test_custom_decay_and_describe():
    s = StageSchedule(total_steps=21, stages=2, lr=1.0, zo_eps_start=1e-3, lr_decay=0.25)
    rows = s.describe()
    assert [r["start"] for r in rows] == [0, 7] and [r["length"] for r in rows] == [7, 14]
    assert [r["lr"] for r in rows] == [1.0, 0.25]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(stages=0), "--stages"),
        (dict(stages=4, total_steps=14), "needs at least 15 steps"),
        (dict(stages=2.5), "--stages"),
        (dict(zo_eps_end=0.0), "--zo-scale-end"),
        (dict(zo_eps_end=-1e-3), "--zo-scale-end"),
        (dict(zo_eps_start=float("nan")), "--zo-scale-start"),
        (dict(lr_decay=0.0), "--lr-decay"),
        (dict(lr_decay=1.5), "--lr-decay"),
        (dict(lr=-1.0), "--lr"),
    ],
)
def test_bad_schedules_are_config_errors(kwargs, needle):
    args = dict(total_steps=100, stages=3, lr=1.0, zo_eps_start=1e-3) | kwargs
    with pytest.raises(ConfigError, match=needle):
        StageSchedule(**args)
