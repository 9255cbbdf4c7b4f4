"""Mixed-task batches: a batch of two tasks vs the same batch as one task, at equal FLOPs.

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
the batch instead of once on all of it.
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


def make_cases(model: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor, backward: bool, seed: int) -> list[common.Case]:
    mix = (torch.arange(ids.shape[0]) % 2).to(ids.device)
    return [common.model_case(name, model, module, ids, backward, seed, task=task) for name, task in (("whole", "a"), ("mixed", mix))]


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
            entry[mode] = {"cases": {n: r.to_json(timings["whole"]) for n, r in timings.items()}, "ratio": timings["mixed"].ratio}
        payload["passes"][pass_name] = entry
    if "compiled" in modes:
        routed.eval()
        with torch.no_grad():
            mix = (torch.arange(size.batch) % 2).to(device)
            payload["dynamo"] = common.dynamo_breaks(routed, input_ids=ids, task=mix, use_cache=False)

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
                 "(`task=` a LongTensor). Baseline of each round: whole.\n")
    rows = []
    for pass_name, entry in payload["passes"].items():
        for mode in modes:
            cases = entry[mode]["cases"]
            rows.append([pass_name, mode, f"{cases['whole']['median_s'] * 1e3:.0f}", f"{cases['mixed']['median_s'] * 1e3:.0f}",
                         f"{common.fmt_ratio(entry[mode]['ratio'])} ({cases['mixed']['ratio_of_medians']:.3f})"])
    parts.append(common.markdown_table(["pass", "mode", "whole (ms)", "mixed (ms)", "mixed/whole"], rows) + "\n")
    dynamo = payload.get("dynamo")
    if dynamo:
        parts.append(f"Compiled mixed forward (eval): {dynamo['graphs']} graph(s), {dynamo['breaks']} graph break(s).\n")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
