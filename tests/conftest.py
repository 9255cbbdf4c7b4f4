import os

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(min(2, os.cpu_count() or 1))
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
