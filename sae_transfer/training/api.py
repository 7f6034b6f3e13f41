"""Entry points for the CLI and the pipeline tasks: train or fine-tune an SAE on one cached
activation dataset, or on live activations of a model, into a run folder (see `run.train_sae`
for the folder layout)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from sae_transfer.corpus import CorpusConfig
from sae_transfer.errors import UserError
from sae_transfer.sae.io import load_sae
from sae_transfer.storage.fingerprint import sha256_file
from sae_transfer.storage.layout import RunLayout
from sae_transfer.storage.sae_format import WEIGHTS_FILE
from sae_transfer.study import SAESection
from sae_transfer.training.config import RUNTIME_FIELDS, TrainConfig, finetune_defaults
from sae_transfer.training.data import open_training_data
from sae_transfer.training.group import Member, train_group
from sae_transfer.training.live import BUFFER_TOKENS, FORWARD_TOKENS, REFILL_PARTS, open_live_data, open_live_stream
from sae_transfer.training.run import Parent, RunResult, SAERunSpec, parent_sae_arch, train_sae


def sae_train_config(sae: SAESection, seed: int = 0, device: str | None = None) -> TrainConfig:
    """The trainer's config for a study's SAESection (d_sae is set from the data: expansion x d_in)."""
    return TrainConfig(arch=sae.arch, l1_coefficient=sae.l1_coefficient, k=sae.k, lr=sae.lr, batch_size=sae.batch_size,
                       total_tokens=sae.train_tokens, seed=seed, device=device)


def train_on_dataset(acts_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *, expansion: int | None = None,
                     buffer_tokens: int = BUFFER_TOKENS, progress: bool = False, variant: str | None = None) -> RunResult:
    """Train an SAE with `cfg` on a cached dataset (d_sae = expansion x d_model when `expansion` is
    given, else cfg.d_sae); resumable. `variant` (one SAE of a sweep) goes into cfg.json's
    metadata. Returns the RunResult (sae_dir, metrics, ...)."""
    data = open_training_data(acts_path, cfg.batch_size, seed=cfg.seed, buffer_tokens=buffer_tokens)
    if expansion is not None:
        cfg = dataclasses.replace(cfg, d_sae=expansion * data.d_in)
    return train_sae(cfg, data.make_source, data.d_in, out_dir, metadata=_with_variant(data.metadata, variant),
                     progress=progress)


def _with_variant(metadata: dict, variant: str | None) -> dict:
    return {**metadata, "variant": variant} if variant else metadata


def train_live(model, hook: str, corpus: CorpusConfig | str | Path, out_dir: str | Path, cfg: TrainConfig, *,
               expansion: int | None = None, context_size: int = 128, buffer_tokens: int = BUFFER_TOKENS,
               refill_parts: int = REFILL_PARTS, forward_tokens: int = FORWARD_TOKENS, n_tokens: int | None = None,
               prepend_bos: bool = True, model_dtype: str = "float32", progress: bool = False) -> RunResult:
    """Train an SAE with `cfg` on live activations of `model` (a loaded model or a spec) at `hook`
    over the corpus's train split, with no cache on disk; resumable (see training/live.py).
    The model runs on cfg.device. `n_tokens` bounds the corpus tokens tokenised (default:
    cfg.total_tokens, one pass with no repeats; fewer makes the stream loop over epochs)."""
    data = open_live_data(model, hook, corpus, cfg.batch_size, seed=cfg.seed, buffer_tokens=buffer_tokens,
                          context_size=context_size, n_tokens=n_tokens or cfg.total_tokens, refill_parts=refill_parts,
                          forward_tokens=forward_tokens, prepend_bos=prepend_bos, device=cfg.device,
                          model_dtype=model_dtype)
    if expansion is not None:
        cfg = dataclasses.replace(cfg, d_sae=expansion * data.d_in)
    return train_sae(cfg, data.make_source, data.d_in, out_dir, metadata=data.metadata, progress=progress)


@dataclass(frozen=True)
class LiveRun:
    """One SAE of a group trained from one live stream (`train_live_group`)."""

    hook: str
    cfg: TrainConfig
    out_dir: str | Path
    expansion: int | None = None  # d_sae = expansion x the hook's width (else cfg.d_sae)
    parent: Parent | None = None  # fine-tune this SAE (see `finetune_run`)
    variant: str | None = None  # the swept settings that set it apart, recorded in cfg.json ("variant")


def finetune_run(parent_sae: str | Path, hook: str, out_dir: str | Path, variant: str | None = None,
                 **overrides) -> LiveRun:
    """A LiveRun fine-tuning `parent_sae` with the seed study's recipe (as `finetune_live`)."""
    cfg, parent = _finetune_setup(Path(parent_sae), overrides)
    return LiveRun(hook, cfg, out_dir, parent=parent, variant=variant)


def train_live_group(model, corpus: CorpusConfig | str | Path, runs: list[LiveRun], *, context_size: int = 128,
                     buffer_tokens: int = BUFFER_TOKENS, refill_parts: int = REFILL_PARTS,
                     forward_tokens: int = FORWARD_TOKENS, prepend_bos: bool = True, model_dtype: str = "float32",
                     progress: bool = False) -> list[RunResult]:
    """Train (or fine-tune) every run of `runs` from one live stream of `model` over all their
    hooks: one forward pass per batch, whatever the number of SAEs (training/group.py). Each run
    gets its own folder, checkpoints, resume and run.json, and trains exactly what `train_live`
    would train alone with its settings. The runs share the batch size, the seed (the stream's
    shuffle) and the device; the corpus is tokenised for the largest token budget."""
    if not runs:
        raise UserError("nothing to train: no runs given")
    for field in ("batch_size", "seed", "device"):
        values = {getattr(r.cfg, field) for r in runs}
        if len(values) > 1:
            raise UserError(f"SAEs trained from one stream share its {field}; got {sorted(map(str, values))}: "
                            f"give them one {field} (or train them apart)")
    first = runs[0].cfg
    hooks = list(dict.fromkeys(r.hook for r in runs))
    stream = open_live_stream(model, hooks, corpus, first.batch_size, seed=first.seed, buffer_tokens=buffer_tokens,
                              context_size=context_size, n_tokens=max(r.cfg.total_tokens for r in runs),
                              refill_parts=refill_parts, forward_tokens=forward_tokens, prepend_bos=prepend_bos,
                              device=first.device, model_dtype=model_dtype)
    members = []
    for r in runs:
        data = stream.data(r.hook)
        cfg = dataclasses.replace(r.cfg, d_sae=r.expansion * data.d_in) if r.expansion is not None else r.cfg
        meta = _with_variant(data.metadata, r.variant)
        members.append(Member(SAERunSpec(cfg, data.make_source, data.d_in, meta, r.parent), Path(r.out_dir), r.hook))
    # fresh runs each read the stream's start for their scale estimate: computed once, kept until training passes it
    stream.live.pin_start(max(r.cfg.scale_estimate_tokens for r in runs))
    try:
        results, _ = train_group(members, stream.live.batches, progress=progress)
    finally:
        stream.live.unpin()
    return [RunResult(d.artifact_dir, d.run_json, d.metrics, d.resumed_from_step, d.skipped) for d in results]


def _finetune_setup(parent_sae: Path, overrides: dict) -> tuple[TrainConfig, Parent]:
    """The seed study's fine-tuning config for `parent_sae` (`finetune_defaults`: LR and sparsity
    coefficient from the parent's run.json) with `overrides`, and the parent's identity."""
    base = load_sae(parent_sae)
    fields = dict(arch=parent_sae_arch(parent_sae), d_sae=base.d_sae, k=base.cfg.k or TrainConfig.k)
    try:
        cfg = finetune_defaults(parent_config(parent_sae), **fields,
                                **{k: v for k, v in overrides.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad fine-tuning settings: {exc}") from None
    return cfg, Parent(path=parent_sae.resolve(), weights_sha256=sha256_file(parent_sae / WEIGHTS_FILE))


def finetune_on_dataset(parent_sae: str | Path, acts_path: str | Path, out_dir: str | Path, *,
                        buffer_tokens: int = BUFFER_TOKENS, progress: bool = False, variant: str | None = None,
                        **overrides) -> RunResult:
    """Fine-tune the SAE folder `parent_sae` on another model's cached activations with the seed
    study's recipe; `overrides` are TrainConfig fields (total_tokens, batch_size, seed, device,
    lr, ...). run.json records the parent's path and weights hash."""
    cfg, parent = _finetune_setup(Path(parent_sae), overrides)
    data = open_training_data(acts_path, cfg.batch_size, seed=cfg.seed, buffer_tokens=buffer_tokens)
    return train_sae(cfg, data.make_source, data.d_in, out_dir, metadata=_with_variant(data.metadata, variant),
                     parent=parent, progress=progress)


def finetune_live(parent_sae: str | Path, model, hook: str, corpus: CorpusConfig | str | Path, out_dir: str | Path, *,
                  context_size: int = 128, buffer_tokens: int = BUFFER_TOKENS, prepend_bos: bool = True,
                  model_dtype: str = "float32", progress: bool = False, **overrides) -> RunResult:
    """Fine-tune `parent_sae` as `finetune_on_dataset` does, on live activations of `model` at
    `hook` over the corpus's train split (training/live.py): no cache on disk."""
    cfg, parent = _finetune_setup(Path(parent_sae), overrides)
    data = open_live_data(model, hook, corpus, cfg.batch_size, seed=cfg.seed, buffer_tokens=buffer_tokens,
                          context_size=context_size, n_tokens=cfg.total_tokens, prepend_bos=prepend_bos,
                          device=cfg.device, model_dtype=model_dtype)
    return train_sae(cfg, data.make_source, data.d_in, out_dir, metadata=data.metadata, parent=parent, progress=progress)


def parent_config(sae_dir: Path) -> TrainConfig:
    """The TrainConfig of the run that produced `sae_dir` (its run.json), or the defaults."""
    run = RunLayout.holding(sae_dir)
    if run is not None and run.manifest.is_file():
        recorded = json.loads(run.manifest.read_text()).get("config") or {}
        known = {f.name for f in dataclasses.fields(TrainConfig)} - set(RUNTIME_FIELDS)  # the child picks its own device
        return TrainConfig.from_dict({k: v for k, v in recorded.items() if k in known})
    return TrainConfig()
