"""A training run in an output folder (sae_transfer.storage.layout.RunLayout: the trained artifact,
checkpoints, training log, and the run.json manifest written last).

`drive_run` is the one driver of such a folder, for any model the shared loop trains: a
call on a folder with a complete run.json for the same config does nothing; a folder with
checkpoints resumes from the newest one (loaded onto the run's device, so a run started on
a GPU resumes on a CPU); otherwise the run starts fresh. The model-specific parts (the
module, the data stream, the final artifact) come from a `RunSpec`: `SAERunSpec` here
(`train_sae`), the crosscoder's in sae_transfer.diffing.crosscoder_run."""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_transfer.errors import UserError
from sae_transfer.sae import SAE, SAEConfig, make_sae
from sae_transfer.sae.io import load_sae, save_sae
from sae_transfer.sae.scaling import fold_scale, scale_factor_of, training_scale
from sae_transfer.storage import checkpoints as ckpt
from sae_transfer.storage.layout import RunLayout
from sae_transfer.training.config import RUNTIME_FIELDS, TrainConfig
from sae_transfer.training.loop import LoopState, TrainingRun, train_loop
from sae_transfer.training.sources import SourceFactory
from sae_transfer.training.tricks import geometric_median

log = logging.getLogger(__name__)
TRAIN_ARCH_TO_SAE = {"relu": "standard", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu"}
SAE_ARCH_TO_TRAIN = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}


@dataclass(frozen=True)
class RunResult:
    """What a finished (or already complete) run left on disk."""

    sae_dir: Path  # the SAELens folder
    run_json: Path  # the manifest
    metrics: dict  # final training metrics (l0, explained_variance, dead_fraction, ...)
    resumed_from_step: int | None  # checkpoint step the run resumed from, if any
    skipped: bool  # True when a complete run was already there


@dataclass(frozen=True)
class Parent:
    """The SAE a fine-tune starts from."""

    path: Path  # its SAELens folder
    weights_sha256: str  # hash of its sae_weights.safetensors


def sample_tokens(make_source: SourceFactory, n_tokens: int) -> torch.Tensor:
    """The first ≥ n_tokens raw activations of the stream [N, D] (used for scale and b_dec)."""
    chunks, got = [], 0
    for acts_BD in make_source(0):
        chunks.append(acts_BD)
        got += acts_BD.shape[0]
        if got >= n_tokens:
            break
    return torch.cat(chunks)


def estimate_scale(raw_ND: torch.Tensor) -> float:
    """s = √D / E‖x‖ on a sample of raw activations (multiplying by s gives mean norm √d_in)."""
    return scale_factor_of(raw_ND.float().norm(dim=-1), raw_ND.shape[1])


def init_b_dec(cfg: TrainConfig, x_ND: torch.Tensor) -> torch.Tensor:
    """Initial decoder bias [D] in scaled units: geometric median, mean or zeros (cfg.b_dec_init)."""
    if cfg.b_dec_init == "geometric_median":
        return geometric_median(x_ND[:16_384])
    if cfg.b_dec_init == "mean":
        return x_ND.mean(0)
    return torch.zeros(x_ND.shape[1])


def fresh_run(cfg: TrainConfig, make_source: SourceFactory, d_in: int, parent_sae: SAE | None) -> TrainingRun:
    """A new run: estimate the scale, build and initialise the SAE (or adapt the parent's)."""
    raw_ND = sample_tokens(make_source,
                           cfg.scale_estimate_tokens if cfg.normalize_activations or cfg.b_dec_init != "zeros" else 1)
    scale = estimate_scale(raw_ND) if cfg.normalize_activations else 1.0
    if parent_sae is not None:
        # The parent reads raw activations of its own model (its s_train folded in): fold its own
        # factor out to get the normalised weights it was trained as, which read s·x of any model
        # (the study reused the base weights unchanged). The child then records this model's s.
        s_parent = training_scale(parent_sae)
        if s_parent is None:
            log.warning("parent SAE records no activation_scale_factor; assuming it was trained at this model's scale")
        sae = fold_scale(parent_sae, 1.0 / (s_parent or scale))
        sae.cfg = SAEConfig(**{**sae.cfg.__dict__, "metadata": {}})
        return TrainingRun.create(cfg, sae, scale)
    sae = make_sae(SAEConfig(TRAIN_ARCH_TO_SAE[cfg.arch], d_in, cfg.d_sae,
                             k=cfg.k if cfg.arch in ("topk", "batchtopk") else None))
    run = TrainingRun.create(cfg, sae, scale)
    run.trainer.init_weights(torch.Generator().manual_seed(cfg.seed), init_b_dec(cfg, raw_ND * scale))
    return run


def restore(run: TrainingRun, checkpoint: ckpt.Checkpoint) -> None:
    """Load a checkpoint's weights, optimiser, dead-latent counts and loop state into `run`
    (load the checkpoint onto run.numerics.device: `ckpt.load_checkpoint(path, device)`)."""
    run.sae.load_state_dict(checkpoint.sae_tensors)
    ckpt.optimizer_from_tensors(run.optimizer, checkpoint.optimizer_tensors, checkpoint.state["optimizer_groups"])
    run.dead.load_state_tensors(checkpoint.extra_tensors)
    run.state = LoopState(**checkpoint.state["loop"])


# ----------------------------------------------------------------------------- the run driver


class RunSpec(ABC):
    """The model-specific parts of a run that `drive_run` runs in a folder: the settings,
    how to build the module (fresh, or as a shell a checkpoint fills), the data stream, and
    how to write the final artifact. Everything else (run.json, checkpoints, resume, the
    training log, skip-if-complete) is the driver's."""

    name: str = "run"  # for messages: "a finished <name> run", "resuming <name> ..."
    artifact_dir: str  # the final artifact's folder inside the run folder
    train: TrainConfig  # the shared training settings (every checkpoint records them)

    def config(self) -> dict:
        """The whole run config, JSON-ready: run.json's "config" (and each checkpoint's "run_config")."""
        return self.train.to_dict()

    def learning_config(self, config: dict) -> dict:
        """The part of a recorded `config()` a resumed or re-run run must match: all but the
        runtime settings (device, dtype, ...), so a run started on a GPU resumes on a CPU."""
        return without_runtime(config)

    @abstractmethod
    def fresh(self) -> TrainingRun:
        """A new run, initialised (may read data from the stream's start)."""

    @abstractmethod
    def shell(self) -> TrainingRun:
        """A run with the right shapes on the run's device, for a checkpoint to fill (reads no data)."""

    @abstractmethod
    def batches(self, start_batch: int) -> Iterable[torch.Tensor]:
        """Raw training batches from batch `start_batch` of the stream (the resume point)."""

    @abstractmethod
    def finish(self, run: TrainingRun, last_row: dict, artifact_dir: Path) -> tuple[dict, dict]:
        """Write the trained artifact into artifact_dir; return (final metrics, further run.json fields)."""


@dataclass(frozen=True)
class DriveResult:
    """What `drive_run` left on disk."""

    artifact_dir: Path  # the spec's final artifact
    run_json: Path  # the manifest
    metrics: dict  # final metrics (run.json's final_metrics)
    resumed_from_step: int | None  # checkpoint step the run resumed from, if any
    skipped: bool  # True when a complete run was already there


class OpenRun:
    """A run folder opened for training (see `drive_run`): `result` when a complete run of the
    same learning config is already there, else `run` (fresh, or restored from the newest
    checkpoint) ready for a Loop with `on_log` / `on_checkpoint`, and `finish` to write the
    artifact and, last, run.json."""

    def __init__(self, spec: RunSpec, out_dir: str | Path):
        self.spec, self.out = spec, Path(out_dir)
        self.folder = RunLayout(self.out)
        self.artifact = self.out / spec.artifact_dir
        self.result: DriveResult | None = None
        self.run: TrainingRun | None = None
        self.resumed_from: int | None = None
        self.pending: list[dict] = []
        wanted = spec.learning_config(spec.config())
        done = read_manifest(self.folder.manifest)
        if done is not None:
            if spec.learning_config(done.get("config") or {}) != wanted:
                raise UserError(f"{self.out} holds a finished {spec.name} run with a different config; "
                                "choose another --out or delete it")
            self.result = DriveResult(self.artifact, self.folder.manifest, done["final_metrics"], None, True)
            return
        found = ckpt.list_checkpoints(self.folder.checkpoints)
        state = ckpt.read_state(found[-1]) if found else None
        if state is not None and not (same_learning_config(state["config"], spec.train)
                                      and spec.learning_config(state.get("run_config") or spec.config()) == wanted):
            raise UserError(f"{self.out} holds checkpoints of a {spec.name} run with a different config; "
                            "choose another --out or delete it")
        t_setup = time.perf_counter()
        if state is None:
            self.run = spec.fresh()
            ckpt.truncate_log(self.folder.training_log, -1)
        else:
            self.run = spec.shell()
            restore(self.run, ckpt.load_checkpoint(found[-1], device=self.run.numerics.device))
            ckpt.truncate_log(self.folder.training_log, self.run.state.step)
            self.resumed_from = state["loop"]["step"]
            log.info("resuming %s %s from step %d", spec.name, self.out, self.run.state.step)
        self.t0 = time.perf_counter()
        # a fresh run reads the stream's start (scale, b_dec): on a live source those forward passes
        # also serve the first batches, so they belong to the training rate
        self.setup_s = self.t0 - t_setup

    def on_log(self, row: dict) -> None:
        self.pending.append(row)

    def on_checkpoint(self, run: TrainingRun) -> None:
        # log part first: after a crash, parts past the newest checkpoint are deleted on resume
        ckpt.append_log_rows(self.folder.training_log, self.pending, run.state.step)
        self.pending.clear()
        _write_checkpoint(self.folder, run, self.spec.config(), reader_position=run.state.step)

    def finish(self, last_row: dict, **timings) -> DriveResult:
        """Write the artifact and run.json (`timings` adds to its timings, e.g. a group's)."""
        run, spec = self.run, self.spec
        final, extra = spec.finish(run, last_row, self.artifact)
        ckpt.write_json_atomic(self.folder.manifest, {
            "status": "complete",
            "config": spec.config(),
            "tokens": run.state.tokens,
            "steps": run.state.step,
            "numerics": run.numerics.to_dict(),  # device, compute dtype, TF32, sparse kernels of this call
            "timings": {"train_s": run.state.elapsed_s, "setup_s": self.setup_s,
                        "wall_s_this_call": time.perf_counter() - self.t0,
                        "tokens_per_s": run.state.tokens / max(run.state.elapsed_s + self.setup_s, 1e-9), **timings},
            "final_metrics": final,
            "resample_steps": run.state.resample_steps,
            **extra,
        })
        return DriveResult(self.artifact, self.folder.manifest, final, self.resumed_from, False)


def drive_run(spec: RunSpec, out_dir: str | Path, progress: bool = True) -> DriveResult:
    """Train `spec` into the run folder out_dir (sae_transfer.storage.layout.RunLayout, with the
    artifact in out_dir/spec.artifact_dir): return a complete run of the same learning config
    untouched, else resume from the newest checkpoint (its tensors loaded onto this run's
    device), else start fresh; checkpoint as the loop asks, then write the artifact and,
    last, run.json."""
    opened = OpenRun(spec, out_dir)
    if opened.result is not None:
        return opened.result
    run = opened.run
    last = train_loop(run, spec.batches(run.state.step), opened.on_log, opened.on_checkpoint, progress=progress)
    return opened.finish(last)


def read_manifest(path: Path) -> dict | None:
    """A run folder's run.json if it records a complete run, else None."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if data.get("status") == "complete" else None


def _write_checkpoint(folder: RunLayout, run: TrainingRun, run_config: dict, reader_position: int) -> None:
    opt_tensors, groups = ckpt.optimizer_to_tensors(run.optimizer)
    opt_tensors = {k: v.cpu() for k, v in opt_tensors.items()}  # checkpoints hold CPU tensors: any device resumes them
    state = {
        "config": run.cfg.to_dict(),
        "run_config": run_config,
        "loop": run.state.__dict__,
        "reader_position": reader_position,  # batches consumed from the activation stream
        "optimizer_groups": groups,
    }
    sae_tensors = {k: v.detach().to("cpu", copy=True) for k, v in run.sae.state_dict().items()}
    ckpt.save_checkpoint(folder.checkpoints, run.state.step, sae_tensors, opt_tensors, run.dead.state_tensors(), state,
                         keep=run.cfg.keep_checkpoints)


def without_runtime(config: dict | None) -> dict:
    """A TrainConfig dict without RUNTIME_FIELDS (device, dtype, ...)."""
    return {k: v for k, v in (config or {}).items() if k not in RUNTIME_FIELDS}


def same_learning_config(recorded: dict | None, cfg: TrainConfig) -> bool:
    """Whether a recorded config (run.json, checkpoint) trains what `cfg` trains: equal but
    for RUNTIME_FIELDS (device, dtype, ...), so a run started on a GPU resumes on a CPU."""
    return without_runtime(recorded) == cfg.learning_dict()


def final_dead(run: TrainingRun) -> dict:
    """Dead fraction over min(dead window, tokens trained), and that window."""
    window = min(run.cfg.dead_window_tokens, run.state.tokens)
    return {"dead_fraction_final": float((run.dead.since_fired_F >= window).float().mean()), "dead_window_tokens": window}


# ----------------------------------------------------------------------------- SAE runs


@dataclass
class SAERunSpec(RunSpec):
    """An SAE (or a fine-tune of `parent`) trained on `make_source`; artifact: a SAELens folder."""

    train: TrainConfig
    make_source: SourceFactory
    d_in: int
    metadata: dict | None = None  # cfg.json metadata (model_name, hook_name, context_size, ...)
    parent: Parent | None = None
    name: str = "SAE"
    artifact_dir: str = RunLayout.SAE_DIR

    def _parent_sae(self) -> SAE | None:
        return load_sae(self.parent.path, expect_d_in=self.d_in) if self.parent is not None else None

    def fresh(self) -> TrainingRun:
        return fresh_run(self.train, self.make_source, self.d_in, self._parent_sae())

    def shell(self) -> TrainingRun:
        return fresh_run_shell(self.train, self.d_in, self._parent_sae())

    def batches(self, start_batch: int) -> Iterable[torch.Tensor]:
        return self.make_source(start_batch)

    def finish(self, run: TrainingRun, last_row: dict, artifact_dir: Path) -> tuple[dict, dict]:
        parent = self.parent
        meta = {**(self.metadata or {}), **({"finetuned_from": str(parent.path)} if parent else {})}
        save_sae(run.trainer.inference_sae(), artifact_dir, scale_factor=run.state.scale_factor, metadata=meta,
                 log10_density_F=run.dead.log10_density())
        return {**last_row, **final_dead(run)}, {
            "sae_dir": self.artifact_dir,
            "scale_factor": run.state.scale_factor,
            "metadata": self.metadata or {},
            "finetuned_from": {"path": str(parent.path), "weights_sha256": parent.weights_sha256} if parent else None,
        }


def train_sae(
    cfg: TrainConfig,
    make_source: SourceFactory,
    d_in: int,
    out_dir: str | Path,
    metadata: dict | None = None,
    parent: Parent | None = None,
    progress: bool = True,
) -> RunResult:
    """Train (or fine-tune, when `parent` is given) an SAE into out_dir, resuming if possible.

    `make_source(n)` yields raw acts_BD batches of cfg.batch_size from batch n of the stream.
    `metadata` goes into cfg.json's metadata (model_name, hook_name, context_size, ...)."""
    r = drive_run(SAERunSpec(cfg, make_source, d_in, metadata, parent), out_dir, progress=progress)
    return RunResult(r.artifact_dir, r.run_json, r.metrics, r.resumed_from_step, r.skipped)


def fresh_run_shell(cfg: TrainConfig, d_in: int, parent_sae: SAE | None) -> TrainingRun:
    """A run with the right shapes, to be filled from a checkpoint (no data is read)."""
    if parent_sae is not None:
        sae = fold_scale(parent_sae, 1.0)
        sae.cfg = SAEConfig(**{**sae.cfg.__dict__, "metadata": {}})
    else:
        sae = make_sae(SAEConfig(TRAIN_ARCH_TO_SAE[cfg.arch], d_in, cfg.d_sae,
                                 k=cfg.k if cfg.arch in ("topk", "batchtopk") else None))
    return TrainingRun.create(cfg, sae, 1.0)


def parent_sae_arch(path: str | Path) -> str:
    """The training arch name (relu/topk/jumprelu) of an SAE folder, for fine-tuning it."""
    sae = load_sae(path)
    if sae.cfg.architecture not in SAE_ARCH_TO_TRAIN:
        raise UserError(f"{path}: cannot fine-tune architecture {sae.cfg.architecture!r}")
    return SAE_ARCH_TO_TRAIN[sae.cfg.architecture]
