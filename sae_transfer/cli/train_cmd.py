"""`sae-transfer train` and `sae-transfer finetune`: train an SAE on cached activations (or on
live activations of a model: --model/--hook/--corpus), or fine-tune an existing SAE on another
model's activations. Both resume; both print the SAE folder."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import typer

from sae_transfer.cli._common import parse_count, require
from sae_transfer.errors import UserError
from sae_transfer.training.config import TrainConfig

_DEVICE_HELP = "cpu, cuda or cuda:N (default: CUDA when available, else CPU); a checkpoint resumes on any device."
_DTYPE_HELP = "Matmul precision: float32, or bfloat16 (autocast-style; weights and Adam state stay fp32)."
_TF32_HELP = "On CUDA, let fp32 matmuls use TF32 tensor cores (recorded in run.json)."


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command("train")(train)
    app.command("finetune")(finetune)


def _train_config(fields: dict):
    """A TrainConfig from the flags given (None: the config's default); one line on a bad setting."""

    try:
        return TrainConfig(**{k: v for k, v in fields.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad training settings: {exc}") from None


def _report(result, quiet: bool) -> None:
    m = result.metrics
    if not quiet:
        state = ("already complete" if result.skipped
                 else (f"resumed from step {result.resumed_from_step}" if result.resumed_from_step else "trained"))
        typer.echo(f"{state}: l0 {m.get('l0', float('nan')):.1f}, "
                   f"explained variance {m.get('explained_variance', float('nan')):.4f}, "
                   f"dead {m.get('dead_fraction_final', float('nan')):.3f}", err=True)
    typer.echo(str(result.sae_dir))


def train(
    acts: Path | None = typer.Option(None, "--acts", help="Activation dataset folder (from `sae-transfer cache`) "
                                     "or a .safetensors file with 'acts'. Or train live: --model/--hook/--corpus."),
    model: str | None = typer.Option(None, "--model", help="Train on live activations of this model "
                                     "(local folder or Hub id; with --hook and --corpus) instead of --acts."),
    hook: list[str] | None = typer.Option(None, "--hook", help="Hook to train on (live), e.g. blocks.6.hook_resid_post; "
                                          "repeat it to train one SAE per hook from the same forward passes."),
    corpus: str | None = typer.Option(None, "--corpus", help="Text source (live): stdlib, a .txt/.jsonl/.parquet "
                                      "file or folder, or a Hub dataset id; its train split is used."),
    context_size: int = typer.Option(128, "--context-size", min=2, help="Tokens per sequence, BOS included (live)."),
    arch: str = typer.Option("relu", "--arch", help="relu | topk | batchtopk | jumprelu"),
    d_sae: int = typer.Option(..., "--d-sae", min=1, help="Number of features."),
    tokens: str = typer.Option(..., "--tokens", help="Training tokens, e.g. 50M."),
    out: Path = typer.Option(..., "--out", help="Run folder: sae/, checkpoints/, training_log/, run.json."),
    l1: float | None = typer.Option(None, "--l1", min=0.0, help="Sparsity coefficient (relu: L1·‖W_dec‖; jumprelu: L0)."),
    k: int | None = typer.Option(None, "--k", min=1, help="Active features per token (topk, batchtopk)."),
    lr: float | None = typer.Option(None, "--lr", help="Adam learning rate."),
    batch_size: int = typer.Option(TrainConfig.batch_size, "--batch-size", min=1, help="Tokens per step."),
    lr_warmup: float = typer.Option(0.0, "--lr-warmup", min=0.0, max=1.0, help="Fraction of steps of linear LR warm-up."),
    lr_decay: float = typer.Option(0.2, "--lr-decay", min=0.0, max=1.0,
                                   help="Fraction of steps of linear LR decay to zero at the end."),
    l1_warmup: float = typer.Option(0.05, "--l1-warmup", min=0.0, max=1.0,
                                    help="Fraction of steps of sparsity-coefficient warm-up."),
    jumprelu_l0: str = typer.Option("step", "--jumprelu-l0", help="JumpReLU L0 penalty: step or tanh."),
    ghost_grads: bool = typer.Option(False, "--ghost-grads", help="relu: ghost grads for dead latents."),
    resample_every: int = typer.Option(0, "--resample-every", min=0, help="relu: resample dead latents every N steps (0: off)."),
    init_b_dec: str = typer.Option("auto", "--init-b-dec",
                                   help="auto (relu: zeros; others: geometric_median) | geometric_median | mean | zeros"),
    dead_window: str = typer.Option("1M", "--dead-window", help="Tokens without firing after which a latent is dead."),
    checkpoint_every: str = typer.Option("10M", "--checkpoint-every", help="Checkpoint every N tokens (0: only at the end)."),
    log_every: int = typer.Option(50, "--log-every", min=1, help="Training-log row every N steps."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", min=0, help="torch threads (0: default)."),
    buffer_tokens: str = typer.Option("256k", "--buffer-tokens",
                                      help="Shuffle-buffer size in tokens (live: activations held on the device)."),
    device: str | None = typer.Option(None, "--device", help=_DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=_DTYPE_HELP),
    tf32: bool = typer.Option(True, "--tf32/--no-tf32", help=_TF32_HELP),
    sparse_kernels: str = typer.Option("auto", "--sparse-kernels",
                                       help="topk/batchtopk/jumprelu kernels: csr | dense | auto (csr on CPU, dense on CUDA)."),
    sweep: list[str] | None = typer.Option(None, "--sweep", help="Train one SAE per value, e.g. --sweep l1=2,5,12 "
                                           "(l1, k, lr, d-sae, arch; repeat for a grid). Live: all from one stream."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary; print only the SAE folder."),
) -> None:
    """Train an SAE from cached activations, or from live activations of --model (resumes from the
    newest checkpoint in --out); print the SAE folder. Several --hook or a --sweep train several
    SAEs (live: from one forward pass per batch), one run folder each under --out."""
    from sae_transfer.training.api import train_live, train_on_dataset
    from sae_transfer.training.data import open_training_data

    hooks = list(dict.fromkeys(hook or []))
    live = _live_or_cached(acts, model, hooks[0] if hooks else None, corpus)
    if not live and hooks:
        raise UserError("--hook names the hooks of live training (with --model); a cached dataset holds one hook already")
    if not live:
        open_training_data(acts, batch_size)  # the input first: a missing or empty dataset is the error to name
    require(lr is None or lr > 0, "--lr", lr, "the learning rate must be > 0, e.g. 4e-4")
    require(k is None or k <= d_sae, "--k", k, f"at most --d-sae ({d_sae}) features can be active")
    fields = dict(
        arch=arch, d_sae=d_sae, total_tokens=parse_count(tokens, "--tokens"), l1_coefficient=l1, k=k, lr=lr,
        batch_size=batch_size, seed=seed, lr_warmup_frac=lr_warmup, lr_decay_frac=lr_decay, l1_warmup_frac=l1_warmup,
        jumprelu_l0_mode=jumprelu_l0, ghost_grads=ghost_grads, resample_every_steps=resample_every, init_b_dec=init_b_dec,
        dead_window_tokens=parse_count(dead_window, "--dead-window"),
        checkpoint_every_tokens=parse_count(checkpoint_every, "--checkpoint-every", minimum=0),
        log_every_steps=log_every, num_threads=threads, device=device, dtype=dtype, tf32=tf32, sparse_kernels=sparse_kernels,
    )
    cfg, buffer = _train_config(fields), parse_count(buffer_tokens, "--buffer-tokens")
    variants = sweep_variants(sweep or [])
    for label, changes in variants:
        _train_config({**fields, **changes})  # every variant valid before anything trains
        require(changes.get("k", cfg.k) <= changes.get("d_sae", cfg.d_sae), "--sweep", label,
                "at most d_sae features can be active: lower k or raise d-sae")
    if live and (len(hooks) > 1 or sweep):
        from sae_transfer.training.api import LiveRun, train_live_group

        runs = [LiveRun(h, dataclasses.replace(cfg, **changes), out / _run_folder(h, label), variant=label)
                for h in hooks for label, changes in variants]
        results = train_live_group(model, corpus, runs, context_size=context_size, buffer_tokens=buffer, progress=not quiet)
        for result in results:
            _report(result, quiet)
    elif live:
        _report(train_live(model, hooks[0], corpus, out, cfg, context_size=context_size, buffer_tokens=buffer,
                           progress=not quiet), quiet)
    elif sweep:
        for label, changes in variants:
            _report(train_on_dataset(acts, out / _run_folder(None, label), dataclasses.replace(cfg, **changes),
                                     buffer_tokens=buffer, progress=not quiet, variant=label), quiet)
    else:
        _report(train_on_dataset(acts, out, cfg, buffer_tokens=buffer, progress=not quiet), quiet)


# --sweep keys: the flag names of `train` (and TrainConfig's own names), with how to read a value
_SWEEP_KEYS = {"l1": ("l1_coefficient", float), "l1_coefficient": ("l1_coefficient", float), "k": ("k", int),
               "lr": ("lr", float), "d-sae": ("d_sae", int), "d_sae": ("d_sae", int), "arch": ("arch", str)}


def sweep_variants(specs: list[str]) -> list[tuple[str | None, dict]]:
    """`["l1=2,5", "k=16,32"]` -> one (label, TrainConfig changes) per combination; [(None, {})]
    without a sweep. One line on a bad spec."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or key not in _SWEEP_KEYS or not values.strip():
            raise UserError(f"--sweep {spec!r}: write KEY=V1,V2,... with KEY one of l1, k, lr, d-sae, arch "
                            "(e.g. --sweep l1=2,5,12)")
        field, kind = _SWEEP_KEYS[key]
        try:
            axes.append([(field, kind(v.strip())) for v in values.split(",") if v.strip()])
        except ValueError:
            raise UserError(f"--sweep {spec!r}: {key} takes {kind.__name__} values, e.g. {key}=2,5") from None
    if not axes:
        return [(None, {})]
    from sae_transfer.study import variant_label

    return [(variant_label(combo), dict(combo)) for combo in itertools.product(*axes)]


def _run_folder(hook: str | None, variant: str | None) -> str:
    """The run folder of one SAE of a multi-SAE `train` under --out."""
    from sae_transfer.storage.layout import slug

    return "-".join(slug(part) for part in (hook, variant) if part) or "sae"


def _live_or_cached(acts: Path | None, model: str | None, hook: str | None, corpus: str | None) -> bool:
    """True for live training (--model/--hook/--corpus), False for --acts; one line when neither or both."""
    if acts is not None and model is not None:
        raise UserError("pass either --acts (cached activations) or --model/--hook/--corpus (live), not both")
    if acts is not None:
        return False
    if model is None:
        raise UserError("pass --acts (cached activations) or --model with --hook and --corpus (live activations)")
    missing = [flag for flag, value in (("--hook", hook), ("--corpus", corpus)) if value is None]
    if missing:
        raise UserError(f"live training with --model needs {' and '.join(missing)}")
    return True


def finetune(
    sae: Path = typer.Option(..., "--sae", help="SAE folder to start from (ours or SAELens 6)."),
    acts: Path = typer.Option(..., "--acts", help="Activations of the target (e.g. chat) model."),
    out: Path = typer.Option(..., "--out", help="Run folder for the fine-tuned SAE."),
    tokens: str = typer.Option("5M", "--tokens", help="Fine-tuning token budget (the study: 5M)."),
    lr: float | None = typer.Option(None, "--lr", help="Default: the parent run's LR (same as pre-training)."),
    l1: float | None = typer.Option(None, "--l1", min=0.0, help="Default: the parent run's sparsity coefficient."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Tokens per step (the study: 256)."),
    lr_warmup: float = typer.Option(0.05, "--lr-warmup", min=0.0, max=1.0, help="Linear warm-up over this fraction."),
    lr_decay: float = typer.Option(0.2, "--lr-decay", min=0.0, max=1.0, help="Linear decay to zero over the last fraction."),
    checkpoint_every: str = typer.Option("1M", "--checkpoint-every", help="Checkpoint every N tokens (0: only at the end)."),
    log_every: int = typer.Option(50, "--log-every", min=1, help="Training-log row every N steps."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", min=0, help="torch threads (0: default)."),
    buffer_tokens: str = typer.Option("256k", "--buffer-tokens", help="Shuffle-buffer size in tokens."),
    device: str | None = typer.Option(None, "--device", help=_DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=_DTYPE_HELP),
    tf32: bool = typer.Option(True, "--tf32/--no-tf32", help=_TF32_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the SAE folder."),
) -> None:
    """Fine-tune an SAE on another model's activations (the seed study's recipe); print the SAE folder."""
    from sae_transfer.training.api import finetune_on_dataset

    require(lr is None or lr > 0, "--lr", lr, "the learning rate must be > 0, e.g. 4e-4")
    result = finetune_on_dataset(
        sae, acts, out, total_tokens=parse_count(tokens, "--tokens"), batch_size=batch_size, seed=seed, lr=lr, l1_coefficient=l1,
        buffer_tokens=parse_count(buffer_tokens, "--buffer-tokens"), progress=not quiet, lr_warmup_frac=lr_warmup,
        lr_decay_frac=lr_decay, checkpoint_every_tokens=parse_count(checkpoint_every, "--checkpoint-every", minimum=0),
        log_every_steps=log_every, num_threads=threads,
        device=device, dtype=dtype, tf32=tf32,
    )
    _report(result, quiet)
