"""mmrec.stats checked by simulation: why the interval is taken over rounds, not calls.

A benchmark's calls are not independent: consecutive calls of one arm share the machine's state
of that moment, and the machine drifts between rounds (frequency, cache, a neighbour's burst).
What repeats independently is the *round*: both arms run in it, one after the other, so drift
that hits the round hits both alike and cancels in that round's ratio. These tests simulate
exactly that (a per-round drift shared by both arms plus a slow random-walk trend, a small
per-arm per-round shift, and calls whose noise is correlated within the round) at the round
counts the project uses, and check that

* the project's method (paired by round, expanded-percentile bootstrap over rounds) covers the
  true ratio about 95 % of the time, and two runs of one commit agree;
* the previous method (all calls of each arm pooled, calls resampled as if independent, plain
  percentile bootstrap of the ratio of medians) does not: its interval is too narrow, so it
  misses the true ratio about one time in three instead of one in twenty, and two runs of the
  same commit give intervals that do not even overlap about one time in eight (a correct 95 %
  interval: under 1 %);
* an A/A arm (one arm measured twice) is judged stable, while a real 1.3x is found;

then the verdict, serialisation, validation and determinism of `Interval` and its builders.
Simulations use fewer resamples than the project's default to stay fast.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from mmrec import stats
from mmrec.benchmarks.settings import FULL
from mmrec.export.tuning import DEFAULT_ROUNDS
from mmrec.stats import MET, MIN_ROUNDS, MISSED, NOT_CONCLUSIVE, Interval, aa_check, paired_ratio, pooled_ratio

# the rounds per comparison of the bench sections and of `mmrec tune` (at least 10)
ROUND_COUNTS = sorted({max(10, n) for n in (FULL.offline_rounds, FULL.serving_rounds, FULL.photo_rounds,
                                            DEFAULT_ROUNDS)})

SIMS = 300  # simulated benchmarks per scenario
CALLS = 20  # calls per arm and round
RESAMPLES = 1000  # in the simulation loops (the project uses stats.RESAMPLES)
TRUE_RATIO = 1.25  # latency of A / latency of B
DRIFT_SD = 0.10  # log-sd of the per-round drift both arms share
WALK_SD = 0.05  # log-sd of each step of the slow trend (a random walk over the rounds)
ARM_SD = 0.03  # log-sd of an arm's own per-round shift
CALL_SD = 0.05  # log-sd of a call's noise, AR(1)-correlated within the round
CALL_RHO = 0.9


def simulate(rng: np.random.Generator, sims: int, rounds: int, ratio: float,
             calls: int = CALLS) -> tuple[np.ndarray, np.ndarray]:
    """Latencies (ms) of arms A and B, shape (sims, rounds, calls); median(A)/median(B) = ratio."""
    drift = rng.normal(0, DRIFT_SD, (sims, rounds)) + np.cumsum(rng.normal(0, WALK_SD, (sims, rounds)), axis=1)

    def arm(log_level: float) -> np.ndarray:
        shift = rng.normal(0, ARM_SD, (sims, rounds))
        eps = rng.normal(0, CALL_SD, (sims, rounds, calls))
        noise = np.empty_like(eps)
        noise[..., 0] = eps[..., 0]
        for k in range(1, calls):  # stationary AR(1): a call resembles the one before it
            noise[..., k] = CALL_RHO * noise[..., k - 1] + math.sqrt(1 - CALL_RHO**2) * eps[..., k]
        return 10.0 * np.exp(log_level + drift[..., None] + shift[..., None] + noise)

    return arm(math.log(ratio)), arm(0.0)


def new_intervals(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The project's method on each simulated benchmark: rows of (low, high)."""
    a_rounds, b_rounds = np.median(a, axis=2), np.median(b, axis=2)  # stats.round_medians, vectorized
    out = []
    for s in range(a.shape[0]):
        iv = paired_ratio(a_rounds[s], b_rounds[s], resamples=RESAMPLES, seed=s)
        out.append((iv.low, iv.high))
    return np.array(out)


def old_intervals(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The previous method: every call of an arm pooled over the rounds (no pairing), both arms'
    calls resampled independently, median(A)/median(B) per resample, 2.5th and 97.5th percentiles."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    n = a.shape[1]
    out = []
    for s in range(a.shape[0]):
        ratios = (np.median(a[s][rng.integers(0, n, (RESAMPLES, n))], axis=1)
                  / np.median(b[s][rng.integers(0, n, (RESAMPLES, n))], axis=1))
        out.append(np.percentile(ratios, [2.5, 97.5]))
    return np.array(out)


def coverage(intervals: np.ndarray, truth: float) -> float:
    return float(np.mean((intervals[:, 0] <= truth) & (truth <= intervals[:, 1])))


def non_overlap(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x[:, 0] > y[:, 1]) | (y[:, 0] > x[:, 1])))


@functools.lru_cache(maxsize=None)
def two_runs(rounds: int) -> dict:
    """Two independent runs (own drift, own noise) of the same A/B, SIMS benchmarks each, with
    both methods' intervals; shared by the coverage and the two-runs tests."""
    rng = np.random.default_rng(20240611 + rounds)
    runs = [simulate(rng, SIMS, rounds, TRUE_RATIO) for _ in range(2)]
    return {"new": [new_intervals(a, b) for a, b in runs], "old": [old_intervals(a, b, rng) for a, b in runs]}


@pytest.mark.parametrize("rounds", ROUND_COUNTS)
def test_new_method_covers_the_true_ratio_under_between_round_drift(rounds):
    new = two_runs(rounds)["new"][0]
    cov = coverage(new, TRUE_RATIO)
    width = np.median(new[:, 1] / new[:, 0])
    print(f"\n{rounds} rounds: new method coverage {cov:.3f}, median high/low {width:.3f}")
    assert cov >= 0.90, cov
    # covering by being uselessly wide would not count: the intervals are finite, narrow, and
    # (nearly) always tell the real 1.25x from no difference
    assert np.isfinite(new).all() and width < 1.15, width
    assert np.mean(new[:, 0] > 1.0) >= 0.95


@pytest.mark.parametrize("rounds", ROUND_COUNTS)
def test_old_method_misses_the_true_ratio_in_the_same_simulation(rounds):
    old = two_runs(rounds)["old"][0]
    cov = coverage(old, TRUE_RATIO)
    print(f"\n{rounds} rounds: old method (calls pooled and resampled) coverage {cov:.3f}")
    assert cov < 0.80, cov  # a "95 %" interval that misses at least one time in five


@pytest.mark.parametrize("rounds", ROUND_COUNTS)
def test_two_runs_of_one_commit_agree_with_the_new_method_not_the_old(rounds):
    """Same code, same true ratio, two runs on a drifting machine: the old intervals contradict
    each other (no overlap) many times as often as correct 95 % intervals do (< 1 %)."""
    runs = two_runs(rounds)
    new, old = non_overlap(*runs["new"]), non_overlap(*runs["old"])
    print(f"\n{rounds} rounds: two runs of one commit, non-overlapping intervals: new {new:.3f}, old {old:.3f}")
    assert new <= 0.03, new
    assert old >= 0.08 and old >= 5 * max(new, 1 / SIMS), (old, new)


@pytest.mark.parametrize("rounds", ROUND_COUNTS)
def test_pooled_ratio_covers_the_geometric_mean_over_cases(rounds):
    """Tuning's score: two cases (batch sizes) with different true ratios, each with its own drift."""
    rng = np.random.default_rng(7 + rounds)
    ratios = (1.1, 1.4)
    cases = [simulate(rng, SIMS, rounds, r) for r in ratios]
    medians = [(np.median(a, axis=2), np.median(b, axis=2)) for a, b in cases]
    truth = math.sqrt(ratios[0] * ratios[1])
    hits = 0
    for s in range(SIMS):
        iv = pooled_ratio([(a[s], b[s]) for a, b in medians], resamples=RESAMPLES, seed=s)
        hits += iv.low <= truth <= iv.high
    print(f"\n{rounds} rounds: pooled_ratio coverage {hits / SIMS:.3f}")
    assert hits / SIMS >= 0.90


@pytest.mark.parametrize("rounds", ROUND_COUNTS)
def test_aa_arm_is_stable_and_a_real_difference_is_found(rounds):
    rng = np.random.default_rng(99 + rounds)
    a1, a2 = simulate(rng, SIMS, rounds, 1.0)  # the same arm twice in every round: no difference
    slow, fast = simulate(rng, SIMS, rounds, 1.3)  # a real 1.3x under the same drift
    a1, a2, slow, fast = (np.median(x, axis=2) for x in (a1, a2, slow, fast))
    stable = [aa_check(paired_ratio(a1[s], a2[s], resamples=RESAMPLES, seed=s))["stable"] for s in range(SIMS)]
    found = [paired_ratio(slow[s], fast[s], resamples=RESAMPLES, seed=s) for s in range(SIMS)]
    stable_rate = float(np.mean([x is True for x in stable]))
    found_rate = float(np.mean([iv.shows_difference() and iv.low > 1.0 for iv in found]))
    print(f"\n{rounds} rounds: A/A stable {stable_rate:.3f}, 1.3x found {found_rate:.3f}")
    assert all(x in (True, False) for x in stable)  # enough rounds: always judged, never None
    assert stable_rate >= 0.90, stable_rate
    assert found_rate >= 0.95, found_rate


# --- Interval: verdicts, serialisation, validation, determinism ------------------------------

def test_verdict_met_missed_and_not_conclusive_on_both_sides():
    above = Interval(1.5, 1.3, 1.7, 10)  # wholly above 1.2, wholly below 2, straddles 1.5
    assert above.verdict(1.2, "above") == MET and above.verdict(1.2, "below") == MISSED
    assert above.verdict(2.0, "above") == MISSED and above.verdict(2.0, "below") == MET
    assert above.verdict(1.5, "above") == NOT_CONCLUSIVE and above.verdict(1.5, "below") == NOT_CONCLUSIVE
    # a bound that touches the threshold is not beyond it
    assert above.verdict(1.3, "above") == NOT_CONCLUSIVE and above.verdict(1.7, "below") == NOT_CONCLUSIVE
    diff = Interval(-3.0, -4.0, -2.0, 10, "difference")  # e.g. ms saved: lower is better
    assert diff.null == 0.0 and diff.verdict(0.0, "below") == MET and diff.verdict(0.0, "above") == MISSED
    assert diff.verdict(-3.0, "below") == NOT_CONCLUSIVE
    assert diff.shows_difference() and not Interval(0.5, -1.0, 2.0, 10, "difference").shows_difference()
    assert Interval(1.0, 0.98, 1.03, 10).relation(1.0) == "straddles"


def test_too_few_rounds_give_infinite_bounds_and_no_verdict():
    rng = np.random.default_rng(3)
    a, b = rng.lognormal(np.log(20), 0.01, MIN_ROUNDS - 1), rng.lognormal(np.log(10), 0.01, MIN_ROUNDS - 1)
    for iv in (paired_ratio(a, b), stats.paired_difference(a, b), pooled_ratio([(a, b)])):
        assert iv.rounds == MIN_ROUNDS - 1 and not iv.conclusive
        assert iv.high == math.inf and iv.low == (-math.inf if iv.kind == "difference" else 0.0)  # ratio: exp(-inf)
        # a 2x every round, yet nothing is claimed on so few rounds
        assert iv.verdict(iv.null, "above") == NOT_CONCLUSIVE and iv.verdict(iv.null, "below") == NOT_CONCLUSIVE
    assert paired_ratio(a, b).point == pytest.approx(np.exp(np.mean(np.log(a / b))))
    assert aa_check(paired_ratio(a, b))["stable"] is None and aa_check(None)["stable"] is None
    # one pooled case with too few rounds makes the whole pooled interval inconclusive
    more_a, more_b = rng.lognormal(np.log(20), 0.01, 10), rng.lognormal(np.log(10), 0.01, 10)
    assert not pooled_ratio([(more_a, more_b), (a, b)]).conclusive
    # exactly MIN_ROUNDS rounds do give an interval
    a3, b3 = rng.lognormal(np.log(20), 0.01, MIN_ROUNDS), rng.lognormal(np.log(10), 0.01, MIN_ROUNDS)
    assert paired_ratio(a3, b3).conclusive and paired_ratio(a3, b3).verdict(1.0, "above") == MET


def test_to_dict_from_dict_round_trip_including_infinite_bounds():
    finite = Interval(1.2346, 1.1, 1.4, 12, "ratio")
    d = finite.to_dict()
    assert d["level"] == stats.LEVEL and d["method"] == stats.METHOD and d["rounds"] == 12
    assert Interval.from_dict(d) == finite
    diff = Interval(-2.5, -3.25, -1.75, 10, "difference")
    assert Interval.from_dict(diff.to_dict()) == diff
    open_ = Interval(1.8, -math.inf, math.inf, 2, "difference")
    d = open_.to_dict()
    assert d["low"] is None and d["high"] is None  # JSON has no infinity
    back = Interval.from_dict(d)
    assert back == open_ and not back.conclusive and back.verdict(0.0, "above") == NOT_CONCLUSIVE
    ratio_open = Interval.from_dict(paired_ratio([2.0, 2.0], [1.0, 1.0]).to_dict())
    assert ratio_open.high == math.inf and not ratio_open.conclusive
    # rounding to `digits` is the only change
    assert Interval.from_dict(Interval(1.23456789, 1.1, 1.3, 10).to_dict()).point == 1.2346


def test_inputs_are_validated():
    ok = [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError):
        paired_ratio(ok, ok[:3])  # rounds are paired: one value per round in each arm
    with pytest.raises(ValueError):
        stats.paired_difference(ok, ok[:3])
    with pytest.raises(ValueError):
        paired_ratio([], [])
    with pytest.raises(ValueError):
        paired_ratio([[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]])  # not one value per round
    for bad in ([1.0, 0.0, 3.0, 4.0], [1.0, -2.0, 3.0, 4.0]):
        with pytest.raises(ValueError):
            paired_ratio(bad, ok)
        with pytest.raises(ValueError):
            paired_ratio(ok, bad)
        with pytest.raises(ValueError):
            pooled_ratio([(ok, ok), (ok, bad)])
    with pytest.raises(ValueError):
        pooled_ratio([])
    # a difference of non-positive values is fine (e.g. ms saved)
    assert stats.paired_difference([0.0, -1.0, 2.0, 3.0], ok).point == pytest.approx(np.mean([-1.0, -3.0, -1.0, -1.0]))


def test_pooled_ratio_point_is_the_geometric_mean_of_the_cases_points():
    rng = np.random.default_rng(5)
    cases = [(rng.lognormal(np.log(13), 0.05, 10), rng.lognormal(np.log(10), 0.05, 10)),
             (rng.lognormal(np.log(300), 0.05, 10), rng.lognormal(np.log(200), 0.05, 10))]
    pooled = pooled_ratio(cases)
    points = [paired_ratio(a, b).point for a, b in cases]
    assert pooled.point == pytest.approx(math.sqrt(points[0] * points[1]), rel=1e-12)
    assert pooled.rounds == 10 and pooled.kind == "ratio" and pooled.low < pooled.point < pooled.high
    assert min(points) < pooled.point < max(points)
    # one case pooled is that case
    assert pooled_ratio(cases[:1]) == paired_ratio(*cases[0])


def test_a_fixed_seed_gives_the_same_interval_and_another_seed_a_close_one():
    rng = np.random.default_rng(11)
    a, b = rng.lognormal(np.log(12), 0.05, 10), rng.lognormal(np.log(10), 0.05, 10)
    first = paired_ratio(a, b)
    assert paired_ratio(list(a), list(b)) == first and paired_ratio(a, b, seed=0) == first
    assert stats.paired_difference(a, b) == stats.paired_difference(a, b)
    assert pooled_ratio([(a, b), (b, a)], seed=4) == pooled_ratio([(a, b), (b, a)], seed=4)
    other = paired_ratio(a, b, seed=1)
    assert other.point == first.point and (other.low, other.high) != (first.low, first.high)
    assert other.low == pytest.approx(first.low, rel=0.02) and other.high == pytest.approx(first.high, rel=0.02)
