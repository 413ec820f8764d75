import os

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
