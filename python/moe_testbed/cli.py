"""The ``moe-testbed`` command line: ``train``, ``demo``, ``data ...`` and ``report ...``.

``train`` takes one flag per config field (``moe-testbed train --help`` lists them), a
``--config`` file and a ``--preset``; flags override the file, the file overrides the preset.
The data and report subcommands come from their modules; a module that fails to import leaves
its subcommand out rather than breaking the rest of the CLI.
"""

from __future__ import annotations

import argparse
import sys

from moe_testbed import __version__
from moe_testbed.config import add_config_flags, resolve


def _cmd_train(args: argparse.Namespace) -> int:
    from moe_testbed.train import train

    try:
        cfg = resolve(args)
    except (ValueError, FileNotFoundError) as e:
        args._parser.error(str(e))
    out = args.out or f"runs/{cfg.preset}-{cfg.moe.router}-{cfg.moe.balance}-{cfg.moe.scope}"
    train(cfg, out, resume=not args.no_resume)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from moe_testbed.demo import run_demo

    run_demo(args.out, steps=args.steps, data_dir=args.data_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-testbed",
        description="MoE Routing Testbed: train small MoE language models on multi-domain text "
        "and measure expert utilization and specialization.",
    )
    parser.add_argument("--version", action="version", version=f"moe-testbed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser(
        "train",
        help="train one model (resumes from OUT/checkpoints when present)",
        description="Train a decoder-only MoE LM. Precedence: flags > --config file > --preset.",
    )
    tr.add_argument("--out", help="run directory (default runs/PRESET-ROUTER-BALANCE-SCOPE)")
    tr.add_argument(
        "--no-resume", action="store_true", help="start over even if OUT has a checkpoint"
    )
    add_config_flags(tr)
    tr.set_defaults(func=_cmd_train, _parser=tr)

    demo = sub.add_parser(
        "demo",
        help="reference vs learned (global/micro-batch scope) vs random routers, with a report",
        description="Train four tiny models on the built-in sample and write the comparison.",
    )
    demo.add_argument("--out", default="runs/demo", help="parent directory of the four runs")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    demo.add_argument("--data-dir", default=None, help="corpus (default: the built-in sample)")
    demo.set_defaults(func=_cmd_demo)

    try:
        from moe_testbed.data.cli import add_data_subcommands
    except ImportError:
        pass
    else:
        add_data_subcommands(sub)
    try:
        from moe_testbed.report import add_report_subcommands
    except ImportError:
        pass
    else:
        add_report_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
