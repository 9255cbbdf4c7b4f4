"""``modpass`` command line: ``modpass demo`` (more subcommands to come)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modpass", description="Task-aware Mixture-of-Depths for PyTorch transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="route a tiny unified transformer, check equivalence, train dense vs MoD vs UniMoD", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
