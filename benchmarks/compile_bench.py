"""Compile time of the routed model against the dense one, over repeated cold compiles.

Usage (from the repository root)::

    python benchmarks/compile_bench.py                       # CPU model of model_bench.py, 3 rounds
    python benchmarks/compile_bench.py --device cuda --rounds 3

One compile is one sample of a noisy quantity (on this host the routed/dense
ratio of single runs ranged 0.89-1.39), so this script repeats it. Every
sample is a fresh Python process with empty Inductor and Triton caches that
builds the model of ``model_bench.py`` (dense, or routed by
``modpass.transform`` with every other layer at c = 0.125), compiles it and
times the first call (compile + one run) and the second (one run); the
compile time is their difference. Rounds run each (model, pass) once, in a
shuffled order, and the ratio is the median of per-round ratios. Each sample
also records where the time went, from Dynamo's compile-time counters.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import model_bench  # noqa: E402

import modpass  # noqa: E402

MODELS = ("dense", "mod")
PASSES = ("fwd", "fwdbwd")
# Dynamo's compile-time counters worth a column: tracing, AOTAutograd, Inductor's lowering and
# code generation, and the wait for the kernel compiles (C++ on CPU, Triton on GPU).
PHASES = {
    "Dynamo trace": "bytecode_tracing",
    "AOT trace": "aot_trace_joint_graph",
    "partition": "min_cut_rematerialization_partition",
    "lowering": "GraphLowering.run",
    "codegen": "Scheduler.codegen",
    "kernel compile wait": "async_compile.wait",
}
RESULT_TAG = "compile_bench result: "


def sample(args, device: torch.device, dtype: torch.dtype) -> dict:
    """One cold compile of one model and pass, in this (fresh) process."""
    size = model_bench.size_for(args, device)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = model_bench.build_model(size, device, dtype)
    if args.worker == "mod":
        model = modpass.transform(model, args.capacity, layers="every_other", inplace=True)
        common.randomize_routers(model, args.seed)
    common.synchronize(device)
    build_s = time.perf_counter() - start
    backward = args.worker_pass == "fwdbwd"
    model.train(backward)
    ids = torch.randint(0, size.vocab, (size.batch, size.tokens), generator=torch.Generator().manual_seed(args.seed))
    case = common.model_case(args.worker, model, common.compile_module(model, common.resolve_backend(args.backend)),
                             ids.to(device), backward, args.seed)
    times = [common.time_call(case, device) for _ in range(2)]
    metrics = torch._dynamo.utils.compilation_time_metrics
    return {"build_s": build_s, "first_call_s": times[0], "run_s": times[1], "compile_s": times[0] - times[1],
            "phases": {label: sum(metrics.get(key, ())) for label, key in PHASES.items()}}


def run_sample(name: str, pass_name: str) -> dict:
    """``sample`` in a fresh process with empty compile caches."""
    caches = tempfile.mkdtemp(prefix="modpass-compile-bench-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor", "TRITON_CACHE_DIR": f"{caches}/triton",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", name, "--worker-pass", pass_name]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    process_s = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode or not lines:
        raise SystemExit(f"{name} {pass_name} sample failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    # The process's whole wall time too: what a sample costs a time-limited GPU lease, compile or not.
    return {**json.loads(lines[-1][len(RESULT_TAG):]), "process_s": process_s}


def markdown(payload: dict) -> str:
    def values(name: str, pass_name: str, pick) -> list[float]:
        return [pick(s) for s in payload["samples"] if s["model"] == name and s["pass"] == pass_name]

    def spread(numbers: list[float], digits: int) -> str:
        return f"{statistics.median(numbers):.{digits}f} ({min(numbers):.{digits}f}–{max(numbers):.{digits}f})"

    rows = []
    for pass_name in payload["passes"]:
        phases = [" / ".join(f"{statistics.median(values(name, pass_name, lambda s, p=p: s['phases'][p])):.1f}"
                             for name in MODELS) for p in PHASES]
        overheads = [" / ".join(f"{statistics.median(values(name, pass_name, lambda s, k=k: s[k])):.1f}" for name in MODELS)
                     for k in ("build_s", "process_s")]
        rows.append([pass_name, *(spread(values(name, pass_name, lambda s: s["compile_s"]), 1) for name in MODELS),
                     f"**{spread(payload['ratios'][pass_name], 2)}**", *phases, *overheads])
    rounds_done, rounds = len(payload["ratios"][payload["passes"][0]]), payload["settings"]["rounds"]
    cut_off = "" if rounds_done == rounds else f" of {rounds} (cut off)"
    method = (f"{rounds_done} rounds{cut_off}; each sample a fresh process with empty Inductor/Triton caches "
              "(compile = first call - second call); rounds run every (model, pass) once in a shuffled order, "
              "ratio = median of per-round routed/dense ratios (range in brackets)")
    headers = ["pass", "dense compile (s)", "routed compile (s)", "routed / dense",
               *(f"{label} dense / routed (s)" for label in PHASES),
               "model build dense / routed (s)", "whole sample dense / routed (s)"]
    return (common.markdown_preamble("modpass compile time: routed vs dense model", payload, method)
            + f"\nModel: LlamaForCausalLM, {payload['size']}; MoD c={payload['settings']['capacity']} on every other layer.\n\n"
            + common.markdown_table(headers, rows)
            + "\n\nPhase columns are medians of Dynamo's compile-time counters, summed over the forward and backward "
              "graphs. Kernels compile in worker processes from code generation on; the wait is what remains of "
              "those compiles when the generated module loads. Model build includes `modpass.transform`; "
              "a whole sample is its process's wall time, start to exit.\n")


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=float, default=0.125)
    parser.add_argument("--passes", default=",".join(PASSES), help="comma list of fwd,fwdbwd")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-pass", choices=PASSES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        device, dtype = common.setup(args)
        print(RESULT_TAG + json.dumps(sample(args, device, dtype)))
        return
    device, _ = common.setup(args)
    args.rounds = args.rounds or (1 if args.quick else 3)
    passes = [p for p in args.passes.split(",") if p]
    size = model_bench.size_for(args, device)

    payload = common.header("compile", args, device)
    payload.update(size=size.describe(), passes=passes, samples=[], ratios={p: [] for p in passes})
    stem = Path(args.out) if args.out else common.default_out(device, "compile", *(["quick"] if args.quick else []))
    order = random.Random(args.seed)
    for round_number in range(args.rounds):
        jobs = [(name, pass_name) for name in MODELS for pass_name in passes]
        order.shuffle(jobs)
        this_round = {}
        for name, pass_name in jobs:
            result = this_round[name, pass_name] = run_sample(name, pass_name)
            payload["samples"].append({"round": round_number, "model": name, "pass": pass_name, **result})
            # The whole sample in the log: a run cut off by a time limit still leaves its phases.
            print(f"  round {round_number + 1}/{args.rounds} {name} {pass_name}: compile {result['compile_s']:.1f} s "
                  f"{json.dumps(result)}", flush=True)
        for pass_name in passes:
            payload["ratios"][pass_name].append(this_round["mod", pass_name]["compile_s"] / this_round["dense", pass_name]["compile_s"])
        # Written after every round, so that a run cut off later keeps the rounds it finished.
        text = markdown(payload)
        common.write_results(stem, payload, text)
    print("\n" + text)


if __name__ == "__main__":
    main()
