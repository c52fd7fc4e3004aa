"""``moe-testbed analyze``: routing and specialization of a Hugging Face MoE causal LM.

Loads the model with ``transformers`` (a local directory, or a hub name when online), converts
its sparse MoE blocks with ``moe_kernels.integrations.hf.convert_sparse_moe`` (the same capture
for every supported family: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4-MoE),
runs domain-labelled text (``moe_testbed.domain_text``) through it in batches and writes a run
directory in the trainer's format (``moe_testbed.rundir``) with the report pages:

- ``metrics.jsonl``: one record (step 0) named like the trainer's evaluation record:
  ``val/<domain>/loss`` and ``ppl``, ``val/loss``, every count metric of
  ``moe_testbed.metrics.summarize_stats`` under ``val/`` (utilization, purity, NMI,
  specialization score, routing specialization, normalized effective rank, domain isolation,
  router entropy and confidence, ...), and the probes under ``probe/`` (stiffness, n-gram
  expertise, co-activation);
- ``counts/step_0000000.npz``: the counts, ``coactivation_LEE`` over every analysed token,
  ``seq_counts_LNE`` (selections of every sequence) and ``seq_domain_N`` (its domain);
- ``verdict.json`` / ``verdict.md``: the paradigm verdict (:func:`paradigm_verdict`, rule in
  ``docs/METRICS.md``) with the numbers it rests on; ``report/`` (``moe-testbed report``).

Memory does not grow with the number of tokens: counts, co-activation and losses accumulate on
the model's device (``moe_kernels.stats``, one host synchronisation at the end); the captures of
each batch are consumed and dropped. Only the per-sequence counts (L x N x E integers) grow,
with the number of sequences. bf16 on GPU, fp32 on CPU.

Legend: L MoE layers, D domains, E experts, K top-k, B sequences, S positions, T = B * S,
N analysed sequences.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from moe_kernels import stats
from moe_kernels.integrations.hf import (
    SparseMoEBlock,
    captured_routing,
    convert_sparse_moe,
    set_routing_inputs,
)
from moe_kernels.integrations.hf_routing import SUPPORTED_MODEL_TYPES
from moe_testbed import logging as names
from moe_testbed import metrics, probes
from moe_testbed.domain_text import (
    DomainText,
    domain_windows,
    hf_encoder,
    load_text,
    window_batches,
)
from moe_testbed.rundir import RunDir, atomic_write_json

# The paradigm rule (docs/METRICS.md, "Paradigm verdict").
MODULAR_ISOLATION = 0.5
MODULAR_RANK = 0.5


def modular_specialization(num_experts: int) -> float:
    """The routing specialization at which domains use E / 2 experts in effective number:
    ``log 2 / log E`` (a domain spread evenly over half the experts)."""
    return math.log(2) / math.log(num_experts) if num_experts > 1 else 0.0


# ----------------------------------------------------------------------------- the model


def resolve_device(name: str) -> torch.device:
    """``auto`` = the GPU when there is one, else the CPU; any other torch device name as is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _looks_local(name: str) -> bool:
    """A path rather than a hub name (``org/name``): absolute, relative or with two slashes."""
    return name.startswith((".", "/", "~")) or name.count("/") >= 2


def hf_model_config(name_or_path: str):
    """The transformers config of a supported HF MoE model (nothing else is loaded).

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: a model that cannot be loaded, or whose ``model_type`` is not a supported
            MoE family (a dense model among them); the message lists the supported ones.
    """
    import transformers

    name = str(name_or_path)
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"model: no such directory {name!r}")
    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model: cannot load {name!r} (a local directory with config.json, or a hub name "
            f"when online): {e}"
        ) from None
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model: {name!r} has model_type {kind!r}, not a supported MoE family; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def load_hf_model(name_or_path: str, *, device: torch.device, capture: bool = True):
    """(model, tokenizer, converted block names) of a supported HF MoE causal LM, in eval mode,
    bf16 on GPU and fp32 on CPU, its sparse blocks converted (``convert_sparse_moe``).

    Raises what :func:`hf_model_config` raises.
    """
    import transformers

    name = str(name_or_path)
    hf_model_config(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    blocks = convert_sparse_moe(model.eval(), capture=capture)
    return model, tokenizer, blocks


def routing_blocks(model: torch.nn.Module) -> list[SparseMoEBlock]:
    """The converted sparse MoE blocks of ``model``, in module order (the layers ``l``)."""
    return [m for m in model.modules() if isinstance(m, SparseMoEBlock)]


# ----------------------------------------------------------------------------- the pass


class Collected(NamedTuple):
    """One pass over the windows: ``sums`` as ``moe_kernels.stats.read`` returns them;
    ``loss_D`` summed next-token cross-entropy and ``tokens_D`` predicted tokens per domain;
    ``coactivation_LEE`` pair counts (diagonal: selections); ``seq_counts_LNE`` int32 and
    ``seq_domain_N`` int64."""

    sums: dict[str, Any]
    loss_D: np.ndarray
    tokens_D: np.ndarray
    coactivation_LEE: np.ndarray
    seq_counts_LNE: np.ndarray
    seq_domain_N: np.ndarray


def _logits(model: torch.nn.Module, tokens_BS: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens_BS).logits.float()


def _experts_per_layer(model: torch.nn.Module) -> list[torch.Tensor]:
    """experts_TK of the last forward of every converted block (captures cleared)."""
    return [c[-1].experts_TK.long() for c in captured_routing(model, clear=True)]


@torch.no_grad()
def collect(
    model: torch.nn.Module,
    windows: dict[str, torch.Tensor],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> Collected:
    """Run every window through ``model`` (converted with ``capture=True``) and accumulate the
    routing counts and losses on its device. ``windows``: ``{domain: int64 (N_d, S + 1)}``.

    Raises ValueError for a model without converted blocks or bad windows / batch size.
    """
    blocks = routing_blocks(model)
    if not blocks:
        raise ValueError("model: no converted sparse MoE block; call convert_sparse_moe first")
    device, D = blocks[0].device, len(windows)
    L, E = len(blocks), blocks[0].num_experts
    N = sum(int(w.shape[0]) for w in windows.values())
    model.eval()
    captured_routing(model, clear=True)
    stats.enable(model, num_labels=D)
    coact = torch.zeros(L, E, E, dtype=torch.float64, device=device)
    seq_counts = torch.zeros(L, N, E, dtype=torch.int32, device=device)
    seq_domain = torch.zeros(N, dtype=torch.int64)
    loss = torch.zeros(D, dtype=torch.float64, device=device)
    counted = torch.zeros(D, dtype=torch.int64)
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(math.ceil(w.shape[0] / batch_size) for w in windows.values())
        bar = tqdm(total=total, unit="batch", desc="analyze", dynamic_ncols=True)
    n0 = 0
    try:
        for tokens_BS1, labels_BS1 in window_batches(windows, batch_size):
            x, y = tokens_BS1[:, :-1].to(device), tokens_BS1[:, 1:].to(device)
            labels = labels_BS1[:, :-1].to(device)
            d, (B, S) = int(labels_BS1[0, 0]), x.shape
            set_routing_inputs(model, labels=labels)
            logits = _logits(model, x)
            loss[d] += F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), reduction="sum")
            counted[d] += y.numel()
            for layer, experts_TK in enumerate(_experts_per_layer(model)):
                hot_TE = torch.zeros(B * S, E, device=device)
                hot_TE.scatter_(1, experts_TK, 1.0)
                coact[layer] += (hot_TE.T @ hot_TE).double()
                seq_counts[layer, n0 : n0 + B] = hot_TE.view(B, S, E).sum(1).int()
            seq_domain[n0 : n0 + B] = d
            n0 += B
            if bar is not None:
                bar.update(1)
        sums = stats.read(model, reset=True)
    finally:
        stats.disable(model)
        set_routing_inputs(model, labels=None)
        if bar is not None:
            bar.close()
    return Collected(
        sums,
        loss.cpu().numpy(),
        counted.numpy(),
        coact.cpu().numpy(),
        seq_counts.cpu().numpy(),
        seq_domain.numpy(),
    )


def coactivation_matrix(pairs_LEE: np.ndarray) -> np.ndarray:
    """``metrics.coactivation`` from accumulated pair counts: row i divided by the selections
    of i (its diagonal); rows of never-selected experts stay 0."""
    single = np.diagonal(pairs_LEE, axis1=1, axis2=2)
    return pairs_LEE / np.where(single > 0, single, 1.0)[:, :, None]


def probe_values(
    model: torch.nn.Module, windows: dict[str, torch.Tensor], *, seed: int = 0
) -> dict[str, float]:
    """The trainer's probes (``moe_testbed.probes.run_probes``) on the first ``max(1, 32 // D)``
    windows of every domain; the replacement pool of a domain is the set of token ids in its
    analysed windows."""
    per = max(1, 32 // len(windows))
    tokens = torch.cat([w[:per, :-1] for w in windows.values()])
    labels = torch.cat([torch.full_like(w[:per, :-1], d) for d, w in enumerate(windows.values())])
    pools = {d: torch.unique(w) for d, w in enumerate(windows.values())}
    device = routing_blocks(model)[0].device

    @torch.no_grad()
    def route(tok: torch.Tensor, lab: torch.Tensor) -> list[torch.Tensor]:
        captured_routing(model, clear=True)
        _logits(model, tok.to(device))
        return [e.cpu() for e in _experts_per_layer(model)]

    num_experts = routing_blocks(model)[0].num_experts
    gen = torch.Generator().manual_seed(seed)
    result = probes.run_probes(route, tokens, labels, pools, num_experts=num_experts, generator=gen)
    return result.record


# ----------------------------------------------------------------------------- the verdict


def paradigm_verdict(counts_LDE: np.ndarray) -> dict[str, Any]:
    """Modular vs distributed, by the rule of ``docs/METRICS.md`` ("Paradigm verdict").

    From the layer means of ``domain_isolation`` (DI), ``normalized_effective_rank`` (NER) and
    ``routing_specialization`` (RS) of ``counts_LDE`` (L, D, E): ``modular`` when DI >= 0.5,
    NER >= 0.5 and RS >= log 2 / log E; ``distributed`` when DI < 0.5; ``mixed`` otherwise.
    Returns the verdict, the numbers (layer means and per-layer lists, the effective experts
    per domain ``E ** (1 - RS)``, the thresholds, the layers that pass the modular rule) and a
    one-paragraph ``text``. Raises ValueError as the metrics do (D < 2 with selections...).
    """
    c = np.asarray(counts_LDE)
    E = c.shape[-1]
    di = np.atleast_1d(metrics.domain_isolation(c))
    ner = np.atleast_1d(metrics.normalized_effective_rank(c))
    rs = np.atleast_1d(metrics.routing_specialization(c))
    rs_min = modular_specialization(E)

    def rule(i: float, r: float, s: float) -> str:
        if i < MODULAR_ISOLATION:
            return "distributed"
        return "modular" if r >= MODULAR_RANK and s >= rs_min else "mixed"

    per_layer = [rule(*v) for v in zip(di, ner, rs)]
    m_di, m_ner, m_rs = float(di.mean()), float(ner.mean()), float(rs.mean())
    verdict = rule(m_di, m_ner, m_rs)
    eff = E ** (1.0 - m_rs)
    modular_layers = [i for i, v in enumerate(per_layer) if v == "modular"]
    why = {
        "modular": "domains route to largely separate experts",
        "distributed": "domains share most of their experts (collaboration)",
        "mixed": "domains are isolated but their routing is not concentrated or low-rank",
    }[verdict]
    text = (
        f"Verdict: {verdict} ({why}). Means over the {len(di)} MoE layers: domain isolation "
        f"{m_di:.3f} (modular needs >= {MODULAR_ISOLATION}; a pair of domains shares "
        f"{1 - m_di:.0%} of its routing mass), normalized effective rank {m_ner:.3f} (needs >= "
        f"{MODULAR_RANK}), routing specialization {m_rs:.3f} (needs >= {rs_min:.3f} = log 2 / "
        f"log E: {eff:.1f} of E = {E} experts per domain in effective number, modular needs <= "
        f"{E / 2:g}). Layers meeting the modular rule: "
        f"{', '.join(map(str, modular_layers)) or 'none'} of {len(di)}."
    )
    return {
        "verdict": verdict,
        "text": text,
        "domain_isolation": m_di,
        "normalized_effective_rank": m_ner,
        "routing_specialization": m_rs,
        "effective_experts_per_domain": eff,
        "num_experts": E,
        "thresholds": {
            "domain_isolation": MODULAR_ISOLATION,
            "normalized_effective_rank": MODULAR_RANK,
            "routing_specialization": rs_min,
        },
        "per_layer": {
            "domain_isolation": di.tolist(),
            "normalized_effective_rank": ner.tolist(),
            "routing_specialization": rs.tolist(),
            "verdict": per_layer,
        },
        "modular_layers": modular_layers,
    }


def verdict_markdown(v: dict[str, Any], blocks: list[str]) -> str:
    """``verdict.md``: the paragraph and a per-layer table of the numbers it rests on."""
    from moe_kernels.tables import markdown_table

    p = v["per_layer"]
    rows = [
        [str(i), blocks[i] if i < len(blocks) else "", f"{a:.3f}", f"{b:.3f}", f"{c:.3f}", w]
        for i, (a, b, c, w) in enumerate(
            zip(
                p["domain_isolation"],
                p["normalized_effective_rank"],
                p["routing_specialization"],
                p["verdict"],
            )
        )
    ]
    header = ["layer", "block", "domain isolation", "norm. eff. rank", "routing spec.", "rule"]
    return f"# Paradigm verdict\n\n{v['text']}\n\n" + markdown_table(header, rows) + "\n"


# ----------------------------------------------------------------------------- the command


def analysis_record(col: Collected, domains: list[str]) -> dict[str, float]:
    """The metrics record of one pass, named like the trainer's evaluation record."""
    rec: dict[str, float] = {}
    losses = col.loss_D / np.maximum(col.tokens_D, 1)
    for d, domain in enumerate(domains):
        rec[names.name("loss", split="val", domain=domain)] = float(losses[d])
        rec[names.name("ppl", split="val", domain=domain)] = math.exp(min(float(losses[d]), 50))
    rec[names.name("loss", split="val")] = float(np.mean(losses))
    rec[names.name("ppl", split="val")] = math.exp(min(float(np.mean(losses)), 50))
    rec.update(metrics.summarize_stats(col.sums, scope=None, split="val"))
    return rec


def analyze(
    model: str,
    text: str | DomainText = "sample",
    *,
    out: str | os.PathLike,
    domains: str | list[str] | None = None,
    split: str = "auto",
    tokens: int = 16384,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    seed: int = 0,
    run_probes: bool = True,
    report: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Analyse HF MoE model ``model`` (path or hub name) on ``text`` and write run dir ``out``.

    Args:
        text: a source for :func:`moe_testbed.domain_text.load_text` (or loaded text);
            ``domains``, ``split`` and ``seed`` as there.
        tokens: predicted tokens per domain (``tokens // seq_len`` windows, at least one).
        seq_len: S; None = ``min(512, max_position_embeddings)``.
        device: ``auto`` (GPU when available), ``cpu``, ``cuda``, ...
    Returns ``{"record": metrics record, "verdict": paradigm_verdict(...), "out": Path}``.
    Raises FileNotFoundError / ValueError as the loaders and metrics do.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens: expected an int >= 1 (tokens per domain), got {tokens!r}")
    dev = resolve_device(device)
    text = (
        text if isinstance(text, DomainText) else load_text(text, domains, split=split, seed=seed)
    )
    hf_model, tokenizer, blocks = load_hf_model(model, device=dev)
    S = seq_len or min(512, int(getattr(hf_model.config, "max_position_embeddings", 512)))
    encode, sep = hf_encoder(tokenizer)
    windows = domain_windows(text, encode, sep, S, max(1, tokens // S), spread=True)
    col = collect(hf_model, windows, batch_size=batch_size, progress=progress)
    record: dict[str, Any] = {"step": 0, "tokens": int(col.tokens_D.sum())}
    record.update(analysis_record(col, text.domains))
    if run_probes:
        record.update(probe_values(hf_model, windows, seed=seed))
    verdict = paradigm_verdict(col.sums["requested_LDE"])
    rd = RunDir(out)
    rd.path.mkdir(parents=True, exist_ok=True)
    config = {
        "name": f"analyze {Path(str(model)).name}",
        "analyze": {
            "model": str(model),
            "model_type": hf_model.config.model_type,
            "blocks": blocks,
            "num_experts": routing_blocks(hf_model)[0].num_experts,
            "top_k": routing_blocks(hf_model)[0].top_k,
            "text": text.source,
            "split": text.split,
            "domains": text.domains,
            "seq_len": S,
            "windows_per_domain": {d: int(w.shape[0]) for d, w in windows.items()},
            "batch_size": batch_size,
            "device": str(dev),
            "dtype": str(next(hf_model.parameters()).dtype).replace("torch.", ""),
            "seed": seed,
        },
    }
    rd.write_config(config)
    if rd.metrics_path.exists():
        rd.metrics_path.unlink()
    rd.append_metrics(record)
    sums = col.sums
    rd.write_counts(
        0,
        requested_LDE=sums["requested_LDE"],
        kept_LDE=sums["kept_LDE"],
        weight_sum_LDE=sums["weight_sum_LDE"],
        domains=text.domains,
        coactivation_LEE=coactivation_matrix(col.coactivation_LEE).astype(np.float32),
        seq_counts_LNE=col.seq_counts_LNE,
        seq_domain_N=col.seq_domain_N,
    )
    atomic_write_json(rd.path / "verdict.json", verdict)
    (rd.path / "verdict.md").write_text(verdict_markdown(verdict, blocks), encoding="utf-8")
    if report:
        from moe_testbed.report import make_report

        make_report(rd.path)
    return {"record": record, "verdict": verdict, "out": rd.path}
