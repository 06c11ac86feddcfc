r"""Batches of initial points: ``B`` flows integrated together in lock-step rounds.

:func:`~subriemann.gradient_flow` with initial points ``[B, K]`` calls
:func:`run_batch`: each flow runs the single-flow engine in its own thread
(its :class:`~subriemann.flow.engine.Flow` holds its own copy of the metric,
so its threshold is its own), and posts every evaluation to a
:class:`~subriemann.flow.lockstep.LockStep`; the calling thread serves them in
rounds with :func:`serve_round` (batched vector fields first, through
:func:`subriemann.linalg.prefill_states`, then every answer from the caches).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from subriemann.flow.lockstep import LockStep

__all__ = ["MEMBER", "serve_round", "run_batch"]

MEMBER = threading.local()
"""``lockstep``: set in the threads of a batch of flows (see :func:`run_batch`)."""


def _direct(fl: Any, kind: str, payload: Any) -> Any:
    return fl.compute(kind, payload)


def serve_round(requests: Sequence[tuple[Any, str, Any]]) -> list[tuple[bool, Any]]:
    """One lock-step round: batched vector fields first, then every answer from the caches.

    ``requests`` are ``(flow, kind, (theta, tau))``; only the vector fields at
    the flows' own threshold (``tau is None``) are batched.
    """
    from subriemann.linalg import prefill_states

    fields = [(fl, p[0]) for fl, kind, p in requests if kind == "field" and p[1] is None]
    if len(fields) > 1:
        fl0 = fields[0][0]
        m = fl0.metric  # the members' metrics are copies of one metric
        # which cache entries the vector field reads (filling them is only a cache fill)
        need = m.gradient_needs
        if need is not None:
            try:
                prefill_states(fl0.space, torch.stack([th for _, th in fields]), need)
            except Exception:  # noqa: BLE001  (the single-point route below reports it)
                pass
    out: list[tuple[bool, Any]] = []
    for fl, kind, p in requests:
        try:
            out.append((True, fl.compute(kind, p)))
        except Exception as err:  # noqa: BLE001  (raised again in the member's thread)
            out.append((False, err))
    return out


def run_batch(space: Any, points: Tensor, run_one: Callable[[Tensor], Any]) -> list[Any]:
    """Run ``run_one(points[i])`` for every ``i`` in threads, serving their rounds here.

    ``KeyboardInterrupt`` stops every member at its next request (each keeps its
    trajectory); an exception raised in a member is raised here.
    """
    n = points.shape[0]
    results: list[Any] = [None] * n
    lock = LockStep(n, serve_round, _direct)

    def member(i: int) -> None:
        try:
            MEMBER.lockstep = lock  # this thread's flow posts its evaluations to the rounds
            results[i] = run_one(points[i])
        except BaseException as err:  # noqa: BLE001  (re-raised by the caller below)
            results[i] = err
        finally:
            lock.finished()

    threads = [threading.Thread(target=member, args=(i,), daemon=True) for i in range(n)]
    with space.state_cache(4 * n):
        for t in threads:
            t.start()
        try:
            lock.serve()
        except KeyboardInterrupt:
            pass  # every member stops at its next request and keeps its trajectory
        for t in threads:
            t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
