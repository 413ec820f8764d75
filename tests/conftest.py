import os
import sys
import time
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the test clusters and their job processes agree

import torch  # noqa: E402

# Two shared cores: intra-op threads fight each other (11 s vs 127 s for the invariance tests).
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Tests marked ``last`` run after all others, in their order: they start a `ray start` head, which the
    local Rays of the other tests must never meet."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)  # stable: order kept within each


# ---- shared servers: a module asks for one by naming its fixture; each lives as long as its module -------------------


@pytest.fixture(scope="module")
def s3_server():
    """moto's local S3 server for the module, this process's AWS settings pointed at it (jobtools.moto_s3): yields
    .endpoint, .keys and .env. Skips the module where moto is not installed."""
    pytest.importorskip("moto.server")
    from jobtools import moto_s3

    with moto_s3() as server:
        yield server


@pytest.fixture(scope="module")
def ray_head_options() -> dict:
    """How the module's `ray start` head (``head``) starts: jobtools.ray_head's keyword arguments (num_cpus; env,
    added to the head's environment). A module overrides this fixture to change them."""
    return {"num_cpus": 4}


@pytest.fixture(scope="module")
def head(tmp_path_factory, ray_head_options):
    """A real `ray start --head` for the module (jobtools.ray_head: loopback, its own ports and temp dir, stopped by
    its own process group), with this process a client without token auth while it runs. Yields .address (the Job
    API's), .env (the head's environment, for a `ray job submit` client) and .root (a temp folder, the head's log in
    it). A module that uses it is marked ``last``, or runs on its own: the local Rays of other tests must never meet
    it."""
    from jobtools import ray_auth_disabled, ray_head

    root = tmp_path_factory.mktemp("head")
    t0 = time.time()
    with ray_head(root / "head.log", **ray_head_options) as ray, ray_auth_disabled():
        print(f"\nray head up: {time.time() - t0:.1f} s", file=sys.stderr)
        yield SimpleNamespace(address=ray.address, env=ray.env, root=root)
