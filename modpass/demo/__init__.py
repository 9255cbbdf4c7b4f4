"""``modpass demo``: route a tiny unified transformer, then train dense vs MoD vs UniMoD on real digits.

Part 1 checks that a full-capacity transform reproduces the dense model and
prints per-block, per-task FLOPs at the demo's ratios. Part 2 trains the
three variants from one initialisation on scikit-learn's digits, with two
tasks (label -> image generation, image -> label understanding) in mixed
batches, at matched training FLOPs, and writes ``loss_vs_flops.png`` and
``results.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .train import Settings, run

__all__ = ["main"]

QUICK_STEPS = 12
# The demo's own dependencies (the ``demo`` extra), checked up front so a bare install fails with the fix.
DEMO_MODULES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def missing_dependencies() -> list[str]:
    return [package for module, package in DEMO_MODULES.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> int:
    """Run the demo with command-line arguments ``argv``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="modpass demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"a short smoke run ({QUICK_STEPS} steps, about a minute on 2 cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data split and batches")
    parser.add_argument("--out", type=Path, default=Settings.out, help="directory for loss_vs_flops.png and results.json")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps of the UniMoD variant; the others get the same FLOPs (default {Settings.steps})")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else QUICK_STEPS if args.quick else Settings.steps
    if steps < 1:
        parser.error("--steps must be at least 1")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a directory (made if missing) for the plot and results")
    if missing := missing_dependencies():
        print(f"modpass demo needs {' and '.join(missing)}: pip install 'modpass[demo]' "
              "(./run demo installs it for you)", file=sys.stderr)
        return 2
    settings = Settings(seed=args.seed, steps=steps, out=args.out, eval_points=2 if args.quick else Settings.eval_points)
    return run(settings)
