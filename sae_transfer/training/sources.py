"""Activation sources for the training loop: anything iterable over raw acts_BD batches that
can start at batch n. `InMemorySource` mirrors the Parquet `ActivationReader` interface;
`device_batches` brings a source's batches to the training device."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

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
        # drawn on the CPU whatever the data's device, so a seed gives the same order everywhere
        if not self.shuffle:
            return torch.arange(self.acts_ND.shape[0], device=self.acts_ND.device)
        order = torch.randperm(self.acts_ND.shape[0], generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return order.to(self.acts_ND.device)

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


_END = object()  # end of the source


class PinnedPrefetcher:
    """Iterator of fp32 batches on a CUDA device. A worker thread reads the source up to
    `depth` batches ahead and pins them; each batch's host-to-device copy is issued on a side
    stream one step ahead, so it overlaps the step that is computing. A source error is
    raised when the batch it replaced is asked for; `close()` stops the worker."""

    def __init__(self, batches: Iterable[torch.Tensor], device: torch.device, depth: int = 2):
        self.device, self._queue, self._stop = device, queue.Queue(maxsize=depth), threading.Event()
        self._stream = torch.cuda.Stream(device)
        self._worker = threading.Thread(target=self._read, args=(iter(batches),), daemon=True, name="batch-prefetch")
        self._worker.start()
        self._next = self._issue()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, it: Iterator[torch.Tensor]) -> None:
        try:
            for batch in it:
                if not self._put(batch.pin_memory() if batch.device.type == "cpu" else batch):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, raised in its thread
            self._put(exc)

    def _issue(self):
        """The next item: a device batch whose copy is under way, _END, or an exception."""
        item = self._queue.get()
        if item is _END or isinstance(item, BaseException):
            return item
        with torch.cuda.stream(self._stream):
            return item.to(self.device, non_blocking=True)

    def __iter__(self) -> PinnedPrefetcher:
        return self

    def __next__(self) -> torch.Tensor:
        item = self._next
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._stream)
        item.record_stream(current)  # its memory is in use on the compute stream too
        self._next = self._issue()
        return item.float()

    def close(self) -> None:
        """Stop the worker (it exits at its next queue operation)."""
        self._stop.set()


def device_batches(batches: Iterable[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """Iterator over `batches` for training on `device`. On the CPU, the source's own iterator
    (no thread, no copy: nothing to overlap that the source does not already). On CUDA, a
    PinnedPrefetcher."""
    if device.type == "cuda":
        return PinnedPrefetcher(batches, device)
    return iter(batches)
