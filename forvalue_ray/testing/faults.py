"""Faults injected into a running job from outside its steps: Ray runs :func:`install` in every worker process of a
job whose runtime_env names it (:data:`RUNTIME_ENV`). Installed, a worker does what the variables set in its
environment ask, each time it is about to write a shard's part (its rejected rows are written by then):

- ``FORVALUE_FAULT_EXIT_ONCE=<marker file>``: the first worker to find the file absent creates it and dies
  (``os._exit``): an actor killed mid-shard;
- ``FORVALUE_FAULT_SLOW_S=<seconds>``: it sleeps that long first; set on one node of a
  ``ray.cluster_utils.Cluster`` (``add_node(env_vars=...)``), that node is a straggler.

A test that starts Ray itself passes :data:`RUNTIME_ENV` to ``ray.init``; a job process it starts (a driver it does
not control) gets it through Ray's ``RAY_RUNTIME_ENV_HOOK=forvalue_ray.testing.faults.with_faults``.
"""

from __future__ import annotations

import os
import time

EXIT_ONCE = "FORVALUE_FAULT_EXIT_ONCE"
SLOW_S = "FORVALUE_FAULT_SLOW_S"
RUNTIME_ENV = {"worker_process_setup_hook": "forvalue_ray.testing.faults.install"}


def install() -> None:
    """Wrap this worker's shard part writer with the faults its environment asks for (none: left as it is)."""
    slow, marker = float(os.environ.get(SLOW_S, "0")), os.environ.get(EXIT_ONCE)
    if not slow and not marker:
        return
    from ..job import parts

    write_part = parts.write_part

    def write_part_with_faults(*args, **kwargs):
        time.sleep(slow)
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(17)
        write_part(*args, **kwargs)

    parts.write_part = write_part_with_faults


def with_faults(runtime_env: dict | None) -> dict:
    """A ``RAY_RUNTIME_ENV_HOOK``: the runtime_env ``ray.init`` was given, with :func:`install` added."""
    return {**(runtime_env or {}), **RUNTIME_ENV}
