"""The ``moe-testbed`` command line: ``train``, ``demo``, ``sweep``, ``report``, ``compare``,
``analyze``, ``export``, ``specialize``, ``data ...``.

``train`` takes one flag per config field (``moe-testbed train --help`` lists them, with the
help text of each field), a ``--config`` file and a ``--preset``; flags override the file, the
file overrides the preset. The data subcommands come from ``moe_testbed.data.cli``; if that
module fails to import, its subcommands are left out rather than breaking the rest of the CLI.

Errors a user can cause end in one line on stderr, ``moe-testbed COMMAND: error: ...``, naming
the flag, the expected and the actual value, and exit status 2; any other error also ends in
one line (exit status 1). ``--debug`` (before or after the command) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from moe_testbed import __version__
from moe_testbed.config import ConfigError, flag, validate
from moe_testbed.flags import add_config_flags, resolve
from moe_testbed.runstart import RunDirError

# Errors a user can cause with flags, files or directories: one line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    OSError,
    ImportError,
    RunDirError,
)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the usage of ``train`` alone would
    be a screenful), pointing at ``--help``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def error_text(err: BaseException) -> str:
    """One line describing ``err``: a config error starts with its flag."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, ConfigError):
        return f"{flag(err.field)}: {text}"
    if isinstance(err, USER_ERRORS):
        return text
    return f"{type(err).__name__}: {text} (an unexpected error; --debug shows the traceback)"


def _cmd_train(args: argparse.Namespace) -> int:
    from moe_testbed.sinks import require_tensorboard
    from moe_testbed.train import train

    try:
        cfg = resolve(args)
        validate(cfg)  # and what the run needs from this machine, before anything starts
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        args._parser.error(error_text(e))
    if cfg.train.tensorboard:
        try:
            require_tensorboard()
        except ImportError as e:
            print(f"moe-testbed train: {e}", file=sys.stderr)
            return 2
    out = args.out or f"runs/{cfg.preset}-{cfg.moe.router}-{cfg.moe.balance}-{cfg.moe.scope}"
    train(cfg, out, resume=not args.no_resume, allow_config_change=args.allow_config_change)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from moe_testbed.demo import run_demo

    run_demo(args.out, steps=args.steps, data_dir=args.data_dir)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from moe_testbed.report import make_report

    try:
        paths = make_report(args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"moe-testbed report: error: {error_text(err)}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from moe_testbed.report import compare

    parents = [os.path.dirname(os.path.abspath(d)) for d in args.run_dirs]
    out = args.out or Path(os.path.commonpath(parents)) / "compare"
    try:
        paths = compare(args.run_dirs, out)
    except (FileNotFoundError, ValueError) as err:
        print(f"moe-testbed compare: error: {error_text(err)}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from moe_testbed.evaluation import evaluate_run

    try:
        path = evaluate_run(
            args.run_dir,
            eval_tokens=args.eval_tokens,
            permutations=args.permutations,
            floor_draws=args.floor_draws,
            device=args.device,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"moe-testbed evaluate: error: {error_text(err)}", file=sys.stderr)
        return 2
    print(path)
    return 0


def add_report_subcommands(subparsers: Any) -> None:
    """Register ``report RUN_DIR`` and ``compare RUN_DIR... [--out DIR]``.

    Each parser sets ``func`` (``args.func(args) -> int`` exit code).
    """
    p = subparsers.add_parser("report", help="plots, report.html and summary.md of one run")
    p.add_argument("run_dir", help="run directory (config.json, metrics.jsonl, counts/)")
    p.set_defaults(func=_cmd_report)
    c = subparsers.add_parser("compare", help="final-metric table and curves across runs")
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    c.add_argument(
        "--out", default=None, help="output directory (default: <common parent>/compare)"
    )
    c.set_defaults(func=_cmd_compare)
    e = subparsers.add_parser(
        "evaluate",
        help="specialization against chance of a run's last checkpoint -> RUN_DIR/evaluation.json",
        description="Evaluate the last checkpoint on a fixed validation budget per domain: "
        "loss, specialization metrics with their permutation null, chance-corrected score, "
        "step-0 value and representation floor (docs/METRICS.md). Runs written before "
        "data.data_seed existed use their training seed as data seed.",
    )
    e.add_argument("run_dir", help="run directory (config.json, checkpoints/)")
    e.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        help="validation tokens per domain (default: the run's data.eval_tokens)",
    )
    e.add_argument(
        "--permutations",
        type=int,
        default=200,
        help="domain-label shuffles of the permutation null (default 200)",
    )
    e.add_argument(
        "--floor-draws",
        type=int,
        default=8,
        help="random linear routers of the representation floor (default 8; 0 = none)",
    )
    e.add_argument("--device", default="auto", help="torch device; auto = GPU if any")
    e.set_defaults(func=_cmd_evaluate)


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on ``parser`` and on every subcommand below it, registered or added later
    (default left to the top level, so ``moe-testbed --debug train`` works too)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--debug" not in sub._option_string_actions:
                    sub.add_argument(
                        "--debug",
                        action="store_true",
                        default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line",
                    )
                _add_debug(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moe-testbed",
        description="MoE Routing Testbed: train small MoE language models on multi-domain text "
        "and measure expert utilization and specialization.",
    )
    parser.add_argument("--version", action="version", version=f"moe-testbed {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of one line"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser(
        "train",
        help="train one model (resumes from OUT/checkpoints when present)",
        description="Train a decoder-only MoE LM. Precedence: flags > --config file > --preset. "
        "One run writes to OUT at a time. Resuming needs the checkpoint's config, except for "
        "steps, logging/evaluation/checkpoint cadence, progress and threads.",
    )
    tr.add_argument("--out", help="run directory (default runs/PRESET-ROUTER-BALANCE-SCOPE)")
    tr.add_argument(
        "--no-resume",
        action="store_true",
        help="start over even if OUT has a checkpoint; OUT's earlier contents are moved to "
        "OUT/.previous-<time>/ first (nothing is deleted)",
    )
    tr.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the config differs from the checkpoint's (the changes are "
        "recorded in OUT/history.jsonl); sizes, data and seed cannot change",
    )
    add_config_flags(tr)
    tr.set_defaults(func=_cmd_train, _parser=tr)

    demo = sub.add_parser(
        "demo",
        help="does the balancing scope change specialization? four tiny runs, read out",
        description="Train four tiny models on the built-in sample (reference and hash routers, "
        "the learned router balanced per sequence and over the global batch), write the "
        "comparison and print the chance-corrected specialization table with a plain-language "
        "reading. About 4 minutes on two idle CPU cores.",
    )
    demo.add_argument("--out", default="runs/demo", help="parent directory of the four runs")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps per run (>= 1)")
    demo.add_argument("--data-dir", default=None, help="corpus (default: the built-in sample)")
    demo.set_defaults(func=_cmd_demo)

    try:
        from moe_testbed.data.cli import add_data_subcommands
    except ImportError:
        pass
    else:
        add_data_subcommands(sub)
    add_report_subcommands(sub)
    from moe_testbed.sweep import add_sweep_subcommand

    add_sweep_subcommand(sub)
    from moe_testbed.analysis_cli import add_analysis_subcommands

    add_analysis_subcommands(sub)
    _add_debug(parser)
    return parser


def _command(args: argparse.Namespace) -> str:
    words = [getattr(args, "command", None), getattr(args, "data_command", None)]
    return " ".join(["moe-testbed", *(w for w in words if w)])


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (see the module docstring for errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print(f"{_command(args)}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        print(f"{_command(args)}: error: {error_text(err)}", file=sys.stderr)
        return 2 if isinstance(err, USER_ERRORS) else 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
