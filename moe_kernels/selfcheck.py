"""Check every op x backend x dtype x edge-case shape available on this machine against the
reference, forward and backward: the first thing to run on a new GPU machine.

Run: ``python -m moe_kernels.selfcheck [--full] [--device cuda:0] [--json FILE]``.

Each backend of each op family (cuda, triton, cpu; the reference is the yardstick) that accepts
the family's inputs on the device runs the fixed cases of ``moe_kernels._selfcheck_cases`` (the
edge cases: one token, an empty expert, k = E, every token to one expert, dropped slots, padding
rows; ``--full`` adds larger and odd shapes) in every dtype it takes, and each of its ops is
compared with the reference run in fp64 on the same device: exact for ids, plans and counts, the
per-dtype tolerances of ``moe_kernels.tolerances`` for float outputs. One table is printed
(op, backend, dtype, shape, max abs error, tolerance, verdict, ms); the exit status is 1 when any
row fails, 0 otherwise. Backends that take no input here are listed under the table with why.

On a CPU machine this checks the C++ backends and, when ``TRITON_INTERPRET=1`` is set, the Triton
kernels through Triton's interpreter (slow: one program at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from moe_kernels import _selfcheck_cases as C
from moe_kernels.ops import _select as S

COLUMNS = ("op", "backend", "dtype", "shape", "max abs err", "tolerance", "verdict", "ms")


def family_backends(family: str) -> list[S.Backend]:
    import importlib

    return importlib.import_module(f"moe_kernels.ops.{family}").BACKENDS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m moe_kernels.selfcheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="add larger and odd shapes to the cases (seconds on a GPU; many minutes through "
        "Triton's interpreter on CPU)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="device to check, e.g. cuda:0 or cpu (default: cuda:0 when CUDA is available, "
        "else cpu)",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="also write the rows to FILE")
    p.add_argument(
        "--ops",
        nargs="+",
        choices=C.FAMILIES,
        default=list(C.FAMILIES),
        help="op families to check (default: all)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="backend names to check (default: every one but the reference)",
    )
    p.add_argument("--quiet", action="store_true", help="print only failing rows and the summary")
    return p.parse_args(argv)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SystemExit(f"--device: expected e.g. cuda:0 or cpu, got {name!r} ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device: {name} asked for, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise SystemExit(
                f"--device: expected an index below {torch.cuda.device_count()}, got {name}"
            )
    elif device.type != "cpu":
        raise SystemExit(f"--device: expected a cuda or cpu device, got {name!r}")
    return device


def plan(args, device):
    """(family, backend, dtype) triples to run, and (family, backend, dtype, reason) declined."""
    todo, skipped = [], []
    for family in args.ops:
        for b in family_backends(family):
            if b.name == "reference" or (args.backends and b.name not in args.backends):
                continue
            for dtype in C.FAMILY_DTYPES[family]:
                why = C.declined(family, b, dtype, device)
                (skipped if why else todo).append((family, b, dtype, why))
    return todo, skipped


def format_table(rows: list[C.Row]) -> str:
    cells = [
        [
            r.op,
            r.backend,
            r.dtype,
            r.shape,
            "-" if r.max_err is None else f"{r.max_err:.2e}",
            r.tol,
            r.verdict,
            f"{r.ms:.2f}",
        ]
        for r in rows
    ]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(COLUMNS)]
    widths[-2] = min(widths[-2], 60)
    line = lambda cs: "  ".join(str(c)[:w].ljust(w) for c, w in zip(cs, widths)).rstrip()
    out = [line(COLUMNS), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a temporary file in the same directory,
    flushed and fsync'ed, then renamed over ``path`` (a reader never sees a partial file)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run(args) -> tuple[list[C.Row], list[tuple]]:
    from tqdm import tqdm

    device = resolve_device(args.device)
    todo, skipped = plan(args, device)
    rows: list[C.Row] = []
    bar = tqdm(todo, desc="selfcheck", unit="check", file=sys.stderr, disable=None, leave=False)
    for family, b, dtype, _ in bar:
        bar.set_postfix_str(f"{family} {b.name} {C.DTYPE_NAMES[dtype]}")
        ref = S.by_name(family_backends(family), "reference")
        rows += C.check_backend(family, b, ref, dtype, device, full=args.full)
    return rows, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    rows, skipped = run(args)
    failed = [r for r in rows if not r.ok]
    shown = failed if args.quiet else rows
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"moe_kernels self-check on {device} ({name}), torch {torch.__version__}, "
        f"{'full' if args.full else 'quick'} cases"
    )
    print(format_table(shown))
    by_backend: dict[tuple, list[str]] = {}
    for family, b, dtype, why in skipped:
        by_backend.setdefault((b.name, why), []).append(f"{family}/{C.DTYPE_NAMES[dtype]}")
    if by_backend:
        print("\nnot available here (not checked):")
        for (bname, why), what in sorted(by_backend.items()):
            print(f"  {bname}: {', '.join(what)}: {why}")
    verdict = "FAILED" if failed else "passed"
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed; self-check {verdict}")
    if args.json:
        write_json_atomic(
            args.json,
            {
                "device": str(device),
                "device_name": name,
                "torch": torch.__version__,
                "full": args.full,
                "rows": [r.as_dict() for r in rows],
                "not_available": [
                    dict(op=f, backend=b.name, dtype=C.DTYPE_NAMES[d], reason=w)
                    for f, b, d, w in skipped
                ],
                "passed": not failed,
            },
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
