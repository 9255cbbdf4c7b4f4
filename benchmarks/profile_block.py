"""Where does a routed block's time go? ``torch.profiler`` over the cases of ``block_bench.py``.

Usage (from the repository root)::

    python benchmarks/profile_block.py --quick
    python benchmarks/profile_block.py --sizes S1 --capacities 0.125 --modes eager
    python benchmarks/profile_block.py --device cuda --modes compiled --capacities 1.0,0.5,0.25,0.125 --top 0

For each mode it profiles ``dense`` and, per capacity, ``routed@c``,
``dense_k@c`` and ``routing@c`` (see block_bench.py) for a few calls each
after warm-up. Per case it reports the wall time per call, the host time
spent before the last kernel was issued (launch-bound if close to the wall
time) and, on CUDA, the **device time**: the sum of the kernels' own times
per call, which leaves out the host's launch and guard overhead that
dominates a lone compiled block on a GPU. From those come device-time
ratios against the dense block (routed, dense-on-k, glue, routing-only) and
the kernel launches per call (Triton ones apart). ``--top N`` adds the
profiler's top-N operator tables per case.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import block_bench  # noqa: E402 (script directory on the path first)
import common  # noqa: E402

CALLS = 5
#: The switches of ``modpass.routing``, each on by default; ``--generic-forms`` turns all of them off.
SWITCHES = ("COMPILED_FORMS", "SELECTION_KERNEL", "ONE_GRADIENT_BUFFER")
#: Case-name suffix of the routed cases compiled with every switch off (``--generic-forms``).
GENERIC = " generic"


@dataclasses.dataclass
class Profile:
    wall_ms: float
    host_ms: float
    device_ms: float | None  # None where the device has no kernel timeline (CPU)
    launches: float | None
    triton_launches: float | None
    tables: str


def device_events(averages) -> list:
    """The device-side entries of ``key_averages()`` (kernels, copies, memsets), as the profiler's own total counts them."""
    return [evt for evt in averages
            if evt.device_type == DeviceType.CUDA and not getattr(evt, "is_user_annotation", False)]


def profile_case(case: common.Case, device: torch.device, top: int) -> Profile:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(3):
        common.time_call(case, device)
    host, wall = [], []
    for _ in range(CALLS):
        if case.prepare:
            case.prepare()
        common.synchronize(device)
        start = time.perf_counter()
        case.step()
        host.append(time.perf_counter() - start)  # returns once everything is queued
        common.synchronize(device)
        wall.append(time.perf_counter() - start)
    with profile(activities=activities) as prof:
        for _ in range(CALLS):
            if case.prepare:
                case.prepare()
            case.step()
        common.synchronize(device)
    averages = prof.key_averages()
    tables = ""
    if top:
        tables = averages.table(sort_by="self_cpu_time_total", row_limit=top)
        if device.type == "cuda":
            tables += "\n" + averages.table(sort_by="self_device_time_total", row_limit=top)
    device_ms = launches = triton = None
    if device.type == "cuda":
        events = device_events(averages)
        device_ms = sum(evt.self_device_time_total for evt in events) / 1e3 / CALLS
        launches = sum(evt.count for evt in events) / CALLS
        triton = sum(evt.count for evt in events if evt.key.startswith("triton_")) / CALLS
    return Profile(min(wall) * 1e3, min(host) * 1e3, device_ms, launches, triton, tables)


def suffix(switches: tuple[str, ...]) -> str:
    """Case-name suffix of a routed case run with ``switches`` off."""
    return GENERIC if set(switches) == set(SWITCHES) else " without " + ",".join(switches)


def switched_off_case(case: common.Case, switches: tuple[str, ...]) -> common.Case:
    """``case`` run (and so compiled: Dynamo guards on the switches) with ``switches`` of
    ``modpass.routing`` off: with all of them, the router as a ``Linear``, selection as two
    sorts and autograd's two gradient buffers for the block input."""
    def step() -> None:
        with common.routing_switches(**dict.fromkeys(switches, False)):
            case.step()

    return dataclasses.replace(case, name=case.name + suffix(switches), step=step)


def case_table(profiles: dict[str, Profile]) -> str:
    dense = profiles["dense"].device_ms
    rows = []
    for name, p in profiles.items():
        rows.append([name, f"{p.wall_ms:.3f}", f"{p.host_ms:.3f}",
                     "n/a" if p.device_ms is None else f"{p.device_ms:.3f}",
                     "n/a" if p.device_ms is None else common.fmt_ratio(p.device_ms / dense),
                     "n/a" if p.launches is None else f"{p.launches:g}",
                     "n/a" if p.triton_launches is None else f"{p.triton_launches:g}"])
    headers = ["case", "wall ms", "host issue ms", "device ms", "device / dense", "launches", "Triton launches"]
    return common.markdown_table(headers, rows) + "\n"


def capacity_table(profiles: dict[str, Profile], flops: dict[str, common.Flops], capacities, suffixes) -> str:
    """Device-time ratios per capacity: the GPU-side counterpart of block_bench's table."""
    dense = profiles["dense"].device_ms
    rows = []
    for c in capacities:
        dense_k = profiles[f"dense_k@{c}"].device_ms if f"dense_k@{c}" in profiles else dense
        ideal = flops[f"routed@{c}"].causal_adjusted / flops["dense"].causal_adjusted
        for forms in ("", *suffixes):
            if f"routed@{c}{forms}" not in profiles:
                continue
            routed = profiles[f"routed@{c}{forms}"].device_ms
            routing = profiles[f"routing@{c}{forms}"].device_ms if f"routing@{c}{forms}" in profiles else None
            rows.append([f"{c}{forms}", f"{ideal:.3f}", common.fmt_ratio(routed / dense),
                         common.fmt_overhead(routed / dense, ideal), common.fmt_ratio(dense_k / dense),
                         common.fmt_pct((routed - dense_k) / dense), common.fmt_pct(None if routing is None else routing / dense)])
    headers = ["c", "FLOP c/a", "device ratio", "ovh", "dense-k", "glue", "route"]
    return common.markdown_table(headers, rows) + "\n"


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="one size name from block_bench.SIZES")
    parser.add_argument("--capacities", default="0.125", help="comma list")
    parser.add_argument("--passes", default="fwd", help="comma list of fwd,fwdbwd")
    parser.add_argument("--top", type=int, default=15, help="rows of the profiler's operator tables per case (0: none)")
    parser.add_argument("--generic-forms", action="store_true",
                        help=f"also profile the compiled routed cases with every routing switch ({', '.join(SWITCHES)}) off (A/B)")
    parser.add_argument("--without", action="append", default=[], metavar="SWITCH[,SWITCH]",
                        help="also profile the compiled routed cases with these routing switches off (repeatable; A/B of one form)")
    args = parser.parse_args()
    switch_sets = [SWITCHES] if args.generic_forms else []
    switch_sets += [tuple(names.split(",")) for names in args.without]
    if unknown := {name for names in switch_sets for name in names} - set(SWITCHES):
        parser.error(f"unknown routing switch(es) {sorted(unknown)}; known: {', '.join(SWITCHES)}")
    device, dtype = common.setup(args)
    modes = common.parse_modes(args.modes)
    backend = common.resolve_backend(args.backend)
    capacities = tuple(float(c) for c in args.capacities.split(","))
    name = "Q" if args.quick else (args.sizes or ("G1" if device.type == "cuda" else "S1"))
    size = block_bench.SIZES[name]
    variants = block_bench.build_variants(size, capacities, device, dtype, args.seed)
    payload = common.header("profile", args, device)
    method = f"3 warm-up calls, then {CALLS} calls timed (minimum) and {CALLS} profiled, per case in turn"
    report = [common.markdown_preamble(f"profile of block_bench cases: {name} {size.describe()}, {dtype}", payload, method),
              "**device ms** = the kernels' own time per call (profiler, CUDA only); **device ratio** = routed / dense "
              "device time; **ovh** = device ratio / causal-adjusted FLOP ratio; **glue** = (routed - dense-k) / dense; "
              "**route** = routing-only graph / dense; **launches** = device kernels, copies and memsets per call.\n"]
    payload["results"] = {}
    for pass_name in args.passes.split(","):
        backward = pass_name == "fwdbwd"
        block_bench.set_mode(variants, backward)
        flops = block_bench.flops_of(variants, backward, args.seed)
        for mode in modes:
            print(f"  {pass_name} {mode}")
            profiles = {}
            for variant in variants:
                module = common.compile_module(variant.module, backend, args.compile_mode) if mode == "compiled" else variant.module
                profiles[variant.name] = profile_case(block_bench.make_case(variant, module, backward, args.seed), device, args.top)
                if mode == "compiled" and variant.name.startswith(("routed@", "routing@")):
                    for switches in switch_sets:
                        case = switched_off_case(block_bench.make_case(variant, module, backward, args.seed), switches)
                        profiles[case.name] = profile_case(case, device, args.top)
            payload["results"][f"{pass_name} {mode}"] = {n: dataclasses.asdict(p) | {"tables": None} for n, p in profiles.items()}
            report.append(f"## {pass_name} {mode}\n")
            report.append(case_table(profiles))
            if device.type == "cuda":
                report.append(capacity_table(profiles, flops, capacities, [suffix(switches) for switches in switch_sets]))
            report += [f"#### {n}\n\n```\n{p.tables}\n```\n" for n, p in profiles.items() if p.tables]
    text = "\n".join(report)
    print(text)
    stem = Path(args.out) if args.out else common.default_out(device, "profile", name)
    common.write_results(stem, payload, text)


if __name__ == "__main__":
    main()
