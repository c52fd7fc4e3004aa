"""analyze: routing captured through the HF integration for every supported family equals the
unpatched models' routing; metrics equal a direct computation on the ids; the testbed's own
validation metrics come back from its export; batch-size invariance; clear input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import SAMPLE_DOMAINS, VAL_TOKENS  # noqa: E402

from moe_testbed import cli, metrics  # noqa: E402
from moe_testbed.analyze import analyze, coactivation_matrix, paradigm_verdict  # noqa: E402
from moe_testbed.domain_text import domain_windows, hf_encoder, load_text  # noqa: E402
from moe_testbed.rundir import RunDir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)
MOE = dict(moe_intermediate_size=8, num_experts_per_tok=2)
DS = dict(
    intermediate_size=24,
    n_routed_experts=8,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    **MOE,
)
MLA = dict(q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
FAMILIES = {
    "mixtral": lambda t, v: t.MixtralConfig(
        intermediate_size=8, num_local_experts=4, num_experts_per_tok=2, vocab_size=v, **SMALL
    ),
    "qwen2_moe": lambda t, v: t.Qwen2MoeConfig(
        intermediate_size=24,
        shared_expert_intermediate_size=16,
        num_experts=4,
        vocab_size=v,
        **MOE,
        **SMALL,
    ),
    "qwen3_moe": lambda t, v: t.Qwen3MoeConfig(
        intermediate_size=24, num_experts=8, head_dim=8, vocab_size=v, **MOE, **SMALL
    ),
    "olmoe": lambda t, v: t.OlmoeConfig(
        intermediate_size=8, num_experts=4, num_experts_per_tok=2, vocab_size=v, **SMALL
    ),
    "deepseek_v2": lambda t, v: t.DeepseekV2Config(
        topk_method="group_limited_greedy", vocab_size=v, **DS, **MLA, **SMALL
    ),
    "deepseek_v3": lambda t, v: t.DeepseekV3Config(vocab_size=v, **DS, **MLA, **SMALL),
    "glm4_moe": lambda t, v: t.Glm4MoeConfig(head_dim=8, vocab_size=v, **DS, **SMALL),
}


def _family_dir(family, sample_export, path):
    """A tiny random-weight model of ``family`` with the export's tokenizer, saved to ``path``."""
    tok = transformers.AutoTokenizer.from_pretrained(sample_export)
    torch.manual_seed(0)
    config = FAMILIES[family](transformers, len(tok))
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gate.weight"):  # some families start their routers at zero (ties)
                p.normal_(0.0, 1.0)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _direct_routing(path, windows):
    """Expert ids per layer from the unpatched model's own routers (gate outputs)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    ids: list[list[torch.Tensor]] = [[] for _ in gates]
    hooks = [
        g.register_forward_hook(lambda _m, _i, out, i=i: ids[i].append(out[2].long()))
        for i, g in enumerate(gates)
    ]
    with torch.no_grad():
        for w in windows.values():
            model(input_ids=w[:, :-1])
    for h in hooks:
        h.remove()
    return [torch.cat(x) for x in ids]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_routing_and_metrics_equal_direct_computation(family, sample_export, tmp_path):
    path = _family_dir(family, sample_export, tmp_path / family)
    res = analyze(
        str(path), "sample", domains=SAMPLE_DOMAINS, out=tmp_path / "run", tokens=64,
        seq_len=16, batch_size=3, run_probes=family == "mixtral", report=False,
    )  # fmt: skip
    text = load_text("sample", SAMPLE_DOMAINS)
    encode, sep = hf_encoder(transformers.AutoTokenizer.from_pretrained(path))
    windows = domain_windows(text, encode, sep, 16, 4, spread=True)  # as analyze
    ids_L = _direct_routing(path, windows)  # (T, K) per layer, domain by domain
    labels_T = torch.cat(
        [torch.full((w.shape[0] * 16,), d) for d, w in enumerate(windows.values())]
    )
    counts = RunDir(res["out"]).load_counts(0)
    E = counts["requested_LDE"].shape[-1]
    direct = np.stack(
        [
            np.stack([np.bincount(ids[labels_T == d].reshape(-1), minlength=E) for d in range(3)])
            for ids in ids_L
        ]
    )
    np.testing.assert_array_equal(counts["requested_LDE"], direct)
    expect = metrics.summarize(direct, kept_LDE=direct, split="val")
    for key, value in expect.items():
        assert res["record"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    np.testing.assert_allclose(
        counts["coactivation_LEE"], metrics.coactivation(torch.stack(ids_L), E), rtol=1e-6
    )
    np.testing.assert_array_equal(counts["seq_counts_LNE"].sum(1), direct.sum(1))
    assert counts["seq_domain_N"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert res["verdict"]["verdict"] in ("modular", "distributed", "mixed")
    if family == "mixtral":
        assert "probe/all/stiffness" in res["record"]


def test_analyze_reproduces_the_testbed_validation(sample_run, sample_export, tmp_path):
    """The export analysed on the run's validation text gives the run's own final evaluation."""
    res = analyze(
        str(sample_export), "sample", domains=SAMPLE_DOMAINS, out=tmp_path / "a",
        tokens=VAL_TOKENS, seq_len=32, batch_size=4, run_probes=False,
    )  # fmt: skip
    run = RunDir(sample_run)
    final = [r for r in run.read_metrics() if "val/loss" in r][-1]
    checked = [k for k in final if k.startswith("val/")]
    assert len(checked) > 50
    for key in checked:
        assert res["record"][key] == pytest.approx(final[key], rel=1e-5, abs=1e-6), key
    ours, theirs = RunDir(res["out"]).load_counts(0), run.load_counts(run.list_counts()[-1])
    np.testing.assert_array_equal(ours["requested_LDE"], theirs["requested_LDE"])
    assert ours["domains"] == theirs["domains"] == SAMPLE_DOMAINS.split(",")
    report = (res["out"] / "report" / "summary.md").read_text()
    assert "Paradigm verdict" in report and res["verdict"]["verdict"] in report
    assert json.loads((res["out"] / "verdict.json").read_text())["verdict"]


def test_batch_size_invariance(sample_export, tmp_path):
    kw = dict(domains=SAMPLE_DOMAINS, tokens=128, seq_len=16, run_probes=False, report=False)
    a = analyze(str(sample_export), "sample", out=tmp_path / "b1", batch_size=1, **kw)
    b = analyze(str(sample_export), "sample", out=tmp_path / "b5", batch_size=5, **kw)
    ca, cb = RunDir(a["out"]).load_counts(0), RunDir(b["out"]).load_counts(0)
    for key in ("requested_LDE", "seq_counts_LNE", "coactivation_LEE"):
        np.testing.assert_array_equal(ca[key], cb[key])
    for key, value in a["record"].items():
        assert b["record"][key] == pytest.approx(value, rel=1e-5), key


def test_bad_inputs(sample_export, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        analyze(str(tmp_path / "missing"), "sample", out=tmp_path / "o")
    dense = tmp_path / "llama"
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(intermediate_size=24, vocab_size=64, **SMALL)
    ).save_pretrained(dense)
    with pytest.raises(ValueError, match="'llama', not a supported MoE family.*mixtral"):
        analyze(str(dense), "sample", out=tmp_path / "o")
    with pytest.raises(ValueError, match="at least two domains"):
        analyze(str(sample_export), "sample", domains="de", out=tmp_path / "o")
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    (text_dir / "poems.txt").write_text("Roses are red, violets are blue. " * 40)
    (text_dir / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="domain 'empty'.*has no text"):
        analyze(str(sample_export), str(text_dir), out=tmp_path / "o")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "no domain field"}) + "\n")
    with pytest.raises(ValueError, match="needs 'text' and 'domain'"):
        analyze(str(sample_export), str(rows), out=tmp_path / "o")
    with pytest.raises(ValueError, match="tokens"):
        analyze(str(sample_export), "sample", tokens=0, out=tmp_path / "o")


def test_text_sources_directory_and_jsonl(tmp_path):
    d = tmp_path / "dir"
    (d / "code").mkdir(parents=True)
    (d / "code" / "a.py").write_text("print(1)\n")
    (d / "code" / "b.py").write_text("print(2)\n")
    (d / "prose.txt").write_text("Once upon a time.")
    t = load_text(str(d))
    assert t.domains == ["code", "prose"] and t.split == "all" and len(t.docs["code"]) == 2
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join(json.dumps({"text": f"t{i}", "domain": "ab"[i % 2]}) for i in range(20))
    )
    t = load_text(str(rows), split="validation")
    assert t.domains == ["a", "b"] and all(len(v) == 1 for v in t.docs.values())
    assert load_text("sample", "de,zh").docs["zh"]  # corpus: the validation split by default


def test_paradigm_verdict_rule():
    reference = np.kron(np.eye(4), np.ones((1, 2)))[None] * 100  # 4 domains own 2 experts each
    v = paradigm_verdict(reference)
    assert v["verdict"] == "modular" and v["domain_isolation"] == pytest.approx(1.0)
    assert v["effective_experts_per_domain"] == pytest.approx(2.0)
    v = paradigm_verdict(np.ones((2, 4, 8)) * 50)  # every domain everywhere
    assert v["verdict"] == "distributed" and v["modular_layers"] == []
    assert "domain isolation 0.000" in v["text"]
    # Two domains on 8 of 12 experts each, sharing 4: isolation 0.5, but each domain spreads
    # over more than half of the experts, so not modular.
    spread = np.zeros((1, 2, 12))
    spread[0, 0, :8], spread[0, 1, 4:] = 1, 1
    v = paradigm_verdict(spread)
    assert v["domain_isolation"] == pytest.approx(0.5) and v["verdict"] == "mixed"


def test_coactivation_from_pair_counts():
    ids = torch.randint(0, 6, (1, 50, 1))
    ids = torch.cat([ids, (ids + 1) % 6], -1)
    hot = torch.zeros(50, 6).scatter_(1, ids[0], 1.0)
    pairs = (hot.T @ hot).double().numpy()[None]
    np.testing.assert_allclose(coactivation_matrix(pairs), metrics.coactivation(ids, 6))


def test_cli_analyze_errors(tmp_path, capsys):
    assert cli.main(["analyze", "--model", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "no such directory" in capsys.readouterr().err
