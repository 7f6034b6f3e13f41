"""`sae-transfer cache`: cache activations of one or more hooks to Parquet datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from sae_transfer.cli._common import parse_count


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command("cache")(cache)


def cache(
    model: str = typer.Option(..., "--model", help="Hugging Face id or local checkpoint folder."),
    hook: list[str] = typer.Option(..., "--hook", help="Hook name (repeat for several; one forward pass serves all)."),
    corpus: str = typer.Option("stdlib", "--corpus",
                               help="'stdlib', a .txt/.jsonl/.parquet file or folder, or a Hub dataset id."),
    tokens: str = typer.Option(..., "--tokens", help="Tokens (rows) per dataset, e.g. 2M; exact."),
    context_size: int = typer.Option(128, "--context-size", min=2, help="Tokens per sequence, BOS included."),
    out: Path = typer.Option(..., "--out", help="Root folder; one dataset folder per hook is made under it."),
    dtype: str = typer.Option("float32", "--dtype", help="Stored element dtype: float32, float16 or bfloat16."),
    model_dtype: str = typer.Option("float32", "--model-dtype", help="Dtype the model runs in."),
    batch_tokens: str = typer.Option("16384", "--batch-tokens", help="Tokens per forward pass (whole sequences)."),
    split: str = typer.Option("train", "--split", help="Corpus split: train or eval."),
    prepend_bos: bool = typer.Option(True, "--prepend-bos/--no-prepend-bos", help="BOS at position 0 of every sequence."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision of the model."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: CUDA if available)."),
    attn_implementation: str = typer.Option("auto", "--attn-implementation",
                                            help="auto (SDPA on CUDA, eager on CPU), eager (bit-exact with HF eager) or sdpa."),
    text_column: str = typer.Option("text", "--text-column", help="Text column of .jsonl/.parquet/Hub corpora."),
    max_docs: int | None = typer.Option(None, "--max-docs", min=1, help="Read at most this many documents."),
    shard_size: str = typer.Option("128MiB", "--shard-size", help="Bytes per Parquet shard."),
    row_group_rows: int | None = typer.Option(None, "--row-group-rows", min=1,
                                              help="Rows per row group (default ~16 MiB groups)."),
    full_forward: bool = typer.Option(False, "--full-forward",
                                      help="Run every layer instead of stopping after the deepest hook."),
    no_checksum: bool = typer.Option(False, "--no-checksum", help="Skip the sha256 of each shard."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Cache activations of every --hook from one forward pass per batch; print the dataset folders."""
    from sae_transfer.activations import CacheConfig, cache_activations
    from sae_transfer.corpus import CorpusConfig

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    cfg = CacheConfig(
        model=model,
        hooks=tuple(hook),
        corpus=CorpusConfig(source=corpus, text_column=text_column, max_docs=max_docs),
        n_tokens=parse_count(tokens, "--tokens"),
        context_size=context_size,
        dtype=dtype,
        model_dtype=model_dtype,
        batch_tokens=parse_count(batch_tokens, "--batch-tokens"),
        split=split,
        prepend_bos=prepend_bos,
        revision=revision,
        device=device,
        attn_implementation=attn_implementation,
        stop_early=not full_forward,
        shard_bytes=parse_count(shard_size, "--shard-size"),
        row_group_rows=row_group_rows,
        checksum=not no_checksum,
    )
    for record in cache_activations(cfg, out, progress=not quiet):
        if record.reused:
            note = "already complete, nothing to do"
        elif record.resumed_rows:
            note = f"resumed from {record.resumed_rows} rows"
        else:
            note = "written"
        typer.echo(f"{record.path}\t{record.hook}\t{record.n_tokens} tokens\t{note}")
