"""python -m moe_kernels.selfcheck: the table, the JSON and the exit status, with the Triton
kernels through the interpreter on CPU (this folder's conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib
import json

import pytest
from triton_helpers import requires_triton

from moe_kernels import selfcheck
from moe_kernels.ops.grouped_mm import CpuGroupedMM

G = importlib.import_module("moe_kernels.ops.grouped_mm")


@requires_triton
def test_every_cpu_and_triton_row_passes(tmp_path, capsys):
    out = tmp_path / "sc.json"
    rc = selfcheck.main(["--ops", "routing_histogram", "grouped_mm", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    for col in selfcheck.COLUMNS:
        assert col in text.splitlines()[1]
    rows = json.loads(out.read_text())["rows"]
    by_backend = {(r["op"], r["backend"]) for r in rows}
    for op in ("grouped_mm", "grouped_mm (dx)", "grouped_mm_dw", "routing_histogram"):
        assert (op, "cpu") in by_backend and (op, "triton") in by_backend
    assert all(r["verdict"] == "ok" for r in rows)
    shapes = {r["shape"].split(":")[0] for r in rows}
    assert {"T=1", "empty expert", "one expert", "K=E", "all empty"} <= shapes
    assert "no Triton route kernel" not in text  # route was not asked for


def test_a_wrong_backend_fails_the_run(monkeypatch, capsys):
    class Wrong(CpuGroupedMM):
        name = "wrong"

        def dw(self, x, dy, offsets):
            out = super().dw(x, dy, offsets)
            return out.flip(0)  # experts swapped

    monkeypatch.setattr(G, "BACKENDS", [Wrong(), *G.BACKENDS])
    rc = selfcheck.main(["--ops", "grouped_mm", "--backends", "wrong", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 1
    lines = [ln for ln in text.splitlines() if ln.startswith("grouped_mm_dw")]
    assert lines and all("FAIL" in ln for ln in lines)
    assert not any(ln.startswith("grouped_mm ") for ln in text.splitlines())  # --quiet
    assert "self-check FAILED" in text


def test_bad_device_is_one_clear_error():
    with pytest.raises(SystemExit, match="--device"):
        selfcheck.main(["--device", "tpu:0"])
