"""The one training loop shared by every architecture, split into step / evaluate / checkpoint.

Shape legend: B batch tokens, D d_in, F d_sae."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from sae_transfer.errors import UserError
from sae_transfer.sae import SAE, metrics
from sae_transfer.training.config import TrainConfig
from sae_transfer.training.schedules import lr_multiplier, rewarmup_multiplier
from sae_transfer.training.trainers import StepLoss, Trainer, make_trainer
from sae_transfer.training.tricks import DeadTracker, resample_dead_latents

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Everything besides tensors that a resumed run needs (saved as JSON)."""

    step: int = 0  # optimiser steps done
    tokens: int = 0  # tokens trained on
    scale_factor: float = 1.0  # raw activations are multiplied by this before the SAE
    resample_steps: list[int] = field(default_factory=list)  # steps at which latents were resampled
    elapsed_s: float = 0.0  # training wall time so far (excluding I/O setup)


@dataclass
class TrainingRun:
    """An SAE being trained: model, trainer, optimiser, dead-latent tracker and loop state."""

    cfg: TrainConfig
    sae: SAE
    trainer: Trainer
    optimizer: torch.optim.Optimizer
    dead: DeadTracker
    state: LoopState

    @classmethod
    def create(cls, cfg: TrainConfig, sae: SAE, scale_factor: float) -> "TrainingRun":
        """Wrap an initialised SAE (weights in scaled units) for training."""
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, fused=True)
        dead = DeadTracker(sae.d_sae, cfg.dead_window_tokens)
        return cls(cfg, sae, make_trainer(sae, cfg), optimizer, dead, LoopState(scale_factor=scale_factor))

    def current_lr(self) -> float:
        """LR for the next step: schedule × post-resample re-warm-up."""
        cfg, step = self.cfg, self.state.step
        mult = lr_multiplier(step, cfg.total_steps, cfg.lr_warmup_frac, cfg.lr_decay_frac)
        mult *= rewarmup_multiplier(step, self.state.resample_steps, cfg.resample_lr_drop, cfg.resample_rewarmup_steps)
        return cfg.lr * mult


def train_step(run: TrainingRun, raw_BD: torch.Tensor) -> tuple[torch.Tensor, StepLoss]:
    """One optimiser step on a raw batch; returns (scaled batch, its StepLoss).
    Raises UserError naming the step if the loss is not finite (weights are left untouched)."""
    cfg, st = run.cfg, run.state
    lr = run.current_lr()
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    x_BD = raw_BD * st.scale_factor if st.scale_factor != 1.0 else raw_BD
    out = run.trainer.loss(x_BD, st.step, run.dead.dead_mask(), detail=is_log_step(cfg, st.step))
    if not math.isfinite(float(out.loss.detach())):
        raise UserError(
            f"training diverged: loss is {float(out.loss.detach())} at step {st.step} (token {st.tokens}); "
            "the last checkpoint is intact — lower the learning rate or check the activations"
        )
    if not out.grads_done:
        run.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.sae.parameters(), cfg.grad_clip, foreach=True)
    run.optimizer.step()
    run.trainer.after_step()
    run.dead.update(out.fired_F, x_BD.shape[0])
    if out.fire_count_F is not None:
        run.dead.add_counts(out.fire_count_F, x_BD.shape[0])
    st.step += 1
    st.tokens += x_BD.shape[0]
    _maybe_resample(run, x_BD)
    return x_BD, out


def _maybe_resample(run: TrainingRun, x_BD: torch.Tensor) -> None:
    cfg, st = run.cfg, run.state
    every = cfg.resample_every_steps
    if not every or st.step % every or st.step > cfg.resample_until_frac * cfg.total_steps:
        return
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.step)
    n = resample_dead_latents(run.sae, run.dead.dead_mask(), x_BD, run.optimizer, gen)
    if n:  # nothing resampled: no LR drop and re-warm-up
        st.resample_steps.append(st.step)
        log.info("step %d: resampled %d dead latents", st.step, n)


def evaluate(run: TrainingRun, x_BD: torch.Tensor, out: StepLoss) -> dict:
    """One training-log row for the batch just trained on (metrics in scaled units)."""
    st = run.state
    with torch.no_grad():
        return {
            "step": st.step,
            "tokens": st.tokens,
            "lr": run.current_lr(),
            "loss": float(out.loss),
            "mse": float(out.mse),
            "sparsity": float(out.sparsity),
            "l0": float(out.fire_count_F.sum()) / x_BD.shape[0],
            "explained_variance": float(metrics.explained_variance(x_BD, out.x_hat_BD)),
            "explained_variance_legacy": float(metrics.explained_variance_legacy(x_BD, out.x_hat_BD)),
            "dead_fraction": float(run.dead.dead_mask().float().mean()),
            "elapsed_s": st.elapsed_s,
        }


def is_log_step(cfg: TrainConfig, step: int) -> bool:
    """Whether 0-based `step` gets a training-log row (every log_every_steps, and the last)."""
    return step % cfg.log_every_steps == 0 or step == cfg.total_steps - 1


def checkpoint_due(cfg: TrainConfig, tokens_before: int, tokens_after: int) -> bool:
    """True when a checkpoint boundary (every checkpoint_every_tokens) was crossed."""
    every = cfg.checkpoint_every_tokens
    return every > 0 and tokens_before // every != tokens_after // every


def train_loop(
    run: TrainingRun,
    batches: Iterable[torch.Tensor],
    on_log: Callable[[dict], None],
    on_checkpoint: Callable[[TrainingRun], None],
    progress: bool = True,
) -> dict:
    """Train until cfg.total_steps; logs every log_every_steps, checkpoints every
    checkpoint_every_tokens and at the end. Returns the last log row."""
    from tqdm.auto import tqdm

    cfg, st = run.cfg, run.state
    bar = tqdm(total=cfg.total_tokens, initial=st.tokens, unit="tok", unit_scale=True, disable=not progress, smoothing=0.1)
    last_row: dict = {}
    t_last = time.perf_counter()
    it = iter(batches)
    while st.step < cfg.total_steps:
        raw_BD = next(it, None)
        if raw_BD is None:
            raise UserError(f"activation data ran out at step {st.step} of {cfg.total_steps}; lower --tokens or allow more epochs")
        tokens_before = st.tokens
        x_BD, out = train_step(run, raw_BD)
        now = time.perf_counter()
        st.elapsed_s += now - t_last
        t_last = now
        if is_log_step(cfg, st.step - 1):
            last_row = evaluate(run, x_BD, out)
            on_log(last_row)
            bar.set_postfix(l0=f"{last_row['l0']:.1f}", ev=f"{last_row['explained_variance']:.3f}", refresh=False)
        bar.update(x_BD.shape[0])
        if checkpoint_due(cfg, tokens_before, st.tokens) or st.step == cfg.total_steps:
            on_checkpoint(run)
            t_last = time.perf_counter()
    bar.close()
    return last_row
