"""Shared harness for the modpass benchmarks (``block_bench.py``, ``model_bench.py``).

The method follows ``shared/reference/cpu-performance-ceiling.md`` so that the
numbers are comparable with the hand-written reference block measured there:

* every case gets warm-up calls first; the first call's wall time is kept as
  the compile time (for eager cases it is just a cold call);
* then ``rounds`` rounds, each running every case once in a freshly shuffled
  order, so slow drifts of a shared machine hit all cases alike;
* ``gc.collect()`` runs before each timed call and the collector is off while
  it runs, so no collection lands inside a measurement;
* the headline number is the **median of per-round ratios** case/baseline,
  which cancels a round's machine-wide slowdown; the ratio of medians is kept
  too, as a noise check (the two should agree to a few percent);
* "fwd" runs under ``torch.no_grad()``; "fwdbwd" is ``out.backward(g)`` with a
  fixed ``g`` and every gradient set to None (outside the timed region)
  before each step.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` after
``modpass.flops.register_cpu_attention_flops()`` (without it CPU attention
counts as zero). "counter" is what the counter reports (attention over the full
T x T); "causal-adjusted" halves the attention FLOPs, which is closer to what a
causal flash kernel does, and is the denominator of the overhead factor.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from modpass import routing
from modpass.api import routed_blocks
from modpass.flops import register_cpu_attention_flops

#: Capacities swept by the block benchmark: c = 1.0 exposes the pure routing
#: overhead (every token routed), the others the MoD operating points.
CAPACITIES = (1.0, 0.5, 0.25, 0.125)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CPU_THREADS = 2

Step = Callable[[], None]


# -- command line and environment ------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark script shares; each script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds: a smoke test of the script")
    parser.add_argument("--backend", default="inductor",
                        help="torch.compile backend for the compiled cases (e.g. inductor, modpass)")
    parser.add_argument("--modes", default="eager,compiled", help="comma list of eager,compiled")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. reduce-overhead (CUDA graphs: removes the per-call host "
                             "overhead that dominates small GPU blocks)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default: 9 fwd / 7 fwdbwd on cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per case (default 2 on cpu, 3 on cuda)")
    parser.add_argument("--calls", type=int, default=1,
                        help="back-to-back calls per timed sample (time / calls is recorded). 1 measures one cold "
                             "call's latency; more let the host issue ahead of the GPU, as blocks do inside a model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=CPU_THREADS,
                        help="torch CPU threads (default 2, the project machine's cores, as in the reference)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep Inductor's FX graph / AOTAutograd caches on (compile times then depend on earlier runs)")
    parser.add_argument("--out", default=None,
                        help="output path stem (writes STEM.json and STEM.md); default benchmarks/results/<device>-<bench>-...")
    return parser


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = set(modes) - {"eager", "compiled"}
    if unknown or not modes:
        raise SystemExit(f"--modes takes eager and/or compiled, got {text!r}")
    return modes


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply the measurement settings of the reference method; return (device, dtype)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    if args.warmup is None:
        args.warmup = 3 if device.type == "cuda" else 2
    if device.type == "cpu":
        # The project machine has 2 cores; pinning the thread count keeps runs
        # comparable with the reference (and with each other).
        torch.set_num_threads(args.threads)
    else:
        # TF32 would only matter in float32 runs; keep the matmul precision
        # explicit so fp32 GPU numbers are not silently TF32.
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    # One compiled wrapper per case all share a forward code object (and
    # RoutedBlock.forward is shared by every capacity); the default limit of 8
    # would silently fall back to eager in the middle of a sweep.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    if not args.warm_cache:
        # Cold caches make "compile time" mean a real compile and the numbers
        # reproducible across repeated runs of the script.
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    return device, getattr(torch, args.dtype)


@contextlib.contextmanager
def routing_switches(**values: bool):
    """Set switches of ``modpass.routing`` (``COMPILED_FORMS``, ``SELECTION_KERNEL``, ``ONE_GRADIENT_BUFFER``) for a block, then restore them.

    Dynamo guards on them, so a compiled call inside the block recompiles
    rather than reusing a graph traced with the other setting.
    """
    previous = {name: getattr(routing, name) for name in values}
    for name, value in values.items():
        setattr(routing, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(routing, name, value)


def resolve_backend(name: str):
    """A torch.compile backend: a registered name, or modpass's own if not registered.

    The ``modpass`` backend is declared as an entry point; on a machine where
    the package is not pip-installed (e.g. a GPU box running from the source
    tree) the entry point is missing, so import it directly.
    """
    if name in torch._dynamo.list_backends(exclude_tags=()):
        return name
    if name == "modpass":
        from modpass.backend import modpass_backend

        return modpass_backend
    raise SystemExit(f"unknown torch.compile backend {name!r}; known: {torch._dynamo.list_backends(exclude_tags=())}")


def compile_module(module: torch.nn.Module, backend, mode: str | None = None) -> torch.nn.Module:
    """``torch.compile`` with static shapes, as in the reference (one graph per shape and capacity)."""
    return torch.compile(module, backend=backend, dynamic=False, mode=mode)


def randomize_routers(model: torch.nn.Module, seed: int) -> None:
    """Give every router random weights.

    modpass zero-initialises routers, so an untrained model selects the first
    k tokens of each sequence (contiguous slices). A trained router picks
    scattered tokens; random weights make the gathers and scatters touch
    scattered rows as they would in use.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in routed_blocks(model).values():
            for router in block.mod_routers.values():
                weight = torch.randn(router.weight.shape, generator=generator) / math.sqrt(router.weight.shape[-1])
                router.weight.copy_(weight)
                router.bias.zero_()


def first_tensor(output) -> torch.Tensor:
    """The main output of a block or model call (tensor, tuple/list, or HF ``ModelOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "loss") and output.loss is not None:
        return output.loss
    if isinstance(output, dict):
        output = tuple(output.values())
    return first_tensor(output[0])


# -- steps ----------------------------------------------------------------------------------------
def forward_step(call: Callable[[], object]) -> Step:
    def step() -> None:
        with torch.no_grad():
            call()

    return step


def backward_step(call: Callable[[], object], seed: int = 0) -> Step:
    """``out.backward(g)`` with one fixed ``g`` (ones for a scalar loss), created on first use."""
    grads: dict[str, torch.Tensor] = {}

    def step() -> None:
        out = first_tensor(call())
        if "g" not in grads:
            if out.dim() == 0:
                grads["g"] = torch.ones_like(out)
            else:
                generator = torch.Generator(device=out.device).manual_seed(seed)
                grads["g"] = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        out.backward(grads["g"])

    return step


def model_case(name: str, model: torch.nn.Module, module: Callable, ids: torch.Tensor, backward: bool, seed: int,
               **kwargs) -> Case:
    """A whole-model case: ``module(input_ids=ids, **kwargs)``; with ``labels=ids`` and a backward when ``backward``.

    ``module`` is ``model`` or its compiled wrapper; ``model``'s gradients are cleared before each call.
    """
    if backward:
        step = backward_step(lambda: module(input_ids=ids, labels=ids, use_cache=False, **kwargs), seed=seed)
        return Case(name, step, clear_grads(model.parameters()))
    return Case(name, forward_step(lambda: module(input_ids=ids, use_cache=False, **kwargs)))


def clear_grads(tensors: Iterable[torch.Tensor]) -> Callable[[], None]:
    """A ``prepare`` hook: set ``.grad`` to None on every tensor (params and inputs)."""
    tensors = list(tensors)

    def prepare() -> None:
        for tensor in tensors:
            tensor.grad = None

    return prepare


# -- timing ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    name: str
    step: Step
    prepare: Callable[[], None] | None = None


@dataclasses.dataclass
class CaseResult:
    name: str
    first_call_s: float
    times_s: list[float]
    ratios: list[float]  # per round, vs the baseline case of the same round

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def to_json(self, baseline: CaseResult) -> dict:
        return {
            "first_call_s": self.first_call_s,
            "median_s": self.median_s,
            "median_of_ratios": self.ratio,
            "ratio_of_medians": self.median_s / baseline.median_s,
            "times_s": self.times_s,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Step, device: torch.device, calls: int = 1) -> float:
    """Seconds per call over ``calls`` back-to-back calls of ``step``; CUDA events on GPU, ``perf_counter`` on CPU.

    Gradients accumulate across the calls of one fwd+bwd sample (one extra
    add per parameter, for the dense and routed cases alike).
    """
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    start_s = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start_s) / calls


def time_call(case: Case, device: torch.device, calls: int = 1) -> float:
    if case.prepare is not None:
        case.prepare()
    gc.collect()
    gc.disable()
    try:
        return timed(case.step, device, calls)
    finally:
        gc.enable()


def run_interleaved(cases: Sequence[Case], *, baseline: str, rounds: int, warmup: int, device: torch.device,
                    seed: int = 0, calls: int = 1, log: Callable[[str], None] = print) -> dict[str, CaseResult]:
    """Warm every case up, then time ``rounds`` shuffled rounds; ratios are against ``baseline``."""
    rng = random.Random(seed)
    first: dict[str, float] = {}
    for case in cases:
        first[case.name] = time_call(case, device)
        for _ in range(warmup - 1):
            time_call(case, device)
        log(f"    warm {case.name:<28} first call {first[case.name]:8.2f} s")
    times: dict[str, list[float]] = {case.name: [] for case in cases}
    for round_index in range(rounds):
        order = list(cases)
        rng.shuffle(order)
        for case in order:
            times[case.name].append(time_call(case, device, calls))
        log(f"    round {round_index + 1}/{rounds}: {baseline} {times[baseline][-1] * 1e3:.1f} ms")
    base = times[baseline]
    return {
        name: CaseResult(name, first[name], ts, [t / b for t, b in zip(ts, base)])
        for name, ts in times.items()
    }


def median_round_difference(results: dict[str, CaseResult], minuend: str, subtrahend: str, baseline: str) -> float:
    """Median over rounds of ``(minuend - subtrahend) / baseline``: a small cost measured as a difference.

    Taking the difference within each round (both cases ran moments apart)
    cancels most of the machine's slow drift, unlike a difference of medians.
    """
    a, b, base = (results[n].times_s for n in (minuend, subtrahend, baseline))
    return statistics.median((x - y) / z for x, y, z in zip(a, b, base))


# -- FLOPs ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Flops:
    total: int
    attention: int

    @property
    def causal_adjusted(self) -> float:
        """Attention FLOPs halved: a causal kernel skips the upper triangle."""
        return self.total - self.attention / 2

    def to_json(self) -> dict:
        return {"counter": self.total, "attention": self.attention, "causal_adjusted": self.causal_adjusted}


def is_attention_op(op) -> bool:
    # Every SDPA backend op (flash/_for_cpu, efficient, cudnn) and their backwards.
    return "attention" in str(op)


def count_flops(step: Step) -> Flops:
    """FLOPs of one call of ``step`` (run it eagerly: the count is of the math, not the kernels)."""
    register_cpu_attention_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    per_op = counter.get_flop_counts().get("Global", {})
    return Flops(int(sum(per_op.values())), int(sum(v for op, v in per_op.items() if is_attention_op(op))))


def saved_activations_mib(step: Step, model: torch.nn.Module) -> float:
    """MiB that autograd saves for the backward in one eager call of ``step`` (activations only).

    Each storage counts once, whatever views of it are saved; the model's
    parameters (which linear layers save too) are left out.
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(saved.values()) / 2**20


# -- compiled-code inspection ----------------------------------------------------------------------
_TRITON_KERNEL = re.compile(r"@triton\.jit")
_CPP_KERNEL = re.compile(r"^(cpp_fused_\w+) = async_compile\.cpp", re.MULTILINE)
_FALLBACK = re.compile(r"\b(?:aten|extern_kernels)\.(\w+)")


def inductor_kernels(step: Step, device: torch.device) -> dict | None:
    """Kernels Inductor generates for ``step`` (which must call a freshly compiled module).

    Counts ``@triton.jit`` kernels on CUDA and ``cpp_fused_*`` kernels on CPU,
    plus the ATen/extern calls left in the wrapper (GEMMs, SDPA, and
    fallbacks such as sort/topk). ``run_and_get_code`` resets Dynamo, so call
    this after all timing is done. Caches are off so every graph is lowered
    (a cache hit would not hand back its code).
    """
    from torch._inductor.utils import run_and_get_code

    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        _, codes = run_and_get_code(step)
    if not codes:
        return None
    pattern = _TRITON_KERNEL if device.type == "cuda" else _CPP_KERNEL
    calls: dict[str, int] = {}
    for code in codes:
        # Comment lines repeat the source FX graph (every aten op); only count real calls.
        executable = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("#"))
        for name in _FALLBACK.findall(executable):
            calls[name] = calls.get(name, 0) + 1
    return {
        "graphs": len(codes),
        "kernels_per_graph": [len(pattern.findall(code)) for code in codes],
        "kernels": sum(len(pattern.findall(code)) for code in codes),
        "aten_calls": dict(sorted(calls.items())),
    }


def dynamo_breaks(fn: Callable, *args, **kwargs) -> dict:
    """Graph count and graph breaks Dynamo sees when tracing ``fn(*args, **kwargs)``."""
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = set()
    for reason in explanation.break_reasons:
        where = reason.user_stack[-1] if reason.user_stack else None
        at = f" at {Path(where.filename).name}:{where.lineno} ({where.line})" if where else ""
        reasons.add(str(reason.reason).splitlines()[0] + at)
    return {"graphs": explanation.graph_count, "breaks": explanation.graph_break_count, "reasons": sorted(reasons)}


# -- reporting ------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    with contextlib.suppress(Exception):
        import triton

        info["triton"] = triton.__version__
    return info


def git_revision() -> str | None:
    """The modpass commit measured (with ``+dirty`` when the tree has edits): the code changes often."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "modpass"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def selection_kernel(against: str):
    """``(label, select_rows)``: the selection kernel from a kernel source file or a git revision's.

    For A/B runs of :mod:`modpass.kernels.selection` against another version of
    its Triton code: a file for machines whose copy of the repository has no git
    history, else ``git show REV:modpass/kernels/_selection_triton.py``. The
    kernel must keep ``select_rows``'s signature.
    """
    import importlib.util
    import tempfile

    source_file = Path(against)
    if source_file.is_file():
        label, source = source_file.stem, source_file.read_text()
    else:
        root = Path(__file__).resolve().parent.parent
        label = subprocess.run(["git", "rev-parse", "--short", against], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
        source = subprocess.run(["git", "show", f"{label}:modpass/kernels/_selection_triton.py"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    # Triton reads a kernel's source back from its file, so the copy must live in one.
    path = Path(tempfile.mkdtemp()) / f"selection_{label.replace('-', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return label, module.select_rows


def header(bench: str, args: argparse.Namespace, device: torch.device) -> dict:
    return {
        "benchmark": bench,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(device),
        "torch": torch.__version__,
        "modpass_revision": git_revision(),
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
    }


def default_out(device: torch.device, bench: str, *parts: str) -> Path:
    return RESULTS_DIR / "-".join([device.type, bench, *parts])


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


INTERLEAVED_METHOD = ("warm-ups, then shuffled interleaved rounds; ratios are the median of per-round ratios against the "
                      "baseline case (dense unless stated) of the same round (see benchmarks/common.py); {calls} "
                      "back-to-back call(s) per timed sample")


def markdown_preamble(title: str, payload: dict, method: str | None = None) -> str:
    machine = payload["machine"]
    where = machine.get("gpu") or f"{machine['processor']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} threads"
    return (
        f"# {title}\n\n"
        f"- date: {payload['date']}; torch {payload['torch']}; modpass {payload['modpass_revision']}\n"
        f"- machine: {where}; {machine['platform']}; load average at start {machine['load_average']}\n"
        f"- command: `{payload['command']}`\n"
        f"- method: {method or INTERLEAVED_METHOD.format(calls=payload['settings'].get('calls', 1))}\n"
    )


def write_results(stem: Path, payload: dict, markdown: str) -> None:
    # With the start value in the header, this shows whether other work shared the machine during the run.
    payload["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    # Appended, not with_suffix: a stem may hold a dot of its own (``...-c0.125``).
    json_path, markdown_path = (stem.with_name(stem.name + suffix) for suffix in (".json", ".md"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    markdown_path.write_text(markdown.rstrip() + "\n")
    print(f"\nwrote {json_path} and {markdown_path}")


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1%}"


def fmt_overhead(measured: float | None, ideal: float) -> str:
    return "n/a" if measured is None else f"{measured / ideal:.2f}"
