"""Collect several hooks of a model from ONE forward pass per token batch (torch only).

On a GPU the hook only launches work: norms and the cast to the storage dtype run on the device,
and non-blocking copies on a side stream fill pinned host buffers, with one CUDA event per
batch. The consumer waits for that event (`HookBatch.wait`), so the forward loop never
synchronises with the device and the next forward pass overlaps the copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from sae_transfer.errors import UserError

_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


class _StopForward(Exception):
    """Raised from the last hook needed, so layers after it are never computed."""


@dataclass
class HookBatch:
    """Activations of one batch of whole sequences, per hook, on the host in the storage dtype.

    On CUDA the tensors are pinned host buffers that asynchronous copies are still filling when
    the batch is yielded with `pipelined=True`: call `wait()` before reading them.
    """

    seq_start: int  # seq_id of the first sequence in the batch
    acts: dict[str, torch.Tensor] = field(default_factory=dict)  # hook -> [b, S, D] storage dtype, host
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # hook -> [b, S] float32 raw L2 norms, host
    ready: object | None = None  # torch.cuda.Event recorded after the batch's copies; None: already on the host

    def wait(self, hooks=None) -> HookBatch:
        """Block until the batch's device-to-host copies have landed; returns the batch.

        Raises UserError when a float16 cast of one of `hooks` (default: all) overflowed, i.e. a
        finite activation was stored as inf. Safe to call from several threads at once."""
        if self.ready is not None:
            self.ready.synchronize()
        for name in self.acts if hooks is None else hooks:
            if self.acts[name].dtype == torch.float16:
                _check_float16(name, self.acts[name], self.norms[name])
        return self


def _check_float16(name: str, acts_BSD: torch.Tensor, norms_BS: torch.Tensor) -> None:
    """UserError when a finite activation became inf in float16 (only rows whose norm, an upper
    bound on every element, exceeds the float16 range are looked at)."""
    big_BS = torch.isfinite(norms_BS) & (norms_BS > _FLOAT16_MAX)
    if bool(big_BS.any()) and bool(torch.isinf(acts_BSD[big_BS]).any()):
        raise UserError(f"activations of {name!r} exceed the float16 range (|x| > {_FLOAT16_MAX:g}): "
                        "store them as bfloat16 or float32 (--dtype)")


class _HostStager:
    """Moves hooked activations to the host without stalling the forward pass.

    On CUDA: norms are computed on the device, the cast to the storage dtype happens there too,
    and both are copied into pinned host buffers by `non_blocking` copies on a side stream, so
    the copy engine overlaps the next layers; `finish()` records one event per batch. On CPU:
    one copy in the storage dtype (the model's tensor may be reused by later layers).
    """

    def __init__(self, device: torch.device, store_dtype: torch.dtype):
        self.cuda = device.type == "cuda"
        self.store_dtype = store_dtype
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def stage(self, acts_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(host activations [b, S, D] storage dtype, host norms [b, S] float32) of `acts_BSD`."""
        x_BSD = acts_BSD.detach()
        norms_BS = torch.linalg.vector_norm(x_BSD, dim=-1, dtype=torch.float32)
        if not self.cuda:
            return x_BSD.to(self.store_dtype, copy=True), norms_BS
        stored_BSD = x_BSD.to(self.store_dtype)
        host_BSD = torch.empty(stored_BSD.shape, dtype=self.store_dtype, pin_memory=True)
        host_BS = torch.empty(norms_BS.shape, dtype=torch.float32, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(x_BSD.device))
        with torch.cuda.stream(self.stream):
            host_BSD.copy_(stored_BSD, non_blocking=True)
            host_BS.copy_(norms_BS, non_blocking=True)
        # the caching allocator must not hand these to later layers before the copies ran
        stored_BSD.record_stream(self.stream)
        norms_BS.record_stream(self.stream)
        return host_BSD, host_BS

    def finish(self):
        """An event that completes when every copy staged so far has landed (None on CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event


def _upload(ids_BS: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Token ids on `device`; from pinned memory without a host sync on CUDA."""
    if device.type != "cuda":
        return ids_BS.to(device)
    return ids_BS.pin_memory().to(device, non_blocking=True)


def iter_hook_batches(
    model,
    tokens_NS: torch.Tensor,
    hooks: list[str],
    *,
    batch_seqs: int,
    store_dtype: torch.dtype = torch.float32,
    start_seq: int = 0,
    stop_early: bool = True,
    pipelined: bool = False,
) -> Iterator[HookBatch]:
    """Forward `tokens_NS[start_seq:]` in batches of `batch_seqs` sequences, one pass per batch.

    Every hook in `hooks` is captured in the same pass. With `stop_early`, the pass is
    abandoned (by an exception raised in the hook) as soon as all hooks have fired, so blocks
    after the deepest hook and the unembedding are skipped. Norms are computed in float32 from
    the model's own activations, before the cast to `store_dtype`. With `pipelined`, a batch is
    yielded while its device-to-host copies may still run (the consumer calls `batch.wait()`,
    e.g. on a writer thread); otherwise every yielded batch is ready to read.
    """
    device = next(model.parameters()).device
    stager = _HostStager(device, store_dtype)
    wanted = set(hooks)

    def capture_as(batch: HookBatch, name: str):
        """A hook that stages `name`'s activation into `batch`, the batch whose forward pass it is registered for."""

        def capture(acts, hook):
            if acts.dim() != 3:
                raise UserError(f"hook {name!r} gives shape {tuple(acts.shape)}: only [batch, pos, d] hooks can be cached")
            batch.acts[name], batch.norms[name] = stager.stage(acts)
            if stop_early and len(batch.acts) == len(wanted):
                raise _StopForward
            return None

        return capture

    for s0 in range(start_seq, tokens_NS.shape[0], batch_seqs):
        ids_BS = _upload(tokens_NS[s0:s0 + batch_seqs], device)
        out = HookBatch(seq_start=s0)
        with torch.inference_mode():
            try:
                model.run_with_hooks(ids_BS, return_type=None, fwd_hooks=[(h, capture_as(out, h)) for h in hooks])
            except _StopForward:
                pass
        missing = wanted - set(out.acts)
        if missing:
            raise UserError(f"hooks {sorted(missing)} did not fire in a forward pass: pick hooks on the model's main path")
        out.ready = stager.finish()
        yield out if pipelined else out.wait()
