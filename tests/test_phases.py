"""Which calls measure, and which make updates: the schedule, the triggers, the warm-up."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from labpal_fast import LABPAL

from helpers import Quadratic

pytestmark = pytest.mark.usefixtures("backend")

ALWAYS_VALID = dict(mode="NSGD", momentum=0.0, direction_norm_range=(0.0, math.inf))


def expected_measurements(n_calls, schedule, nu, k, R, U):
    """A straight reading of docs/algorithm.md for runs whose fits are all valid: a measurement takes
    k·m calls and makes one update; a training update takes m calls. Returns the (call, update,
    m, averaged) of every measurement completed within n_calls."""
    def m_at(call):
        entries = [mult for start, mult in sorted(schedule) if start <= call]
        return max(math.floor(entries[-1] * nu), 1) if entries else 1

    out, call, updates, last_end, warm_done, m_prev = [], 0, 0, 0, False, None
    while True:
        m = m_at(call)
        measure = (call == 0 or m != m_prev or (not warm_done and updates >= U)
                   or updates - last_end >= R)
        m_prev = m
        length = k * m if measure else m
        if call + length > n_calls:
            return out
        if measure:
            out.append((call, updates, m, updates >= U))
            warm_done |= updates >= U
            last_end = updates + 1
        call += length
        updates += 1


def run(n_calls, **hyper):
    quad = Quadratic([4, 3], seed=0, offset=0.3)
    opt = LABPAL(quad.parameters(), **ALWAYS_VALID, **hyper)
    for _ in range(n_calls):
        opt.step(quad)
    assert all(r["valid"] for r in opt.measurements())
    return opt, [(r["call"], r["update"], r["m"], r["averaged"]) for r in opt.measurements()]


def test_hand_derived_sequence():
    # k=2, U=3, R=4, m: 1 until call 12, then 2. Worked through by hand:
    # call 0 first measurement (update 1); 2,3 train (2,3); 4 warm-up's end measures (4);
    # 6..9 train (5..8); 10 measures after R=4 updates (9); 12 m changes: measures (10);
    # 16..23 train in pairs (11..14); 24 measures (15).
    opt, got = run(28, batch_size_schedule=((0, 1), (12, 2)), noise_factor=1.0,
                   approximation_batches=2, reuse_updates=4, warmup_updates=3)
    assert got == [(0, 0, 1, False), (4, 3, 1, True), (10, 8, 1, True), (12, 9, 2, True),
                   (24, 14, 2, True)]
    assert opt.updates == 15
    assert expected_measurements(28, ((0, 1), (12, 2)), 1.0, 2, 4, 3) == got


def test_schedule_entry_inside_an_accumulation_is_applied_at_the_next_boundary():
    # m=2 from call 3; calls 5,6 make one update, so the entry at call 6 falls inside it.
    # The reference (equality test at the call) would skip it; here m=4 from call 7.
    opt, got = run(11, batch_size_schedule=((0, 1), (3, 2), (6, 4)), noise_factor=1.0,
                   approximation_batches=1, reuse_updates=100, warmup_updates=100)
    assert got == [(0, 0, 1, False), (3, 3, 2, False), (7, 5, 4, False)]
    assert opt.multiplier == 4


def test_noise_factor_scales_the_schedule():
    # ν = (128/32)·(20000/40000) = 2: multipliers 1, 1.5 → m = 2, 3
    opt, got = run(40, batch_size=32, dataset_size=20000, batch_size_schedule=((0, 1), (20, 1.5)),
                   approximation_batches=1, reuse_updates=100, warmup_updates=100)
    assert [g[2] for g in got] == [2, 3]
    assert [g[0] for g in got] == [0, 20]


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 3), R=st.integers(0, 6), U=st.integers(0, 8),
       nu=st.sampled_from([0.5, 1.0, 1.5, 2.5]),
       schedule=st.dictionaries(st.integers(0, 30), st.sampled_from([0.5, 1, 2, 3]),
                                min_size=1, max_size=3),
       n_calls=st.integers(1, 60))
def test_phase_machine_matches_the_specification(k, R, U, nu, schedule, n_calls):
    schedule = tuple(schedule.items())
    _, got = run(n_calls, batch_size_schedule=schedule, noise_factor=nu, approximation_batches=k,
                 reuse_updates=R, warmup_updates=U)
    assert got == expected_measurements(n_calls, schedule, nu, k, R, U)


def test_phase_property_follows_the_calls():
    quad = Quadratic([3], seed=1, offset=0.3)
    opt = LABPAL(quad.parameters(), **ALWAYS_VALID, approximation_batches=3, reuse_updates=2,
                 warmup_updates=0)
    phases = []
    for _ in range(8):
        opt.step(quad)
        phases.append((opt.phase, opt.updates))
    # calls 0-2 measure (update 1 at call 2); 3,4 train; 5-7 measure again
    assert phases == [("measuring", 0), ("measuring", 0), ("training", 1), ("training", 2),
                      ("training", 3), ("measuring", 3), ("measuring", 3), ("training", 4)]


@pytest.mark.parametrize("line_fit", ["paper", "robust"])
def test_after_an_abandoned_measurement(line_fit):
    """The paper's variant measures again at the next call when a measurement is abandoned (the
    reference's trigger, warm-up or reuse, still holds); the default goes back to training for
    reuse_updates updates. Calls 4 and 11 give a zero gradient (‖d‖ = 0: abandoned).
    Paper, by hand (k=2, U=3, R=4): 0 measures (update 1); 2,3 train (2,3); 4 is abandoned;
    5 measures again (4); 7..10 train (5..8); 11 is abandoned; 12 measures again (9).
    Robust: 4 abandoned, no warm-up retry; 5..8 train (4..7): 4 updates after the abandoned one,
    so 9 measures (8); 11..14 train (9..12); 15 measures (13)."""
    quad = Quadratic([4, 3], seed=0, offset=0.3)
    opt = LABPAL(quad.parameters(), mode="NSGD", line_fit=line_fit, approximation_batches=2,
                 warmup_updates=3, reuse_updates=4, direction_norm_range=(1e-9, math.inf))
    for call in range(17):
        opt.step(lambda scale=0.0 if call in (4, 11) else 1.0: quad() * scale)
    got = [(r["call"], r["update"], r["reason"] is None) for r in opt.measurements()]
    if line_fit == "paper":
        assert got == [(0, 0, True), (4, 3, False), (5, 3, True), (11, 8, False), (12, 8, True)]
    else:
        assert got == [(0, 0, True), (4, 3, False), (9, 7, True), (15, 12, True)]


@pytest.mark.parametrize("mode, momentum, line_fit, R", [
    ("NSGD", 0.0, "robust", 200), ("NSGD", 0.5, "robust", 1000), ("SGD", 0.0, "robust", 1000),
    ("NSGD", 0.0, "paper", 1000)])
def test_reuse_updates_default_follows_mode_and_momentum(mode, momentum, line_fit, R):
    """reuse_updates=None: 200 updates between measurements in NSGD without momentum, the
    paper's 1000 with momentum, in SGD mode or with line_fit="paper" (docs/algorithm.md "How
    often to measure"); the measurements are those of the specification at that R."""
    n_calls, hyper = 2600, dict(approximation_batches=2, warmup_updates=700, noise_factor=1.0,
                                batch_size_schedule=((0, 1),), line_fit=line_fit)
    quad = Quadratic([4, 3], seed=0, offset=0.3)
    opt = LABPAL(quad.parameters(), mode=mode, momentum=momentum,
                 direction_norm_range=(0.0, math.inf), **hyper)
    assert opt.hyper.reuse == R
    for _ in range(n_calls):
        opt.step(quad)
    got = [(r["call"], r["update"], r["m"], r["averaged"]) for r in opt.measurements()]
    assert got == expected_measurements(n_calls, ((0, 1),), 1.0, 2, R, 700)
    assert len(got) == (14 if R == 200 else 3)
