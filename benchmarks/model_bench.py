"""Whole-model benchmark: a tiny Hugging Face Llama with modpass routing vs the same model dense.

Usage (from the repository root)::

    python benchmarks/model_bench.py --quick                 # smoke test, tiny sizes
    python benchmarks/model_bench.py --modes eager           # CPU reference model, eager only
    python benchmarks/model_bench.py                         # eager and torch.compile
    python benchmarks/model_bench.py --device cuda           # bf16, hidden 2048, T=4096

The CPU model is the one of ``shared/reference/cpu-performance-ceiling.md``:
``LlamaForCausalLM`` from a config with random weights (8 layers, hidden 512,
8 heads, MLP 1408, vocab 4096 so the LM head does not dominate, sdpa
attention), B=2, T=1024, routed by ``modpass.transform(model, 0.125,
layers="every_other")``. "fwd" is ``model(input_ids)`` under no_grad (eval);
"fwdbwd" is ``model(input_ids, labels=input_ids).loss.backward()`` (train
mode, as in training; Llama has no dropout, so the math is the same). For
fwdbwd it also records the activations autograd saves for the backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402 (script directory on the path first)

import modpass  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ModelSize:
    layers: int
    hidden: int
    heads: int
    mlp: int
    vocab: int
    batch: int
    tokens: int

    def describe(self) -> str:
        return (f"{self.layers} layers, hidden {self.hidden}, {self.heads} heads, MLP {self.mlp}, "
                f"vocab {self.vocab}, B={self.batch}, T={self.tokens}")


SIZES = {
    "quick": ModelSize(layers=4, hidden=64, heads=4, mlp=176, vocab=256, batch=2, tokens=64),
    "cpu": ModelSize(layers=8, hidden=512, heads=8, mlp=1408, vocab=4096, batch=2, tokens=1024),
    # "Realistic" GPU size: a 1B-class layer shape (hidden 2048, T=4096), 8 layers to bound compile time.
    "cuda": ModelSize(layers=8, hidden=2048, heads=16, mlp=5632, vocab=32000, batch=2, tokens=4096),
}


def size_for(args: argparse.Namespace, device: torch.device) -> ModelSize:
    """The model size a run uses: ``--quick``'s tiny one, else the size for the device."""
    return SIZES["quick" if args.quick else device.type]


def build_model(size: ModelSize, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.mlp,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.heads, max_position_embeddings=max(size.tokens, 2048),
                         use_cache=False, attn_implementation="sdpa")
    # Built on the device: the GPU-sized model's random init takes 19 s on a 2-core host, and every
    # compile_bench sample (a fresh process) pays it.
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype).eval()


def make_cases(models: dict[str, torch.nn.Module], compiled: dict[str, torch.nn.Module], ids: torch.Tensor,
               backward: bool, seed: int) -> list[common.Case]:
    return [common.model_case(name, model, compiled[name], ids, backward, seed) for name, model in models.items()]


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=float, default=0.125)
    parser.add_argument("--layers", default="every_other", help="modpass layers=: every_other, all, or a comma list")
    parser.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                        help="count Inductor kernels (default: on for cuda, off for cpu)")
    args = parser.parse_args()
    device, dtype = common.setup(args)
    modes = common.parse_modes(args.modes)
    backend = common.resolve_backend(args.backend)
    if args.kernels is None:
        args.kernels = device.type == "cuda"
    layers = args.layers if args.layers in ("every_other", "all", "last_half") else [int(i) for i in args.layers.split(",")]
    size = size_for(args, device)

    print(f"== {size.describe()}, {dtype}, {device}; MoD c={args.capacity} on layers={args.layers}")
    torch.manual_seed(args.seed)
    dense = build_model(size, device, dtype)
    routed = modpass.transform(dense, args.capacity, layers=layers)
    common.randomize_routers(routed, args.seed)
    models = {"dense": dense, "mod": routed}
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, size.vocab, (size.batch, size.tokens), generator=generator).to(device)

    payload = common.header("model", args, device)
    payload["size"] = dataclasses.asdict(size)
    payload["routed_layers"] = list(modpass.api.routed_blocks(routed))
    payload["passes"] = {}
    for backward in (False, True):
        pass_name = "fwdbwd" if backward else "fwd"
        for model in models.values():
            model.train(backward)
        entry: dict = {"flops": {}, "modes": {}}
        for case in make_cases(models, models, ids, backward, args.seed):
            if case.prepare:
                case.prepare()
            entry["flops"][case.name] = common.count_flops(case.step).to_json()
            if backward:
                case.prepare()
                entry.setdefault("saved_activations_mib", {})[case.name] = common.saved_activations_mib(case.step, models[case.name])
        for mode in modes:
            rounds = args.rounds or (3 if args.quick else (7 if backward else 9))
            compiled = {n: common.compile_module(m, backend, args.compile_mode) for n, m in models.items()} if mode == "compiled" else models
            print(f"  {pass_name} {mode}: {rounds} rounds")
            timings = common.run_interleaved(make_cases(models, compiled, ids, backward, args.seed), baseline="dense",
                                             rounds=rounds, warmup=args.warmup, device=device, seed=args.seed,
                                             calls=args.calls)
            entry["modes"][mode] = {
                "cases": {n: r.to_json(timings["dense"]) for n, r in timings.items()},
                "ratio": timings["mod"].ratio,
            }
        payload["passes"][pass_name] = entry
    if "compiled" in modes:
        for model in models.values():
            model.eval()
        with torch.no_grad():
            payload["dynamo"] = {n: common.dynamo_breaks(m, input_ids=ids, use_cache=False) for n, m in models.items()}
        if args.kernels:
            payload["kernels"] = {}
            for backward in (False, True):
                for model in models.values():
                    model.train(backward)
                compiled = {n: common.compile_module(m, backend, args.compile_mode) for n, m in models.items()}
                for case in make_cases(models, compiled, ids, backward, args.seed):
                    if case.prepare:
                        case.prepare()
                    payload["kernels"].setdefault(case.name, {})["fwdbwd" if backward else "fwd"] = \
                        common.inductor_kernels(case.step, device)

    text = markdown(payload, size, modes)
    print("\n" + text)
    parts = [] if len(modes) == 2 else list(modes)
    if args.quick:
        parts.insert(0, "quick")
    if args.backend != "inductor" and "compiled" in modes:
        parts.append(args.backend)
    if args.compile_mode and "compiled" in modes:
        parts.append(args.compile_mode)
    stem = Path(args.out) if args.out else common.default_out(device, "model", *parts)
    common.write_results(stem, payload, text)


def markdown(payload: dict, size: ModelSize, modes: tuple[str, ...]) -> str:
    settings = payload["settings"]
    parts = [common.markdown_preamble("modpass whole-model benchmark: routed Llama vs dense", payload)]
    parts.append(f"Model: LlamaForCausalLM, {size.describe()}, {settings['dtype']}; MoD c={settings['capacity']} "
                 f"on {', '.join(payload['routed_layers'])}.\n")
    headers = ["pass", "FLOP c/a"]
    for mode in modes:
        headers += [f"dense {mode} (ms)", f"MoD {mode} (ms)", f"MoD/dense {mode}", "ovh"]
    rows = []
    for pass_name, entry in payload["passes"].items():
        dense, mod = entry["flops"]["dense"], entry["flops"]["mod"]
        counter = mod["counter"] / dense["counter"]
        adjusted = mod["causal_adjusted"] / dense["causal_adjusted"]
        row = [pass_name, f"{counter:.3f}/{adjusted:.3f}"]
        for mode in modes:
            timing = entry["modes"][mode]
            cases = timing["cases"]
            row += [f"{cases['dense']['median_s'] * 1e3:.0f}", f"{cases['mod']['median_s'] * 1e3:.0f}",
                    f"{common.fmt_ratio(timing['ratio'])} ({cases['mod']['ratio_of_medians']:.3f})",
                    common.fmt_overhead(timing["ratio"], adjusted)]
        rows.append(row)
    parts.append(common.markdown_table(headers, rows) + "\n")
    parts.append("MoD/dense is the median of per-round ratios (ratio of medians in brackets); ovh = MoD/dense / "
                 "causal-adjusted FLOP ratio.\n")
    saved = payload["passes"].get("fwdbwd", {}).get("saved_activations_mib")
    if saved:
        parts.append(f"Activations saved for the backward (eager, parameters excluded): dense {saved['dense']:.1f} MiB, "
                     f"MoD {saved['mod']:.1f} MiB ({saved['mod'] / saved['dense']:.3f} of dense).\n")
    if "compiled" in modes:
        crows = []
        for name in ("dense", "mod"):
            row = [name, *(f"{entry['modes']['compiled']['cases'][name]['first_call_s']:.1f}"
                           for entry in payload["passes"].values())]
            dynamo = payload.get("dynamo", {}).get(name)
            row.append(f"{dynamo['graphs']}/{dynamo['breaks']}" if dynamo else "")
            kernels = payload.get("kernels", {}).get(name, {})
            row.append("/".join(str(kernels[p]["kernels"]) if kernels.get(p) else "-" for p in payload["passes"])
                       if kernels else "")
            crows.append(row)
        headers = ["model", *(f"compile {p} (s)" for p in payload["passes"]), "graphs/breaks (fwd)",
                   "kernels fwd/fwdbwd"]
        parts.append("### torch.compile: first call (compile + one run)\n\n" + common.markdown_table(headers, crows) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
