"""The training loop: AdamW, warmup + cosine, gradient accumulation, clipping, eval, checkpoints.

One optimizer step (``train`` below) is::

    for each of grad_accum micro-batches:        # DDP gradient sync only on the last one
        logits = model(tokens, labels)            # MoE layers see domain labels and token ids
        loss = cross_entropy + aux_losses(model)  # aux/z losses at the configured scope
        (loss / grad_accum).backward()
    clip; optimizer.step(); scheduler.step(); update_routers(model)

Routing statistics accumulate on device inside the MoE layers and are read (one host sync)
only at log and eval steps. Checkpoints hold everything the next step depends on (model,
optimizer, scheduler, data position, every RNG, drained statistics), are written atomically,
and a resumed run continues bit-identically on CPU.

Legend: B micro-batch, S positions, V vocabulary, L MoE layers, D domains, E experts.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_testbed import metrics
from moe_testbed.config import RunConfig, save
from moe_testbed.model import MoETransformer, route_experts
from moe_testbed.rundir import RunDir, atomic_write_bytes, last_values

CKPT = "last.pt"


# ----------------------------------------------------------------------------- setup


def _dist() -> tuple[int, int]:
    """(rank, world) -- initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _device(cfg: RunConfig, rank: int) -> torch.device:
    if cfg.train.device != "auto":
        return torch.device(cfg.train.device)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _autocast(cfg: RunConfig, device: torch.device):
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, cfg: RunConfig) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warmup, cosine decay."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    # Weight decay on matrices only: norms and biases are not shrunk toward zero.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
    )


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from moe_kernels.routers import Router

    return [m for m in model.modules() if isinstance(m, Router)]


def _router_draws(model: torch.nn.Module) -> list[int]:
    # A random router's weight is a non-persistent buffer fixed by (seed, number of draws); the
    # draw count is not in the state dict, so the checkpoint carries it.
    return [int(getattr(r, "_draws", 0)) for r in _routers(model)]


@torch.no_grad()
def _set_router_draws(model: torch.nn.Module, draws: list[int]) -> None:
    for r, n in zip(_routers(model), draws):
        if getattr(r, "kind", None) == "random":
            r._draws = n
            r.weight_ED.copy_(r._draw(r.weight_ED.device))


# ----------------------------------------------------------------------------- statistics


class StatsWindow:
    """Routing counts read from the MoE layers, summed on the host between log steps.

    ``drain`` moves the device accumulators here (reset); the window is part of the checkpoint
    so a resumed run logs the same numbers.
    """

    KEYS = (
        "requested_LDE",
        "kept_LDE",
        "weight_sum_LDE",
        "entropy_sum_L",
        "max_prob_sum_L",
        "tokens_L",
    )

    def __init__(self, model: torch.nn.Module, enabled: bool, all_reduce: bool) -> None:
        self.model, self.enabled, self.all_reduce = model, enabled, all_reduce
        self.sums: dict[str, np.ndarray] = {}
        self.bias_LE: np.ndarray | None = None

    def read(self, all_reduce: bool | None = None) -> dict[str, np.ndarray]:
        from moe_kernels import stats

        reduce = self.all_reduce if all_reduce is None else all_reduce
        return stats.read(self.model, reset=True, all_reduce=reduce)

    def drain(self) -> None:
        if self.enabled:
            self.add(self.read())

    def add(self, r: dict[str, Any]) -> None:
        for k in self.KEYS:
            v = np.asarray(r[k], dtype=np.float64 if "sum" in k else np.int64)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        if r.get("bias_LE") is not None:
            self.bias_LE = np.asarray(r["bias_LE"], dtype=np.float32)

    def take(self) -> dict[str, np.ndarray]:
        out, self.sums = self.sums, {}
        return out


def routing_metrics(
    s: dict[str, np.ndarray], scope: str | None, prefix: str, groups: list[list[int]] | None
) -> dict[str, float]:
    """metrics.summarize of a window plus router entropy/confidence; {} for an empty window."""
    if not s or s["requested_LDE"].sum() == 0:
        return {}
    out = metrics.summarize(
        s["requested_LDE"], kept_LDE=s["kept_LDE"], groups=groups, scope=scope, prefix=prefix
    )
    tokens = np.maximum(s["tokens_L"], 1)
    for name, key in (("router_entropy", "entropy_sum_L"), ("router_confidence", "max_prob_sum_L")):
        values = s[key] / tokens
        for layer, v in enumerate(values):
            out[f"{prefix}layer{layer}/{name}"] = float(v)
        out[f"{prefix}all/{name}"] = float(values.mean())
    return out


# ----------------------------------------------------------------------------- data


class RunData:
    """What the trainer needs from a corpus.

    ``domains`` (names), ``vocab_size``; ``next_batch() -> (tokens_BS1, labels_BS1)`` int64 of
    S + 1 positions (inputs and shifted targets); ``state_dict``/``load_state_dict`` for the
    exact data position; ``val_batches(d)`` the fixed validation batches of domain d;
    ``pools()`` domain -> token ids, for the context-perturbation probe.
    """

    domains: list[str]
    vocab_size: int

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def val_batches(self, domain: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def pools(self) -> dict[int, torch.Tensor]:
        raise NotImplementedError


class SyntheticData(RunData):
    """Eight synthetic domains (``--data-dir synthetic``): tests and benchmarks without a corpus.

    Domain d emits a noisy first-order Markov chain over its own slice of the vocabulary plus a
    shared slice, so domains are distinguishable and next tokens are learnable. Batch n of rank
    r is drawn from a generator seeded by (seed, n * world + r): the position is one integer.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        batch: int,
        seed: int,
        rank: int,
        world: int,
        eval_batches: int,
        num_domains: int = 8,
    ) -> None:
        self.domains = [f"synthetic{d}" for d in range(num_domains)]
        self.vocab_size, self.seq_len, self.batch = vocab_size, seq_len, batch
        self.seed, self.rank, self.world, self.eval_batches = seed, rank, world, eval_batches
        self.n = 0
        g = np.random.default_rng(seed)
        width = vocab_size // (num_domains + 1)  # one slice per domain + one shared slice
        self.slices = [np.arange(d * width, (d + 1) * width) for d in range(num_domains + 1)]
        self.next_tok = [
            g.choice(np.concatenate([sl, self.slices[-1]]), size=vocab_size)
            for sl in self.slices[:-1]
        ]

    def _batch(self, key: int, batch: int, domain: int | None = None):
        g = np.random.default_rng([self.seed, key])
        dom = (
            g.integers(len(self.domains), size=batch) if domain is None else np.full(batch, domain)
        )
        toks = np.empty((batch, self.seq_len + 1), dtype=np.int64)
        for b, d in enumerate(dom):
            pool = np.concatenate([self.slices[d], self.slices[-1]])
            t = g.choice(pool)
            noise = g.random(self.seq_len + 1) < 0.2
            rand = g.choice(pool, size=self.seq_len + 1)
            for i in range(self.seq_len + 1):
                toks[b, i] = t
                t = rand[i] if noise[i] else self.next_tok[d][t]
        labels = np.repeat(dom[:, None], self.seq_len + 1, axis=1)
        return torch.from_numpy(toks), torch.from_numpy(labels.astype(np.int64))

    def next_batch(self):
        out = self._batch(self.n * self.world + self.rank, self.batch)
        self.n += 1
        return out

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = int(state["n"])

    def val_batches(self, domain):
        return [
            self._batch(10**9 + domain * 1000 + i, self.batch, domain)
            for i in range(self.eval_batches)
        ]

    def pools(self):
        return {
            d: torch.from_numpy(np.concatenate([self.slices[d], self.slices[-1]]))
            for d in range(len(self.domains))
        }


class CorpusData(RunData):
    """The data layer's corpus: ``data_dir`` None = the sample shipped in the package."""

    def __init__(self, cfg: RunConfig, rank: int, world: int) -> None:
        from moe_testbed import data

        t, d, seq = cfg.train, cfg.data, cfg.model.seq_len
        subset = [x.strip() for x in d.domains.split(",")] if d.domains else None
        corpus = data.load_corpus(d.data_dir or "sample", subset, seed=t.seed)
        tok = data.train_tokenizer(corpus, vocab_size=d.tokenizer_vocab)
        self.train_set = data.build_dataset(corpus, tok, seq_len=seq, split="train")
        self.val_set = data.build_dataset(corpus, tok, seq_len=seq, split="validation")
        self.domains = list(self.train_set.domains)
        self.vocab_size = int(self.train_set.vocab_size)
        self.loader = data.BatchLoader(
            self.train_set, t.micro_batch_size, seed=t.seed, rank=rank, world_size=world
        )
        per_domain = d.eval_batches * t.micro_batch_size
        seqs = data.validation_sequences(self.val_set, max_per_domain=per_domain)
        self._val = [
            [(x, torch.full_like(x, i)) for x in seqs[name].split(t.micro_batch_size)]
            for i, name in enumerate(self.domains)
        ]
        self._pools: dict[int, torch.Tensor] | None = None

    def next_batch(self):
        out = self.loader.batch(self.loader.step)
        self.loader.step += 1
        return out

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)

    def val_batches(self, domain):
        return self._val[domain]

    def pools(self):
        if self._pools is None:  # the domain's own vocabulary: distinct ids of its train stream
            self._pools = {
                i: torch.from_numpy(
                    np.unique(np.asarray(self.train_set.tokens[n][:200_000])).astype(np.int64)
                )
                for i, n in enumerate(self.domains)
            }
        return self._pools


def build_data(cfg: RunConfig, rank: int, world: int) -> RunData:
    """The run's corpus: ``synthetic``, or the data layer's corpus (``None`` = shipped sample)."""
    t, d = cfg.train, cfg.data
    if d.data_dir == "synthetic":
        vocab = cfg.model.vocab_size or 512
        return SyntheticData(
            vocab, cfg.model.seq_len, t.micro_batch_size, t.seed, rank, world, d.eval_batches
        )
    return CorpusData(cfg, rank, world)


# ----------------------------------------------------------------------------- probes


def _probe_batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """First validation batch of every domain, a few sequences each: the fixed probe tokens."""
    per = max(1, 32 // len(trainer.data.domains))
    toks, labs = zip(
        *[
            (b[0][0][:per], b[0][1][:per])
            for b in (trainer.data.val_batches(d) for d in range(len(trainer.data.domains)))
        ]
    )
    return torch.cat(toks)[:, :-1], torch.cat(labs)[:, :-1]


def run_probes(trainer: Trainer) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Stiffness under context perturbation, n-gram expertise (n=1, 2) and co-activation."""
    from moe_testbed import probes

    tokens, labels = _probe_batch(trainer)
    tokens, labels = tokens.to(trainer.device), labels.to(trainer.device)
    route = lambda tok, lab: route_experts(trainer.raw, tok, lab)  # noqa: E731
    rec: dict[str, float] = {}
    gen = torch.Generator().manual_seed(trainer.cfg.train.seed + trainer.step)
    stiff = probes.stiffness_under_perturbation(
        route, tokens, labels, trainer.data.pools(), generator=gen
    )
    experts = [e.cpu() for e in route(tokens, labels)]
    trainer.probe_state.setdefault("routes", {})[trainer.step] = np.stack(
        [e.numpy() for e in experts]
    ).astype(np.int16)
    values: dict[str, list[float]] = {"stiffness": list(stiff)}
    for n in (1, 2):
        grams = probes.ngram_ids(tokens.cpu(), n).reshape(-1)
        values[f"ngram_expertise_n{n}"] = [metrics.ngram_expertise(grams, e) for e in experts]
    num_e = trainer.cfg.moe.num_experts
    coact = np.stack([metrics.coactivation(e, num_e) for e in experts])
    off = ~np.eye(num_e, dtype=bool)
    values["coactivation_offdiag_max"] = [float(c[off].max()) for c in coact]
    for name, per_layer in values.items():
        for layer, v in enumerate(per_layer):
            rec[f"probe/layer{layer}/{name}"] = float(v)
        rec[f"probe/all/{name}"] = float(np.mean(per_layer))
    return rec, {"coactivation_LEE": coact.astype(np.float32)}


def finish_saturation(trainer: Trainer) -> None:
    """Router saturation: each eval's probe routing against the final one -> saturation.json."""
    from moe_testbed import probes
    from moe_testbed.rundir import atomic_write_json

    routes = trainer.probe_state.get("routes", {})
    if not routes:
        return
    final = routes[max(routes)]
    out = {
        str(step): probes.saturation(list(r), list(final)).tolist()
        for step, r in sorted(routes.items())
    }
    atomic_write_json(trainer.run_dir.path / "saturation.json", out)


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Holds the run's state; ``run()`` trains to ``cfg.train.steps``, resuming if it can."""

    def __init__(self, cfg: RunConfig, out: str | os.PathLike, *, resume: bool = True) -> None:
        self.cfg, self.rank, self.world = cfg, *_dist()
        self.device = _device(cfg, self.rank)
        t = cfg.train
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(t.seed)  # same init on every rank; data differs by rank
        np.random.seed(t.seed)
        random.seed(t.seed)
        self.run_dir = RunDir(out)
        self.data: RunData = build_data(cfg, self.rank, self.world)
        if cfg.model.vocab_size <= 0:
            cfg.model.vocab_size = self.data.vocab_size
        if cfg.moe.router == "reference" and cfg.moe.num_groups is None:
            cfg.moe.num_groups = len(self.data.domains)  # one expert group per domain
        self.raw = MoETransformer(cfg.model, cfg.moe).to(self.device)
        self.groups = self._reference_groups()
        self.model: torch.nn.Module = self.raw
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.raw)
        if t.compile:
            self.model = torch.compile(self.model)
        self.optimizer = _optimizer(self.raw, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(s, cfg))
        if t.stats:
            from moe_kernels import stats

            stats.enable(self.raw, num_labels=len(self.data.domains))
        self.window = StatsWindow(self.raw, t.stats, all_reduce=self.world > 1)
        self.step = 0
        self.tokens = 0
        self.loss_sum = torch.zeros((), device=self.device)  # training loss since last log
        self.loss_count = 0
        self.probe_state: dict[str, Any] = {}
        if resume and (self.run_dir.checkpoints_dir / CKPT).exists():
            self.load()
        elif self.rank == 0:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            self.run_dir.write_config(cfg.to_dict())
            save(cfg, self.run_dir.path / "config.yaml")
            if self.run_dir.metrics_path.exists():
                self.run_dir.metrics_path.unlink()

    def _reference_groups(self) -> list[list[int]] | None:
        if self.cfg.moe.router != "reference":
            return None
        return [list(g) for g in self.raw.moe_layers()[0].reference_groups()]

    # -- one optimizer step
    def train_step(self) -> float:
        t = self.cfg.train
        self.model.train()
        log_step = t.log_every and (self.step + 1) % t.log_every == 0
        per_micro: list[dict[str, np.ndarray]] = []
        if log_step:
            self.window.drain()  # earlier steps -> window; this step is read per micro-batch
        total = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            tokens_BS1, labels_BS1 = self.data.next_batch()
            tokens_BS1, labels_BS1 = tokens_BS1.to(self.device), labels_BS1.to(self.device)
            inputs, targets, labels = tokens_BS1[:, :-1], tokens_BS1[:, 1:], labels_BS1[:, :-1]
            sync = micro == t.grad_accum - 1 or self.world == 1
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                with _autocast(self.cfg, self.device):
                    logits = self.model(inputs, labels)
                    ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
                    loss = ce + self._aux()
                (loss / t.grad_accum).backward()
            total += ce.detach() / t.grad_accum
            if log_step and t.stats:
                per_micro.append(self.window.read(all_reduce=False))  # this rank's micro-batch
        if t.grad_clip > 0:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), t.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        from moe_kernels import update_routers

        update_routers(self.raw)
        self.step += 1
        self.tokens += t.grad_accum * inputs.numel() * self.world
        self.loss_sum += total
        self.loss_count += 1
        if log_step:
            self.log(per_micro)
        return float(total) if log_step else float("nan")

    def _all_ranks(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Sum host arrays over data-parallel ranks (identity on one rank)."""
        if self.world == 1:
            return arrays
        out = {}
        for k, v in arrays.items():
            t = torch.from_numpy(np.ascontiguousarray(v))
            dist.all_reduce(t)
            out[k] = t.numpy()
        return out

    def _aux(self) -> torch.Tensor:
        from moe_kernels import aux_losses

        return aux_losses(self.raw)

    # -- logging
    def log(self, per_micro: list[dict[str, np.ndarray]]) -> None:
        loss = self.loss_sum / self.loss_count
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        rec: dict[str, Any] = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": float(loss),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(getattr(self, "last_grad_norm", float("nan"))),
            "aux_loss": float(self._aux().detach()),
        }
        self.loss_sum.zero_()
        self.loss_count = 0
        # Balance is logged at micro-batch and global-batch scope whatever the training scope
        # (sequence-scope MaxVio would need per-sequence counts, which the layers do not keep).
        if per_micro:
            step_counts = self._all_ranks(
                {k: sum(r[k] for r in per_micro) for k in StatsWindow.KEYS}
            )
            mv_micro = np.mean(
                [
                    metrics.max_violation(r["requested_LDE"])
                    for r in per_micro
                    if r["requested_LDE"].sum() > 0
                ],
                axis=0,
            )
            mv_global = metrics.max_violation(step_counts["requested_LDE"])
            rec["train/all/max_violation@micro_batch"] = float(np.mean(mv_micro))
            rec["train/all/max_violation@global_batch"] = float(np.mean(mv_global))
            for layer, (a, b) in enumerate(zip(np.atleast_1d(mv_micro), np.atleast_1d(mv_global))):
                rec[f"train/layer{layer}/max_violation@micro_batch"] = float(a)
                rec[f"train/layer{layer}/max_violation@global_batch"] = float(b)
            self.window.add(step_counts)
            # Window metrics are over all tokens since the last log: label them by the window.
            rec.update(routing_metrics(self.window.take(), "log_window", "train/", self.groups))
            if self.window.bias_LE is not None:
                rec["bias_abs_max"] = float(np.abs(self.window.bias_LE).max())
        self.last_record = rec
        if self.rank == 0:
            self.run_dir.append_metrics(rec)

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Per-domain validation loss and routing metrics of the validation tokens."""
        self.window.drain()  # keep training counts out of the validation counts
        self.model.eval()
        rec: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
        losses = []
        for d, name in enumerate(self.data.domains):
            total, n = 0.0, 0
            for tokens_BS1, labels_BS1 in self.data.val_batches(d):
                tokens_BS1, labels_BS1 = tokens_BS1.to(self.device), labels_BS1.to(self.device)
                with _autocast(self.cfg, self.device):
                    logits = self.raw(tokens_BS1[:, :-1], labels_BS1[:, :-1])
                total += float(
                    F.cross_entropy(
                        logits.flatten(0, 1), tokens_BS1[:, 1:].reshape(-1), reduction="sum"
                    )
                )
                n += tokens_BS1[:, 1:].numel()
            rec[f"val/{name}/loss"] = total / max(n, 1)
            rec[f"val/{name}/ppl"] = math.exp(min(rec[f"val/{name}/loss"], 50))
            losses.append(rec[f"val/{name}/loss"])
        rec["val/loss"] = float(np.mean(losses))
        rec["val/ppl"] = math.exp(min(rec["val/loss"], 50))
        extra: dict[str, np.ndarray] = {}
        if self.cfg.train.stats:
            from moe_kernels import stats

            val = stats.read(self.raw, reset=True, all_reduce=False)  # every rank: same batches
            window = StatsWindow(self.raw, True, False)
            window.add(val)
            rec.update(routing_metrics(window.sums, None, "val/", self.groups))
        if self.cfg.train.probes:
            probe_rec, extra = run_probes(self)
            rec.update(probe_rec)
            if self.cfg.train.stats:
                stats.read(self.raw, reset=True)  # probe forwards are not validation counts
        if self.cfg.train.stats and self.rank == 0:
            self.run_dir.write_counts(
                self.step,
                requested_LDE=val["requested_LDE"],
                kept_LDE=val["kept_LDE"],
                weight_sum_LDE=val["weight_sum_LDE"],
                bias_LE=val.get("bias_LE"),
                domains=self.data.domains,
                groups=self.groups,
                **extra,
            )
        self.model.train()
        if self.rank == 0:
            self.run_dir.append_metrics(rec)
        return rec

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "model": self.raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "rng": _rng_state(),
            "stats_window": {"sums": self.window.sums, "bias_LE": self.window.bias_LE},
            "loss_sum": self.loss_sum.clone(),
            "loss_count": self.loss_count,
            "probe_state": self.probe_state,
            "router_draws": _router_draws(self.raw),
            "config": self.cfg.to_dict(),
        }

    def save(self) -> None:
        self.window.drain()  # device accumulators -> host window (saved below)
        state = self.state_dict()
        if self.world > 1:
            # Each rank has its own data position and RNG; rank 0 also writes the shared rest.
            path = self.run_dir.checkpoints_dir / f"rank{self.rank}.pt"
            self._write(path, {"data": state["data"], "rng": state["rng"]})
            dist.barrier()
        if self.rank == 0:
            self._write(self.run_dir.checkpoints_dir / CKPT, state)
        if self.world > 1:
            dist.barrier()

    @staticmethod
    def _write(path: Path, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path, buf.getvalue())

    def load(self) -> None:
        state = torch.load(
            self.run_dir.checkpoints_dir / CKPT, map_location=self.device, weights_only=False
        )
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens = state["step"], state["tokens"]
        if self.world > 1:
            state.update(
                torch.load(self.run_dir.checkpoints_dir / f"rank{self.rank}.pt", weights_only=False)
            )
        self.data.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        self.window.sums = state["stats_window"]["sums"]
        self.window.bias_LE = state["stats_window"]["bias_LE"]
        self.loss_sum = state["loss_sum"].to(self.device)
        self.loss_count = state["loss_count"]
        self.probe_state = state["probe_state"]
        _set_router_draws(self.raw, state["router_draws"])
        if self.rank == 0:
            self.run_dir.truncate_metrics(self.step)

    # -- the loop
    def run(self) -> dict[str, Any]:
        t = self.cfg.train
        if self.rank == 0 and self.step == 0:
            self.print_summary()
        bar = None
        if t.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, unit="step", dynamic_ncols=True)
        tic, tokens0 = time.perf_counter(), self.tokens
        while self.step < t.steps:
            self.train_step()
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                self.evaluate()
            if t.ckpt_every and (self.step % t.ckpt_every == 0 or self.step == t.steps):
                self.save()
            if bar is not None:
                bar.update(1)
                if t.log_every and self.step % t.log_every == 0:
                    rate = (self.tokens - tokens0) / (time.perf_counter() - tic)
                    r = self.last_record
                    bar.set_postfix_str(
                        f"tok/s={rate:,.0f} loss={r['loss']:.3f} "
                        f"util={r.get('train/all/utilization@log_window', float('nan')):.3f} "
                        f"spec={r.get('train/all/specialization_score', float('nan')):.3f}"
                    )
        if bar is not None:
            bar.close()
        if t.probes and self.rank == 0:
            finish_saturation(self)
        return last_values(self.run_dir.read_metrics()) if self.rank == 0 else {}

    def print_summary(self) -> None:
        n = self.raw.num_params()
        t, m = self.cfg.train, self.cfg.model
        print(
            f"moe-testbed: preset={self.cfg.preset} router={self.cfg.moe.router} "
            f"balance={self.cfg.moe.balance} scope={self.cfg.moe.scope} "
            f"E={self.cfg.moe.num_experts} k={self.cfg.moe.top_k}\n"
            f"  params: total {n['total'] / 1e6:.2f}M, active {n['active'] / 1e6:.2f}M per token; "
            f"train FLOPs/token {n['flops_per_token'] / 1e6:.1f}M\n"
            f"  tokens/step {t.micro_batch_size * m.seq_len * t.grad_accum * self.world:,}"
            f" ({self.world} rank(s) x {t.grad_accum} micro-batches); device {self.device}; "
            f"domains {len(self.data.domains)}; out {self.run_dir.path}",
            flush=True,
        )


def train(cfg: RunConfig, out: str | os.PathLike, *, resume: bool = True) -> dict[str, Any]:
    """Train (or resume) a run in ``out``; returns the last logged value of every metric."""
    trainer = Trainer(cfg, out, resume=resume)
    try:
        return trainer.run()
    finally:
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
