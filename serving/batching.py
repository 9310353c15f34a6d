"""Micro-batching: concurrent requests share one model call, on the event loop or in a worker
thread, as their size makes worth it.

The score routes validate and map a request's body inside :meth:`MicroBatcher.expecting`, then
:meth:`MicroBatcher.enqueue` takes its model inputs and :meth:`MicroBatcher.wait` awaits the
scores. Two paths, by the rows a model call would get:

* **Small requests are scored on the event loop.** A request of fewer than ``min_rows`` rows
  waits for the other small requests the loop validates in the same pass (those whose bodies
  arrived together: a callback scheduled with ``call_soon`` runs after them), then they share
  one model call on the loop, or go to the worker together if they add up to ``min_rows``. A
  call of a few rows is mostly Python between torch operations, which holds the GIL: in a
  worker thread it ran no faster beside the loop, and under load the two threads fought for the
  GIL at every operation (1-row requests at concurrency 8: a model call of 4 rows took 3 ms
  and 0.95 ms of CPU in the worker against 0.2 ms in a loop of its own), besides a thread hop
  each way per request.
* **Larger batches run in the worker thread**: it takes the oldest waiting request, gathers what
  else is queued and, while other requests are still being validated (so will be queued soon)
  and the batch is smaller than ``min_rows``, waits for them up to ``max_wait``; then, for up to
  ``max_rows`` rows, it concatenates their inputs (a few arrays per request), runs the model
  once, and hands each request its own slice of the scores, in order. A lone request never
  waits; under load requests pile up while the model runs, so batches grow and throughput with
  them. Large operations release the GIL, so the next requests are parsed on the other core
  while a batch is scored; between operations the worker needs the GIL back, which the thread
  parsing hands over within ``CTCVR_GIL_SWITCH_MS`` (``serving.main`` sets Python's switch
  interval to it). :meth:`MicroBatcher.submit` (from any thread) always takes this path.

Each queued request carries the scorer that validated it: after a hot reload, requests validated
against the old model are still scored by it (a batch never mixes models), so no request is
dropped or scored by a model whose schema it was not checked against.

Ranking requests (:class:`~serving.model.RankFeatures`) batch too: with each other, when they
take the same features from their contexts (each request's context row is broadcast to its own
candidates), never with rows of ``/v1/score``. A ranking request of one candidate is one row
(``Scorer.featurize_rank``) and batches with the rows.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from serving.model import Features, RankFeatures
from serving.scorer import Scorer

__all__ = ["BatchResult", "MicroBatcher", "Overloaded", "ScoringTimeout"]

log = logging.getLogger("ctcvr.serving")

_POLL_S = 0.0005  # how often a waiting batch rechecks whether requests are still on the way


class Overloaded(RuntimeError):
    """Too many rows are waiting, or the service is stopping; retry later (HTTP 503)."""


class ScoringTimeout(RuntimeError):
    """The request waited longer than its timeout (HTTP 503)."""


@dataclass(frozen=True)
class BatchResult:
    scores: np.ndarray  # (n, 3) float32 of this request's rows: pctr, pcvr, pctcvr
    version: str  # the model that computed them


@dataclass
class _Pending:
    scorer: Scorer
    features: Features | RankFeatures
    # a thread-safe future for requests submitted from any thread; an asyncio one (cheaper to
    # settle and await: no wake-up of the loop through its self-pipe) for those enqueued on it
    future: Future | asyncio.Future = field(default_factory=Future)

    @property
    def size(self) -> int:
        return self.features.size

    def batches_with(self, other: _Pending) -> bool:
        """Whether both can share a model call: the same model, and inputs of one kind (rows,
        or ranking requests taking the same features from their contexts)."""
        if other.scorer is not self.scorer:
            return False
        mine, theirs = self.features, other.features
        if isinstance(mine, RankFeatures) and isinstance(theirs, RankFeatures):
            return mine.from_context == theirs.from_context
        return isinstance(mine, Features) and isinstance(theirs, Features)


class MicroBatcher:
    """Groups concurrent requests into model calls of at most ``max_rows`` rows.

    Args:
        max_rows: the most rows per model call (a larger single request runs alone).
        max_wait_s: how long a batch may wait for requests still being validated.
        min_rows: a batch of this many rows runs at once, in the worker: it already spreads the
            per-call cost of the model over enough rows, and waiting would only keep the model
            idle while the requests it waits for are parsed. Smaller batches of requests given
            to :meth:`enqueue` run on the event loop.
        max_queue_rows: rows allowed to wait; beyond it :meth:`submit` raises :class:`Overloaded`.
        on_batch: called with (rows, seconds) after each model call (metrics).

    Example::

        batcher = MicroBatcher(max_rows=4096, max_wait_s=0.002, max_queue_rows=65_536)
        batcher.start()  # in the app's lifespan: small requests are then scored on its loop
        with batcher.expecting():
            ticket = batcher.enqueue(scorer, scorer.prepare(body))
        result = await batcher.wait(ticket, timeout=10.0)  # BatchResult(scores (n, 3), version)

    From a thread: ``batcher.result(batcher.submit(scorer, features), timeout=10.0)``.
    """

    def __init__(
        self,
        max_rows: int,
        max_wait_s: float,
        max_queue_rows: int,
        on_batch: Callable[[int, float], None] | None = None,
        min_rows: int = 64,
    ) -> None:
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.min_rows = min_rows
        self.max_queue_rows = max_queue_rows
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._queued_rows = 0
        self._expected = 0  # requests being validated, about to be submitted
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._carry: _Pending | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._on_loop: list[_Pending] = []  # small requests waiting for this loop pass to end

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        """Start the worker; called on an event loop, small requests are scored on it."""
        try:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        except RuntimeError:
            self._loop = self._loop_thread = None
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ctcvr-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Score what is queued, then end the worker."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    @contextmanager
    def expecting(self) -> Iterator[None]:
        """Marks a request that is being validated and will be submitted: batches wait for it."""
        with self._lock:
            self._expected += 1
        try:
            yield
        finally:
            with self._lock:
                self._expected -= 1

    def submit(self, scorer: Scorer, features: Features | RankFeatures) -> Future:
        """Queue a request's model inputs (mapped by ``scorer``) for scoring.

        Raises:
            Overloaded: more than ``max_queue_rows`` rows would be waiting, or stopping.
        """
        if self._thread is None:
            raise Overloaded("the service is not accepting requests (starting or stopping)")
        pending = _Pending(scorer, features)
        self._admit(pending)
        self._queue.put(pending)
        return pending.future

    def enqueue(self, scorer: Scorer, features: Features | RankFeatures) -> Future:
        """:meth:`submit`, from the event loop the batcher was started on: a request of fewer
        than ``min_rows`` rows waits for the rest of this loop pass, and the small requests of
        the pass are scored together (module docstring).

        Raises:
            Overloaded: more than ``max_queue_rows`` rows would be waiting, or stopping.
        """
        if self._loop is None or features.size >= self.min_rows:
            return self.submit(scorer, features)
        if self._thread is None:
            raise Overloaded("the service is not accepting requests (starting or stopping)")
        pending = _Pending(scorer, features, self._loop.create_future())
        self._admit(pending)
        if not self._on_loop:
            self._loop.call_soon(self._score_loop_pass)
        self._on_loop.append(pending)
        return pending.future

    def _admit(self, pending: _Pending) -> None:
        with self._lock:
            if self._queued_rows + pending.size > self.max_queue_rows and self._queued_rows > 0:
                raise Overloaded(f"{self._queued_rows} rows are already waiting to be scored")
            self._queued_rows += pending.size

    def _score_loop_pass(self) -> None:
        """The small requests enqueued in this loop pass, in order: batches of fewer than
        ``min_rows`` rows are scored here, larger ones go to the worker."""
        waiting, self._on_loop = self._on_loop, []
        while waiting:
            batch = [waiting[0]]
            rows = batch[0].size
            for item in waiting[1:]:
                if not batch[0].batches_with(item) or rows + item.size > self.max_rows:
                    break
                batch.append(item)
                rows += item.size
            waiting = waiting[len(batch) :]
            if rows < self.min_rows:
                self._execute(batch)
            elif self._thread is None:  # stopped during this pass
                self._refuse(batch, Overloaded("the service is stopping"))
            else:
                for item in batch:  # queued together, so the worker gathers them as one batch
                    self._queue.put(item)

    @staticmethod
    async def wait(future: Future | asyncio.Future, timeout: float) -> BatchResult:
        """Await an enqueued or submitted request's scores without holding a thread.

        Raises:
            ScoringTimeout: no result within ``timeout`` seconds.
        """
        if isinstance(future, Future):
            future = asyncio.wrap_future(future)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:  # the future is cancelled: its batch skips it if not started
            raise ScoringTimeout(f"no result within {timeout:g} s") from None

    @staticmethod
    def result(future: Future, timeout: float) -> BatchResult:
        """Wait for a submitted request's scores.

        Raises:
            ScoringTimeout: no result within ``timeout`` seconds.
        """
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()  # the worker skips it if it has not started it yet
            raise ScoringTimeout(f"no result within {timeout:g} s") from None

    def score(
        self, scorer: Scorer, features: Features | RankFeatures, timeout: float
    ) -> BatchResult:
        """:meth:`submit` then :meth:`result`."""
        return self.result(self.submit(scorer, features), timeout)

    # Worker ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while self._next_batch():
            pass

    def _next_batch(self) -> bool:
        """Wait for requests and score one batch; False once stopped. (A scored batch goes with
        this call's locals: while the worker waits, it keeps no request, and no replaced model,
        alive.)"""
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        if first is None:
            return False
        batch, stop = self._gather(first)
        self._execute(batch)
        if stop:
            self._drain()
        return not stop

    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        batch, rows = [first], first.size
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_rows:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if self._expected == 0 or remaining <= 0 or rows >= self.min_rows:
                    break  # nobody else is on the way, waited long enough, or large enough
                try:  # short polls: an arrival wakes us at once, the poll rechecks _expected
                    item = self._queue.get(timeout=min(remaining, _POLL_S))
                except queue.Empty:
                    continue
            if item is None:
                return batch, True
            if not first.batches_with(item) or rows + item.size > self.max_rows:
                self._carry = item  # starts the next batch, keeping arrival order
                break
            batch.append(item)
            rows += item.size
        return batch, False

    def _drain(self) -> None:
        while True:
            if self._carry is not None:
                item, self._carry = self._carry, None
            else:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
            if item is not None:
                batch, _ = self._gather(item)
                self._execute(batch)

    def _refuse(self, batch: list[_Pending], err: Exception) -> None:
        with self._lock:
            self._queued_rows -= sum(p.size for p in batch)
        for p in batch:
            if _start(p.future):
                self._settle(p.future, error=err)

    def _execute(self, batch: list[_Pending]) -> None:
        with self._lock:
            self._queued_rows -= sum(p.size for p in batch)
        live = [p for p in batch if _start(p.future)]
        if not live:
            return
        scorer = live[0].scorer
        start = time.perf_counter()
        try:
            features = type(live[0].features).concat([p.features for p in live])
            scores = scorer.predict(features)
        except Exception as err:  # handed to each request, which answers 500 without details
            log.exception("scoring failed for a batch of %d request(s)", len(live))
            for p in live:
                self._settle(p.future, error=err)
            return
        if self.on_batch is not None:
            self.on_batch(features.size, time.perf_counter() - start)
        end = 0
        for p in live:
            start, end = end, end + p.size
            self._settle(p.future, BatchResult(scores[start:end], scorer.version))

    def _settle(
        self,
        future: Future | asyncio.Future,
        result: BatchResult | None = None,
        error: Exception | None = None,
    ) -> None:
        """Hand a request its scores or error: an asyncio future through its loop when this is
        the worker thread (a batch of small requests that reached ``min_rows`` together)."""
        if isinstance(future, Future):
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
        elif threading.get_ident() == self._loop_thread:
            _settle_on_loop(future, result, error)
        else:
            future.get_loop().call_soon_threadsafe(_settle_on_loop, future, result, error)


def _start(future: Future | asyncio.Future) -> bool:
    """Whether a request is still waiting for its scores (False once its wait timed out)."""
    if isinstance(future, Future):
        return future.set_running_or_notify_cancel()
    return not future.cancelled()


def _settle_on_loop(
    future: asyncio.Future, result: BatchResult | None, error: Exception | None
) -> None:
    if future.done():  # cancelled since: its wait timed out
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
