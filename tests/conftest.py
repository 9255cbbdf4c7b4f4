import os

import pytest
import torch
import torch._inductor.config
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


@pytest.fixture(autouse=True)
def _scalar_cpu_kernels(request):
    """Inductor's C++ kernels are compiled scalar unless a test is marked ``vectorized``.

    On 2 cores and an empty Inductor cache, choosing vector tilings and compiling the vectorised
    C++ is about a quarter of a compiled llama test; the routed graphs, their fusions and what the
    tests check are the same either way. The tests marked ``vectorized`` (the main fullgraph and
    gradient checks) and the benchmarks keep Inductor's default. CUDA kernels are unaffected.
    """
    if request.node.get_closest_marker("vectorized"):
        yield
        return
    with torch._inductor.config.patch({"cpp.simdlen": 1}):
        yield
