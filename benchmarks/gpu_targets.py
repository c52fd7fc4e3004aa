"""The targets table from the JSON of both GPU benchmarks.

Run: ``python -m benchmarks.gpu_targets LAYER.json OPS.json`` with the ``--json`` outputs of
``benchmarks.gpu_layer`` and ``benchmarks.ops_gpu`` (either may be left out: its targets are
N/A). Prints each target's worst case over the measured shapes, token counts and routings.
"""

from __future__ import annotations

import argparse
import json

from benchmarks import gpu_harness as H


def main(argv=None) -> list[H.Target]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_targets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", nargs="+", help="JSON files written by gpu_layer / ops_gpu --json")
    args = p.parse_args(argv)
    layer = memory = ops = None
    smoke = False
    for path in args.results:
        with open(path) as f:
            res = json.load(f)
        smoke = smoke or res["machine"]["smoke"] or "not a GPU figure" in res["machine"]["timer"]
        print(f"{path}: {H.machine_line(res['machine'])}")
        if res["benchmark"] == "gpu_layer":
            layer, memory = res["layer"], res["memory"] or None
        elif res["benchmark"] in ("ops_gpu", "gpu_ops"):  # gpu_ops: the script's former name
            ops = res["ops"]
        else:
            p.error(f"{path}: not a gpu_layer / ops_gpu result")
    targets = H.evaluate_targets(layer, memory, ops)
    print()
    print(H.targets_table(targets, smoke))
    return targets


if __name__ == "__main__":
    main()
