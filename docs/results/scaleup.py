"""The scale-up check of docs/RESULTS.md (question 7): does the ranking of the methods at one
size hold at another?

    python docs/results/scaleup.py OUT.png SMALL_SWEEP_RUNS BIG_SWEEP_RUNS [--label NAME=LABEL]

Both arguments are a sweep's ``runs/`` directory of the same grid at two presets (run names
``NAME-seedS``). For validation loss and for the chance-corrected specialization score it
prints one Markdown table (per configuration: mean ± sample std over seeds at each size and
the rank of the means, 1 = lowest loss or highest specialization) and the Spearman correlation
of the two rankings three ways: per seed (seed s at one size against seed s at the other; mean
± std over seeds), of the seed means, and a 95% bootstrap interval of the latter (seeds
resampled with replacement within every configuration and size, 2000 resamples). It writes
a two-panel figure (big against small, per configuration, ± std) to OUT.png.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from tables import mean_std, run_values

METRICS = [("val loss", "loss", 1), ("spec corrected", "corrected", -1)]  # sign: lower is better
RESAMPLES = 2000


def read(runs: Path) -> dict[str, dict[int, dict[str, float]]]:
    """Configuration -> seed -> values (``tables.run_values``) of every run in ``runs``."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for d in sorted(runs.iterdir()):
        m = re.fullmatch(r"(.+)-seed(\d+)", d.name)
        if m and d.is_dir():
            out.setdefault(m.group(1), {})[int(m.group(2))] = run_values(d)
    return out


def preset(runs: Path) -> str:
    """The preset of the first run in ``runs`` (its ``config.json``), for the column heads."""
    import json

    for d in sorted(runs.iterdir()):
        if (d / "config.json").exists():
            return json.loads((d / "config.json").read_text()).get("preset", d.parent.name)
    return runs.parent.name


def ranks(values: list[float], sign: int) -> np.ndarray:
    """1 = best (lowest ``sign * value``); ties share the mean rank."""
    from scipy.stats import rankdata

    return rankdata([sign * v for v in values])


def spearman(a: list[float], b: list[float]) -> float:
    return float(spearmanr(a, b).statistic)


def analyse(small, big, names, key, sign, rng):
    seeds = sorted(set.intersection(*(set(small[n]) & set(big[n]) for n in names)))
    per_seed = [
        spearman([small[n][s][key] for n in names], [big[n][s][key] for n in names]) for s in seeds
    ]
    mean_s = [np.mean([small[n][s][key] for s in seeds]) for n in names]
    mean_b = [np.mean([big[n][s][key] for s in seeds]) for n in names]
    boot = []
    for _ in range(RESAMPLES):
        pick = lambda side, n: np.mean(  # noqa: E731
            [side[n][s][key] for s in rng.choice(seeds, size=len(seeds))]
        )
        boot.append(spearman([pick(small, n) for n in names], [pick(big, n) for n in names]))
    boot = np.array([b for b in boot if np.isfinite(b)])
    return {
        "seeds": seeds,
        "per_seed": per_seed,
        "of_means": spearman(mean_s, mean_b),
        "interval": (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))),
        "rank_small": ranks(mean_s, sign),
        "rank_big": ranks(mean_b, sign),
    }


def _sd(vals: list[float]) -> float:
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("png", type=Path)
    p.add_argument("small", type=Path, help="runs/ of the grid at the smaller preset")
    p.add_argument("big", type=Path, help="runs/ of the same grid at the bigger preset")
    p.add_argument("--label", action="append", default=[], metavar="NAME=LABEL")
    args = p.parse_args()
    labels = dict(s.split("=", 1) for s in args.label)
    small, big = read(args.small), read(args.big)
    names = [n for n in small if n in big]
    head_s, head_b = preset(args.small), preset(args.big)
    rng = np.random.default_rng(0)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.2 * len(METRICS), 4.4))
    for ax, (title, key, sign) in zip(axes, METRICS):
        r = analyse(small, big, names, key, sign, rng)
        seeds = r["seeds"]
        print(f"\n{title}: seeds {seeds}\n")
        print(f"| configuration | {head_s} | rank | {head_b} | rank |")
        print("|---|---|---|---|---|")
        for i, n in enumerate(names):
            vs = [small[n][s][key] for s in seeds]
            vb = [big[n][s][key] for s in seeds]
            print(
                f"| {labels.get(n, n)} | {mean_std(vs)} | {r['rank_small'][i]:g} | "
                f"{mean_std(vb)} | {r['rank_big'][i]:g} |"
            )
            ax.errorbar(
                np.mean(vs),
                np.mean(vb),
                xerr=_sd(vs),
                yerr=_sd(vb),
                fmt="o",
                capsize=3,
            )
            ax.annotate(
                labels.get(n, n),
                (np.mean(vs), np.mean(vb)),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ps = r["per_seed"]
        lo, hi = r["interval"]
        print(
            f"\nSpearman {title}: per seed {', '.join(f'{v:.2f}' for v in ps)} "
            f"(mean {np.mean(ps):.2f} ± {_sd(ps):.2f}); "
            f"of the seed means {r['of_means']:.2f}, 95% bootstrap interval [{lo:.2f}, {hi:.2f}]"
        )
        ax.set_title(f"{title}: Spearman {r['of_means']:.2f} [{lo:.2f}, {hi:.2f}]", fontsize=9)
        ax.set_xlabel(f"{head_s} (mean ± std over {len(seeds)} seeds)")
        ax.set_ylabel(head_b)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
