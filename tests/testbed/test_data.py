"""Tests of moe_testbed.data: cleaning, split, tokenizer, packing/labels, loader, bad inputs."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from moe_testbed.data import (
    SAMPLE_DOMAINS,
    BatchLoader,
    build_dataset,
    clean,
    load_corpus,
    prepare_corpus,
    prepare_from_dir,
    train_tokenizer,
    validation_batches,
    validation_sequences,
)
from moe_testbed.data.cli import add_data_subcommands, main
from moe_testbed.data.inspect import naive_bayes
from moe_testbed.data.prepare import prepare_from_records, records_by_domain
from moe_testbed.data.tokenizer import EOT, eot_id, tokenizer_key

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def sample():
    return load_corpus("sample")


@pytest.fixture(scope="module")
def sample_tok(sample, cache):
    return train_tokenizer(sample, 4096, cache_dir=cache)


def _synthetic_dir(root, n_docs=20):
    """Three domains whose byte-level tokens cannot overlap: digits, Latin letters, Cyrillic.
    One line per document (no newline token shared between domains)."""
    rng = random.Random(0)
    alphabets = {"digits": "0123456789", "latin": "abcdefgh", "cyr": "абвгдежз"}
    root.mkdir()
    for name, alpha in alphabets.items():
        d = root / name
        d.mkdir()
        for i in range(n_docs):
            words = [
                "".join(rng.choice(alpha) for _ in range(rng.randint(2, 6))) for _ in range(60)
            ]
            (d / f"doc{i}.txt").write_text(" ".join(words), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("synthetic")
    src = _synthetic_dir(tmp / "src")
    prepare_from_dir(src, tmp / "corpus", quiet=True)
    corpus = load_corpus(tmp / "corpus", val_fraction=0.2)
    tok = train_tokenizer(corpus, 512, cache_dir=cache)
    return corpus, tok, tmp / "corpus"


# ---------------------------------------------------------------- cleaning


def test_strip_licence_header_python_keeps_docstring_and_code():
    src = (
        "#!/usr/bin/env python\n# Copyright 2001 PSF.\n# Licensed under the PSF License.\n\n"
        '"""Module docs."""\nimport os\n'
    )
    assert clean.strip_licence_header(src, "py") == '"""Module docs."""\nimport os\n'


def test_strip_licence_header_c_style_only_licence_blocks():
    src = (
        "/* Copyright (C) 1991 FSF.\n   GNU Lesser General Public License. */\n\n"
        "/* Parse the input. */\nint main(void) { return 0; }\n"
    )
    out = clean.strip_licence_header(src, "c")
    assert out.startswith("/* Parse the input. */")  # a non-licence comment is kept
    go = (
        "// Copyright 2009 The Go Authors. All rights reserved.\n// license in LICENSE.\n\n"
        "package main\n"
    )
    assert clean.strip_licence_header(go, "c") == "package main\n"
    with pytest.raises(ValueError, match="syntax"):
        clean.strip_licence_header(src, "cobol")


def test_untranslated_paragraphs_are_dropped():
    de = (
        "Klicken Sie auf das Symbol, um den Dialog zu öffnen.\n\n"
        "Click the icon to open the dialog and then choose the style.\n\nLibreOffice Calc"
    )
    assert (
        clean.drop_untranslated(de, "de")
        == "Klicken Sie auf das Symbol, um den Dialog zu öffnen.\n\nLibreOffice Calc"
    )
    ru = (
        "Выберите Формат - Маркеры.\n\nOpen Styles - context menu of an entry.\n\n0.3925\n\n"
        "Откройте LibreOffice Writer и нажмите кнопку."
    )
    assert (
        clean.drop_untranslated(ru, "ru")
        == "Выберите Формат - Маркеры.\n\nОткройте LibreOffice Writer и нажмите кнопку."
    )
    assert not clean.is_untranslated("这是一个用于 the LibreOffice 的帮助页面。", "zh")
    with pytest.raises(ValueError, match="language"):
        clean.is_untranslated("text", "xx")


def test_dedup_near_empty_and_chunking():
    docs = [("Hello   world\n", "a"), ("Hello world", "b"), ("Other", "c")]
    assert [s for _, s in clean.dedup(docs)] == ["a", "c"]  # whitespace-normalised hash
    assert clean.is_near_empty("  \n short \n", 64)
    assert not clean.is_near_empty("x" * 64)
    text = "\n\n".join(f"paragraph {i} " + "word " * 50 for i in range(40))
    pieces = clean.chunk(text, 1000)
    assert all(len(p) <= 1000 for p in pieces) and len(pieces) > 5
    assert "\n\n".join(pieces) == text  # chunking only cuts at paragraph boundaries
    long_para = "\n".join(f"line {i} " + "x" * 80 for i in range(100))  # no blank line at all
    assert all(len(p) <= 1000 for p in clean.chunk(long_para, 1000))


def test_clean_stream_drops_empty_and_duplicate_pieces():
    from moe_testbed.data.prepare import clean_stream

    raw = [
        ("# Copyright X\n# license: MIT\n\n" + "def f():\n    return 1\n" * 10, "a.py"),
        ("tiny", "b.py"),
        ("def f():\n    return 1\n" * 10, "c.py"),
    ]
    out = list(clean_stream(raw, code="py"))
    assert [s for _, s in out] == ["a.py"]
    assert "Copyright" not in out[0][0]


def test_split_is_deterministic_by_document():
    texts = [f"document number {i}" for i in range(200)]
    tr, va = clean.split_indices(texts, 0.1, seed=3)
    assert len(va) == 20 and sorted(tr + va) == list(range(200))
    assert clean.split_indices(texts, 0.1, seed=3) == (tr, va)
    # The split follows the documents, not their order.
    rev = texts[::-1]
    _, va_rev = clean.split_indices(rev, 0.1, seed=3)
    assert {rev[i] for i in va_rev} == {texts[i] for i in va}
    assert clean.split_indices(texts, 0.1, seed=4)[1] != va
    assert clean.split_indices(texts[:2], 0.1)[1] != []  # tiny domains still get one document
    with pytest.raises(ValueError, match="val_fraction"):
        clean.split_indices(texts, 1.5)


def test_sample_loads_with_deterministic_disjoint_split(sample):
    assert sample.domains == sorted(SAMPLE_DOMAINS) and len(sample.domains) >= 8
    again = load_corpus("sample")
    assert again.fingerprint == sample.fingerprint
    for d in sample.domains:
        assert sample.validation[d] == again.validation[d]
        assert len(sample.validation[d]) >= 1
        assert not set(sample.train[d]) & set(sample.validation[d])
        assert sample.manifest["domains"][d]["sources"][0]["licence"]
    assert load_corpus("sample", seed=1).fingerprint != sample.fingerprint


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_on_every_sample_domain(sample, sample_tok):
    assert eot_id(sample_tok) == 0 and sample_tok.id_to_token(0) == EOT
    for d in sample.domains:
        docs = sample.validation[d][:5] + sample.train[d][:5]
        for text in docs:
            ids = sample_tok.encode(text, add_special_tokens=False).ids
            assert sample_tok.decode(ids, skip_special_tokens=False) == text, d


def test_tokenizer_cache_key_tracks_corpus_and_settings(sample, synthetic, sample_tok, cache):
    k = tokenizer_key(sample, 4096, 2_000_000)
    assert k != tokenizer_key(sample, 8192, 2_000_000)
    assert k != tokenizer_key(sample, 4096, 1_000_000)
    assert k != tokenizer_key(synthetic[0], 4096, 2_000_000)
    assert (cache / f"tokenizer-{k}.json").exists()
    assert train_tokenizer(sample, 4096, cache_dir=cache).to_str() == sample_tok.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(sample, 100, cache_dir=cache)


# ---------------------------------------------------------------- datasets and loader


def test_packing_separators_and_label_alignment(synthetic, cache):
    corpus, tok, _ = synthetic
    ds = build_dataset(corpus, tok, seq_len=32, split="train", cache_dir=cache)
    sep = eot_id(tok)
    vocab_of = {}
    for d in ds.domains:
        stream = np.asarray(ds.tokens[d])
        assert ds.tokens[d].dtype == np.uint16
        # Every document is followed by exactly one separator.
        assert stream[-1] == sep and int((stream == sep).sum()) == len(corpus.train[d])
        vocab_of[d] = set(stream.tolist()) - {sep}
    assert not vocab_of["digits"] & vocab_of["latin"] and not vocab_of["latin"] & vocab_of["cyr"]
    loader = BatchLoader(ds, batch_size=64, seed=0, balance="domain")
    for step in range(3):
        tokens_BS1, labels_BS1 = loader.batch(step)
        assert tokens_BS1.shape == labels_BS1.shape == (64, 33)
        assert tokens_BS1.dtype == labels_BS1.dtype == torch.int64
        for row, lab in zip(tokens_BS1.tolist(), labels_BS1.tolist()):
            d = ds.domains[lab[0]]
            assert len(set(lab)) == 1  # a row never spans two domains
            assert set(row) - {sep} <= vocab_of[d]  # every label matches its token's domain
    assert set(labels_BS1[:, 0].tolist()) == {0, 1, 2}


def test_batches_resume_without_replay_and_split_over_ranks(synthetic, cache):
    corpus, tok, _ = synthetic
    ds = build_dataset(corpus, tok, seq_len=32, split="train", cache_dir=cache)
    a = BatchLoader(ds, 8, seed=5)
    it = iter(a)
    first = [next(it) for _ in range(4)]
    state = a.state_dict()
    fresh = BatchLoader(ds, 8, seed=5)
    fresh.load_state_dict(state)
    assert torch.equal(next(iter(fresh))[0], a.batch(4)[0])
    for s, (x, y) in enumerate(first):  # batch(step) is a pure function of (seed, step, rank)
        x2, y2 = BatchLoader(ds, 8, seed=5).batch(s)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(BatchLoader(ds, 8, seed=6).batch(0)[0], first[0][0])
    whole = BatchLoader(ds, 8, seed=5, world_size=1).batch(7)[0][:8]
    ranks = [BatchLoader(ds, 4, seed=5, rank=r, world_size=2).batch(7)[0] for r in range(2)]
    assert torch.equal(torch.cat(ranks), whole)
    with pytest.raises(ValueError, match="seed"):
        BatchLoader(ds, 8, seed=6).load_state_dict(state)


def test_natural_balance_follows_token_counts(synthetic, cache):
    corpus, tok, _ = synthetic
    ds = build_dataset(corpus, tok, seq_len=32, split="train", cache_dir=cache)
    nat = BatchLoader(ds, 8, balance="natural").probs
    w = np.array([ds.num_windows(d) for d in ds.domains], dtype=float)
    np.testing.assert_allclose(nat, w / w.sum())
    np.testing.assert_allclose(BatchLoader(ds, 8).probs, 1 / 3)


def test_validation_sequences_are_fixed(synthetic, cache):
    corpus, tok, _ = synthetic
    val = build_dataset(corpus, tok, seq_len=16, split="validation", cache_dir=cache)
    seqs = validation_sequences(val)
    assert seqs["digits"].shape[1] == 17 and seqs["digits"].shape[0] >= 2
    batches = list(validation_batches(val, 2))
    assert sum(x.shape[0] for x, _ in batches) == sum(s.shape[0] for s in seqs.values())
    for x, y in batches:
        assert y.shape == x.shape and len(set(y.flatten().tolist())) == 1
    assert torch.equal(validation_sequences(val, max_per_domain=1)["cyr"], seqs["cyr"][:1])


# ---------------------------------------------------------------- inspect


def test_sample_domains_are_distinguishable(sample, sample_tok, cache):
    train = build_dataset(sample, sample_tok, 256, "train", cache_dir=cache)
    val = build_dataset(sample, sample_tok, 256, "validation", cache_dir=cache)
    nb = naive_bayes(train, val)
    print({d: round(a, 3) for d, a in nb["accuracy"].items()}, nb["overall"])
    assert nb["overall"] >= 0.95
    assert min(nb["accuracy"].values()) >= 0.85
    assert nb["confusion"].sum() == sum(nb["windows"].values())


def test_cli_inspect_and_subcommand_wiring(synthetic, cache, capsys):
    _, _, path = synthetic
    rc = main(
        [
            "inspect",
            "--source",
            str(path),
            "--vocab-size",
            "512",
            "--seq-len",
            "16",
            "--cache-dir",
            str(cache),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "digits" in out and "top confusions" in out
    import argparse

    parser = argparse.ArgumentParser()
    add_data_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "prepare", "--domains", "chat", "--mb", "0.1"])
    assert args.func.__name__ == "cmd_prepare" and args.mb == 0.1
    assert main(["inspect", "--source", str(path / "nope")]) == 2


# ---------------------------------------------------------------- other sources, bad inputs


def test_from_dir_accepts_txt_and_jsonl(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "alpha.txt").write_text("alpha text " * 50, encoding="utf-8")
    with open(src / "beta.jsonl", "w", encoding="utf-8") as f:
        for i in range(3):
            f.write(json.dumps({"text": f"beta document {i} " * 20}) + "\n")
    m = prepare_from_dir(src, tmp_path / "out", quiet=True)
    assert m["domains"]["alpha"]["documents"] == 1 and m["domains"]["beta"]["documents"] == 3
    assert not list((tmp_path / "out").glob(".*tmp*"))  # atomic writes leave no temp files
    assert load_corpus(tmp_path / "out").domains == ["alpha", "beta"]


def test_records_adapter_groups_by_domain_field(tmp_path):
    rows = iter(
        [
            {"text": "hello there " * 20, "domain": "a"},
            {"text": "general kenobi " * 20, "domain": "b"},
            {"text": "no label here " * 20},
        ]
    )
    grouped = records_by_domain(rows, default_domain="misc")
    assert sorted(grouped) == ["a", "b", "misc"]
    m = prepare_from_records(grouped, tmp_path / "hf", quiet=True)
    assert sorted(m["domains"]) == ["a", "b", "misc"]
    with pytest.raises(ValueError, match="text_field"):
        records_by_domain([{"body": "x"}])


def test_bad_inputs_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="source: corpus directory .*nope"):
        load_corpus(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="from_dir: directory"):
        prepare_from_dir(tmp_path / "nope", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="from_dir: .* holds no domain"):
        prepare_from_dir(empty, tmp_path / "out")
    (empty / "blank.txt").write_text("   \n", encoding="utf-8")
    with pytest.raises(ValueError, match="domain 'blank'.*no text"):
        prepare_from_dir(empty, tmp_path / "out")
    with pytest.raises(ValueError, match=r"domains: unknown .*klingon.*expected a subset"):
        load_corpus("sample", domains="en_lit,klingon")
    with pytest.raises(ValueError, match=r"domains: unknown .*klingon.*code_go"):
        prepare_corpus("klingon", 0.1, tmp_path / "out")
    with pytest.raises(ValueError, match="mb: expected a positive"):
        prepare_corpus("chat", 0, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_corpus(empty)


def test_prepare_reports_unavailable_apt_sources(tmp_path, monkeypatch, capsys):
    import moe_testbed.data.sources as sources

    monkeypatch.setattr(sources.shutil, "which", lambda name: None)  # a machine without apt-get
    m = prepare_corpus("biomed", 0.01, tmp_path / "out", cache=tmp_path / "cache", quiet=True)
    assert m["domains"] == {}
    assert "apt-get not found" in m["unavailable"]["biomed"]
    rc = main(
        [
            "prepare",
            "--domains",
            "biomed",
            "--mb",
            "0.01",
            "--out",
            str(tmp_path / "out"),
            "--cache",
            str(tmp_path / "cache"),
            "--quiet",
        ]
    )
    assert rc == 1 and "unavailable: biomed: apt-get not found" in capsys.readouterr().err
