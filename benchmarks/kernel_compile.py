"""Triton compile time of modpass's selection kernel, ahead of time: no GPU needed.

Usage (from the repository root, with Triton installed)::

    python benchmarks/kernel_compile.py --against d9513de --out benchmarks/results/cpu-kernel-compile   # d9513de: unrolled passes

Inductor compiles the Triton kernels of a compiled model on the host, so the
kernel's compile time is part of a routed model's compile time on a GPU. This
script compiles ``select_rows`` (as ``selection.launch`` specialises it) for
GPU targets with ``triton.compile``, which runs the whole pipeline down to the
cubin on the CPU. Each sample uses an empty Triton cache; with ``--against REV``
(a git revision or a kernel source file) that kernel is compiled in the same rounds,
alternating, so the two see the same machine load.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from modpass.kernels import selection  # noqa: E402


def compile_once(kernel, capability: int) -> tuple[float, int]:
    """Seconds for one compile into an empty cache, and the cubin's size in bytes (``kernel`` None: the current one)."""
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    start = time.perf_counter()
    compiled = selection.compile_for(capability, kernel)
    return time.perf_counter() - start, len(compiled.asm["cubin"])


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--against", default=None, help="also compile this kernel: a git revision or a kernel source file")
    parser.add_argument("--capabilities", default="90,80", help="comma list of CUDA compute capabilities")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, _ = common.setup(args)

    kernels = {"current": None}  # compile_for's default: the installed kernel
    if args.against:
        label, kernel = common.selection_kernel(args.against)
        kernels[label] = kernel
    capabilities = [int(c) for c in args.capabilities.split(",")]

    # One throwaway compile loads Triton's compiler and LLVM, which the first sample would otherwise pay.
    compile_once(kernels["current"], capabilities[0])
    samples = {(name, cap): [] for name in kernels for cap in capabilities}
    sizes = {}
    for _ in range(args.repeats):
        for cap in capabilities:
            for name, kernel in kernels.items():
                seconds, sizes[name, cap] = compile_once(kernel, cap)
                samples[name, cap].append(seconds)

    payload = common.header("kernel_compile", args, device)
    payload["results"] = [{"kernel": name, "sm": cap, "seconds": samples[name, cap], "cubin_bytes": sizes[name, cap]}
                          for name, cap in samples]
    rows = [[name, f"sm_{cap}", f"{statistics.median(samples[name, cap]):.2f}",
             f"{min(samples[name, cap]):.2f}–{max(samples[name, cap]):.2f}", sizes[name, cap]]
            for name, cap in samples]
    method = (f"`selection.compile_for` (CHUNK={selection.CHUNK}, {selection.NUM_WARPS} warps) into an "
              f"empty cache, {args.repeats} rounds alternating the kernels; median and range of the seconds")
    markdown = (common.markdown_preamble("modpass selection kernel: Triton compile time", payload, method)
                + "\n" + common.markdown_table(["kernel", "target", "compile (s)", "range (s)", "cubin (bytes)"], rows))
    print(markdown)
    if args.out:
        common.write_results(Path(args.out), payload, markdown)


if __name__ == "__main__":
    main()
