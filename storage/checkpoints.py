"""Trainer checkpoints and the Parquet training log, all written atomically.

    <run>/checkpoints/step-000001234/  sae.safetensors        model tensors (scaled units)
                                       optimizer.safetensors  Adam state, key "<param>.<name>"
                                       extra.safetensors      trainer tensors (dead-latent counts)
                                       state.json             loop state, configs, reader position
    <run>/training_log/part-000001234.parquet   log rows up to that step (TRAINING_LOG_SCHEMA)

A checkpoint folder is written under a temporary name and renamed into place; only folders
with a state.json count. Log parts are flushed just before each checkpoint; after a
crash, parts past the checkpoint a run resumes from are deleted (`truncate_log`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

TRAINING_LOG_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("tokens", pa.int64()),
        ("lr", pa.float64()),
        ("loss", pa.float64()),
        ("mse", pa.float64()),  # mean over tokens of Σ_d (x − x̂)², scaled units
        ("sparsity", pa.float64()),  # sparsity term before its coefficient (0 for topk)
        ("l0", pa.float64()),  # mean active features per token
        ("explained_variance", pa.float64()),  # 1 − E‖x−x̂‖² / (E‖x‖² − ‖Ex‖²), batch
        ("explained_variance_legacy", pa.float64()),  # per-token mean (seed study)
        ("dead_fraction", pa.float64()),  # latents silent for dead_window_tokens
        ("elapsed_s", pa.float64()),  # training wall time so far
    ]
)
CKPT_PREFIX = "step-"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    sae_tensors: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    extra_tensors: dict[str, torch.Tensor]
    state: dict  # JSON state: loop state, config, reader position, optimiser param groups


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to a temp file in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(per-parameter state tensors keyed "<index>.<name>", JSON-ready param groups)."""
    sd = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().clone() for i, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    return tensors, sd["param_groups"]


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Restore optimiser state written by `optimizer_to_tensors`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    root: Path,
    step: int,
    sae_tensors: dict[str, torch.Tensor],
    optimizer_tensors: dict[str, torch.Tensor],
    extra_tensors: dict[str, torch.Tensor],
    state: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` under root atomically, then delete all but the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    save_file({k: v.contiguous() for k, v in sae_tensors.items()}, tmp / "sae.safetensors")
    save_file({k: v.contiguous() for k, v in optimizer_tensors.items()}, tmp / "optimizer.safetensors")
    save_file({k: v.contiguous() for k, v in extra_tensors.items()}, tmp / "extra.safetensors")
    write_json_atomic(tmp / "state.json", state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "state.json").is_file())


def read_state(path: Path) -> dict:
    """The JSON state of a checkpoint folder (no tensors are read)."""
    return json.loads((path / "state.json").read_text())


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`, its tensors placed on `device`
    (the resuming run's device, whichever device wrote them)."""
    where = str(torch.device(device))
    return Checkpoint(
        path=path,
        sae_tensors=load_file(str(path / "sae.safetensors"), device=where),
        optimizer_tensors=load_file(str(path / "optimizer.safetensors"), device=where),
        extra_tensors=load_file(str(path / "extra.safetensors"), device=where),
        state=read_state(path),
    )


def latest_checkpoint(root: Path, device: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest complete checkpoint under root (tensors on `device`), or None."""
    found = list_checkpoints(root)
    return load_checkpoint(found[-1], device) if found else None


def append_log_rows(log_dir: Path, rows: list[dict], step: int) -> Path | None:
    """Write `rows` as one Parquet part named after `step` (atomic); None if no rows."""
    if not rows:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=TRAINING_LOG_SCHEMA)
    final = log_dir / f"part-{step:09d}.parquet"
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=log_dir)
    os.close(fd)
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def read_log(log_dir: Path) -> pa.Table:
    """All training-log rows, ordered by step (an empty table if none)."""
    parts = sorted(log_dir.glob("part-*.parquet")) if log_dir.is_dir() else []
    if not parts:
        return TRAINING_LOG_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=TRAINING_LOG_SCHEMA) for p in parts]).sort_by("step")


def truncate_log(log_dir: Path, after_step: int) -> None:
    """Delete log parts written after `after_step` (a resumed run rewrites them)."""
    for part in log_dir.glob("part-*.parquet") if log_dir.is_dir() else []:
        if int(part.stem.split("-")[1]) > after_step:
            part.unlink()
