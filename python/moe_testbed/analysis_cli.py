"""The ``analyze``, ``export`` and ``specialize`` subcommands of ``moe-testbed``.

Each parser sets ``func`` (``args.func(args) -> int`` exit code); errors a user can fix
(missing paths, unsupported models, bad text sources) print one line and return 2. Heavy
imports (``transformers``) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _fail(command: str, err: Exception) -> int:
    print(f"moe-testbed {command}: {err}", file=sys.stderr)
    return 2


def _cmd_analyze(args: argparse.Namespace) -> int:
    from moe_testbed.analyze import analyze

    out = args.out or f"runs/analyze-{args.model.rstrip('/').split('/')[-1]}"
    try:
        result = analyze(
            args.model,
            args.text,
            out=out,
            domains=args.domains,
            split=args.split,
            tokens=args.tokens,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            device=args.device,
            seed=args.seed,
            run_probes=not args.no_probes,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as err:
        return _fail("analyze", err)
    print(result["verdict"]["text"])
    print(f"run directory: {result['out']} (report: {result['out'] / 'report' / 'report.html'})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from moe_testbed.export import export_run

    try:
        out = export_run(args.run_dir, args.out_dir)
    except (FileNotFoundError, ValueError) as err:
        return _fail("export", err)
    print(out)
    return 0


def _cmd_specialize(args: argparse.Namespace) -> int:
    from moe_testbed.specialize import format_results, specialize

    try:
        results = specialize(
            args.model,
            args.domain,
            budget=args.budget,
            select=[s.strip() for s in args.select.split(",")],
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            text=args.text,
            domains=args.domains,
            seq_len=args.seq_len,
            eval_tokens=args.eval_tokens,
            device=args.device,
            seed=args.seed,
            out=args.out,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as err:
        return _fail("specialize", err)
    print(format_results(results))
    return 0


def add_analysis_subcommands(subparsers: Any) -> None:
    """Register ``analyze``, ``export`` and ``specialize``."""
    a = subparsers.add_parser(
        "analyze",
        help="routing and specialization metrics of a Hugging Face MoE model, with a verdict",
        description="Run domain-labelled text through an HF MoE causal LM (Mixtral, Qwen2-MoE, "
        "Qwen3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4-MoE), capture its routing and write a run "
        "directory with every metric of docs/METRICS.md, the report pages and the paradigm "
        "verdict (modular vs distributed).",
    )
    a.add_argument("--model", required=True, help="HF model directory, or a hub name when online")
    a.add_argument(
        "--text",
        default="sample",
        help="sample, prepared, a corpus directory, a directory with one file or folder per "
        "domain, or a JSONL with text and domain fields (default sample)",
    )
    a.add_argument("--domains", default=None, help="comma-separated subset of the domains")
    a.add_argument(
        "--split",
        default="auto",
        choices=("auto", "train", "validation", "all"),
        help="document split; auto = validation of a testbed corpus, all of other text",
    )
    a.add_argument("--tokens", type=int, default=16384, help="tokens per domain (default 16384)")
    a.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: model's, <= 512)"
    )
    a.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    a.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda, ...")
    a.add_argument("--seed", type=int, default=0, help="document split and probe seed")
    a.add_argument("--out", default=None, help="run directory (default runs/analyze-MODEL)")
    a.add_argument("--no-probes", action="store_true", help="skip stiffness / n-gram probes")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.set_defaults(func=_cmd_analyze)

    e = subparsers.add_parser(
        "export",
        help="write a run's checkpoint as a Hugging Face model directory",
        description="Write the last checkpoint of RUN_DIR as a Mixtral (or Qwen2-MoE, for "
        "dense blocks or unnormalised gates) model directory with the run's tokenizer.",
    )
    e.add_argument("--hf", action="store_true", required=True, help="HF format (the only one)")
    e.add_argument("run_dir", help="run directory with a checkpoint")
    e.add_argument("out_dir", help="output model directory")
    e.set_defaults(func=_cmd_export)

    s = subparsers.add_parser(
        "specialize",
        help="fine-tune the experts most specialized to a domain, against random and full",
        description="Score every (layer, expert) by its specialization to DOMAIN (docs/"
        "METRICS.md), train the top experts per layer within the parameter budget, and report "
        "the validation loss of every domain against a random expert subset of the same size "
        "and full fine-tuning.",
    )
    s.add_argument("--model", required=True, help="testbed run directory or HF model directory")
    s.add_argument("--domain", required=True, help="target domain")
    s.add_argument("--budget", type=float, default=0.15, help="trained share of the parameters")
    s.add_argument("--select", default="dbes,random,all", help="comma-separated: dbes, random, all")
    s.add_argument("--steps", type=int, default=100, help="optimizer steps per selection")
    s.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    s.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    s.add_argument("--text", default=None, help="text source (default: the run's corpus)")
    s.add_argument("--domains", default=None, help="comma-separated domains to evaluate")
    s.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    s.add_argument("--eval-tokens", type=int, default=None, help="validation tokens per domain")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    s.add_argument("--seed", type=int, default=0, help="random selection and data order")
    s.add_argument("--out", default=None, help="directory for specialize.json / .md")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_specialize)
