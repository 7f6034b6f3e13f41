"""Train a BatchTopK crosscoder on paired caches into a run folder, resumably.

    <out>/crosscoder/      crosscoder folder (sae_transfer.diffing.crosscoder_io; both decoders, both scale factors)
    <out>/checkpoints/     trainer checkpoints (sae_transfer.storage.checkpoints; the shared SAE machinery)
    <out>/training_log/    Parquet parts of the training log
    <out>/run.json         manifest, written last: config, pairing, timings, metrics, class counts

It reuses the SAE training loop and run driver (sae_transfer.training.run.drive_run) as they
are: the crosscoder is an SAE over [x_base, x_chat] and the paired stream already scales each
model by its own factor, so the loop's own scale is 1. This module supplies the driver's
model-specific parts (`CrosscoderRunSpec`): the module, the paired stream, the final metrics
and the crosscoder folder. As for an SAE run, a folder with a complete run.json for the same
config is returned untouched and a folder with checkpoints resumes from the newest one on
this run's device (the stream restarts at the batch it had reached).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_transfer.diffing.crosscoder import CrossCoder, Taxonomy, class_counts, latent_table
from sae_transfer.diffing.crosscoder_io import save_crosscoder
from sae_transfer.diffing.paired import PairedCaches, paired_factory, read_paired
from sae_transfer.sae import metrics
from sae_transfer.training.config import TrainConfig
from sae_transfer.training.loop import TrainingRun
from sae_transfer.training.run import RunSpec, drive_run, final_dead, without_runtime
from sae_transfer.training.trainers.crosscoder import DECODER_INIT, CrosscoderTrainer
from sae_transfer.training.tricks import geometric_median


@dataclass(frozen=True)
class CrosscoderConfig:
    """Everything that determines a crosscoder run besides the paired data."""

    train: TrainConfig = TrainConfig(arch="batchtopk", d_sae=256, k=8, lr=1e-3, total_tokens=200_000, batch_size=1024)
    # the shared training settings; arch must be "batchtopk" (k = mean active latents per token)
    taxonomy: Taxonomy = Taxonomy()  # ρ cut-offs recorded with the run
    buffer_tokens: int = 65_536  # rows held in the paired shuffle buffer (memory: rows × 2D × 4 bytes)
    eval_tokens: int = 16_384  # rows (from the start of the caches) for the final per-model metrics

    def __post_init__(self) -> None:
        if self.train.arch != "batchtopk":
            raise ValueError(f"train.arch={self.train.arch!r}: a crosscoder trains with arch='batchtopk'")

    def to_dict(self) -> dict:
        """JSON-ready dict (run.json, checkpoint check)."""
        return {"train": self.train.to_dict(), "taxonomy": dataclasses.asdict(self.taxonomy),
                "buffer_tokens": self.buffer_tokens, "eval_tokens": self.eval_tokens, "decoder_init": DECODER_INIT}


@dataclass(frozen=True)
class CrosscoderResult:
    """What a finished (or already complete) crosscoder run left on disk."""

    crosscoder_dir: Path  # the crosscoder folder (sae_transfer.diffing.crosscoder_io)
    run_json: Path  # the manifest
    metrics: dict  # final metrics: per-model explained variance, l0, dead fraction, class counts
    resumed_from_step: int | None  # checkpoint step the run resumed from, if any
    skipped: bool  # True when a complete run was already there


def new_run(cfg: CrosscoderConfig, pair: PairedCaches, cc: CrossCoder | None = None) -> TrainingRun:
    """A TrainingRun wrapping a crosscoder (a fresh zero one unless given) for the shared loop:
    the loop's own scale is 1 (the paired stream scales each model) and its trainer is
    swapped for the crosscoder's."""
    t = cfg.train
    cc = cc or CrossCoder.create(pair.d_model, t.d_sae, t.k, metadata=dict(pair.meta))
    run = TrainingRun.create(t, cc, 1.0)
    run.trainer = CrosscoderTrainer(cc, t, run.trainer.sparse_kernels)
    return run


def fresh_run(cfg: CrosscoderConfig, pair: PairedCaches) -> TrainingRun:
    """A new run: record the scale factors, initialise weights, b_dec per model from a sample."""
    run = new_run(cfg, pair)
    cc = run.sae
    with torch.no_grad():
        cc.scales_M.copy_(torch.tensor([pair.scale_base, pair.scale_chat]))
    x_NMD = read_paired(pair, 0, min(pair.n_tokens, cfg.train.scale_estimate_tokens)).x_BMD
    t = cfg.train
    if t.b_dec_init == "geometric_median":
        b_dec = torch.cat([geometric_median(x_NMD[:16_384, m]) for m in range(2)])
    elif t.b_dec_init == "mean":
        b_dec = x_NMD.mean(0).flatten()
    else:
        b_dec = torch.zeros(2 * pair.d_model)
    run.trainer.init_weights(torch.Generator().manual_seed(t.seed), b_dec)
    return run


@dataclass
class CrosscoderRunSpec(RunSpec):
    """A crosscoder on `pair` for the shared run driver (sae_transfer.training.run.drive_run)."""

    cfg: CrosscoderConfig
    pair: PairedCaches
    name: str = "crosscoder"
    artifact_dir: str = "crosscoder"

    @property
    def train(self) -> TrainConfig:
        return self.cfg.train

    def config(self) -> dict:
        return self.cfg.to_dict()

    def learning_config(self, config: dict) -> dict:
        return {**config, "train": without_runtime(config.get("train"))}

    def fresh(self) -> TrainingRun:
        return fresh_run(self.cfg, self.pair)

    def shell(self) -> TrainingRun:
        return new_run(self.cfg, self.pair)

    def batches(self, start_batch: int):
        t = self.cfg.train
        return paired_factory(self.pair, t.batch_size, seed=t.seed, buffer_tokens=self.cfg.buffer_tokens)(start_batch)

    def finish(self, run: TrainingRun, last_row: dict, artifact_dir: Path) -> tuple[dict, dict]:
        cfg, pair = self.cfg, self.pair
        final = {**last_row, **evaluate_crosscoder(run.sae, pair, cfg.eval_tokens), **final_dead(run)}
        final["class_counts"] = class_counts(latent_table(run.sae.cpu(), cfg.taxonomy))
        save_crosscoder(run.sae, artifact_dir, metadata={"taxonomy": dataclasses.asdict(cfg.taxonomy)})
        return final, {"crosscoder_dir": self.artifact_dir, "pairing": pair.meta,
                       "scale_factors": {"base": pair.scale_base, "chat": pair.scale_chat}}


def train_crosscoder(cfg: CrosscoderConfig, pair: PairedCaches, out_dir: str | Path, progress: bool = False) -> CrosscoderResult:
    """Train (or resume, or find finished) a crosscoder on `pair` into out_dir."""
    r = drive_run(CrosscoderRunSpec(cfg, pair), out_dir, progress=progress)
    return CrosscoderResult(r.artifact_dir, r.run_json, r.metrics, r.resumed_from_step, r.skipped)


@torch.no_grad()
def evaluate_crosscoder(cc: CrossCoder, pair: PairedCaches, max_rows: int, batch_size: int = TrainConfig.batch_size) -> dict:
    """Per-model explained variance and MSE (training units) and L0 on the first max_rows rows,
    with the inference threshold."""
    sums = {"n": 0, "l0": 0.0}
    xs, xhats = [], []
    for start in range(0, min(max_rows, pair.n_tokens), batch_size):
        x_BMD = read_paired(pair, start, min(start + batch_size, max_rows, pair.n_tokens)).x_BMD.to(cc.W_enc.device)
        f_BF = cc.encode(x_BMD.flatten(1))
        xs.append(x_BMD)
        xhats.append(cc.split(cc.decode(f_BF)))
        sums["n"] += x_BMD.shape[0]
        sums["l0"] += float((f_BF > 0).sum())
    x_NMD, x_hat_NMD = torch.cat(xs), torch.cat(xhats)
    out = {"eval_tokens": sums["n"], "eval_l0": sums["l0"] / max(sums["n"], 1)}
    for m, name in enumerate(("base", "chat")):
        out[f"explained_variance_{name}"] = float(metrics.explained_variance(x_NMD[:, m], x_hat_NMD[:, m]))
        out[f"mse_{name}"] = float((x_NMD[:, m] - x_hat_NMD[:, m]).pow(2).sum(-1).mean())
    return out

