"""Block-level benchmark: one modpass-routed Llama-style block vs the same dense block.

Usage (from the repository root)::

    python benchmarks/block_bench.py --quick                      # smoke test, tiny sizes
    python benchmarks/block_bench.py --sizes S1                   # CPU reference size S1
    python benchmarks/block_bench.py --sizes S1 --modes eager
    python benchmarks/block_bench.py --device cuda                # bf16, D=2048, T=4096 (size G1)
    python benchmarks/block_bench.py --sizes S1 --backend modpass

The block is the reference block of ``shared/reference/cpu-performance-ceiling.md``
(pre-norm, RMSNorm, q/k/v/o without bias, RoPE, causal SDPA, SwiGLU with
I = 2.75 D). Two of them sit in a ``ModuleList`` so that modpass recognises
them as repeated blocks, and ``modpass.transform(model, c, layers=[1])``
routes exactly block 1. Only that block is timed: its inputs (hidden state,
cos, sin) are recorded with a forward pre-hook during one model call, and the
routed module ``routed.layers[1]`` and the dense ``model.layers[1]`` are then
called directly on them.

Cases timed together in each interleaved set (one set per size, pass and mode):

* ``dense``      the original block on all T tokens (the baseline of every ratio);
* ``routed@c``   modpass's routed block at capacity c (k = ceil(c T) tokens);
* ``dense_k@c``  the dense block on the k tokens the router picked (gathered
  outside the timed region): the ideal "MoD for free" time at that k;
* ``routing@c``  modpass's routed graph with the block body removed
  (router, selection, every gather, gate and scatter, block = identity).

The routing glue is reported two ways, because each has its weakness:
"glue" = routed@c - dense_k@c (everything modpass adds on top of running the
block on k tokens, including its Python dispatch, but a difference of two
larger, noisy times) and "routing-only" = routing@c (direct, precise, but built
from modpass internals and without the interaction with the block's kernels).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402 (script directory on the path first)

import modpass  # noqa: E402
from modpass.routing import gather_tokens  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Size:
    hidden: int
    heads: int
    tokens: int
    batch: int

    def describe(self) -> str:
        return f"D={self.hidden}, T={self.tokens}, B={self.batch} (heads {self.heads}, I={mlp_width(self.hidden)})"


#: S1-S3 are the reference CPU sizes; G1 is the "realistic" GPU size; Q is the smoke test.
SIZES = {
    "Q": Size(64, 4, 64, 2),
    "S1": Size(512, 8, 512, 4),
    "S2": Size(512, 8, 1024, 4),
    "S3": Size(1024, 16, 1024, 2),
    "G1": Size(2048, 16, 4096, 2),
}


def mlp_width(hidden: int) -> int:
    return int(2.75 * hidden)


# -- the model ------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class LlamaBlock(nn.Module):
    """Pre-norm Llama block: RMSNorm -> q/k/v -> RoPE -> causal SDPA -> o, RMSNorm -> SwiGLU."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(hidden)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.mlp_norm = RMSNorm(hidden)
        width = mlp_width(hidden)
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(batch, tokens, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(y.transpose(1, 2).reshape(batch, tokens, hidden))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TwoBlocks(nn.Module):
    """Hidden states in, hidden states out: RoPE tables (1, T, head_dim) are side inputs of each block."""

    def __init__(self, size: Size):
        super().__init__()
        head_dim = size.hidden // size.heads
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)
        self.layers = nn.ModuleList(LlamaBlock(size.hidden, size.heads) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq.float())
        angles = torch.cat((angles, angles), dim=-1)[None]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


def block_inputs(model: nn.Module, x: torch.Tensor) -> tuple[tuple, dict]:
    """The (args, kwargs) block 1 receives during ``model(x)``."""
    seen: dict[str, tuple[tuple, dict]] = {}

    def remember(module, args, kwargs):
        seen.setdefault("call", (args, dict(kwargs)))

    handle = model.layers[1].register_forward_pre_hook(remember, with_kwargs=True)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen["call"]


# -- routed variants ------------------------------------------------------------------------------
def routed_block(model: nn.Module, capacity: float, seed: int) -> nn.Module:
    """``routed.layers[1]`` of ``modpass.transform(model, capacity, layers=[1])``, with random routers."""
    probe = torch.randn(2, 13, model.layers[0].q_proj.in_features, device=model.inv_freq.device,
                        dtype=model.layers[0].q_proj.weight.dtype)
    routed = modpass.transform(model, capacity, layers=[1], example_inputs=(probe,))
    common.randomize_routers(routed, seed)
    return routed.layers[1]


def strip_block_body(gm: torch.fx.GraphModule) -> None:
    """Turn a routed block graph into its routing-only form, in place.

    The scatter's ``block_output`` argument is replaced by the gathered hidden
    state (block = identity, so the gate's elementwise update still runs) and
    every node modpass did not add that is now unused (the block body) is
    dropped. Nodes modpass added stay even when unused (the rotary-table
    gathers), so eager mode still pays for them as the real routed path does.
    """
    graph = gm.graph
    scatter = next(n for n in graph.nodes if n.meta.get("modpass_role") == "scatter")
    base, index, selected, _block_output, weight, *rest = scatter.args
    scatter.args = (base, index, selected, selected, weight, *rest)
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and "modpass_role" not in node.meta and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()


def routing_only_block(block: nn.Module) -> nn.Module | None:
    """A copy of a RoutedBlock whose routed graphs skip the block body, or None if modpass internals changed.

    RoutedBlock builds one routed graph per call structure on first use
    (``build_route``); wrapping that method on the copy strips every graph it
    builds, for eval/no-grad and train structures alike.
    """
    if not hasattr(block, "build_route"):
        return None
    stripped = copy.deepcopy(block)
    stripped._routes.clear()  # a deep copy shares the routed graphs built so far: the stripped ones are built anew
    build = stripped.build_route

    @torch._dynamo.disable
    def build_route(key, *args, **kwargs):
        build(key, *args, **kwargs)
        route = stripped._routes[key]  # None: a form this block runs one call per capacity
        if route is not None:
            strip_block_body(route.graph)

    stripped.__dict__["build_route"] = build_route
    return stripped


def selected_inputs(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, int]:
    """The block-1 inputs at the tokens ``block`` (a routed block) selects, and k.

    Every tensor argument with the token axis at dim 1 (hidden, cos, sin) is
    gathered with modpass's own ``gather_tokens``, so the dense block sees
    exactly what runs inside the routed path.
    """
    with torch.no_grad():
        block(*args, **kwargs)
    index = block.last_routing[0].index
    tokens = args[0].shape[1]
    gathered = tuple(gather_tokens(a, index, (1,)) if isinstance(a, torch.Tensor) and a.dim() >= 2
                     and a.shape[1] == tokens else a for a in args)
    return gathered, index.shape[1]


# -- one measurement set --------------------------------------------------------------------------
@dataclasses.dataclass
class Variant:
    """One module called on one set of inputs."""

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict


def make_case(variant: Variant, module: nn.Module, backward: bool, seed: int) -> common.Case:
    args, kwargs = variant.args, variant.kwargs
    if not backward:
        return common.Case(variant.name, common.forward_step(lambda: module(*args, **kwargs)))
    x = args[0].detach().requires_grad_(True)
    rest = args[1:]
    step = common.backward_step(lambda: module(x, *rest, **kwargs), seed=seed)
    return common.Case(variant.name, step, common.clear_grads([x, *variant.module.parameters()]))


def set_mode(variants: list[Variant], backward: bool) -> None:
    """fwd runs in eval mode, fwdbwd in train mode (as training would); build the routed graphs eagerly.

    A RoutedBlock captures a new graph the first time it sees a call
    structure (train/eval is part of it); doing that here keeps the capture
    out of the compile time and lets Dynamo trace the cached graph.
    """
    for variant in variants:
        variant.module.train(backward)
        with torch.no_grad():
            variant.module(*variant.args, **variant.kwargs)


def measure(variants: list[Variant], *, backward: bool, compiled: bool, backend, args, device) -> dict:
    rounds = args.rounds or (7 if backward else 9)
    if device.type == "cuda" and args.rounds is None:
        rounds = 15 if backward else 25
    if args.quick:
        rounds = 2
    modules = {v.name: common.compile_module(v.module, backend, args.compile_mode) if compiled else v.module for v in variants}
    cases = [make_case(v, modules[v.name], backward, args.seed) for v in variants]
    print(f"  {'fwdbwd' if backward else 'fwd'} {'compiled' if compiled else 'eager'}: {len(cases)} cases, {rounds} rounds")
    return common.run_interleaved(cases, baseline="dense", rounds=rounds, warmup=args.warmup, device=device, calls=args.calls,
                                  seed=args.seed)


def flops_of(variants: list[Variant], backward: bool, seed: int) -> dict[str, common.Flops]:
    counts = {}
    for variant in variants:
        if variant.name.startswith("routing@"):
            continue  # gathers/topk/scatter count as ~0 FLOPs
        case = make_case(variant, variant.module, backward, seed)
        if case.prepare:
            case.prepare()
        counts[variant.name] = common.count_flops(case.step)
    return counts


def build_variants(size: Size, capacities, device, dtype, seed: int) -> list[Variant]:
    """The dense block, and per capacity the routed, dense-on-k and routing-only variants, on shared inputs."""
    torch.manual_seed(seed)
    model = TwoBlocks(size).to(device=device, dtype=dtype).eval()
    x = torch.randn(size.batch, size.tokens, size.hidden, device=device, dtype=dtype)
    block_args, block_kwargs = block_inputs(model, x)
    dense = model.layers[1]
    variants = [Variant("dense", dense, block_args, block_kwargs)]
    for capacity in capacities:
        block = routed_block(model, capacity, seed)
        variants.append(Variant(f"routed@{capacity}", block, block_args, block_kwargs))
        gathered, k = selected_inputs(block, block_args, block_kwargs)
        if k < size.tokens:
            variants.append(Variant(f"dense_k@{capacity}", dense, gathered, block_kwargs))
        stripped = routing_only_block(block)
        if stripped is not None:
            variants.append(Variant(f"routing@{capacity}", stripped, block_args, block_kwargs))
    if not any(v.name.startswith("routing@") for v in variants):
        print("  routing-only variant unavailable (RoutedBlock internals changed); reporting glue only")
    return variants


def bench_size(name: str, size: Size, args, device, dtype, backend, modes) -> dict:
    print(f"\n== {name}: {size.describe()}, {dtype}, {device}")
    variants = build_variants(size, args.capacities, device, dtype, args.seed)
    by_name = {v.name: v for v in variants}
    ks = {c: (by_name[f"dense_k@{c}"].args[0].shape[1] if f"dense_k@{c}" in by_name else size.tokens)
          for c in args.capacities}
    block_args, block_kwargs = variants[0].args, variants[0].kwargs
    dense = variants[0].module
    routed = {c: by_name[f"routed@{c}"].module for c in args.capacities}

    result: dict = {"size": dataclasses.asdict(size), "k": {str(c): k for c, k in ks.items()}, "passes": {}}
    for backward in (False, True):
        pass_name = "fwdbwd" if backward else "fwd"
        set_mode(variants, backward)
        flops = flops_of(variants, backward, args.seed)
        entry: dict = {"flops": {n: f.to_json() for n, f in flops.items()}, "modes": {}}
        for mode in modes:
            timings = measure(variants, backward=backward, compiled=mode == "compiled", backend=backend, args=args,
                              device=device)
            entry["modes"][mode] = summarize(timings, args.capacities, ks, size.tokens)
        result["passes"][pass_name] = entry
    if "compiled" in modes:
        result["dynamo"] = graph_breaks(dense, routed, block_args, block_kwargs)
        if args.kernels:
            result["kernels"] = kernel_counts(variants, backend, device, args.seed)
    return result


def summarize(timings: dict[str, common.CaseResult], capacities, ks, tokens) -> dict:
    base = timings["dense"]
    out = {"cases": {n: r.to_json(base) for n, r in timings.items()}, "capacities": {}}
    for capacity in capacities:
        row = {"ratio": timings[f"routed@{capacity}"].ratio}
        dense_k = f"dense_k@{capacity}" if ks[capacity] < tokens else "dense"
        row["dense_k_ratio"] = timings[dense_k].ratio
        row["glue"] = common.median_round_difference(timings, f"routed@{capacity}", dense_k, "dense")
        routing = timings.get(f"routing@{capacity}")
        row["routing_only"] = routing.ratio if routing else None
        out["capacities"][str(capacity)] = row
    spread = [abs(r.ratio - r.median_s / base.median_s) for n, r in timings.items() if n != "dense"]
    out["max_ratio_disagreement"] = max(spread, default=0.0)
    return out


def graph_breaks(dense: nn.Module, routed: dict[float, nn.Module], args: tuple, kwargs: dict) -> dict:
    """Dynamo graphs and breaks per block (forward, no grad): the target is 1 graph, 0 breaks."""
    found = {}
    with torch.no_grad():
        for name, module in [("dense", dense), *((f"routed@{c}", m) for c, m in routed.items())]:
            module.eval()
            found[name] = common.dynamo_breaks(module, *args, **kwargs)
    return found


def kernel_counts(variants: list[Variant], backend, device, seed: int) -> dict:
    """Kernels Inductor emits per case and pass (fresh compiles; run after all timing)."""
    counts: dict = {}
    for backward in (False, True):
        for variant in variants:
            if variant.name.startswith("dense_k@"):
                continue  # same graph as dense at another static T
            variant.module.train(backward)
            module = common.compile_module(variant.module, backend)
            case = make_case(variant, module, backward, seed)
            if case.prepare:
                case.prepare()
            counts.setdefault(variant.name, {})["fwdbwd" if backward else "fwd"] = common.inductor_kernels(case.step, device)
    return counts


# -- report ---------------------------------------------------------------------------------------
def markdown(payload: dict, modes: tuple[str, ...]) -> str:
    parts = [common.markdown_preamble("modpass block benchmark: routed block vs dense block", payload)]
    parts.append(
        "Columns: **FLOP c/a** = FLOP ratio routed/dense, counter / causal-adjusted; **eager**, **comp.** = "
        "median per-round time ratio routed/dense; **ovh** = time ratio / causal-adjusted FLOP ratio; "
        "**dense-k** = dense block on the k selected tokens / dense; **glue** = (routed - dense-k) / dense "
        "(median of per-round differences); **route** = routing-only graph (block body removed) / dense.\n"
    )
    for name, result in payload["results"].items():
        size = Size(**result["size"])
        parts.append(f"## {name}: {size.describe()}\n")
        for pass_name, entry in result["passes"].items():
            flops = entry["flops"]
            dense_flops = flops["dense"]
            timing = entry["modes"]
            dense_ms = ", ".join(f"{mode} {timing[mode]['cases']['dense']['median_s'] * 1e3:.1f} ms" for mode in timing)
            parts.append(f"### {pass_name}: dense {dense_flops['causal_adjusted'] / 1e9:.2f} GFLOP causal-adjusted; "
                         f"dense {dense_ms}\n")
            headers = ["c", "k", "FLOP c/a"]
            for mode in modes:
                tag = "eager" if mode == "eager" else "comp."
                headers += [tag, "ovh", f"dense-k {tag[0]}", f"glue {tag[0]}", f"route {tag[0]}"]
            rows = []
            for capacity, k in result["k"].items():
                routed = flops[f"routed@{capacity}"]
                counter = routed["counter"] / dense_flops["counter"]
                adjusted = routed["causal_adjusted"] / dense_flops["causal_adjusted"]
                row = [capacity, k, f"{counter:.3f}/{adjusted:.3f}"]
                for mode in modes:
                    cell = timing[mode]["capacities"][capacity]
                    row += [common.fmt_ratio(cell["ratio"]), common.fmt_overhead(cell["ratio"], adjusted),
                            common.fmt_ratio(cell["dense_k_ratio"]), common.fmt_pct(cell["glue"]),
                            common.fmt_pct(cell["routing_only"])]
                rows.append(row)
            parts.append(common.markdown_table(headers, rows) + "\n")
            noise = ", ".join(f"{mode} {timing[mode]['max_ratio_disagreement']:.3f}" for mode in timing)
            parts.append(f"Noise check, max |median of ratios - ratio of medians|: {noise}.\n")
        parts.append(compile_table(result))
    return "\n".join(parts)


def compile_table(result: dict) -> str:
    """First-call seconds (compile + one run) per case, and Dynamo graphs/breaks and kernel counts."""
    passes = result["passes"]
    if not any("compiled" in entry["modes"] for entry in passes.values()):
        return ""
    names = [n for n in next(iter(passes.values()))["modes"]["compiled"]["cases"] if not n.startswith("dense_k@")]
    headers = ["case", *(f"compile {p} (s)" for p in passes), "graphs/breaks (fwd)", "kernels fwd/fwdbwd"]
    rows = []
    for name in names:
        row = [name]
        for entry in passes.values():
            row.append(f"{entry['modes']['compiled']['cases'][name]['first_call_s']:.1f}")
        dynamo = result.get("dynamo", {}).get(name)
        row.append(f"{dynamo['graphs']}/{dynamo['breaks']}" if dynamo else "")
        kernels = result.get("kernels", {}).get(name)
        row.append("/".join(str(kernels[p]["kernels"]) if kernels and kernels.get(p) else "-" for p in passes)
                   if kernels else "")
        rows.append(row)
    return "### torch.compile: first call (compile + one run)\n\n" + common.markdown_table(headers, rows) + "\n"


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help=f"comma list of {', '.join(SIZES)} (default S1,S2,S3 on cpu, G1 on cuda)")
    parser.add_argument("--capacities", default=",".join(map(str, common.CAPACITIES)))
    parser.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                        help="count Inductor kernels per case (default: on for cuda, off for cpu)")
    args = parser.parse_args()
    device, dtype = common.setup(args)
    modes = common.parse_modes(args.modes)
    backend = common.resolve_backend(args.backend)
    args.capacities = tuple(float(c) for c in args.capacities.split(","))
    if args.kernels is None:
        args.kernels = device.type == "cuda"
    sizes = ["Q"] if args.quick else (args.sizes.split(",") if args.sizes else
                                      (["G1"] if device.type == "cuda" else ["S1", "S2", "S3"]))
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; choose from {list(SIZES)}")

    payload = common.header("block", args, device)
    payload["results"] = {}
    for name in sizes:
        payload["results"][name] = bench_size(name, SIZES[name], args, device, dtype, backend, modes)
    text = markdown(payload, modes)
    print("\n" + text)
    parts = ["-".join(sizes)] + ([] if len(modes) == 2 else list(modes))
    if args.backend != "inductor" and "compiled" in modes:
        parts.append(args.backend)
    if args.compile_mode and "compiled" in modes:
        parts.append(args.compile_mode)
    stem = Path(args.out) if args.out else common.default_out(device, "block", *parts)
    common.write_results(stem, payload, text)


if __name__ == "__main__":
    main()
