"""Lock-step rounds (:class:`subriemann.flow.lockstep.LockStep`) against sequential runs.

The members here are small explicit-Euler flows ``y' = -a y`` (numpy scalars) that post
every evaluation of their vector field; a round evaluates the fields of all waiting
members at once (one vectorised numpy product).  The reference is the same flows
run one after the other without :class:`LockStep`: elementwise float64 products give
bit-identical results, so the batch must reproduce them exactly.  The end-to-end
batches of :func:`subriemann.gradient_flow` are in ``tests/flow/test_batch.py``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from subriemann.flow.lockstep import LockStep

RATES = np.array([0.5, 1.0, 2.0, 3.5])
STEP = 0.1


def euler_flow(rate: float, steps: int, field) -> list[float]:
    """``steps`` Euler steps of y' = field(rate, y) from y = 1; the visited points."""
    ys = [1.0]
    for _ in range(steps):
        ys.append(ys[-1] + STEP * field(rate, ys[-1]))
    return ys


def direct_field(rate: float, y: float) -> float:
    return float(-rate * y)


def batched(widths: list[int]):
    """The round evaluation: all fields of a round in one vectorised product."""

    def evaluate(requests):
        widths.append(len(requests))
        rates = np.array([p[0] for _, _, p in requests])
        ys = np.array([p[1] for _, _, p in requests])
        return [(True, float(v)) for v in -rates * ys]

    return evaluate


def run_members(lock: LockStep, bodies, interrupted: bool = False) -> list:
    """Run ``bodies[i]()`` in member threads, serve their rounds here; results or errors.

    ``interrupted``: ``serve`` must end with KeyboardInterrupt (a Ctrl-C in a round).
    """
    results: list = [None] * len(bodies)

    def member(i):
        try:
            results[i] = bodies[i]()
        except BaseException as err:  # noqa: BLE001  (inspected by the tests)
            results[i] = err
        finally:
            lock.finished()

    threads = [threading.Thread(target=member, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    if interrupted:
        with pytest.raises(KeyboardInterrupt):
            lock.serve()
    else:
        lock.serve()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a member thread hangs"
    return results


def _poster(lock: LockStep, i: int):
    return lambda rate, y: lock.request(i, "field", (rate, y))


def test_batch_equals_sequential_flows_and_every_round_serves_all_members():
    steps = 7
    sequential = [euler_flow(r, steps, direct_field) for r in RATES]
    widths: list[int] = []
    lock = LockStep(len(RATES), batched(widths), lambda m, k, p: direct_field(*p))
    bodies = [
        (lambda i=i: euler_flow(RATES[i], steps, _poster(lock, i))) for i in range(len(RATES))
    ]
    together = run_members(lock, bodies)
    assert together == sequential  # bit for bit
    assert lock.rounds == steps and lock.widest == len(RATES)
    assert widths == [len(RATES)] * steps


def test_members_that_finish_early_leave_the_rounds():
    """Member i takes i + 1 steps: the rounds shrink 4, 3, 2, 1 and nobody waits forever."""
    widths: list[int] = []
    lock = LockStep(len(RATES), batched(widths), lambda m, k, p: direct_field(*p))
    bodies = [(lambda i=i: euler_flow(RATES[i], i + 1, _poster(lock, i))) for i in range(4)]
    together = run_members(lock, bodies)
    assert together == [euler_flow(RATES[i], i + 1, direct_field) for i in range(4)]
    assert widths == [4, 3, 2, 1] and lock.rounds == 4


def test_an_error_goes_to_its_member_only():
    def evaluate(requests):
        return [
            (False, ValueError("bad point")) if m == 1 else (True, 2 * p)
            for m, _, p in requests
        ]

    lock = LockStep(3, evaluate, lambda m, k, p: 2 * p)
    results = run_members(lock, [(lambda i=i: lock.request(i, "x", 10 + i)) for i in range(3)])
    assert results[0] == 20 and results[2] == 24
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad point"


def test_an_interrupt_reaches_every_member_once_then_requests_run_directly():
    """Ctrl-C in a round: serve re-raises, each member gets one KeyboardInterrupt at its
    next request, and later requests are computed in the member's thread (serialized)."""
    rounds = {"n": 0}
    direct_calls: list[int] = []

    def evaluate(requests):
        rounds["n"] += 1
        if rounds["n"] == 2:
            raise KeyboardInterrupt
        return [(True, p) for _, _, p in requests]

    def direct(member, kind, payload):
        direct_calls.append(member)
        return -payload

    lock = LockStep(3, evaluate, direct)

    def body(i):
        first = lock.request(i, "x", 1)  # served in round 1
        try:
            lock.request(i, "x", 2)  # round 2 is interrupted
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        return first, interrupted, lock.request(i, "x", 3), lock.request(i, "x", 4)

    results = run_members(lock, [(lambda i=i: body(i)) for i in range(3)], interrupted=True)
    assert results == [(1, True, -3, -4)] * 3
    assert rounds["n"] == 2 and lock.rounds == 1  # the interrupted round is not counted
    assert sorted(direct_calls) == [0, 0, 1, 1, 2, 2]
