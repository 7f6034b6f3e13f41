"""Activation sources for the training loop: anything iterable over raw acts_BD batches that
can start at batch n. `InMemorySource` mirrors the Parquet `ActivationReader` interface."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from sae_transfer.errors import UserError

# start_batch -> iterable of raw acts_BD batches (batch n of the stream first)
SourceFactory = Callable[[int], Iterable[torch.Tensor]]


class InMemorySource:
    """Shuffled batches of an in-memory [N, D] tensor, epoch after epoch.

    Batch b of the stream is the same whatever `start_batch` was, so resuming at
    start_batch=n continues exactly; `batches_yielded` counts from the stream start."""

    def __init__(
        self,
        acts_ND: torch.Tensor,
        batch_size: int = 4096,
        seed: int = 0,
        start_batch: int = 0,
        epochs: int | None = None,
        check_finite: bool = True,
        shuffle: bool = True,
        name: str = "in-memory activations",
    ):
        if acts_ND.shape[0] < batch_size:
            raise UserError(f"{name}: {acts_ND.shape[0]} tokens is less than one batch ({batch_size}); use a smaller batch size")
        self.acts_ND, self.batch_size, self.seed = acts_ND, batch_size, seed
        self.epochs, self.check_finite, self.shuffle, self.name = epochs, check_finite, shuffle, name
        self.batches_per_epoch = acts_ND.shape[0] // batch_size
        self.batches_yielded = start_batch

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.acts_ND.shape[0])
        return torch.randperm(self.acts_ND.shape[0], generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, order = -1, None
        while self.epochs is None or self.batches_yielded < self.epochs * self.batches_per_epoch:
            b = self.batches_yielded
            if b // self.batches_per_epoch != epoch:
                epoch = b // self.batches_per_epoch
                order = self._order(epoch)
            i = b % self.batches_per_epoch
            acts_BD = self.acts_ND.index_select(0, order[i * self.batch_size : (i + 1) * self.batch_size]).float()
            if self.check_finite and not bool(torch.isfinite(acts_BD).all()):
                raise UserError(f"{self.name}: batch {b} holds non-finite activations; rebuild the activation cache")
            self.batches_yielded = b + 1
            yield acts_BD


def in_memory_factory(acts_ND: torch.Tensor, batch_size: int, seed: int = 0, **kwargs) -> SourceFactory:
    """A SourceFactory over an in-memory tensor."""
    return lambda start_batch: InMemorySource(acts_ND, batch_size, seed=seed, start_batch=start_batch, **kwargs)
