"""The micro-batcher: requests merged into model calls, in order, bounded, never mixing models."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pytest

from serving.artifact import load_artifact
from serving.batching import MicroBatcher, Overloaded, ScoringTimeout
from serving.model import Features
from serving.scorer import Scorer


class GatedScorer:
    """A scorer whose model calls wait for a gate (to hold the worker busy) and are recorded."""

    def __init__(self, scorer: Scorer, name: str | None = None) -> None:
        self.artifact, self._scorer = scorer.artifact, scorer
        self.version = name or scorer.version
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set once the worker is inside a model call
        self.calls: list[int] = []
        self.threads: list[str] = []  # the thread of each model call

    def predict(self, features):
        self.entered.set()
        self.gate.wait(10)
        self.calls.append(features.size)
        self.threads.append(threading.current_thread().name)
        return self._scorer.predict(features)


@pytest.fixture(scope="module")
def scorer(edge_model) -> Scorer:
    return Scorer(load_artifact(edge_model.model), max_rows=1024)


@pytest.fixture(scope="module")
def inputs(scorer, edge_model):
    """``inputs(start, stop)``: the model inputs of those rows of the edge model's data."""

    def make(start: int, stop: int) -> Features:
        return scorer.prepare(orjson.dumps({"rows": edge_model.rows[start:stop]}))

    return make


@pytest.fixture
def batcher():
    batches: list[int] = []
    b = MicroBatcher(
        max_rows=64,
        max_wait_s=0.05,
        max_queue_rows=1000,
        on_batch=lambda rows, _: batches.append(rows),
    )
    b.batches = batches
    b.start()
    yield b
    b.stop()


def test_concurrent_requests_share_model_calls_and_get_their_own_rows(
    batcher, scorer, inputs, edge_model
):
    requests = [(k * 5, 1 + k % 6) for k in range(24)]
    barrier = threading.Barrier(len(requests))

    def one(request):
        start, size = request
        barrier.wait()
        with batcher.expecting():
            ticket = batcher.submit(scorer, inputs(start, start + size))
        return batcher.result(ticket, timeout=10)

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(one, requests))
    for (start, size), result in zip(requests, results):
        assert result.version == edge_model.version and result.scores.shape == (size, 3)
        np.testing.assert_allclose(
            result.scores, edge_model.expected[start : start + size], atol=1e-5
        )
    assert sum(batcher.batches) == sum(size for _, size in requests)
    assert len(batcher.batches) < len(requests)  # merged
    assert max(batcher.batches) <= 64  # bounded


def test_a_lone_request_does_not_wait(scorer, inputs, edge_model):
    import time

    b = MicroBatcher(max_rows=64, max_wait_s=5.0, max_queue_rows=1000)
    b.start()
    try:
        start = time.perf_counter()
        b.score(scorer, inputs(0, 2), timeout=10)
        assert time.perf_counter() - start < 2.0  # nobody else was being validated: no 5 s wait
    finally:
        b.stop()


def test_only_small_batches_wait_for_requests_being_validated(scorer, inputs):
    import time

    b = MicroBatcher(max_rows=64, max_wait_s=5.0, max_queue_rows=1000, min_rows=4)
    b.start()
    try:
        with b.expecting():  # another request is being validated all along
            start = time.perf_counter()
            assert b.score(scorer, inputs(0, 4), timeout=10).scores.shape == (
                4,
                3,
            )  # 4 rows: at once
            assert time.perf_counter() - start < 2.0
            small = b.submit(scorer, inputs(0, 2))  # 2 rows: waits for the other request
            time.sleep(0.3)
            assert not small.done()
        assert b.result(small, timeout=10).scores.shape == (2, 3)  # nobody is coming: it runs
    finally:
        b.stop()


def test_batches_never_mix_models(batcher, scorer, inputs, edge_model):
    a, b = GatedScorer(scorer, "A"), GatedScorer(scorer, "B")
    a.gate.clear()
    first = batcher.submit(a, inputs(0, 1))  # holds the worker
    assert a.entered.wait(10)
    order = [a, b, b, a, a, b]
    tickets = [(s, batcher.submit(s, inputs(k, k + 2))) for k, s in enumerate(order)]
    a.gate.set()
    assert batcher.result(first, 10).version == "A"
    for k, (s, ticket) in enumerate(tickets):
        result = batcher.result(ticket, 10)
        assert result.version == s.version
        np.testing.assert_allclose(result.scores, edge_model.expected[k : k + 2], atol=1e-5)
    assert a.calls == [1, 2, 4] and b.calls == [4, 2]  # runs of the same model merged, in order


def test_overload_and_timeout(scorer, inputs, edge_model):
    gated = GatedScorer(scorer)
    gated.gate.clear()
    b = MicroBatcher(max_rows=64, max_wait_s=0.0, max_queue_rows=10)
    b.start()
    try:
        busy = b.submit(gated, inputs(0, 1))
        assert gated.entered.wait(10)  # the worker is now inside the gated model call
        waiting = b.submit(gated, inputs(0, 8))
        with pytest.raises(Overloaded, match="rows are already waiting"):
            b.submit(gated, inputs(0, 3))
        with pytest.raises(ScoringTimeout):
            b.result(waiting, timeout=0.05)
        assert waiting.cancelled()
        gated.gate.set()
        assert b.result(busy, 10).scores.shape == (1, 3)
        assert gated.calls == [1]  # the timed-out request was never scored
    finally:
        gated.gate.set()
        b.stop()
    with pytest.raises(Overloaded, match="not accepting requests"):
        b.submit(scorer, inputs(0, 1))


def test_a_failing_model_call_fails_its_requests_only(batcher, scorer, inputs, edge_model):
    class Broken(GatedScorer):
        def predict(self, features):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        batcher.score(Broken(scorer), inputs(0, 2), timeout=10)
    assert batcher.score(scorer, inputs(0, 2), timeout=10).scores.shape == (2, 3)


def test_stop_scores_what_is_queued(scorer, inputs, edge_model):
    gated = GatedScorer(scorer)
    gated.gate.clear()
    b = MicroBatcher(max_rows=2, max_wait_s=0.0, max_queue_rows=1000)
    b.start()
    tickets = [b.submit(gated, inputs(k, k + 2)) for k in range(5)]
    stopper = threading.Thread(target=b.stop)
    stopper.start()
    gated.gate.set()
    stopper.join(10)
    assert all(t.done() and t.result().scores.shape == (2, 3) for t in tickets)


def test_ranking_requests_batch_with_their_kind_only(batcher, scorer, inputs, edge_model):
    """Ranking requests taking the same features from their contexts share a model call, each
    with its own context; rows of /v1/score and other splits go in calls of their own."""
    rows = edge_model.rows

    def ranking(start: int, stop: int, context: tuple[str, ...]):
        ctx = {k: v for k, v in rows[start].items() if k in context}
        candidates = [{k: v for k, v in r.items() if k not in context} for r in rows[start:stop]]
        return scorer.prepare_rank(orjson.dumps({"context": ctx, "candidates": candidates}))

    gated = GatedScorer(scorer)
    gated.gate.clear()
    first = batcher.submit(gated, inputs(0, 2))  # holds the worker while the others queue
    assert gated.entered.wait(10)
    split = ("user", "city", "strict_cat")
    queued = [
        ranking(0, 5, split),
        ranking(5, 8, split),
        ranking(8, 10, ("user",)),
        ranking(10, 13, split),
    ]
    tickets = [batcher.submit(gated, r.features) for r in queued]
    plain = batcher.submit(gated, inputs(12, 14))
    gated.gate.set()
    assert MicroBatcher.result(first, 10).scores.shape == (2, 3)
    for r, ticket in zip(queued, tickets, strict=True):
        np.testing.assert_allclose(
            MicroBatcher.result(ticket, 10).scores, scorer.predict(r.features), atol=1e-6
        )
    assert MicroBatcher.result(plain, 10).scores.shape == (2, 3)
    # the worker's calls: the first rows; two rankings of one split; one of another split; the
    # last ranking (the split again, but after another kind: arrival order is kept); the rows
    assert gated.calls == [2, 8, 2, 3, 2]


# Small requests on the event loop -------------------------------------------------------------


def _on_a_loop(batcher: MicroBatcher, requests) -> list:
    """Start ``batcher`` on a new event loop, enqueue ``requests`` ((scorer, features) pairs) in
    one loop pass and await every result (or the exception it raised), in order."""

    async def main():
        batcher.start()
        try:
            tickets = []
            for scorer, features in requests:
                try:
                    tickets.append(batcher.enqueue(scorer, features))
                except Overloaded as err:
                    tickets.append(err)
            results = []
            for ticket in tickets:
                try:
                    results.append(
                        ticket
                        if isinstance(ticket, Exception)
                        else await MicroBatcher.wait(ticket, timeout=10)
                    )
                except Exception as err:  # noqa: BLE001 - the test checks which
                    results.append(err)
            return results
        finally:
            batcher.stop()

    return asyncio.run(main())


def test_small_requests_of_one_loop_pass_share_a_model_call_on_the_loop(scorer, inputs, edge_model):
    gated = GatedScorer(scorer)
    batcher = MicroBatcher(max_rows=64, max_wait_s=0.05, max_queue_rows=1000, min_rows=16)
    sizes = [1, 3, 2, 5]
    starts = [0, 1, 4, 6]
    results = _on_a_loop(
        batcher, [(gated, inputs(k, k + n)) for k, n in zip(starts, sizes, strict=True)]
    )
    assert gated.calls == [11]  # one call for the pass's 11 rows
    assert gated.threads == [threading.current_thread().name]  # asyncio.run's loop: this thread
    for k, n, result in zip(starts, sizes, results, strict=True):
        np.testing.assert_allclose(result.scores, edge_model.expected[k : k + n], atol=1e-5)
    assert batcher.queued_rows == 0


def test_small_requests_adding_up_to_min_rows_and_large_ones_go_to_the_worker(scorer, inputs):
    gated = GatedScorer(scorer)
    batcher = MicroBatcher(max_rows=64, max_wait_s=0.0, max_queue_rows=1000, min_rows=8)
    results = _on_a_loop(batcher, [(gated, inputs(0, 5)), (gated, inputs(5, 10))])
    assert [r.scores.shape for r in results] == [(5, 3), (5, 3)]
    assert gated.calls == [10] and gated.threads == ["ctcvr-batcher"]  # together, in the worker
    gated.calls.clear(), gated.threads.clear()
    _on_a_loop(batcher, [(gated, inputs(0, 8))])  # min_rows on its own: straight to the worker
    assert gated.calls == [8] and gated.threads == ["ctcvr-batcher"]


def test_a_loop_pass_keeps_order_and_never_mixes_models(scorer, inputs, edge_model):
    a, b = GatedScorer(scorer, "A"), GatedScorer(scorer, "B")
    batcher = MicroBatcher(max_rows=64, max_wait_s=0.0, max_queue_rows=1000, min_rows=64)
    order = [a, b, b, a, a, b]
    results = _on_a_loop(batcher, [(s, inputs(k, k + 2)) for k, s in enumerate(order)])
    for k, (s, result) in enumerate(zip(order, results, strict=True)):
        assert result.version == s.version
        np.testing.assert_allclose(result.scores, edge_model.expected[k : k + 2], atol=1e-5)
    assert a.calls == [2, 4] and b.calls == [4, 2]  # runs of one model merged, in order


def test_a_failing_model_call_on_the_loop_fails_its_requests_only(scorer, inputs):
    class Broken(GatedScorer):
        def predict(self, features):
            raise RuntimeError("boom")

    batcher = MicroBatcher(max_rows=64, max_wait_s=0.0, max_queue_rows=1000)
    broken, fine = Broken(scorer), GatedScorer(scorer)
    first, second, third = _on_a_loop(
        batcher, [(broken, inputs(0, 1)), (broken, inputs(1, 2)), (fine, inputs(2, 4))]
    )
    assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError)
    assert third.scores.shape == (2, 3) and fine.calls == [2]
    assert batcher.queued_rows == 0


def test_the_loop_path_counts_waiting_rows_against_the_queue_bound(scorer, inputs):
    batcher = MicroBatcher(max_rows=64, max_wait_s=0.0, max_queue_rows=4)
    results = _on_a_loop(batcher, [(scorer, inputs(0, 3)), (scorer, inputs(3, 5))])
    assert results[0].scores.shape == (3, 3)
    assert isinstance(results[1], Overloaded)  # 3 rows waiting in the pass, 2 more exceed 4
    assert batcher.queued_rows == 0
    with pytest.raises(Overloaded, match="not accepting requests"):
        batcher.enqueue(scorer, inputs(0, 1))


def test_a_small_request_that_stopped_waiting_on_the_loop_is_not_scored(scorer, inputs):
    gated = GatedScorer(scorer)
    batcher = MicroBatcher(max_rows=64, max_wait_s=0.0, max_queue_rows=1000, min_rows=16)

    async def main():
        never = asyncio.get_running_loop().create_future()
        with pytest.raises(ScoringTimeout):
            await MicroBatcher.wait(never, timeout=0)
        assert never.cancelled()  # what a wait that timed out leaves behind
        batcher.start()
        try:
            impatient = batcher.enqueue(gated, inputs(0, 1))
            patient = batcher.enqueue(gated, inputs(1, 3))
            impatient.cancel()  # its wait timed out before the loop pass
            return await MicroBatcher.wait(patient, timeout=10)
        finally:
            batcher.stop()

    result = asyncio.run(main())
    assert result.scores.shape == (2, 3)
    assert gated.calls == [2]  # the pass scored the request still waiting, alone
    assert batcher.queued_rows == 0
