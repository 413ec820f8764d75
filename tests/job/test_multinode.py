"""The job on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and two worker nodes, each its
own raylet, on this machine), connected with ``--ray-address`` from a job subprocess:

- model actors spread over the worker nodes give the core API's scores;
- a straggler node (20 s more per shard) scores few shards: the pool's other actor pulls the rest;
- a worker node removed abruptly while it holds a shard (a reclaimed spot instance): the job finishes by itself,
  every row exactly once, the same scores as an uninterrupted run, and run.json names the lost node and the
  redone shard;
- a node added mid-run (autoscaling up) gets an actor of a ``--num-actors 1-2`` pool and scores shards;
- the target statistics broadcast lives on the driver's node, so it outlives every worker node.

The tests share one cluster and change its nodes in file order (the slow node, a loss, an addition).

Each worker node has room for one model actor only (3 CPUs, 2 per actor), so after a loss the lost actor cannot
be restarted anywhere: its in-flight shard must be redone on the surviving actor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from forvalue_ray import io as fio
from forvalue_ray.sample_data import sentence_task
from forvalue_ray.testing import faults
from jobtools import REPO, as_matrix, read_scores, run_ok, save_tiny_model, write_parquet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SHARD_ROWS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another test left Ray initialised"
    # results over 1 KB go to the object store of the node that made them, as large ones do on a real fleet
    # (by default up to 100 KB are returned inline to their owner, which would hide where the tiny model's live)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "_system_config": {"max_direct_call_object_size": 1024}})
    # every shard takes >= 1 s (0.5 s before each of its two part writes): the pool's second actor, however slowly
    # a loaded machine starts it, finds shards left to score
    workers = [c.add_node(num_cpus=3, env_vars={faults.SLOW_S: "0.5"}) for _ in range(2)]
    c.wait_for_nodes()
    root = tmp_path_factory.mktemp("multinode")
    train, target = sentence_task(n_classes=3, n_train_per_class=32, n_val_per_class=2)
    data = {"root": root, "train_rows": train, "model": save_tiny_model(root / "model"),
            "train": write_parquet(train, root / "train.parquet", row_group_size=SHARD_ROWS),
            "target": write_parquet(target, root / "target.parquet")}
    yield c, workers, data  # workers: the worker nodes alive now, kept current by the tests
    c.shutdown()


@pytest.fixture(scope="module")
def uninterrupted(cluster):
    """The same job on a single-node local Ray (in-process; it shuts its Ray down when it returns)."""
    import ray

    _, _, data = cluster
    out = data["root"] / "local"
    run_ok("value", "--model", data["model"], "--train", data["train"], "--target", data["target"], "--out", out,
           "--shard-rows", SHARD_ROWS, "--no-progress")
    assert not ray.is_initialized()
    ids = [r["id"] for r in data["train_rows"]]
    return ids, as_matrix(read_scores(out), ids)


def value(c, data, out, wait=True, num_actors="2"):
    """``forvalue-ray value`` as a job process attached to the cluster (the test process stays a bystander)."""
    args = [sys.executable, "-m", "forvalue_ray.cli", "value", "--model", data["model"], "--train", data["train"],
            "--target", data["target"], "--out", out, "--shard-rows", SHARD_ROWS, "--num-actors", num_actors,
            "--cpus-per-actor", 2, "--ray-address", c.address, "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO),
           "RAY_RUNTIME_ENV_HOOK": "forvalue_ray.testing.faults.with_faults"}  # the slow node's straggler hook
    job = subprocess.Popen([str(a) for a in args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    return finish(job) if wait else job


def finish(job, timeout=900) -> str:
    """The job's log once it exits; a job still running after ``timeout`` is killed and fails the test with the
    end of its log (a hang shows where it hung)."""
    try:
        return job.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"the job did not end in {timeout} s; its log ends:\n{job.communicate()[0][-8000:]}")


def wait_for_part_in_flight(job, out, seconds=2.0):
    """A shard whose rejected part is written but not its scores part, for ``seconds`` on end: it is in the
    hands of a slow actor, which sleeps between the two writes."""
    t0, seen, since = time.time(), None, 0.0
    while True:
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.time() - t0 < 600, "no shard in flight on the slow node"
        keys = {p.stem for p in (out / "rejected").glob("*.parquet")} - {p.stem for p in (out / "scores").glob("*")}
        if keys and keys == seen and time.time() - since >= seconds:
            return keys
        if keys != seen:
            seen, since = keys, time.time()
        time.sleep(0.2)


def check_same_scores(uninterrupted, out):
    ids, expected = uninterrupted
    np.testing.assert_array_equal(as_matrix(read_scores(out), ids), expected)


def test_actors_on_two_nodes_give_the_same_scores(cluster, uninterrupted, tmp_path):
    c, workers, data = cluster
    log = value(c, data, tmp_path / "plain")
    run = fio.read_json(str(tmp_path / "plain" / "run.json"))
    inv = run["this_invocation"]
    assert run["counts"]["scored"] == 96, log[-3000:]
    assert set(inv["shards_per_node"]) == {w.node_id for w in workers}, inv  # one model actor on each worker node
    assert inv["nodes_lost"] == [] and inv["retried_shards"] == []
    check_same_scores(uninterrupted, tmp_path / "plain")


def test_a_straggler_node_scores_few_shards(cluster, uninterrupted, tmp_path):
    """Shards are pulled by whichever actor is free, so a slow node holds only the shard in its hands; the job
    ends at most about one slow shard after the fast actor's last."""
    c, workers, data = cluster
    slow = c.add_node(num_cpus=3, env_vars={faults.SLOW_S: "20"})
    c.remove_node(workers.pop())
    workers.append(slow)
    out = tmp_path / "straggler"
    t0 = time.time()
    log = value(c, data, out)
    wall = time.time() - t0
    per_node = fio.read_json(str(out / "run.json"))["this_invocation"]["shards_per_node"]
    assert sum(per_node.values()) == 24 and per_node.get(slow.node_id, 0) <= 3, (per_node, log[-3000:])
    check_same_scores(uninterrupted, out)
    print(json.dumps({"straggler_wall_s": round(wall, 1), "shards_per_node": per_node}))


def test_a_worker_node_lost_mid_shard_changes_nothing(cluster, uninterrupted, tmp_path):
    c, workers, data = cluster
    fast, slow = workers
    out = tmp_path / "lost"
    job = value(c, data, out, wait=False)
    in_flight = wait_for_part_in_flight(job, out)
    c.remove_node(slow, allow_graceful=False)  # abruptly, as a reclaimed spot instance
    workers.remove(slow)
    t_lost = time.time()
    log = finish(job)
    recovery = time.time() - t_lost
    assert job.returncode == 0, log[-3000:]
    run = fio.read_json(str(out / "run.json"))
    inv = run["this_invocation"]
    assert inv["nodes_lost"] == [slow.node_id], (inv, log[-3000:])
    assert in_flight <= set(inv["retried_shards"]), inv
    assert "survived 1 lost Ray nodes" in log
    assert run["counts"]["scored"] == 96
    rc = subprocess.run([sys.executable, "-m", "forvalue_ray.cli", "verify", str(out)], capture_output=True, text=True,
                        env={**os.environ, "RAY_ADDRESS": c.address, "RAY_AUTH_MODE": "disabled"})
    assert rc.returncode == 0, rc.stdout + rc.stderr
    check_same_scores(uninterrupted, out)
    print(json.dumps({"recovery_after_node_loss_s": round(recovery, 1), "retried": inv["retried_shards"]}))


def test_a_node_added_mid_run_gets_an_actor(cluster, uninterrupted, tmp_path):
    """A pool of 1-2 actors on one node (3 s more per shard, so the run outlasts the new node's start-up)."""
    c, workers, data = cluster
    c.remove_node(workers.pop())
    workers.append(c.add_node(num_cpus=3, env_vars={faults.SLOW_S: "3"}))
    out = tmp_path / "grown"
    job = value(c, data, out, wait=False, num_actors="1-2")
    wait_for_part_in_flight(job, out, seconds=0.5)
    added = c.add_node(num_cpus=3)
    workers.append(added)
    log = finish(job)
    assert job.returncode == 0, log[-3000:]
    inv = fio.read_json(str(out / "run.json"))["this_invocation"]
    assert inv["shards_per_node"].get(added.node_id, 0) > 0, inv
    check_same_scores(uninterrupted, out)


def test_the_broadcast_outlives_every_worker_node(cluster, tmp_path):
    """The target pass's statistics are made on the driver's node: with every worker node gone they are still
    there (a copy on a lost node could not be rebuilt: the target actors that computed its inputs are gone)."""
    import ray

    from forvalue_ray.job import ValueConfig, spec, target

    c, workers, data = cluster
    cfg = ValueConfig(model=str(data["model"]), train=str(data["train"]), target=str(data["target"]),
                      out=str(tmp_path / "out"), num_actors="2", cpus_per_actor=2)
    ray.init(address=c.address)
    try:
        run = spec.resolve(cfg)
        payload, names, _ = target.build_target(target.encode_target(run.target, run.reading, run.model),
                                                run.target, run.model, run.out)
        assert ray.experimental.get_object_locations([payload])[payload]["node_ids"] == [
            ray.get_runtime_context().get_node_id()]
        while workers:
            c.remove_node(workers.pop(), allow_graceful=False)
        assert ray.get(payload, timeout=60)["stats"].names == names
    finally:
        ray.shutdown()
