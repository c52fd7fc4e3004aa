"""Audit of bad inputs and faults: the CLI, config files, run directories, crashes, ``data
prepare`` and the Python API, each case classified as

* OK: a clear one-line error (naming what was wrong) or the right result;
* LOSS: data of a run lost or mixed with another's;
* WRONG: a silently wrong result (exit 0 where an error was due, or a wrong number/report);
* UNCLEAR: an error, but a traceback, several lines, or a message that does not name the
  argument and value.

The scenarios and the harness are in ``audit_harness.py``. Run it from the repository root with
the package installed (editable)::

    python tests/testbed/audit_inputs.py [--only TEXT] [--area testbed|ops]

It prints one row per case and the counts per class. Not collected by pytest (its name does not
start with ``test_``): it trains a few dozen tiny runs on the synthetic domains and takes a
few minutes on two cores. Cases of the ``ops`` area check the op-level contract of
``moe_kernels`` (token counts, offsets, ids, NaN bias, argument names).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

import moe_kernels as mk
from moe_kernels import MoE, MoEConfig
from moe_testbed import train as train_module
from moe_testbed.config import RunConfig, validate
from moe_testbed.rundir import RunDir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_harness import (  # noqa: E402
    Outcome,
    api_error,
    both_checkpoints_corrupt,
    cli_error,
    compare_data_seed,
    compare_different_steps,
    corrupt,
    corrupt_newest_checkpoint,
    eval_every_zero,
    fake_run,
    isolated,
    judge_error,
    leftover_without_checkpoint,
    no_resume_then_crash,
    not_a_run_directory,
    report_after_no_resume,
    resume_refused,
    resume_with_allowed_change,
    run_cli,
    stale_temp_removed,
    steps_extended,
    train_error,
    two_writers,
)

# ----------------------------------------------------------------------------- cases

# Bad train flags, one case per line: FLAGS [=> what the one-line error must name] (default:
# the last flag and its value). Each must be refused before the run directory is written.
TRAIN_FLAGS = """
--lr nan
--lr 0
--lr -1
--lr inf
--seq-len 0
--seq-len -1
--capacity-factor 0
--capacity-factor -1
--capacity-factor nan
--jitter 1.5
--jitter -0.1
--aux-coef -0.1
--z-coef nan
--bias-rate -1
--vocab-size -1
--vocab-size 100
--tokenizer-vocab 100
--tokenizer-vocab 100000
--eval-batches 0
--eval-batches -1
--steps 0
--steps -5
--micro-batch-size 0
--grad-accum 0
--warmup-steps -1
--min-lr-ratio 2
--min-lr-ratio -0.5
--beta1 1
--beta2 1.5
--weight-decay -1
--grad-clip -1
--grad-clip inf
--seed -1
--seed 8589934592
--log-every -1
--eval-every -1
--ckpt-every -1
--d-model 0
--d-model 30 => --n-heads 30
--n-heads 0
--n-layers 0
--d-ff-expert 0
--moe-every 0
--top-k 0
--top-k 9
--top-k two
--num-experts 0
--shared-experts -1
--device tpu
--device cuda:99
--rope-theta 0
--norm-eps -1
--preset huge
--router oracle
--scope batch
--dtype fp16
--bogus => --bogus
--domains en_lit,klingon => --domains klingon
--domains en_lit,en_lit => --domains en_lit
--domains ,
--data-dir /nonexistent/corpus
--data-dir synthetic --domains en_lit
--router reference --num-groups 3
--router reference --num-groups 4
--router reference --domains de,en_lit,zh => --num-groups 3
--router reference --data-dir synthetic => --top-k 2
--router hash --balance aux_free
"""
# Other commands that must fail, one per line: ARGV => what the one-line error must name.
# {tmp} is a fresh empty directory.
CLI_ERRORS = """
train --data-dir {tmp} => --data-dir manifest.json
train --config {tmp}/nope.yaml => nope.yaml
train --config {tmp} => --config
report {tmp} => nothing-to-report
report {tmp}/nope => not-found
compare => RUN_DIR
demo --steps 0 --out {tmp}/d => --steps 0
demo --steps -1 --out {tmp}/d => --steps -1
demo --data-dir /nope --out {tmp}/d => --data-dir /nope
data prepare --mb 0 --domains chat --out {tmp}/o => --mb 0
data prepare --mb -1 --out {tmp}/o => --mb -1
data prepare --mb nan --out {tmp}/o => --mb nan
data prepare --from-dir {tmp}/nope --out {tmp}/o => --from-dir nope
data prepare --from-dir {tmp} --out {tmp}/o => --from-dir no-domain
data prepare --domains klingon --out {tmp}/o => --domains klingon
data inspect --source /nope => /nope
data inspect --vocab-size 10 => --vocab-size 10
data inspect --seq-len 0 => --seq-len 0
"""
CONFIG_FILES = [  # (file name, content, what the one-line error must name)
    ("invalid YAML", "c.yaml", "moe: {router: [x\n", "c.yaml"),
    ("invalid JSON", "c.json", '{"moe": ', "c.json"),
    ("unknown field", "c.yaml", "moe: {routr: x}\n", "moe.routr"),
    ("unknown section", "c.yaml", "mo: {}\n", "'mo'"),
    ("list at top level", "c.yaml", "- 1\n", "c.yaml"),
    ("wrong suffix", "c.toml", "x = 1\n", "c.toml"),
    ("wrong type", "c.yaml", "train: {steps: many}\n", "--steps"),
    ("bad range", "c.yaml", "train: {lr: -1}\n", "--lr"),
]


def _table(text: str) -> list[tuple[list[str], tuple[str, ...]]]:
    rows = []
    for line in text.strip().splitlines():
        argv, _, must = line.partition(" => ")
        words = argv.split()
        named = tuple(m.replace("-", " ") if m[0] != "-" else m for m in must.split())
        rows.append((words, named or tuple(words[-2:])))
    return rows


def prepared(setup: Callable[[Path], object], case: Callable[[Path], Outcome]):
    """``case`` after ``setup(tmp)``."""
    return lambda tmp: (setup(tmp), case(tmp))[1]


def _config(name: str, text: str, must: str) -> Callable[[Path], Outcome]:
    def case(tmp: Path) -> Outcome:
        (tmp / name).write_text(text)
        rc, _, err = run_cli(["train", "--config", tmp / name, "--out", tmp / "run"])
        return judge_error(rc, err, (must,))

    return case


def _src(tmp: Path) -> None:
    (tmp / "src").mkdir()
    (tmp / "src" / "prose.txt").write_text("a sentence of prose that is long enough. " * 300)


def _file(tmp: Path) -> None:
    (tmp / "f").write_text("x")


def _no_cap(tmp: Path) -> Outcome:
    rc, _, err = run_cli(["data", "prepare", "--from-dir", tmp / "src", "--out", tmp / "o"])
    if rc != 0:
        return judge_error(rc, err, ())
    size = json.loads((tmp / "o" / "manifest.json").read_text())["domains"]["prose"]["bytes"]
    return ("OK", f"no cap: {size} bytes") if size > 10_000 else ("WRONG", f"capped at {size}")


def _validate(section: str, name: str, value: object) -> None:
    cfg = RunConfig()
    setattr(getattr(cfg, section), name, value)
    validate(cfg)


def _train_api_nan(tmp: Path) -> Outcome:
    cfg = RunConfig()
    cfg.data.data_dir, cfg.train.lr = "synthetic", float("nan")
    verdict = api_error(lambda: train_module.train(cfg, tmp / "run"), "train.lr", "nan")(tmp)
    return ("WRONG", "wrote the run directory") if (tmp / "run").exists() else verdict


def _moe(router: str, **inputs: torch.Tensor) -> Callable[[], object]:
    kw = {"num_groups": 2} if router == "reference" else {}
    return lambda: MoE(16, 16, 4, 1, router=router, **kw)(torch.randn(3, 16), **inputs)


def _histogram(experts: list[int], labels: list[int]) -> Callable[[], object]:
    experts_TK = torch.tensor(experts, dtype=torch.int32).unsqueeze(1)
    out_GE = torch.zeros(2, 4, dtype=torch.int64)
    return lambda: mk.routing_histogram(experts_TK, torch.tensor(labels), out_GE)


def _grouped_mm(offsets: list[int]) -> Callable[[], object]:
    return lambda: mk.grouped_mm(torch.randn(4, 8), torch.randn(2, 8, 8), torch.tensor(offsets))


_NAN = float("nan")
_DISPATCH = (
    "w, e = mk.topk_gating(torch.randn(6, 4), 2)\nmk.dispatch(torch.ones(3, 8), mk.route(e, 4))"
)
CASES: list[tuple[str, str, Callable[[Path], Outcome]]] = [
    *(("testbed", "train " + " ".join(a), train_error(*a, must=m)) for a, m in _table(TRAIN_FLAGS)),
    *(("testbed", " ".join(a), cli_error(*a, must=m)) for a, m in _table(CLI_ERRORS)),
    *(("testbed", f"config file: {what}", _config(*rest)) for what, *rest in CONFIG_FILES),
    ("testbed", "train --out <a file>", prepared(_file, cli_error("train", "--out", "{tmp}/f"))),
    ("testbed", "two runs into one --out", two_writers),
    ("testbed", "--no-resume, crash, resume", no_resume_then_crash),
    ("testbed", "report after --no-resume", report_after_no_resume),
    ("testbed", "resume: another --lr", resume_refused("--lr", "0.001", must="train.lr")),
    (
        "testbed",
        "resume: another --num-experts",
        resume_refused("--num-experts", "4", must="moe.num_experts"),
    ),
    (
        "testbed",
        "resume: another --micro-batch-size",
        resume_refused("--micro-batch-size", "2", must="train.micro_batch_size"),
    ),
    ("testbed", "resume: another --seed", resume_refused("--seed", "1", must="train.seed")),
    (
        "testbed",
        "resume: another --data-dir",
        resume_refused("--data-dir", "sample", "--vocab-size", "4096", must="data.data_dir"),
    ),
    (
        "testbed",
        "resume: --num-experts, allowed",
        resume_refused("--num-experts", "4", "--allow-config-change", must="moe.num_experts"),
    ),
    ("testbed", "resume: fewer --steps than done", resume_refused("--steps", "3", must="step 4")),
    ("testbed", "resume: --lr, allowed", resume_with_allowed_change),
    ("testbed", "resume: more --steps", steps_extended),
    ("testbed", "truncated last.pt", corrupt_newest_checkpoint),
    ("testbed", "both checkpoints corrupt", both_checkpoints_corrupt),
    ("testbed", "stale .last.pt.*.tmp", stale_temp_removed),
    ("testbed", "--out holds someone's files", not_a_run_directory),
    ("testbed", "rerun without a checkpoint", leftover_without_checkpoint),
    ("testbed", "--eval-every 0", eval_every_zero),
    (
        "testbed",
        "report <config only>",
        prepared(
            lambda t: RunDir(t / "r").write_config({}),
            cli_error("report", "{tmp}/r", must=("nothing to report",)),
        ),
    ),
    (
        "testbed",
        "report <a file>",
        prepared(_file, cli_error("report", "{tmp}/f", must=("not found",))),
    ),
    (
        "testbed",
        "compare with an empty run",
        prepared(
            lambda t: (fake_run(t / "a", 0, 3), (t / "e").mkdir()),
            cli_error("compare", "{tmp}/a", "{tmp}/e", must=("nothing to report",)),
        ),
    ),
    ("testbed", "compare seeds at different steps", compare_different_steps),
    ("testbed", "compare different data seeds", compare_data_seed),
    ("testbed", "report: corrupt config.json", corrupt("config")),
    ("testbed", "report: corrupt counts file", corrupt("counts")),
    ("testbed", "report: corrupt metrics line", corrupt("metrics")),
    (
        "testbed",
        "data prepare --mb 0 --from-dir",
        prepared(
            _src,
            cli_error(
                "data",
                "prepare",
                "--mb",
                "0",
                "--from-dir",
                "{tmp}/src",
                "--out",
                "{tmp}/o",
                must=("--mb", "0"),
            ),
        ),
    ),
    ("testbed", "data prepare --from-dir, no --mb", prepared(_src, _no_cap)),
    (
        "testbed",
        "validate: steps='10'",
        api_error(lambda: _validate("train", "steps", "10"), "train.steps", "'10'"),
    ),
    (
        "testbed",
        "validate: lr=True",
        api_error(lambda: _validate("train", "lr", True), "train.lr", "True"),
    ),
    (
        "testbed",
        "from_dict: unknown key",
        api_error(lambda: RunConfig.from_dict({"train": {"stpes": 1}}), "train.stpes"),
    ),
    ("testbed", "train(): nan lr", _train_api_nan),
    (
        "testbed",
        "MoE reference labels -3",
        api_error(_moe("reference", labels=torch.tensor([0, -3, 1])), "labels", "-3"),
    ),
    (
        "testbed",
        "MoE hash token ids < 0",
        api_error(_moe("hash", token_ids=torch.tensor([0, -2, 1])), "token_ids", "-2"),
    ),
    (
        "testbed",
        "MoEConfig capacity_factor=0",
        api_error(lambda: MoEConfig(capacity_factor=0.0), "capacity_factor", "0.0"),
    ),
    ("ops", "dispatch: x has another token count", isolated(_DISPATCH, "x", "6")),
    ("ops", "grouped_mm: offsets past N", api_error(_grouped_mm([0, 2, 9]), "offsets", "9")),
    ("ops", "grouped_mm: decreasing offsets", api_error(_grouped_mm([0, 3, 2]), "offsets")),
    ("ops", "grouped_mm: negative offsets", api_error(_grouped_mm([-1, 2, 4]), "offsets", "-1")),
    (
        "ops",
        "route: int64 ids above 2^31",
        api_error(lambda: mk.route(torch.tensor([[2**32 + 1]]), 4), "experts", str(2**32 + 1)),
    ),
    (
        "ops",
        "routing_histogram: labels below -1",
        api_error(_histogram([0, 1, 2], [0, -3, 1]), "labels", "-3"),
    ),
    (
        "ops",
        "routing_histogram: ids below -1",
        api_error(_histogram([0, -3, 1], [0, 0, 1]), "experts", "-3"),
    ),
    (
        "ops",
        "topk_gating: NaN in bias_E",
        api_error(
            lambda: mk.topk_gating(torch.randn(4, 4), 2, bias_E=torch.tensor([_NAN, 0, 0, 0])),
            "bias_E",
            "nan",
        ),
    ),
    (
        "ops",
        "MoE: NaN input names x",
        api_error(lambda: MoE(16, 16, 4, 2)(torch.full((3, 16), _NAN)), "x: "),
    ),
]


if not torch.cuda.is_available():
    CASES.append(("testbed", "train --device cuda without CUDA", train_error("--device", "cuda")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--area", choices=("testbed", "ops"), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    counts: Counter[tuple[str, str]] = Counter()
    t0 = time.time()
    for area, name, case in CASES:
        if args.only not in name or (args.area and area != args.area):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)  # nothing lands in the caller's directory
            try:
                verdict, detail = case(Path(tmp))
            except Exception as e:
                verdict, detail = "UNCLEAR", f"audit case raised {type(e).__name__}: {e}"[:120]
            finally:
                os.chdir(cwd)
        counts[area, verdict] += 1
        print(f"{verdict:8s} {area:8s} {name[:48]:48s} {detail}", flush=True)
    print(f"\n{sum(counts.values())} cases in {time.time() - t0:.0f} s")
    for area in ("testbed", "ops"):
        row = {v: counts[area, v] for v in ("OK", "LOSS", "WRONG", "UNCLEAR")}
        print(f"{area:8s} " + "  ".join(f"{k} {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
