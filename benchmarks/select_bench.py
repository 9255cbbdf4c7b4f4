"""Token selection alone on a GPU: modpass's Triton kernel against the two sorts it replaces.

Usage (from the repository root, on a CUDA machine)::

    python benchmarks/select_bench.py --out benchmarks/results/cuda-select

For each batch, sequence length and capacity it times the kernel
(``selection.select_tokens``, at every length: routing itself sends rows past
``selection.MAX_TOKENS`` to the sorts) and ``routing.select_tokens`` with
``routing.SELECTION_KERNEL`` off (a stable descending sort, then a sort of the
k winners), each eager and compiled by Inductor (which lowers the sorts its own
way). ``--against`` adds other versions of the kernel (a git revision or a
kernel source file each) and ``--configs`` other launch settings (tokens per
chunk x warps), launched eagerly, as an A/B in the same run. Times come from
``triton.testing.do_bench_cudagraph``: the calls are replayed from a CUDA
graph, so they are kernel time without the host's launch overhead. Every form
is checked against the eager sorts before it is timed.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from modpass import routing  # noqa: E402
from modpass.kernels import selection  # noqa: E402


def compiled(select):
    return torch.compile(select, backend="inductor", fullgraph=True, dynamic=False)


def with_sorts(select):
    """``select`` run with routing's selection kernel off: the two sorts (the switch stays outside Dynamo)."""
    def run(scores: torch.Tensor, k: int) -> torch.Tensor:
        with common.routing_switches(SELECTION_KERNEL=False):
            return select(scores, k)
    return run


def time_form(name: str, select, scores: torch.Tensor, k: int, want: torch.Tensor) -> float:
    """Microseconds per call of ``select`` on ``scores``, after checking its answer."""
    from triton.testing import do_bench_cudagraph

    if not torch.equal(select(scores, k), want):
        raise SystemExit(f"{name} disagrees with the eager sorts at {tuple(scores.shape)}, k={k}")
    return do_bench_cudagraph(lambda: select(scores, k), rep=50) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="2,8")
    parser.add_argument("--lengths", default="1024,4096,16384,32768,65536")
    parser.add_argument("--capacities", default="0.5,0.125")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--against", default="", help="comma list of other kernels: git revisions or kernel source files")
    parser.add_argument("--configs", default=f"{selection.CHUNK}x{selection.NUM_WARPS}",
                        help="comma list of CHUNKxWARPS launch settings for each --against kernel (and, where it "
                             "differs from the default, the current one)")
    parser.add_argument("--out", default=None, help="output path stem (writes STEM.json and STEM.md)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("select_bench.py times GPU kernels: it needs a CUDA device")
    device = torch.device("cuda")
    torch._dynamo.config.recompile_limit = 256
    payload = common.header("select", args, device)
    payload["results"] = []
    forms = {"kernel": selection.select_tokens, "kernel compiled": compiled(selection.select_tokens),
             "sorts": with_sorts(routing.select_tokens), "sorts compiled": with_sorts(compiled(routing.select_tokens))}
    kernels = {"": None, **dict(common.selection_kernel(a) for a in filter(None, args.against.split(",")))}
    default = (selection.CHUNK, selection.NUM_WARPS)
    for label, kernel in kernels.items():
        for config in args.configs.split(","):
            chunk, warps = (int(n) for n in config.split("x"))
            if kernel is not None or (chunk, warps) != default:
                forms[" ".join(filter(None, ["kernel", label, f"{chunk}x{warps}"]))] = functools.partial(
                    selection.launch, kernel=kernel, chunk=chunk, num_warps=warps)
    rows = []
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for batch, length, capacity in itertools.product(
        (int(b) for b in args.batches.split(",")),
        (int(t) for t in args.lengths.split(",")),
        (float(c) for c in args.capacities.split(",")),
    ):
        k = math.ceil(capacity * length)
        # Router scores are bf16 logits widened to fp32: many exact ties, as in a real model.
        scores = torch.randn(batch, length, device=device, generator=generator).bfloat16().float()
        want = forms["sorts"](scores, k)
        micros = {name: time_form(name, select, scores, k, want) for name, select in forms.items()}
        payload["results"].append({"batch": batch, "tokens": length, "capacity": capacity, "k": k, "us": micros})
        best_sorts = min(micros["sorts"], micros["sorts compiled"])
        rows.append([batch, length, capacity, *(f"{micros[name]:.1f}" for name in forms),
                     f"{best_sorts / micros['kernel compiled']:.2f}"])
        print(rows[-1], flush=True)
    method = "triton.testing.do_bench_cudagraph (CUDA-graph replays: kernel time, no launch overhead), median"
    text = "\n".join([
        common.markdown_preamble("token selection: Triton kernel vs two sorts (us per call)", payload, method),
        common.markdown_table(["B", "T", "c", *forms, "best sorts / kernel compiled"], rows),
    ])
    print(text)
    common.write_results(Path(args.out) if args.out else common.default_out(device, "select"), payload, text)


if __name__ == "__main__":
    main()
