import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# One xdist worker per core: more threads per worker than its share of the cores only oversubscribes them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))
settings.register_profile(
    "modpass",
    max_examples=int(os.environ.get("MODPASS_HYPOTHESIS_EXAMPLES", "8")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("modpass")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
