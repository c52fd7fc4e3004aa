"""export --hf: a testbed model as a Mixtral / Qwen2-MoE directory that transformers loads, with
the same logits (fp32) and the run's tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_testbed import cli  # noqa: E402
from moe_testbed.config import ModelConfig, default_moe  # noqa: E402
from moe_testbed.export import export_family, export_model, load_run_model, run_tokenizer  # noqa: E402
from moe_testbed.model import MoETransformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**overrides) -> MoETransformer:
    moe = {k: overrides.pop(k) for k in ("normalize", "activation") if k in overrides}
    m = ModelConfig(
        vocab_size=97, d_model=32, n_layers=3, n_heads=4, d_ff_expert=16, d_ff_dense=48, seq_len=24
    )
    for k, v in overrides.items():
        setattr(m, k, v)
    return MoETransformer(m, default_moe(num_experts=4, top_k=2, **moe)).eval()


@pytest.mark.parametrize(
    "overrides, family",
    [
        ({}, "mixtral"),  # the testbed's defaults: every block MoE, tied embeddings
        ({"tie_embeddings": False, "activation": "geglu", "norm_eps": 1e-6}, "mixtral"),
        ({"moe_every": 2}, "qwen2_moe"),  # dense blocks -> mlp_only_layers
        ({"normalize": False, "tie_embeddings": False}, "qwen2_moe"),  # norm_topk_prob=False
    ],
)
def test_logits_match_the_testbed_model(tmp_path, overrides, family):
    torch.manual_seed(0)
    model = _model(**overrides)
    with torch.no_grad():  # trained-like scales: larger router logits, non-trivial norms
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    export_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.model_type == family
    tokens = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        ref, out = model(tokens), hf(input_ids=tokens).logits
    err = (out - ref).abs().max().item()
    print(family, overrides, "max |logits - testbed|", err, "max |logits|", ref.abs().max().item())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


def test_unexportable_settings_are_all_named():
    m = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2)
    moe = default_moe(router="hash", balance="none", shared_experts=1, capacity_factor=1.25)
    with pytest.raises(ValueError) as err:
        export_family(m, moe)
    msg = str(err.value)
    for part in ("router='hash'", "shared_experts=1", "capacity_factor=1.25", "Supported"):
        assert part in msg
    with pytest.raises(ValueError, match="score='sigmoid'.*aux_free"):
        export_family(m, default_moe(score="sigmoid", balance="aux_free"))
    with pytest.raises(ValueError, match="activation='gelu'"):
        export_family(m, default_moe(activation="gelu"))
    dense = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, dense="equal_active")
    with pytest.raises(ValueError, match="model.dense='equal_active'"):
        export_family(dense, default_moe())


def test_export_run_loads_with_its_tokenizer(sample_run, sample_export):
    model, cfg, step = load_run_model(sample_run)
    info = json.loads((sample_export / "testbed_export.json").read_text())
    assert info["family"] == "mixtral" and info["step"] == step == 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(sample_export).eval()
    tok = transformers.AutoTokenizer.from_pretrained(sample_export)
    text = ["Der Vertrag tritt am 1. Januar in Kraft.", "def f(x):\n    return x + 1\n"]
    ours = [e.ids for e in run_tokenizer(cfg).encode_batch(text, add_special_tokens=False)]
    assert tok(text, add_special_tokens=False)["input_ids"] == ours
    assert tok.eos_token_id == 0  # the document separator
    ids = torch.tensor([ours[0][:20], ours[1][:20]]) if min(map(len, ours)) >= 20 else None
    ids = ids if ids is not None else torch.randint(0, cfg.model.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), rtol=1e-5, atol=2e-5)


def test_cli_export_errors(tmp_path, capsys):
    assert cli.main(["export", "--hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "has no config.json" in capsys.readouterr().err
