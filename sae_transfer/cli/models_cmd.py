"""`sae-transfer demo-models` builds the offline base/chat pair; `sae-transfer hooks` lists
(or checks) the hook names a model serves."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command("demo-models")(demo_models)
    app.command("hooks")(hooks)


def demo_models(
    out: Path = typer.Option(Path("artifacts/demo-models"), "--out", help="Folder for base/, chat/ and chat-checkpoints/."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a matching build is on disk."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: one per core)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Build the offline demo pair (base pretrained on stdlib sources, chat fine-tuned from it); cached."""
    from transformers.utils import logging as hf_logging

    from sae_transfer.demo import DemoPairConfig, build_demo_pair, demo_paths

    hf_logging.disable_progress_bar()  # one bar per saved shard is noise here
    cfg = DemoPairConfig()
    if threads is not None:
        cfg = dataclasses.replace(cfg, num_threads=threads)
    report = build_demo_pair(out, cfg, force=force, progress=not quiet)
    paths = demo_paths(out)
    if report.skipped:
        typer.echo(f"demo pair already built in {out} (config {report.config_hash}): nothing to do; --force rebuilds")
    else:
        typer.echo(f"built demo pair in {report.build_seconds:.0f} s (config {report.config_hash})")
    typer.echo(f"base:        {paths.base}")
    typer.echo(f"chat:        {paths.chat}")
    typer.echo(f"checkpoints: {', '.join(str(p) for p in paths.checkpoint_dirs())}")
    typer.echo(f"hook:        {report.hook}   ({report.n_params / 1e6:.2f}M params per model)")
    loss = report.losses
    typer.echo("held-out next-token loss, nats/token (stdlib files never trained on):")
    typer.echo(f"  unigram {loss['unigram_heldout']:.3f}   base {loss['base_heldout']:.3f}   chat {loss['chat_heldout']:.3f}")
    typer.echo(f"held-out instruction pairs, loss on the answer tokens ({report.n_pairs.get('eval', 0)} pairs):")
    typer.echo(f"  base {loss['base_assistant_heldout']:.3f}   chat {loss['chat_assistant_heldout']:.3f}")
    for i, rollout in enumerate(report.rollouts, 1):
        typer.echo(f"--- rollout {i}: user ---\n{rollout['prompt']}\n--- chat (greedy) ---\n{rollout['chat']}")


def hooks(
    model: str = typer.Option(..., "--model", help="Hugging Face id or local checkpoint folder."),
    contains: str | None = typer.Option(None, "--contains", help="Only names containing this text, e.g. resid_pre."),
    check: list[str] = typer.Option([], "--check", help="Fail with close valid names unless this hook exists (repeatable)."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision of the model."),
    device: str | None = typer.Option("cpu", "--device", help="Device to boot the model on."),
) -> None:
    """Print the hook names MODEL serves, one per line (or check some with --check)."""
    from transformers.utils import logging as hf_logging

    from sae_transfer.models import check_hooks, hook_names, load_model

    hf_logging.disable_progress_bar()
    bridge = load_model(model, revision=revision, device=device)
    if check:
        check_hooks(bridge, list(check))
    for name in hook_names(bridge):
        if contains is None or contains in name:
            typer.echo(name)
