"""The only Ray code of the job: connecting, streaming shards through actor pools in rounds, tasks over shards,
broadcasts and reductions through the object store, progress. The passes say *what* runs; this module says *how*.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import queue
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Iterator

from .. import io
from ..io import Shards
from . import parts


def init_ray(address: str | None):
    """Connect to a cluster (``--ray-address`` / RAY_ADDRESS, set by ``ray job submit``) or start a local one."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and "ray" not in sys.modules:
        # a new local Ray runs with token authentication, Ray's own default, here chosen rather than left to Ray,
        # which would warn on every run that it chose it; Ray reads the mode once, when first imported
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # address="local": never attach to another `ray start` cluster on this machine by accident;
            # spare logical CPUs: a pipeline whose actors take every CPU starves the read tasks and hangs;
            # Ray's INFO lines ("Started a local Ray instance") are for a cluster's operator, not a laptop's user
            ray.init(address="local", num_cpus=max(4, (os.cpu_count() or 1) + 2), include_dashboard=False,
                     log_to_driver=True, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours reports rows/s and tokens/s per shard
    # Ray Data's INFO lines (each pass's plan and timing) go to its log file (ray-data.log in the session's logs);
    # its console keeps warnings and errors
    ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)
    # ... and Ray Data's once-per-process notice that its bars are off would only send a user looking for them
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")


@dataclass
class Stage:
    """One step of a streaming pass: ``step(**kwargs)`` as a pool of ``actors`` = (min, max) actors, each with
    ``resources`` (Ray's num_cpus / num_gpus)."""

    step: type
    kwargs: dict
    actors: tuple[int, int]
    resources: dict


def _as_actor(step: type) -> type:
    """The step class as a Ray Data actor: object refs among its arguments resolved (they arrive unresolved),
    and the node that ran each shard stamped on its summary."""
    import ray

    class Actor(step):
        def __init__(self, **kwargs):
            super().__init__(**{k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in kwargs.items()})

        def __call__(self, batch):
            out = super().__call__(batch)
            if "shard" in out:
                out["node"] = [node_id()] * len(out["shard"])
            return out

    Actor.__name__ = Actor.__qualname__ = step.__name__
    return Actor


def _progress(command: str, total: int, done_before: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done_before, unit="shard", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, desc=command)


# passes over the shards still without a part: a shard in flight on a lost node's actor fails fast
# (max_task_retries=0) instead of waiting for a restart the cluster may never have room for, and is redone here
SHARD_ROUNDS = 4


def run_shards(command: str, shards: Shards, done: set[str], stages: list[Stage],
               progress: bool = True) -> tuple[dict, dict]:
    """Stream the unfinished shards through the stages, in rounds until every shard has its part.
    Returns this invocation's totals (shards and parts.RUN_COUNTS, summed as summaries arrive: the driver keeps
    no per-shard record but the finished keys) and what it survived (nodes lost, shards retried, shards per node)."""
    todo = shards.without(done)
    tally = {"shards": 0, **dict.fromkeys(parts.RUN_COUNTS, 0)}
    faults = {"nodes_lost": [], "retried_shards": [], "shards_per_node": {}}
    if not todo:
        return tally, faults
    nodes_before = _alive_nodes()
    bar = _progress(command, len(shards), len(shards) - len(todo), progress)
    t0, per_node, finished = time.time(), collections.Counter(), set()
    for round_ in range(SHARD_ROUNDS):
        if round_:
            faults["retried_shards"] += todo.keys()
            print(f"{command}: retrying {len(todo)} shards that did not finish (first: {todo[0].key})",
                  file=sys.stderr, flush=True)
        for summary in _shard_round(todo, stages, command):
            if summary.get("error"):  # a deterministic failure (a damaged file): every round would fail the same
                bar.close()
                raise RuntimeError(f"shard {summary['shard']} ({summary.get('label') or ''}): {summary['error']}; "
                                   f"the {len(finished)} shards finished this run are kept")
            finished.add(summary["shard"])
            per_node[summary["node"]] += 1
            tally["shards"] += 1
            for k in parts.RUN_COUNTS:
                tally[k] += summary.get(k, 0)
            dt = max(time.time() - t0, 1e-9)
            bar.set_postfix_str(f"{(tally['scored'] + tally['rejected']) / dt:,.1f} rows/s "
                                f"{tally['tokens'] / dt:,.0f} tok/s")
            bar.update(1)
        todo = todo.without(finished)
        if not todo:
            break
    bar.close()
    faults["nodes_lost"] = _lost_nodes(nodes_before, wait=bool(faults["retried_shards"]))
    faults["shards_per_node"] = dict(per_node)
    if todo:
        raise RuntimeError(f"{len(todo)} shards failed {SHARD_ROUNDS} times (first: {todo[0].key}, {todo[0].label}); "
                           f"the Ray logs say why; the finished shards are kept: re-run the same command to retry")
    return tally, faults


def shards_dataset(shards: Shards):
    """A Ray Dataset of shards, one row each, from their table in at most 10,000 blocks (never a Python object
    per shard: 10⁶ shards are ~50 MB of Arrow)."""
    import ray

    table = Shards.of(shards).table
    per_block = -(-len(shards) // min(len(shards), 10_000))
    return ray.data.from_arrow([table.slice(i, per_block) for i in range(0, len(shards), per_block)])


def _shard_round(todo: Shards, stages: list[Stage], label: str) -> Iterator[dict]:
    """One Ray Data pass over ``todo``, yielding each finished shard's summary; a shard whose task fails is skipped
    (left for the next round). A pass that stalls after losing a node is ended (see _watched)."""
    import ray

    nodes = _alive_nodes()

    ctx = ray.data.DataContext.get_current()  # a Dataset copies the context it is created in
    old, ctx.max_errored_blocks = ctx.max_errored_blocks, -1
    try:
        ds = shards_dataset(todo)
        for st in stages:
            with warnings.catch_warnings():
                # max_task_retries=0 (a shard in flight on a lost actor fails fast and is redone in the next round)
                # has no named parameter in Ray 2.60, and its only other route, ray_remote_args_fn, is deprecated
                # too: this one warning is silenced here, every resource goes by its named parameter
                warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
                ds = ds.map_batches(_as_actor(st.step), batch_size=1, fn_constructor_kwargs=st.kwargs,
                                    compute=ray.data.ActorPoolStrategy(min_size=st.actors[0], max_size=st.actors[1]),
                                    max_task_retries=0, **_named_resources(st.resources))

        def stalled(idle_s: float, longest_gap_s: float | None) -> bool:
            limit = NODE_LOSS_STALL_S if longest_gap_s is None else STALL_MARGIN_S + STALL_GAPS * longest_gap_s
            if idle_s < limit:
                return False
            lost = sorted(nodes - _alive_nodes())
            if lost:
                print(f"{label}: no shard finished for {idle_s:.0f} s since node(s) {', '.join(lost)} were lost: "
                      f"ending this pass; its unfinished shards are redone", file=sys.stderr, flush=True)
            return bool(lost)

        def cancel():
            # Ray Data runs a pass in a thread of its own, its StreamingExecutor, tagged with the dataset's id; it
            # has no public handle before the pass's first output (Ray pinned: private names checked by the tests)
            from ray.data._internal.execution.streaming_executor import StreamingExecutor

            for thread in threading.enumerate():
                if isinstance(thread, StreamingExecutor) and thread._dataset_id == ds.get_dataset_id():
                    thread.shutdown(force=True)  # its actors killed: the next round has their room

        yield from _watched(ds.iter_rows(), stalled, cancel)
    finally:
        ctx.max_errored_blocks = old


# a pass that lost a node is ended after this long without a finished shard: before its first, NODE_LOSS_STALL_S;
# then STALL_MARGIN_S + STALL_GAPS x the longest wait between two (the first counted from the pass's start)
NODE_LOSS_STALL_S = 600
STALL_MARGIN_S, STALL_GAPS = 60, 3
CANCEL_GRACE_S = 60  # how long an ended pass's rows may take to stop
_END = object()


def _watched(rows: Iterator[dict], stalled, cancel, poll_s: float = 5.0) -> Iterator[dict]:
    """``rows``, read in a thread of their own, so that a pass Ray Data never ends can be ended here.

    Ray Data can wait forever on a task whose node died at the wrong moment (the last output of an actor's
    streaming task lost with its node, ray-project/ray#62535): the shards it held would never be redone. Every
    ``poll_s`` without a row, ``stalled(seconds since the last row, longest wait between two rows or None)`` is
    asked; when it says so, ``cancel()`` ends the pass and the rows stop (what did not finish is redone by the
    caller's next round)."""
    q: queue.Queue = queue.Queue()

    def read():
        try:
            for row in rows:
                q.put(row)
        except BaseException as e:  # handed to the reader below
            q.put(e)
        q.put(_END)

    threading.Thread(target=read, daemon=True, name="forvalue-shard-round").start()
    last, longest, cancelled, ended = time.time(), None, None, False
    try:
        while True:
            try:
                item = q.get(timeout=poll_s)
            except queue.Empty:
                if cancelled is None and stalled(time.time() - last, longest):
                    cancelled = time.time()
                    cancel()
                elif cancelled is not None and time.time() - cancelled > CANCEL_GRACE_S:
                    return  # the reading thread never woke up: left behind (a daemon), its pass's actors gone
                continue
            if item is _END:
                ended = True
                return
            if isinstance(item, BaseException):
                ended = True
                if cancelled is not None:
                    return  # the pass was ended here: its error is ours
                raise item
            now = time.time()
            longest, last = max(longest or 0.0, now - last), now
            yield item
    finally:
        if not ended and cancelled is None:  # the caller stopped reading (an error, a closed generator): the pass
            cancel()                         # must not run on in the thread


def _named_resources(resources: dict) -> dict:
    """A stage's resources as map_batches' named parameters (num_cpus, num_gpus, memory, resources): passing
    them as ray_remote_args is deprecated (removed in Ray 2.64)."""
    named = {k: resources[k] for k in ("num_cpus", "num_gpus", "memory") if resources.get(k) is not None}
    custom = {k: v for k, v in resources.items() if k not in ("num_cpus", "num_gpus", "memory")}
    return {**named, **({"resources": custom} if custom else {})}


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


# Ray declares a node that vanished abruptly dead only once its health checks have failed (~15-30 s); a retried round
# can finish sooner than that
NODE_DEATH_GRACE_S = 45


def _lost_nodes(before: set[str], wait: bool) -> list[str]:
    """Nodes alive at the start and gone now; after a retried round, given up to NODE_DEATH_GRACE_S to be noticed."""
    deadline = time.time() + (NODE_DEATH_GRACE_S if wait else 0)
    while True:
        lost = before - _alive_nodes()
        if lost or time.time() >= deadline:
            return sorted(lost)
        time.sleep(1)


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


# ---- tasks over shards ----------------------------------------------------------------------------------------------


def shard_pass(shards: Shards, fn, *, num_cpus: float = 0.5, **kwargs) -> Iterator[dict]:
    """``fn(shard, **kwargs)`` (a JSON-able dict) for every shard, as Ray tasks; results stream back as they
    finish. The driver holds one result at a time."""
    if not shards:
        return
    ds = shards_dataset(shards).map_batches(_apply, batch_size=1, fn_kwargs={"fn": fn, "kwargs": kwargs},
                                            num_cpus=num_cpus)
    for row in ds.iter_rows():
        yield json.loads(row["result"])


def _apply(batch, fn, kwargs):
    return {"result": [json.dumps(fn(s, **kwargs)) for s in io.shards_from_columns(batch)]}


ROWS_PER_ID_PARTITION = 5_000_000  # hash partitions of the duplicate-id group-by: 200 at 10^9 rows (Ray's default)


def duplicate_ids(out: str, kind: str, keys: list[str], n_rows: int, show: int = 3) -> tuple[int, list[str]]:
    """Ids scored more than once across all parts (``n_rows`` of them): a distributed group-by (a rejected row may
    repeat a scored id: that is why it was rejected, so only scored ids count)."""
    import ray

    if not keys:
        return 0, []
    paths = [parts.RunOutput(out).part(kind, k) for k in keys]
    fs, _ = io.filesystem(out)
    partitions = max(1, math.ceil(n_rows / ROWS_PER_ID_PARTITION))  # a fixed 200 costs ~30 s on a small output
    counted = ray.data.read_parquet(paths, filesystem=fs).select_columns(["id"]).groupby(
        "id", num_partitions=partitions).count()
    repeated = counted.filter(lambda row: row["count()"] > 1).materialize()  # usually empty; counted once
    n = repeated.count()
    return n, [r["id"] for r in repeated.take(show)] if n else []


# ---- the object store: broadcasts and reductions that never pass through the driver -----------------------------


def is_ref(x) -> bool:
    import ray

    return isinstance(x, ray.ObjectRef)


def broadcast(obj):
    """An object (or a ref already) in the object store, for every actor to read."""
    import ray

    return obj if is_ref(obj) else ray.put(obj)


def get(ref):
    import ray

    return ray.get(ref)


def ray_task(fn, resources: dict):
    """``fn`` as a Ray task with the given resources (a model replica's, for a one-off model pass), retried as the
    job's other tasks are."""
    import ray

    return ray.remote(max_retries=3, **resources)(fn)


def on_driver_node(fn, *args):
    """``fn(*args)`` as a task on the driver's node, for results that a broadcast depends on: a task's result lives
    on the node that ran it, and the actors that computed its inputs are gone by then, so Ray could not rebuild it if
    that node were lost. On the driver's node it is lost only with the driver, which ends the job anyway.
    num_cpus=0: a KubeRay head usually offers no CPUs to tasks; these are light reductions."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_retries=3, scheduling_strategy=here)(fn).remote(*args)


def fold(fn, refs: list):
    """fn(fn(refs[0], refs[1]), refs[2])…, as a chain of tasks in list order: a fixed summation order whatever ran
    them, and two partials in memory at a time. Pure functions of their inputs: safe to retry."""
    import ray

    task = ray.remote(num_cpus=0.5, max_retries=3)(fn)
    total = refs[0]
    for ref in refs[1:]:
        total = task.remote(total, ref)
    return total


class ActorPool:
    """``size`` actors of ``cls(*args)``, each with ``resources``; calls are spread over them round robin."""

    def __init__(self, cls: type, args: tuple, resources: dict, size: int):
        import ray

        self.actors = [ray.remote(**resources)(cls).remote(*args) for _ in range(size)]

    def submit(self, i: int, method: str, *args, num_returns: int = 1):
        """Call ``method(*args)`` on actor ``i % size``; returns the result's ref (``num_returns`` refs)."""
        call = getattr(self.actors[i % len(self.actors)], method)
        return (call.options(num_returns=num_returns) if num_returns != 1 else call).remote(*args)

    def close(self, wait_for) -> None:
        """Wait until ``wait_for`` is computed (not fetched), then free the actors (and their model replicas)."""
        import ray

        if wait_for is not None:
            ray.wait([wait_for], fetch_local=False)
        for a in self.actors:
            ray.kill(a)
