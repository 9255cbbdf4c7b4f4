"""The benchmark harness's pieces that reach into modpass internals.

``block_bench.routing_only_block`` wraps ``RoutedBlock.build_route``; when that
method changed what it returns, the routing-only case crashed every block
benchmark and profile (found on a GPU lease, where a crash costs device time).
"""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import block_bench  # noqa: E402 (the benchmarks' directory on the path first)

from modpass import routing  # noqa: E402


def test_routing_only_block_runs_the_routing_around_an_identity_block():
    variants = {v.name: v for v in block_bench.build_variants(block_bench.SIZES["Q"], (0.5,), torch.device("cpu"),
                                                              torch.float32, seed=0)}
    assert {"dense", "routed@0.5", "dense_k@0.5", "routing@0.5"} <= set(variants)
    routing_only, routed = variants["routing@0.5"], variants["routed@0.5"]
    with torch.no_grad():
        x = routing_only.args[0]
        # Identity in place of the block: every selected token's gated update is zero.
        assert torch.equal(routing_only.module(*routing_only.args, **routing_only.kwargs), x)
        assert not torch.equal(routed.module(*routed.args, **routed.kwargs), x)
    graphs = [route.graph for route in routing_only.module._routes.values() if route is not None]
    assert graphs, "the routing-only block built its routed graph"
    for graph in graphs:
        targets = {node.target for node in graph.graph.nodes if node.op == "call_function"}
        names = " ".join(map(str, targets))
        assert "linear" not in names and "attention" not in names, "the block body is gone"
        assert {routing.select_tokens, routing.scatter_update} <= targets, "the routing stays"
