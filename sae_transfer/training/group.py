"""Several runs trained from one activation stream: one forward pass per batch, N optimiser steps.

A group is a list of (RunSpec, run folder, key) members and a stream whose batches are
{key: acts_BD} (a `LiveActivations` over several hooks: `batches(start)`). Member i trains on
batch[key_i]. Every member keeps its own run folder, checkpoints, training log, resume and
run.json, exactly as `drive_run` writes them: a member that finished is returned untouched, a
member with checkpoints resumes from its newest, and the stream starts at the earliest member's
step (members already past a batch skip it). Because a multi-hook live stream gives each hook the
batches a one-hook stream gives it, a member trains what it would train alone (same weights,
tested), for the price of one forward pass per batch.

Members share the batch size (one stream, one batching) and the numerics (device, dtype, TF32:
the loop sets them once). This is how sweeps (several settings on one hook) and every hook of a
study train from one pass over the model, as SAELens's multi-SAE runner and dictionary_learning's
`trainSAE(trainer_configs=[...])` do."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_transfer.errors import UserError
from sae_transfer.training.device import run_precision
from sae_transfer.training.loop import Loop, ran_out
from sae_transfer.training.run import DriveResult, OpenRun, RunSpec


@dataclass(frozen=True)
class Member:
    """One run of a group: its spec, its run folder and the stream key it trains on."""

    spec: RunSpec
    out_dir: Path
    key: str


@dataclass
class GroupTimings:
    """Where a group's wall time went (seconds): waiting for the stream (forward passes, on the CPU
    or where the device syncs) and each member's steps."""

    stream_s: float = 0.0
    steps_s: dict[str, float] | None = None
    batches: int = 0

    def of(self, out_dir: Path) -> dict:
        """What a member's run.json records: the group's stream time and batches, its own steps' time."""
        return {"group_stream_s": self.stream_s, "group_batches": self.batches,
                "group_member_step_s": (self.steps_s or {}).get(str(out_dir), 0.0)}


def check_group(members: list[Member]) -> None:
    """One batch size for all (one stream); distinct run folders."""
    if not members:
        raise UserError("nothing to train: the group has no members")
    sizes = {m.spec.train.batch_size for m in members}
    if len(sizes) > 1:
        raise UserError(f"runs trained from one stream share its batch size; got {sorted(sizes)}: "
                        "give every SAE of the sweep the same batch_size (or train them apart)")
    outs = [str(m.out_dir) for m in members]
    if len(set(outs)) != len(outs):
        raise UserError("two runs of one group write the same folder: give each SAE its own run folder")


def train_group(members: list[Member], batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
                progress: bool = False) -> tuple[list[DriveResult], GroupTimings]:
    """Train every member from one stream (see the module docstring); returns each member's
    DriveResult, in order, and the group's timings (also written into each new run.json)."""
    check_group(members)
    opened = [OpenRun(m.spec, m.out_dir) for m in members]
    active = [(m, o) for m, o in zip(members, opened) if o.result is None]
    timings = GroupTimings(steps_s={str(m.out_dir): 0.0 for m, _ in active})
    if active:
        numerics = {json.dumps(o.run.numerics.to_dict(), sort_keys=True, default=str) for _, o in active}
        if len(numerics) > 1:
            raise UserError("runs trained from one stream share one device and precision; "
                            "give every SAE of the group the same device and dtype")
        loops = [Loop(o.run, o.on_log, o.on_checkpoint, progress=progress and i == 0) for i, (_, o) in enumerate(active)]
        start = min(o.run.state.step for _, o in active)
        with run_precision(active[0][1].run.numerics):
            it = iter(batches(start))
            b = start
            try:
                while not all(loop.done for loop in loops):
                    t = time.perf_counter()
                    batch = next(it, None)
                    timings.stream_s += time.perf_counter() - t
                    if batch is None:
                        lagging = min((o.run for _, o in active if o.run.state.step < o.run.cfg.total_steps),
                                      key=lambda r: r.state.step)
                        raise ran_out(lagging.state.step, lagging.cfg.total_steps)
                    for (m, o), loop in zip(active, loops):
                        if not loop.done and o.run.state.step == b:
                            t = time.perf_counter()
                            loop.start_clock()
                            loop.step(batch[m.key])
                            timings.steps_s[str(m.out_dir)] += time.perf_counter() - t
                    b += 1
                    timings.batches += 1
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
                for loop in loops:
                    loop.close()
        for (m, o), loop in zip(active, loops):
            o.result = o.finish(loop.last_row, group_size=len(members), **timings.of(m.out_dir))
    return [o.result for o in opened], timings
