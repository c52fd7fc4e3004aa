"""The training loop: AdamW, warmup + cosine, gradient accumulation, clipping, eval, checkpoints.

One optimizer step (``Trainer.train_step``) is::

    for each of grad_accum micro-batches:        # DDP gradient sync only on the last one
        logits = model(tokens, labels)            # MoE layers see domain labels and token ids
        loss = cross_entropy + aux_losses(model)  # aux/z losses at the configured scope
        (loss / grad_accum).backward()
    clip; optimizer.step(); scheduler.step(); update_routers(model)

Under torchrun the run is data parallel (DDP), or with ``--expert-parallel M`` expert parallel
over groups of M ranks and data parallel across them (``moe_kernels.parallel``: DDP for the
replicated parameters, expert gradients reduced over the data-parallel replicas, the gradient
norm over every shard). Routing statistics accumulate on device inside the MoE layers and are
read (one host sync) only at log and eval steps. Checkpoints (``moe_testbed.checkpoint``) hold
everything the next step depends on and a resumed run continues bit-identically on CPU. Data
comes from ``moe_testbed.sources``; metric names and the places records go from
``moe_testbed.logging``.

Legend: B micro-batch, S positions, V vocabulary, L MoE layers, D domains, E experts.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_kernels import aux_losses, parallel, stats, update_routers
from moe_testbed import checkpoint, cpuload, evaluation, metrics, probes, runstart, sinks
from moe_testbed import logging as names
from moe_testbed.config import RunConfig, save, validate
from moe_testbed.model import route_experts
from moe_testbed.rundir import RunDir, atomic_write_json, last_values
from moe_testbed.runtime import (
    StatsWindow,
    autocast_for,
    init_dist,
    lr_at,
    make_optimizer,
    pick_device,
    seed_everything,
)
from moe_testbed.sources import RunData, build_data

# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Holds the run's state; ``run()`` trains to ``cfg.train.steps``, resuming if it can.

    The constructor validates ``cfg``, takes ``out``'s lock (rank 0) and resumes or starts over
    (``checkpoint.open_run``); :meth:`close` releases the lock. Raises what :func:`train`
    raises, and ImportError (naming the extra) when ``cfg.train.tensorboard`` is set and the
    ``tensorboard`` package is missing.
    """

    def __init__(
        self,
        cfg: RunConfig,
        out: str | os.PathLike,
        *,
        resume: bool = True,
        allow_config_change: bool = False,
    ) -> None:
        validate(cfg)  # every field, and what the run needs from this machine: before any work
        if cfg.model.dense != "none":  # a dense baseline: no routing to count or probe
            cfg.train.stats = cfg.train.probes = False
        self.cfg, self.rank, self.world = cfg, *init_dist(cfg.train.dist_timeout)
        self.device = pick_device(cfg, self.rank)
        self.run_dir = RunDir(out)
        self.run_lock = runstart.lock(self.run_dir) if self.rank == 0 else None
        try:
            loaded, changes = checkpoint.open_run(
                self.run_dir,
                cfg,
                resume=resume,
                allow_config_change=allow_config_change,
                device=self.device,
                rank=self.rank,
                world=self.world,
            )
            self._build(loaded, changes, allow_config_change)
        except BaseException:
            self.close()
            raise

    def _build(
        self, loaded: checkpoint.Loaded | None, changes: dict[str, Any], allow_config_change: bool
    ) -> None:
        cfg, t = self.cfg, self.cfg.train
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(t.seed)
        self.data: RunData = build_data(cfg, self.rank, self.world)
        if cfg.model.vocab_size <= 0:  # validate() checked a given one against the tokenizer
            cfg.model.vocab_size = self.data.vocab_size
        if cfg.moe.router == "reference" and cfg.moe.num_groups is None:
            cfg.moe.num_groups = len(self.data.domains)  # one expert group per domain
        cfg.moe.validate()  # the fields just set in place
        self.raw = evaluation.initial_model(cfg).to(self.device)  # the step-0 model of the seed
        self.groups = self._reference_groups()
        self.model: torch.nn.Module = self.raw
        self.ep = self._expert_parallel(t.expert_parallel)
        self.peers = parallel.Peers.gather() if self.world > 1 else None  # to name failed ranks
        if self.world > 1:
            self.model = parallel.data_parallel(self.raw)  # DDP; sharded experts left out
        if t.compile:
            self.model = torch.compile(self.model)
        self.optimizer = make_optimizer(self.raw, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(s, cfg))
        if t.stats:
            stats.enable(self.raw, num_labels=len(self.data.domains))
        self.window = StatsWindow(self.raw, t.stats, all_reduce=self.world > 1)
        self.step = 0
        self.tokens = 0
        self.loss_sum = torch.zeros((), device=self.device)  # training loss since last log
        self.loss_count = 0
        self.probe_state: dict[str, Any] = {}
        if loaded is not None:
            self._resume(loaded, changes, allow_config_change)
        if self.rank == 0:  # the config this run trains with (resolved), also after a resume
            self.run_dir.write_config(cfg.to_dict())
            save(cfg, self.run_dir.path / "config.yaml")
        self.log = sinks.MetricsLog(
            self.run_dir,
            active=self.rank == 0,
            tensorboard=t.tensorboard,
            resume_step=self.step if loaded is not None else None,
        )

    def _resume(
        self, loaded: checkpoint.Loaded, changes: dict[str, Any], allow_config_change: bool
    ) -> None:
        """Load the checkpoint; a state that does not fit the model, optimizer or data stream
        is a clear error, not a traceback. Recorded in ``history.jsonl``."""
        shard = checkpoint.ExpertShard.of(self.raw, self.optimizer, self.ep)
        checkpoint.place_experts(loaded, device=self.device, world=self.world, experts=shard)
        try:
            self.load_state_dict(loaded.state)
        except (RuntimeError, ValueError, KeyError, IndexError) as err:
            raise checkpoint.ConfigChangeError(
                f"out: the checkpoint {loaded.path} does not fit this run (changed: "
                f"{sorted(changes) or 'nothing'}; {checkpoint.describe_error(err)}); start over "
                "with --no-resume (the old run is moved aside)"
            ) from None
        if self.rank == 0:
            self.run_dir.append_history(
                "resume",
                step=self.step,
                checkpoint=loaded.path.name,
                unreadable=[f"{n}: {why}" for n, why in loaded.skipped],
                changes={k: list(v) for k, v in changes.items()},
                allow_config_change=allow_config_change,
            )

    def close(self) -> None:
        """Release the run directory (idempotent)."""
        if self.run_lock is not None:
            self.run_lock.release()

    def _expert_parallel(self, size: int) -> parallel.EPGroup | None:
        """Shard the experts over groups of ``size`` ranks (None for 1)."""
        if size == 1:
            return None
        if self.world % size:
            raise ValueError(
                f"train.expert_parallel: expected a divisor of the world size {self.world} "
                f"(torchrun --nproc_per_node x --nnodes), got {size}"
            )
        return parallel.expert_parallel(self.raw, parallel.init_mesh(size, self.device.type))

    def _reference_groups(self) -> list[list[int]] | None:
        if self.cfg.moe.router != "reference":
            return None
        return [list(g) for g in self.raw.moe_layers()[0].reference_groups()]

    # -- one optimizer step
    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's mean
        cross-entropy at log steps (NaN otherwise, so no host sync between logs)."""
        t = self.cfg.train
        self.model.train()
        log_step = t.log_every and (self.step + 1) % t.log_every == 0
        per_micro: list[dict[str, np.ndarray]] = []
        if log_step:
            self.window.drain()  # earlier steps -> window; this step is read per micro-batch
        ce_total = torch.zeros((), device=self.device)
        aux_total = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            tokens_BS1, labels_BS1 = self.data.next_batch()
            tokens_BS1, labels_BS1 = tokens_BS1.to(self.device), labels_BS1.to(self.device)
            inputs, targets, labels = tokens_BS1[:, :-1], tokens_BS1[:, 1:], labels_BS1[:, :-1]
            sync = micro == t.grad_accum - 1 or self.world == 1
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                with autocast_for(self.cfg, self.device):
                    logits = self.model(inputs, labels)
                    ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
                    aux = aux_losses(self.raw)
                    loss = ce + aux
                (loss / t.grad_accum).backward()
            ce_total += ce.detach() / t.grad_accum
            aux_total += aux.detach().to(aux_total.device) / t.grad_accum
            if log_step and t.stats:
                per_micro.append(self.window.read(all_reduce=False))  # this rank's micro-batch
        if self.ep is not None:
            parallel.reduce_expert_grads(self.raw)  # over the data-parallel replicas
        if t.grad_clip > 0:
            clip = parallel.clip_grad_norm_ if self.ep else torch.nn.utils.clip_grad_norm_
            self.last_grad_norm = clip(self.raw if self.ep else self.raw.parameters(), t.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_routers(self.raw)
        self.step += 1
        self.tokens += t.grad_accum * inputs.numel() * self.world
        self.loss_sum += ce_total
        self.loss_count += 1
        if log_step:
            self._log_train(per_micro, aux_total)
        return float(ce_total) if log_step else float("nan")

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

    def _log_train(self, per_micro: list[dict[str, np.ndarray]], aux: torch.Tensor) -> None:
        """The log record: mean training loss since the last log, this step's aux loss (mean
        over its micro-batches and ranks), lr, grad norm, balance and routing metrics."""
        means = torch.stack([self.loss_sum / self.loss_count, aux])
        if self.world > 1:
            dist.all_reduce(means)
            means /= self.world
        loss, aux_loss = means.tolist()
        rec: dict[str, Any] = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(getattr(self, "last_grad_norm", float("nan"))),
            "aux_loss": aux_loss,
        }
        if not self.raw.moe_layers():  # a dense baseline has no aux loss, not a zero one
            del rec["aux_loss"]
        self.loss_sum.zero_()
        self.loss_count = 0
        # Balance is logged at micro-batch and global-batch scope whatever the training scope
        # (sequence-scope MaxVio would need per-sequence counts, which the layers do not keep).
        if per_micro:
            step_counts = self._all_ranks(
                {k: sum(r[k] for r in per_micro) for k in StatsWindow.KEYS}
            )
            per_batch = [r["requested_LDE"] for r in per_micro if r["requested_LDE"].sum() > 0]
            mv_micro = np.mean([metrics.max_violation(c) for c in per_batch], axis=0)
            mv_global = metrics.max_violation(step_counts["requested_LDE"])
            for scope, values in (("micro_batch", mv_micro), ("global_batch", mv_global)):
                rec.update(names.layer_values("max_violation", values, split="train", scope=scope))
            self.window.add(step_counts)
            # Window metrics are over all tokens since the last log: label them by the window.
            rec.update(
                metrics.summarize_stats(
                    self.window.take(), scope=names.LOG_WINDOW, split="train", groups=self.groups
                )
            )
            if self.window.bias_LE is not None:
                rec["bias_abs_max"] = float(np.abs(self.window.bias_LE).max())
        self.last_record = rec
        self.log.write(rec)

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Per-domain validation loss and routing metrics of the validation tokens."""
        self.window.drain()  # keep training counts out of the validation counts
        self.model.eval()
        rec: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
        tokens_NS1, domain_N = self.data.val_sequences()
        run = evaluation.forward_pass(self.raw, self.cfg, self.device, tokens_NS1, domain_N)
        losses = run.domain_loss(len(self.data.domains))
        for domain, loss in zip(self.data.domains, losses):
            rec[names.name("loss", split="val", domain=domain)] = loss
            rec[names.name("ppl", split="val", domain=domain)] = math.exp(min(loss, 50))
        rec[names.name("loss", split="val")] = float(np.mean(losses))
        rec[names.name("ppl", split="val")] = math.exp(min(float(np.mean(losses)), 50))
        extra: dict[str, np.ndarray] = {}
        if self.cfg.train.stats:
            val = stats.read(self.raw, reset=True, all_reduce=False)  # every rank: same batches
            window = StatsWindow(self.raw, True, False)
            window.add(val)
            rec.update(
                metrics.summarize_stats(window.sums, scope=None, split="val", groups=self.groups)
            )
        if self.cfg.train.probes:
            rec.update(self._probe(extra))
            if self.cfg.train.stats:
                stats.read(self.raw, reset=True)  # probe forwards are not validation counts
        if self.cfg.train.stats:
            self.log.write_counts(
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
        self.log.write(rec)
        return rec

    def _probe(self, extra: dict[str, np.ndarray]) -> dict[str, float]:
        """Run the probes on the fixed probe tokens; keep the routing for router saturation
        and the co-activation matrices for the counts file (into ``extra``)."""
        tokens, labels = probes.probe_batch(self.data)
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        result = probes.run_probes(
            lambda tok, lab: route_experts(self.raw, tok, lab),
            tokens,
            labels,
            self.data.pools(),
            num_experts=self.cfg.moe.num_experts,
            generator=torch.Generator().manual_seed(self.cfg.train.seed + self.step),
        )
        self.probe_state.setdefault("routes", {})[self.step] = result.routes_LTK
        extra["coactivation_LEE"] = result.coactivation_LEE
        return result.record

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "model": self.raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "rng": checkpoint.rng_state(),
            "stats_window": {"sums": self.window.sums, "bias_LE": self.window.bias_LE},
            "loss_sum": self.loss_sum.clone(),
            "loss_count": self.loss_count,
            "probe_state": self.probe_state,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.data.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        self.window.sums = state["stats_window"]["sums"]
        self.window.bias_LE = state["stats_window"]["bias_LE"]
        self.loss_sum = state["loss_sum"].to(self.device)
        self.loss_count = state["loss_count"]
        self.probe_state = state["probe_state"]
        self._apply_hyperparameters()
        if self.rank == 0:  # what was logged after the checkpoint is redone
            self.run_dir.truncate_metrics(self.step)
            self.run_dir.drop_counts_after(self.step)

    def _apply_hyperparameters(self) -> None:
        """Give the loaded optimizer this config's hyperparameters: the saved ones unless a
        resume changed them (the schedule's lr at the current step is recomputed as the
        scheduler computes it, so an unchanged config resumes bit-identically)."""
        t = self.cfg.train
        self.scheduler.base_lrs = [t.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = t.lr
            group["lr"] = t.lr * lr_at(self.scheduler.last_epoch, self.cfg)
            group["betas"] = (t.beta1, t.beta2)
        self.optimizer.param_groups[0]["weight_decay"] = t.weight_decay  # the matrices' group

    def save(self) -> None:
        self.window.drain()  # device accumulators -> host window (saved below)
        shard = checkpoint.ExpertShard.of(self.raw, self.optimizer, self.ep)
        checkpoint.save(
            self.run_dir, self.state_dict(), rank=self.rank, world=self.world, experts=shard
        )

    # -- the loop
    def run(self) -> dict[str, Any]:
        """Train to ``cfg.train.steps`` (evaluating and checkpointing on schedule); returns the
        last logged value of every metric on rank 0 ({} elsewhere)."""
        t = self.cfg.train
        if self.rank == 0 and self.step == 0:
            self.print_summary()
        bar = None
        if t.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, unit="step", dynamic_ncols=True)
        tic, tokens0 = time.perf_counter(), self.tokens
        try:
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
                        bar.set_postfix_str(f"tok/s={rate:,.0f} " + self._progress_text())
            if bar is not None:
                bar.close()
            if t.probes and self.rank == 0:
                curves = probes.saturation_curves(self.probe_state.get("routes", {}))
                if curves:
                    atomic_write_json(self.run_dir.path / "saturation.json", curves)
            if t.eval_every and self.rank == 0 and self.ep is None:  # expert parallel: evaluate
                record = evaluation.evaluation_record(
                    self.raw, self.cfg, self.data, self.device, self.step, progress=t.progress
                )
                atomic_write_json(self.run_dir.path / evaluation.EVALUATION_FILE, record)
        finally:
            self.log.close()
        return last_values(self.run_dir.read_metrics()) if self.rank == 0 else {}

    def _progress_text(self) -> str:
        r = self.last_record
        util = names.name("utilization", split="train", layer=names.ALL, scope=names.LOG_WINDOW)
        spec = names.name("specialization_score", split="train", layer=names.ALL)
        return (
            f"loss={r['loss']:.3f} util={r.get(util, float('nan')):.3f} "
            f"spec={r.get(spec, float('nan')):.3f}"
        )

    def print_summary(self) -> None:
        n = self.raw.num_params()
        if self.ep is not None:  # count the other EP ranks' experts too
            shard = sum(p.numel() for p in parallel.expert_parameters(self.raw).values())
            n = {**n, "total": n["total"] + (self.ep.size - 1) * shard}
            n["active"] += (self.ep.size - 1) * shard
        t, m = self.cfg.train, self.cfg.model
        print(
            f"moe-testbed: preset={self.cfg.preset} dense={m.dense} router={self.cfg.moe.router} "
            f"balance={self.cfg.moe.balance} scope={self.cfg.moe.scope} "
            f"E={self.cfg.moe.num_experts} k={self.cfg.moe.top_k}\n"
            f"  params: total {n['total'] / 1e6:.2f}M, active {n['active'] / 1e6:.2f}M per token; "
            f"train FLOPs/token {n['flops_per_token'] / 1e6:.1f}M\n"
            f"  tokens/step {t.micro_batch_size * m.seq_len * t.grad_accum * self.world:,}"
            f" ({self.world} rank(s) x {t.grad_accum} micro-batches, expert parallel "
            f"{t.expert_parallel}); device {self.device}; "
            f"domains {len(self.data.domains)}; out {self.run_dir.path}",
            flush=True,
        )
        if self.device.type == "cpu":  # once the run holds its directory and starts
            cpuload.warn_if_oversubscribed()


def train(
    cfg: RunConfig,
    out: str | os.PathLike,
    *,
    resume: bool = True,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Train (or resume) a run in ``out``; returns the last logged value of every metric.

    ``resume``: continue from ``out``'s checkpoint when there is one (else the earlier contents
    of ``out`` are moved to ``out/.previous-<time>/`` first); ``allow_config_change``: resume
    even when ``cfg`` differs from the checkpoint's config in more than ``RESUME_FREE``.
    Raises ConfigError for an invalid config, RunDirError when ``out`` is held by another run
    or unusable, ConfigChangeError when resuming would change the config.
    """
    trainer = Trainer(cfg, out, resume=resume, allow_config_change=allow_config_change)
    peers = trainer.peers
    guard = peers.guard("training", collective=False) if peers else contextlib.nullcontext()
    try:
        with guard:  # a failed collective names the rank that exited
            return trainer.run()
    finally:
        trainer.close()
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
