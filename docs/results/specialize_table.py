"""The `specialize` table of docs/RESULTS.md (question 8) over seeds.

    python docs/results/specialize_table.py SPECIALIZE_DIR...

Each directory holds one ``specialize.json`` (``moe-testbed specialize --out DIR``). Per target
domain and selection (dbes, random, all) one Markdown row: the change of the target domain's
validation loss and the mean change over the other domains, mean ± sample std over the
directories (seeds), and how often DBES forgot less than the random subset of the same size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tables import mean_std


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path)
    args = p.parse_args()
    rows: dict[tuple[str, str], list[dict]] = {}
    for d in args.dirs:
        rec = json.loads((d / "specialize.json").read_text())
        for run in rec["runs"]:
            rows.setdefault((rec["domain"], run["select"]), []).append(run)
    print("| domain | select | n | trained share | target change | others change |")
    print("|---|---|---|---|---|---|")
    for (domain, select), runs in sorted(rows.items()):
        share = np.mean([r["trained_fraction"] for r in runs])
        print(
            f"| {domain} | {select} | {len(runs)} | {100 * share:.1f}% | "
            f"{mean_std([r['target_change'] for r in runs], '+.3f')} | "
            f"{mean_std([r['others_change'] for r in runs], '+.3f')} |"
        )
    for domain in sorted({d for d, _ in rows}):
        dbes, rand = rows.get((domain, "dbes"), []), rows.get((domain, "random"), [])
        pairs = list(zip(dbes, rand))
        less = sum(a["others_change"] < b["others_change"] for a, b in pairs)
        print(f"\n{domain}: DBES forgot less than random in {less} of {len(pairs)} seeds")


if __name__ == "__main__":
    main()
