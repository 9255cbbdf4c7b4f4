"""Cached generation: a routed Llama's prompt pass and decode steps with a KV cache vs the same model dense.

Usage (from the repository root)::

    python benchmarks/generate_bench.py --quick
    python benchmarks/generate_bench.py                 # the CPU model of model_bench.py, eager
    python benchmarks/generate_bench.py --decoding router --run-rate 0.125   # MoD's sampling, 1 in 8 tokens run a routed layer
    python benchmarks/generate_bench.py --cache static --compile   # Hugging Face's compiled decoding

The model of ``model_bench.py`` (every other layer routed at c = 0.125),
both with ``use_cache=True`` (``modpass/kv_cache.py``), eager by default (with
a ``DynamicCache`` a routed block runs eagerly). "prefill" is the forward over the
B x T prompt that fills the cache; "decode" is ``--steps`` one-token calls
after it, timed per token, from a copy of the prefilled cache. A routed
layer caches only its selected prompt tokens, so each decode step attends to
fewer keys there, but runs every layer on the new token. The FLOP ratios
count the attention over the cached keys (FlopCounterMode, with CPU attention
registered; the prompt's attention halved for causality); the cache ratio is
the bytes of keys and values held after the prompt.

With ``--cache static`` both models decode into a ``StaticCache`` sized for
the prompt and the steps (a routed layer's holds its kept prompt tokens and
room for the steps); ``--compile`` then compiles each model's decode call with
``fullgraph=True``, as ``generate()`` does on an accelerator, and leaves the
prompt pass eager, as ``generate()`` does. The FLOPs are counted eagerly.

With ``--decoding router`` (``modpass.set_decoding``) a generated token runs a
routed layer only when its router logit is positive. Random routers have no
trained prediction, so each router's bias is set to make ``--run-rate`` of the
prompt's tokens positive at its layer; the decode rows then report the rate
the generated tokens actually ran at, and the time follows it (a layer skips
its whole call only when every row of the batch skips).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402 (script directory on the path first)
import model_bench  # noqa: E402

import modpass  # noqa: E402


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def prefill_step(model: torch.nn.Module, ids: torch.Tensor) -> common.Step:
    return common.forward_step(lambda: model(input_ids=ids, use_cache=True))


def decode_cases(name: str, model: torch.nn.Module, ids: torch.Tensor, steps: int, static: bool,
                 compiled: bool) -> tuple[common.Case, common.Case, object]:
    """``steps`` one-token calls from a fresh copy of the prompt's cache (copied outside the timing), timed per token
    (compiled where asked), and the same calls eager, whose FLOPs are counted; with the prompt's cache."""
    name_of_cache = modpass.kv_cache.cache_keyword(model)
    given = {}
    if static:
        from transformers import StaticCache

        given[name_of_cache] = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps)
    with torch.no_grad():
        prompt_cache = modpass.kv_cache.cache_of(model(input_ids=ids, use_cache=True, **given))
    token = ids[:, -1:]
    forward = torch.compile(model.forward, fullgraph=True) if compiled else model.forward
    state = {}

    def prepare() -> None:
        state["cache"] = copy.deepcopy(prompt_cache)

    def steps_of(call):
        def step() -> None:
            with torch.no_grad():
                for _ in range(steps):
                    call(input_ids=token, use_cache=True, **{name_of_cache: state["cache"]})

        return step

    return common.Case(name, steps_of(forward), prepare), common.Case(name, steps_of(model.forward), prepare), prompt_cache


def calibrate_routers(model: torch.nn.Module, ids: torch.Tensor, run_rate: float) -> None:
    """Set each router's bias so that ``run_rate`` of the prompt's tokens get a positive logit at its layer."""
    blocks = modpass.routed_blocks(model)
    inputs = {}
    hooks = [block.register_forward_pre_hook(lambda module, args, path=path: inputs.setdefault(path, args[0]))
             for path, block in blocks.items()]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        for hook in hooks:
            hook.remove()
        for path, block in blocks.items():
            router = block.mod_routers.default
            logits = router(inputs[path]).flatten().float()
            router.bias -= torch.quantile(logits, 1 - run_rate).to(router.bias.dtype)


def run_rate(model: torch.nn.Module) -> float:
    """The share of the last forward's tokens that ran the routed layers (one-token calls: its decode step)."""
    records = [record for block in modpass.routed_blocks(model).values() for record in block.last_routing]
    return sum(int(record.selected.sum()) for record in records) / sum(record.selected.numel() for record in records)


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=float, default=0.125)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed sample")
    parser.add_argument("--decoding", choices=sorted(modpass.kv_cache.DECODING), default="all", help="modpass.set_decoding")
    parser.add_argument("--run-rate", type=float, default=0.125, help="with --decoding router: the routers' calibrated run rate")
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic", help="the cache the models decode into")
    parser.add_argument("--compile", action="store_true", help="with --cache static: compile the decode calls (fullgraph)")
    args = parser.parse_args()
    if args.compile and args.cache != "static":
        parser.error("--compile needs --cache static: with a DynamicCache a routed layer runs eagerly")
    device, dtype = common.setup(args)
    size = model_bench.size_for(args, device)
    print(f"== {size.describe()}, {dtype}, {device}; MoD c={args.capacity} on every other layer; {args.steps} decode steps; "
          f"decoding {args.decoding}; {args.cache} cache{', decode compiled' if args.compile else ''}")
    torch.manual_seed(args.seed)
    dense = model_bench.build_model(size, device, dtype)
    routed = modpass.transform(dense, args.capacity, layers="every_other")
    common.randomize_routers(routed, args.seed)
    models = {"dense": dense, "mod": routed}
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, size.vocab, (size.batch, size.tokens), generator=generator).to(device)
    if args.decoding == "router":
        calibrate_routers(routed, ids, args.run_rate)
        modpass.set_decoding(routed, "router")
    rounds = args.rounds or (3 if args.quick else 9)

    payload = common.header("generate", args, device)
    payload["size"] = dataclasses.asdict(size)
    payload["passes"] = {}
    prefill = [common.Case(name, prefill_step(model, ids)) for name, model in models.items()]
    decode, eager_decode, caches = zip(*(decode_cases(name, model, ids, args.steps, args.cache == "static", args.compile)
                                         for name, model in models.items()))
    payload["cache_bytes"] = {name: cache_bytes(cache) for name, cache in zip(models, caches)}
    for pass_name, cases, counted in (("prefill", prefill, prefill), ("decode", decode, eager_decode)):
        flops = {}
        for case in counted:
            if case.prepare:
                case.prepare()
            flops[case.name] = common.count_flops(case.step).to_json()
        print(f"  {pass_name}: {rounds} rounds")
        timings = common.run_interleaved(cases, baseline="dense", rounds=rounds, warmup=args.warmup, device=device,
                                         seed=args.seed, calls=args.calls)
        payload["passes"][pass_name] = {"flops": flops, "cases": {n: r.to_json(timings["dense"]) for n, r in timings.items()},
                                        "ratio": timings["mod"].ratio}
    payload["decode_run_rate"] = run_rate(routed)

    text = markdown(payload, size, args.steps)
    print("\n" + text)
    parts = (["quick"] if args.quick else []) + ([f"router{args.run_rate}"] if args.decoding == "router" else [])
    parts += ([args.cache] if args.cache != "dynamic" else []) + (["compiled"] if args.compile else [])
    stem = Path(args.out) if args.out else common.default_out(device, "generate", *parts)
    common.write_results(stem, payload, text)


def markdown(payload: dict, size: model_bench.ModelSize, steps: int) -> str:
    settings = payload["settings"]
    parts = [common.markdown_preamble("modpass cached-generation benchmark: routed Llama vs dense, with a KV cache", payload)]
    parts.append(f"Model: LlamaForCausalLM, {size.describe()}, {settings['dtype']}; MoD c={settings['capacity']} on every "
                 f"other layer; `use_cache=True` with a {settings['cache']} cache, prompt eager, decode "
                 f"{'compiled (fullgraph)' if settings['compile'] else 'eager'}, decoding {settings['decoding']!r}. "
                 f"decode: {steps} one-token calls "
                 f"after the prompt, per token; the last step ran {payload['decode_run_rate']:.3f} of the generated "
                 "tokens through the routed layers.\n")
    rows = []
    for pass_name, entry in payload["passes"].items():
        dense, mod = entry["flops"]["dense"], entry["flops"]["mod"]
        adjusted = mod["causal_adjusted"] / dense["causal_adjusted"] if pass_name == "prefill" else mod["counter"] / dense["counter"]
        cases = entry["cases"]
        per = steps if pass_name == "decode" else 1
        rows.append([pass_name, f"{adjusted:.3f}", f"{cases['dense']['median_s'] * 1e3 / per:.1f}",
                     f"{cases['mod']['median_s'] * 1e3 / per:.1f}",
                     f"{common.fmt_ratio(entry['ratio'])} ({cases['mod']['ratio_of_medians']:.3f})",
                     common.fmt_overhead(entry["ratio"], adjusted)])
    parts.append(common.markdown_table(["pass", "FLOP", "dense (ms)", "MoD (ms)", "MoD/dense", "ovh"], rows) + "\n")
    cache = payload["cache_bytes"]
    parts.append(f"KV cache after the prompt: dense {cache['dense'] / 2**20:.1f} MiB, MoD {cache['mod'] / 2**20:.1f} MiB "
                 f"({cache['mod'] / cache['dense']:.3f} of dense).\n")
    parts.append("MoD/dense is the median of per-round ratios (ratio of medians in brackets); ovh = MoD/dense / FLOP ratio "
                 "(the prompt's attention halved for causality; a decode step's keys all precede it).\n")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
