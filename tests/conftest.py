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


# Guarded: Dynamo's settings differ between the torch releases modpass supports.
FLOAT_SPECIALISATION = {"specialize_float": True} if hasattr(torch._dynamo.config, "specialize_float") else {}


@pytest.fixture(autouse=True)
def _quick_compile_settings(request):
    """Two compile settings that cost time and that modpass's graphs do not depend on, unless a test
    is marked ``compile_defaults``.

    * Inductor's C++ kernels are compiled scalar. On 2 cores and an empty Inductor cache, choosing
      vector tilings and compiling the vectorised C++ is about a quarter of a compiled llama test;
      the routed graphs, their fusions and what the tests check are the same either way.
    * Python floats (Hugging Face's norm epsilons and attention scales) are specialised. Left
      symbolic, as by default, a dynamic compile traces the model, meets a float that
      Inductor cannot turn into a tensor, and traces it all again (Gemma 2, both entries:
      40% of the compile).

    The tests marked ``compile_defaults`` (the main fullgraph, gradient and ``options=`` checks)
    keep torch's defaults, and so do the benchmarks. CUDA kernels are unaffected.
    """
    if request.node.get_closest_marker("compile_defaults"):
        yield
        return
    with torch._inductor.config.patch({"cpp.simdlen": 1}), torch._dynamo.config.patch(FLOAT_SPECIALISATION):
        yield


@pytest.fixture(autouse=True)
def _routed_forward_below_the_recompile_limit():
    """Reset Dynamo before a test once the forward every routed model shares (``ForwardTakingRoutingArguments``) holds
    several compiled entries from earlier tests: Dynamo counts those of objects at the same address against its
    recompile limit (8), and freed models' addresses are reused, so a later ``fullgraph=True`` compile failed with
    "recompile limit exceeded" depending on which worker ran which tests (BEiT, 2026-12-07)."""
    from modpass.tasks import ForwardTakingRoutingArguments

    entries = getattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list", lambda code: [])  # private to torch
    if len(entries(ForwardTakingRoutingArguments.__call__.__code__)) >= 4:
        torch._dynamo.reset()
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo_after_graph_breaks():
    """Reset Dynamo after a test whose compile broke a graph. After a graph break Dynamo may run a frame's code eagerly
    from then on, and transformers' models share the code of their forward wrappers: a later test's ``fullgraph=True``
    compile of another model then starts tracing below them and fails (BEiT after a routed cached ``generate()``,
    2026-12-06, depending on which worker ran which tests)."""
    counters = torch._dynamo.utils.counters
    breaks = sum(counters["graph_break"].values())
    yield
    if sum(counters["graph_break"].values()) != breaks:
        torch._dynamo.reset()
