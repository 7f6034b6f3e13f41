"""`sae-transfer crosscoder`: train a BatchTopK crosscoder on a base and a chat model's
activations, from two cache folders or from two models and a corpus (cached first). Resumes;
prints the crosscoder folder and, on stderr, the latent classes."""

from __future__ import annotations

from pathlib import Path

import typer

from sae_transfer.cli._common import parse_count
from sae_transfer.errors import UserError
from sae_transfer.training.config import TrainConfig


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command("crosscoder")(crosscoder)


def _caches(base_acts, chat_acts, base_model, chat_model, hook, corpus, cache_tokens, context_size, out, device):
    """(base cache, chat cache): the given folders, or both models cached on the same corpus."""
    if base_acts and chat_acts:
        if base_model or chat_model:
            raise UserError("pass either --base-acts/--chat-acts or --base-model/--chat-model, not both")
        return base_acts, chat_acts
    if not (base_model and chat_model and hook):
        raise UserError("pass --base-acts and --chat-acts (cache folders), or --base-model, --chat-model and --hook")
    from sae_transfer.activations import CacheConfig, cache_activations
    from sae_transfer.corpus import CorpusConfig

    paths = []
    for model in (base_model, chat_model):
        cfg = CacheConfig(model=model, hooks=(hook,), corpus=CorpusConfig(source=corpus),
                          n_tokens=parse_count(cache_tokens, "--cache-tokens"), context_size=context_size, device=device)
        paths.append(cache_activations(cfg, out / "activations", progress=False)[0].path)
    return paths[0], paths[1]


def crosscoder(
    out: Path = typer.Option(..., "--out", help="Run folder: crosscoder/, checkpoints/, training_log/, run.json."),
    base_acts: Path | None = typer.Option(None, "--base-acts", help="Base model's activation cache folder."),
    chat_acts: Path | None = typer.Option(None, "--chat-acts", help="Chat model's cache folder (same corpus and hook)."),
    base_model: str | None = typer.Option(None, "--base-model", help="Base model (HF id or folder), cached first."),
    chat_model: str | None = typer.Option(None, "--chat-model", help="Chat model (HF id or folder), cached first."),
    hook: str | None = typer.Option(None, "--hook", help="Hook to cache with --base-model/--chat-model."),
    corpus: str = typer.Option("stdlib", "--corpus", help="Corpus to cache on: 'stdlib', a file or folder, or a Hub id."),
    cache_tokens: str = typer.Option("1M", "--cache-tokens", help="Tokens to cache per model."),
    context_size: int = typer.Option(128, "--context-size", help="Tokens per cached sequence."),
    d_sae: int = typer.Option(..., "--d-sae", help="Number of latents."),
    k: int = typer.Option(32, "--k", help="Mean active latents per token (BatchTopK)."),
    tokens: str = typer.Option(..., "--tokens", help="Training tokens, e.g. 50M."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    batch_size: int = typer.Option(TrainConfig.batch_size, "--batch-size", help="Tokens per step."),
    checkpoint_every: str = typer.Option("10M", "--checkpoint-every", help="Checkpoint every N tokens."),
    buffer_tokens: str = typer.Option("64k", "--buffer-tokens",
                                      help="Paired shuffle-buffer rows (memory: rows × 2 × d_model × 4 B)."),
    seed: int = typer.Option(0, "--seed"),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: CUDA if available)."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: default)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the crosscoder folder."),
) -> None:
    """Train a BatchTopK crosscoder (Minder et al. 2025) on paired base/chat activations; print its folder."""
    from sae_transfer.diffing.crosscoder_run import CrosscoderConfig, train_crosscoder
    from sae_transfer.diffing.paired import open_pair

    base, chat = _caches(base_acts, chat_acts, base_model, chat_model, hook, corpus, cache_tokens, context_size, out, device)
    pair = open_pair(base, chat)
    try:
        train = TrainConfig(arch="batchtopk", d_sae=d_sae, k=k, total_tokens=parse_count(tokens, "--tokens"), lr=lr,
                            batch_size=batch_size, seed=seed, num_threads=threads, device=device,
                            checkpoint_every_tokens=parse_count(checkpoint_every, "--checkpoint-every", minimum=0))
        cfg = CrosscoderConfig(train=train, buffer_tokens=parse_count(buffer_tokens, "--buffer-tokens"))
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad crosscoder settings: {exc}") from None
    result = train_crosscoder(cfg, pair, out, progress=not quiet)
    if not quiet:
        m = result.metrics
        state = "already complete" if result.skipped else "trained"
        typer.echo(f"{state}: explained variance base {m.get('explained_variance_base', float('nan')):.3f}, "
                   f"chat {m.get('explained_variance_chat', float('nan')):.3f}; latents {m.get('class_counts')}", err=True)
    typer.echo(str(result.crosscoder_dir))
