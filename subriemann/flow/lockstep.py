r"""Lock-step integration of a batch of flows: one batched evaluation per round.

:func:`subriemann.gradient_flow` with initial points ``[B, K]`` runs the ``B``
flows together.  Each flow keeps its own adaptive step, rank events and
status (the single-flow engine runs unchanged, one thread per flow), but it
never evaluates the network itself: it posts a request (the vector field,
the singular values or the outputs at a point :math:`\theta_b`) and waits.
The calling thread collects the requests of all flows that are still
running and serves them in **one round**: the vector fields are computed with
batched linear algebra (:func:`subriemann.linalg.prefill_states`: one
:func:`torch.func.vmap` over the ``B`` points for :math:`D[\theta_b]` or
:math:`\nabla_\theta C(\theta_b)`, a batched QR and SVD), then every request
is answered from the per-point caches.

All network evaluations and factorizations run in the calling thread, so no
two threads ever use :mod:`torch.func` at the same time (forward-mode AD is
not thread-safe).

``KeyboardInterrupt`` (Ctrl-C reaches the calling thread) interrupts every
flow at its next request: each keeps its trajectory up to its last accepted
step, exactly as a single interrupted flow does, and the batch returns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["LockStep"]

Request = tuple[Any, str, Any]
"""``(member, kind, payload)`` as posted by a flow."""


class LockStep:
    """Rounds of batched evaluation for ``n`` member threads.

    Parameters
    ----------
    n : int
        Number of members (threads) that will post requests.
    evaluate : callable
        ``evaluate(requests) -> results``: maps the list of pending requests
        ``(member, kind, payload)`` of one round to a list of the same length
        of ``(ok, value)`` pairs (``ok=False``: ``value`` is the exception to
        raise in that member).  Runs in the thread that calls :meth:`serve`.
    direct : callable
        ``direct(member, kind, payload) -> value``: computes one request in the
        member's own thread, used after an interrupt (when :meth:`serve` no
        longer runs), serialized by a lock.

    Examples
    --------
    >>> import threading
    >>> ls = LockStep(2, lambda reqs: [(True, p * 10) for _, _, p in reqs],
    ...               lambda m, k, p: p * 10)
    >>> out = {}
    >>> def member(i):
    ...     try:
    ...         out[i] = ls.request(i, "times10", i + 1)
    ...     finally:
    ...         ls.finished()
    >>> threads = [threading.Thread(target=member, args=(i,)) for i in range(2)]
    >>> for t in threads:
    ...     t.start()
    >>> ls.serve()
    >>> for t in threads:
    ...     t.join()
    >>> sorted(out.items()), ls.rounds
    ([(0, 10), (1, 20)], 1)
    """

    def __init__(
        self,
        n: int,
        evaluate: Callable[[Sequence[Request]], list[tuple[bool, Any]]],
        direct: Callable[[Any, str, Any], Any],
    ) -> None:
        self._cv = threading.Condition()
        self._live = int(n)
        self._pending: dict[int, Request] = {}
        self._results: dict[int, tuple[bool, Any]] = {}
        self._evaluate = evaluate
        self._direct = direct
        self._direct_lock = threading.Lock()
        self._stopped = False
        self._told: set[int] = set()
        #: number of rounds served (one batched evaluation each)
        self.rounds = 0
        #: largest number of requests served in one round
        self.widest = 0

    # -- member side -------------------------------------------------------------
    def request(self, member: Any, kind: str, payload: Any) -> Any:
        """Post a request and wait for its round; returns the value or raises."""
        tid = threading.get_ident()
        with self._cv:
            if not self._stopped:
                self._pending[tid] = (member, kind, payload)
                self._cv.notify_all()
                while tid not in self._results and not self._stopped:
                    self._cv.wait()
            if tid in self._results:
                ok, value = self._results.pop(tid)
                if not ok:
                    raise value
                return value
            self._pending.pop(tid, None)
            first = tid not in self._told
            self._told.add(tid)
        if first:  # deliver the interrupt once to each member
            raise KeyboardInterrupt
        with self._direct_lock:
            return self._direct(member, kind, payload)

    def finished(self) -> None:
        """A member is done (call it in a ``finally``)."""
        with self._cv:
            self._live -= 1
            self._cv.notify_all()

    # -- serving side -------------------------------------------------------------
    def stop(self) -> None:
        """Interrupt every member at its next request (they then compute directly)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    def serve(self) -> None:
        """Serve rounds until every member has finished.

        A round starts when every live member is waiting on a request.  On
        ``KeyboardInterrupt`` the members are stopped and the exception is
        re-raised to the caller (which should then join the member threads).
        """
        try:
            while True:
                with self._cv:
                    while self._live > 0 and len(self._pending) < self._live:
                        self._cv.wait(timeout=0.2)  # the timeout keeps Ctrl-C responsive
                    if self._live <= 0:
                        return
                    batch = self._pending
                    self._pending = {}
                tids = list(batch)
                results = self._evaluate([batch[t] for t in tids])
                self.rounds += 1
                self.widest = max(self.widest, len(tids))
                with self._cv:
                    self._results.update(zip(tids, results))
                    self._cv.notify_all()
        except BaseException:
            self.stop()
            raise
