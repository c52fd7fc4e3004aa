"""The ``moe-testbed`` command line."""

from __future__ import annotations

import argparse
import sys

from moe_testbed import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-testbed",
        description="MoE Routing Testbed: train small MoE language models on multi-domain text "
        "and measure expert utilization and specialization.",
    )
    parser.add_argument("--version", action="version", version=f"moe-testbed {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
