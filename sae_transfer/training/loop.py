"""The one training loop shared by every architecture, split into step / evaluate / checkpoint.

Shape legend: B batch tokens, D d_in, F d_sae."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sae_transfer.errors import UserError
from sae_transfer.sae import SAE, metrics
from sae_transfer.training.config import TrainConfig
from sae_transfer.training.device import Numerics, resolve_numerics, run_precision
from sae_transfer.training.schedules import lr_multiplier, rewarmup_multiplier
from sae_transfer.training.sources import device_batches
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


class NonFiniteWatch:
    """The first step whose loss was not finite, kept on the device so no step waits for it;
    `check` reads it (one host sync) at logging and checkpoint steps."""

    def __init__(self, device: torch.device):
        self.step_ = torch.full((), -1, dtype=torch.int64, device=device)
        self.loss_ = torch.zeros((), device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        """Remember `step` if `loss` is not finite and no earlier step was (device-side)."""
        first = ~torch.isfinite(loss) & (self.step_ < 0)
        self.step_.copy_(torch.where(first, step, self.step_))
        self.loss_.copy_(torch.where(first, loss.float(), self.loss_))

    def check(self, batch_size: int) -> None:
        """Raise UserError naming the first non-finite step, if any (nothing has been logged or
        checkpointed since it: the last checkpoint is intact)."""
        step = int(self.step_)
        if step >= 0:
            raise UserError(
                f"training diverged: loss is {float(self.loss_)} at step {step} (token {step * batch_size}); "
                "the last checkpoint is intact — lower the learning rate or check the activations"
            )


@dataclass
class TrainingRun:
    """An SAE being trained: model, trainer, optimiser, dead-latent tracker and loop state,
    all on numerics.device (weights and Adam state fp32 whatever the compute dtype)."""

    cfg: TrainConfig
    sae: SAE
    trainer: Trainer
    optimizer: torch.optim.Optimizer
    dead: DeadTracker
    state: LoopState
    numerics: Numerics
    nonfinite: NonFiniteWatch

    @classmethod
    def create(cls, cfg: TrainConfig, sae: SAE, scale_factor: float, numerics: Numerics | None = None) -> TrainingRun:
        """Wrap an initialised SAE (weights in scaled units) for training; moves it to the
        run's device as fp32."""
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        numerics = numerics or resolve_numerics(cfg)
        sae.to(device=numerics.device, dtype=torch.float32)
        optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, fused=True)
        dead = DeadTracker(sae.d_sae, cfg.dead_window_tokens, device=numerics.device)
        trainer = make_trainer(sae, cfg, numerics.sparse_kernels)
        return cls(cfg, sae, trainer, optimizer, dead, LoopState(scale_factor=scale_factor), numerics,
                   NonFiniteWatch(numerics.device))

    def current_lr(self) -> float:
        """LR for the next step: schedule × post-resample re-warm-up."""
        cfg, step = self.cfg, self.state.step
        mult = lr_multiplier(step, cfg.total_steps, cfg.lr_warmup_frac, cfg.lr_decay_frac)
        mult *= rewarmup_multiplier(step, self.state.resample_steps, cfg.resample_lr_drop, cfg.resample_rewarmup_steps)
        return cfg.lr * mult


def train_step(run: TrainingRun, raw_BD: torch.Tensor) -> tuple[torch.Tensor, StepLoss]:
    """One optimiser step on a raw batch (moved to the run's device as fp32 if it is not
    there); returns (scaled batch, its StepLoss). Never waits on the device: a non-finite
    loss is recorded in run.nonfinite, which the loop checks at log and checkpoint steps."""
    cfg, st = run.cfg, run.state
    lr = run.current_lr()
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if raw_BD.device != run.numerics.device or raw_BD.dtype != torch.float32:
        raw_BD = raw_BD.to(run.numerics.device, torch.float32, non_blocking=True)
    x_BD = raw_BD * st.scale_factor if st.scale_factor != 1.0 else raw_BD
    log_step = is_log_step(cfg, st.step)
    dead_F = run.dead.dead_mask() if run.dead.any_dead(exact=log_step) else None  # a host read on log steps only
    out = run.trainer.loss(x_BD, st.step, dead_F, detail=log_step)
    run.nonfinite.record(out.loss.detach(), st.step)
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
    run.nonfinite.check(cfg.batch_size)  # resampling draws from the losses: they must be finite
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.step)
    n = resample_dead_latents(run.sae, run.dead.dead_mask(), x_BD, run.optimizer, gen)
    if n:  # nothing resampled: no LR drop and re-warm-up
        st.resample_steps.append(st.step)
        log.info("step %d: resampled %d dead latents", st.step, n)


def evaluate(run: TrainingRun, x_BD: torch.Tensor, out: StepLoss) -> dict:
    """One training-log row for the batch just trained on (metrics in scaled units)."""
    st = run.state
    with torch.no_grad():
        values = torch.stack([
            out.loss.detach().float(), out.mse.float(), out.sparsity.float(),
            out.fire_count_F.sum().float() / x_BD.shape[0],
            metrics.explained_variance(x_BD, out.x_hat_BD).float(),
            metrics.explained_variance_legacy(x_BD, out.x_hat_BD).float(),
            run.dead.dead_mask().float().mean(),
        ]).tolist()  # one host sync for the whole row
    names = ("loss", "mse", "sparsity", "l0", "explained_variance", "explained_variance_legacy", "dead_fraction")
    return {"step": st.step, "tokens": st.tokens, "lr": run.current_lr(), **dict(zip(names, values)),
            "elapsed_s": st.elapsed_s}


def is_log_step(cfg: TrainConfig, step: int) -> bool:
    """Whether 0-based `step` gets a training-log row (every log_every_steps, and the last)."""
    return step % cfg.log_every_steps == 0 or step == cfg.total_steps - 1


def checkpoint_due(cfg: TrainConfig, tokens_before: int, tokens_after: int) -> bool:
    """True when a checkpoint boundary (every checkpoint_every_tokens) was crossed."""
    every = cfg.checkpoint_every_tokens
    return every > 0 and tokens_before // every != tokens_after // every


class Loop:
    """Steps one run towards cfg.total_steps: logs every log_every_steps, checkpoints every
    checkpoint_every_tokens and at the end. `train_loop` drives one Loop from its own batches;
    `train_group` (training/group.py) drives several from one stream.

    The only host syncs are at log and checkpoint steps: the non-finite check, the log row, the
    checkpoint itself. `elapsed_s` counts from `start_clock` (or the previous step) to the end
    of each step."""

    def __init__(self, run: TrainingRun, on_log: Callable[[dict], None], on_checkpoint: Callable[[TrainingRun], None],
                 progress: bool = True):
        self.run, self.on_log, self.on_checkpoint = run, on_log, on_checkpoint
        self.bar = tqdm(total=run.cfg.total_tokens, initial=run.state.tokens, unit="tok", unit_scale=True,
                        disable=not progress, smoothing=0.1)
        self.last_row: dict = {}
        self.t_last = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.run.state.step >= self.run.cfg.total_steps

    def start_clock(self) -> None:
        """Count the next step's time from now (a group's other work is not this run's)."""
        self.t_last = time.perf_counter()

    def step(self, raw_BD: torch.Tensor) -> None:
        run = self.run
        cfg, st = run.cfg, run.state
        tokens_before = st.tokens
        x_BD, out = train_step(run, raw_BD)
        log_now = is_log_step(cfg, st.step - 1)
        checkpoint_now = checkpoint_due(cfg, tokens_before, st.tokens) or st.step == cfg.total_steps
        if log_now or checkpoint_now:
            run.nonfinite.check(cfg.batch_size)  # waits for the device: the timing below is honest
        now = time.perf_counter()
        st.elapsed_s += now - self.t_last
        self.t_last = now
        if log_now:
            self.last_row = evaluate(run, x_BD, out)
            self.on_log(self.last_row)
            self.bar.set_postfix(l0=f"{self.last_row['l0']:.1f}", ev=f"{self.last_row['explained_variance']:.3f}",
                                 refresh=False)
        self.bar.update(x_BD.shape[0])
        if checkpoint_now:
            self.on_checkpoint(run)
            self.t_last = time.perf_counter()

    def close(self) -> None:
        self.bar.close()


def ran_out(step: int, total_steps: int) -> UserError:
    return UserError(f"activation data ran out at step {step} of {total_steps}; lower --tokens or allow more epochs")


def train_loop(
    run: TrainingRun,
    batches: Iterable[torch.Tensor],
    on_log: Callable[[dict], None],
    on_checkpoint: Callable[[TrainingRun], None],
    progress: bool = True,
) -> dict:
    """Train until cfg.total_steps (see `Loop`). Returns the last log row.

    Batches reach the device through `device_batches` (pinned, read ahead on CUDA). TF32 is set
    as run.numerics says for the loop only (`run_precision`)."""
    loop = Loop(run, on_log, on_checkpoint, progress)
    it = device_batches(batches, run.numerics.device)
    with run_precision(run.numerics):
        try:
            while not loop.done:
                raw_BD = next(it, None)
                if raw_BD is None:
                    raise ran_out(run.state.step, run.cfg.total_steps)
                loop.step(raw_BD)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            loop.close()
    return loop.last_row
