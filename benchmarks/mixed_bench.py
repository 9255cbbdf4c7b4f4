"""Mixed-task batches and route masks: a batch of two tasks, or under a route mask, vs the same batch as one task, at equal FLOPs.

Usage (from the repository root)::

    python benchmarks/mixed_bench.py --quick
    python benchmarks/mixed_bench.py                   # the CPU model of model_bench.py, eager and compiled

The model of ``model_bench.py`` is routed for two tasks with the same
capacity (``{"a": c, "b": c}``), so both calls below do the same work:
"whole" is the batch with ``task="a"``; "mixed" is ``task=torch.tensor([0, 1,
0, 1, ...])``, which routes each task's rows separately (compiled: split in
the graph, with ``capture_dynamic_output_shape_ops`` on, one graph for every
mix). mixed/whole is the cost of the split: selecting each task's rows and
writing them back, and running each routed block once per task on part of
the batch instead of once on all of it. "masked" is the batch with
``task="a"`` and a route mask that makes every token routable, so its
capacities are whole's: masked/whole is the cost of the route-mask path
(per-row capacities, the per-row selection, compiled: the largest row
capacity as an unbacked size, with ``capture_scalar_outputs`` on).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402 (script directory on the path first)
import model_bench  # noqa: E402

import modpass  # noqa: E402


def case_arguments(ids: torch.Tensor) -> dict[str, dict]:
    mix = (torch.arange(ids.shape[0]) % 2).to(ids.device)
    return {"whole": {"task": "a"}, "mixed": {"task": mix}, "masked": {"task": "a", "route_mask": torch.ones_like(ids, dtype=torch.bool)}}


def make_cases(model: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor, backward: bool, seed: int) -> list[common.Case]:
    return [common.model_case(name, model, module, ids, backward, seed, **kwargs) for name, kwargs in case_arguments(ids).items()]


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=float, default=0.125)
    args = parser.parse_args()
    device, dtype = common.setup(args)
    modes = common.parse_modes(args.modes)
    backend = common.resolve_backend(args.backend)
    size = model_bench.size_for(args, device)
    if size.batch % 2:
        raise SystemExit("the mixed batch alternates two tasks: the batch size must be even")
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True

    print(f"== {size.describe()}, {dtype}, {device}; tasks a and b at c={args.capacity} on every other layer")
    torch.manual_seed(args.seed)
    routed = modpass.transform(model_bench.build_model(size, device, dtype), {"a": args.capacity, "b": args.capacity},
                               layers="every_other")
    common.randomize_routers(routed, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, size.vocab, (size.batch, size.tokens), generator=generator).to(device)

    payload = common.header("mixed", args, device)
    payload["size"] = dataclasses.asdict(size)
    payload["passes"] = {}
    for backward in (False, True):
        pass_name = "fwdbwd" if backward else "fwd"
        routed.train(backward)
        entry: dict = {}
        for mode in modes:
            module = common.compile_module(routed, backend, args.compile_mode) if mode == "compiled" else routed
            rounds = args.rounds or (3 if args.quick else (7 if backward else 9))
            print(f"  {pass_name} {mode}: {rounds} rounds")
            timings = common.run_interleaved(make_cases(routed, module, ids, backward, args.seed), baseline="whole",
                                             rounds=rounds, warmup=args.warmup, device=device, seed=args.seed,
                                             calls=args.calls)
            entry[mode] = {"cases": {n: r.to_json(timings["whole"]) for n, r in timings.items()},
                           "ratio": timings["mixed"].ratio, "masked_ratio": timings["masked"].ratio}
        payload["passes"][pass_name] = entry
    if "compiled" in modes:
        routed.eval()
        with torch.no_grad():
            payload["dynamo"] = {name: common.dynamo_breaks(routed, input_ids=ids, use_cache=False, **kwargs)
                                 for name, kwargs in case_arguments(ids).items() if name != "whole"}

    text = markdown(payload, size, modes)
    print("\n" + text)
    parts = ["quick"] if args.quick else []
    stem = Path(args.out) if args.out else common.default_out(device, "mixed", *parts)
    common.write_results(stem, payload, text)


def markdown(payload: dict, size: model_bench.ModelSize, modes: tuple[str, ...]) -> str:
    settings = payload["settings"]
    parts = [common.markdown_preamble("modpass mixed-task benchmark: two tasks in one batch vs one task", payload)]
    parts.append(f"Model: LlamaForCausalLM, {size.describe()}, {settings['dtype']}; tasks a and b both at "
                 f"c={settings['capacity']} on every other layer. whole: `task=\"a\"`; mixed: rows alternate a, b "
                 "(`task=` a LongTensor); masked: `task=\"a\"` with a route mask that makes every token routable "
                 "(whole's capacities). Baseline of each round: whole.\n")
    rows = []
    for pass_name, entry in payload["passes"].items():
        for mode in modes:
            cases = entry[mode]["cases"]
            rows.append([pass_name, mode, *(f"{cases[name]['median_s'] * 1e3:.0f}" for name in ("whole", "mixed", "masked")),
                         f"{common.fmt_ratio(entry[mode]['ratio'])} ({cases['mixed']['ratio_of_medians']:.3f})",
                         f"{common.fmt_ratio(entry[mode]['masked_ratio'])} ({cases['masked']['ratio_of_medians']:.3f})"])
    parts.append(common.markdown_table(["pass", "mode", "whole (ms)", "mixed (ms)", "masked (ms)", "mixed/whole", "masked/whole"], rows) + "\n")
    for name, dynamo in payload.get("dynamo", {}).items():
        parts.append(f"Compiled {name} forward (eval): {dynamo['graphs']} graph(s), {dynamo['breaks']} graph break(s).\n")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
