"""The executor's watch over a pass (executor._watched): rows pass through as they come; a pass that stalls is
ended by its cancel callback, and what it yielded before stays yielded."""

from __future__ import annotations

import threading
import time

import pytest

from forvalue_ray.job import executor


def rows_then_block(n: int, unblock: threading.Event, gap_s: float = 0.0):
    """n rows, then a wait (a task Ray Data never sees finish) until ``unblock``, then the error a cancelled
    pass raises."""
    for i in range(n):
        time.sleep(gap_s)
        yield {"shard": f"s{i}"}
    unblock.wait()
    raise RuntimeError("the pass was shut down")


def test_rows_pass_through_in_order_and_a_live_pass_is_never_ended():
    asked = []
    got = list(executor._watched(iter([{"shard": str(i)} for i in range(5)]),
                                 lambda idle, longest: asked.append(idle) or True, lambda: None, poll_s=0.05))
    assert [r["shard"] for r in got] == ["0", "1", "2", "3", "4"]


def test_a_stalled_pass_is_cancelled_once_and_keeps_what_it_yielded():
    unblock, calls, asked = threading.Event(), [], []

    def stalled(idle, longest):
        asked.append((idle, longest))
        return idle > 0.3

    got = list(executor._watched(rows_then_block(3, unblock, gap_s=0.1), stalled,
                                 lambda: calls.append(1) or unblock.set(), poll_s=0.05))
    assert [r["shard"] for r in got] == ["s0", "s1", "s2"] and calls == [1]
    idle, longest = asked[-1]
    assert idle > 0.3 and 0.09 < longest < 0.3, asked[-1]  # the longest wait between rows, ~gap_s
    assert all(i <= 0.3 for i, _ in asked[:-1])  # asked as the wait grew, until it said so


def test_a_pass_its_reader_stops_reading_is_ended():
    unblock, calls = threading.Event(), []
    rows = executor._watched(rows_then_block(3, unblock), lambda *a: False, lambda: calls.append(1) or unblock.set(),
                             poll_s=0.05)
    assert next(rows)["shard"] == "s0" and calls == []
    rows.close()  # the caller gave up (an error of its own): the pass must not run on in the reading thread
    assert calls == [1]


def test_an_error_of_a_pass_that_was_not_cancelled_is_raised():
    unblock = threading.Event()
    unblock.set()
    with pytest.raises(RuntimeError, match="shut down"):
        list(executor._watched(rows_then_block(1, unblock), lambda *a: False, lambda: None, poll_s=0.05))


def test_a_pass_that_never_wakes_after_cancel_is_left_behind(monkeypatch):
    monkeypatch.setattr(executor, "CANCEL_GRACE_S", 0.3)
    never = threading.Event()
    t0 = time.time()
    got = list(executor._watched(rows_then_block(2, never), lambda idle, longest: idle > 0.2, lambda: None,
                                 poll_s=0.05))
    assert len(got) == 2 and time.time() - t0 < 5
    never.set()  # let the reading thread end


class HangOnShard:
    """A step that never finishes one shard (as a task Ray Data waits on forever) and passes the others."""

    def __init__(self, hang: str):
        self.hang = hang

    def __call__(self, batch):
        key = str(batch["key"][0])
        if key == self.hang:
            time.sleep(10 ** 6)
        return {"shard": [key]}


@pytest.mark.timeout(300)
def test_a_round_stalled_after_a_node_loss_is_ended_on_a_real_ray(monkeypatch):
    """executor._shard_round on a local Ray: a shard's task never ends and a node is lost (the alive set
    shrinks); the pass is ended through Ray Data's own executor thread (the private names this relies on are
    Ray 2.60's: this test fails if they change), the shards finished before it are yielded, and the round
    returns."""
    import sys

    from ray import cloudpickle

    from forvalue_ray.io import Shard, Shards
    from jobtools import local_ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module

    alive = iter([{"a", "b"}])  # the round starts with two nodes; every later look finds one
    monkeypatch.setattr(executor, "_alive_nodes", lambda: next(alive, {"a"}))
    monkeypatch.setattr(executor, "NODE_LOSS_STALL_S", 20)  # time for both actors to start here
    monkeypatch.setattr(executor, "CANCEL_GRACE_S", 30)
    monkeypatch.setattr(executor, "STALL_MARGIN_S", 5)
    monkeypatch.setattr(executor, "STALL_GAPS", 1)
    shards = Shards.of([Shard(f"s{i}", f"/data/f{i}.parquet", "parquet", 0, 1, 1, f"f{i}") for i in range(4)])
    stage = executor.Stage(HangOnShard, {"hang": "s0"}, (2, 2), {"num_cpus": 1})
    with local_ray():
        t0 = time.time()
        got = [r["shard"] for r in executor._shard_round(shards, [stage], "test")]
        assert time.time() - t0 < 120
    # the other actor's shards arrived (a shard queued behind s0 on its actor may not have)
    assert got and set(got) <= {"s1", "s2", "s3"}, got
