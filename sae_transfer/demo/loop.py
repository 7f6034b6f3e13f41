"""The training loop and loss evaluation shared by pretraining and chat fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

IGNORE = -100  # label of positions that carry no loss (Hugging Face convention)

# (step) -> (input ids [B, S], labels [B, S] unshifted, IGNORE where untrained)
BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
# (step just finished, model) -> None; called after every step (checkpointing)
StepHook = Callable[[int, torch.nn.Module], None]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Learning rate at `step` (0-based): linear warm-up to `peak`, cosine decay to peak/10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms or biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train_loop(
    model: torch.nn.Module,
    batch_fn: BatchFn,
    *,
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    desc: str,
    on_step: StepHook | None = None,
    progress: bool = True,
) -> list[float]:
    """Train `model` for `steps` AdamW steps on `batch_fn(step)` batches.

    Returns the per-step training loss (nats per trained token). Gradients are clipped to
    norm 1; `on_step(step + 1, model)` runs after each step (e.g. to save checkpoints).
    """
    model.train()
    optimizer = make_optimizer(model, lr, weight_decay)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=1.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        ids_BS, labels_BS = batch_fn(step)
        loss = model(input_ids=ids_BS, labels=labels_BS).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if on_step is not None:
            on_step(step + 1, model)
    model.eval()
    return losses


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, ids_NS: torch.Tensor, labels_NS: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over positions whose label is not IGNORE.

    `labels_NS` is unshifted (label i is the token at position i); position i is predicted
    from the prefix ending at i - 1, so the first label of every row never counts.
    """
    model.eval()
    total, count = 0.0, 0
    for start in range(0, ids_NS.shape[0], batch):
        ids_BS = ids_NS[start:start + batch]
        logits_BSV = model(input_ids=ids_BS).logits[:, :-1].float()
        targets_BS = labels_NS[start:start + batch, 1:]
        mask_BS = targets_BS != IGNORE
        loss_BS = torch.nn.functional.cross_entropy(
            logits_BSV.transpose(1, 2), targets_BS.clamp(min=0), reduction="none"
        )
        total += loss_BS[mask_BS].sum().item()
        count += int(mask_BS.sum())
    return total / max(count, 1)


def unigram_loss(train_tokens: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) of `targets` under add-one-smoothed unigram frequencies of `train_tokens`."""
    counts_V = torch.bincount(train_tokens.flatten(), minlength=vocab_size).double() + 1.0
    logp_V = torch.log(counts_V / counts_V.sum())
    return float(-logp_V[targets.flatten()].mean())
