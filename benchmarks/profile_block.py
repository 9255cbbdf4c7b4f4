"""Where does a routed block's time go? ``torch.profiler`` over the cases of ``block_bench.py``.

Usage (from the repository root)::

    python benchmarks/profile_block.py --quick
    python benchmarks/profile_block.py --sizes S1 --capacity 0.125 --modes eager
    python benchmarks/profile_block.py --device cuda --capacity 0.125

For each mode it profiles ``dense``, ``routed@c``, ``dense_k@c`` and
``routing@c`` (see block_bench.py) for a few calls each after warm-up and
prints, per case, the wall time per call, the host time spent before the
last kernel was issued (launch-bound if close to the wall time) and the top
operators by self host time and by self device time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import block_bench  # noqa: E402 (script directory on the path first)
import common  # noqa: E402

CALLS = 5


def profile_case(case: common.Case, device: torch.device, top: int) -> str:
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
    lines = [f"#### {case.name}: wall {min(wall) * 1e3:.3f} ms/call, host issue {min(host) * 1e3:.3f} ms/call\n"]
    lines.append("```")
    lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=top))
    if device.type == "cuda":
        lines.append(averages.table(sort_by="self_device_time_total", row_limit=top))
    lines.append("```")
    return "\n".join(lines)


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="one size name from block_bench.SIZES")
    parser.add_argument("--capacity", type=float, default=0.125)
    parser.add_argument("--passes", default="fwd", help="comma list of fwd,fwdbwd")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    device, dtype = common.setup(args)
    modes = common.parse_modes(args.modes)
    backend = common.resolve_backend(args.backend)
    name = "Q" if args.quick else (args.sizes or ("G1" if device.type == "cuda" else "S1"))
    size = block_bench.SIZES[name]
    variants = block_bench.build_variants(size, (args.capacity,), device, dtype, args.seed)
    report = [f"# profile of block_bench cases: {name} {size.describe()}, {dtype}, {device}, c={args.capacity}\n"]
    for pass_name in args.passes.split(","):
        backward = pass_name == "fwdbwd"
        block_bench.set_mode(variants, backward)
        for mode in modes:
            report.append(f"## {pass_name} {mode}\n")
            for variant in variants:
                module = common.compile_module(variant.module, backend, args.compile_mode) if mode == "compiled" else variant.module
                case = block_bench.make_case(variant, module, backward, args.seed)
                report.append(profile_case(case, device, args.top))
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
