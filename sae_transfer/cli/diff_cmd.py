"""`sae-transfer diff` and `sae-transfer examples`: feature-level diffing on cached activations
(per-latent transfer, latent matching and drift; max-activating contexts). Both append rows to
Parquet tables under the results folder (`--out`), which the catalog exposes to SQL."""

from __future__ import annotations

from pathlib import Path

import typer

from sae_transfer.cli._common import parse_count, print_table, require
from sae_transfer.errors import UserError

SaeOpt = typer.Option(..., "--sae", help="SAE folder (SAELens layout); repeat for several (diff matches the first two)")
BaseOpt = typer.Option(None, "--base-acts", help="activation cache of the base model (from `sae-transfer cache`)")
ChatOpt = typer.Option(None, "--chat-acts", help="activation cache of the chat model, on the same hook")
OutOpt = typer.Option(..., "--out", help="results folder; tables go to OUT/<table>/part-*.parquet")
DeviceOpt = typer.Option(None, "--device", help="cuda, cpu, ... (default: CUDA when available)")
BatchOpt = typer.Option("8192", "--batch-tokens", help="tokens encoded at once (memory ~ batch x d_sae floats)")
BosOpt = typer.Option(False, "--keep-bos/--skip-bos", help="count BOS positions (skipped by default: they are outliers)")


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command("diff")(diff)
    app.command("examples")(examples)


def _caches(base_acts: Path | None, chat_acts: Path | None, need_both: bool) -> dict[str, Path]:
    caches = {k: v for k, v in (("base", base_acts), ("chat", chat_acts)) if v is not None}
    if need_both and len(caches) < 2:
        raise UserError("--base-acts and --chat-acts are both needed: per-latent transfer compares the two models")
    if not caches:
        raise UserError("no activations: pass --base-acts and/or --chat-acts (folders from `sae-transfer cache`)")
    return caches


def _load_saes(sae: list[str], hook: str):
    from sae_transfer.evals.loading import load_saes

    for spec in sae:
        if not Path(spec).expanduser().is_dir():
            raise UserError(f"--sae {spec!r}: no such folder; pass an SAE folder (cfg.json + sae_weights.safetensors)")
    return load_saes(sae, hook)


def _tail(path: str) -> tuple[str, ...]:
    """What names an SAE folder: its name, with the run folder's for trainer runs (<run>/sae)."""
    p = Path(str(path).rstrip("/"))
    return p.parts[-2:] if p.name == "sae" else p.parts[-1:]


def _child_and_parent(a, b):
    """(child, parent) when one SAE records the other as its fine-tuning parent, else None."""
    for child, parent in ((b, a), (a, b)):
        origin = child.sae.cfg.metadata.get("finetuned_from")
        if origin and _tail(origin) == _tail(parent.folder):
            return child, parent
    return None


def diff(
    sae: list[str] = SaeOpt, base_acts: Path | None = BaseOpt, chat_acts: Path | None = ChatOpt, out: Path = OutOpt,
    match_on: str = typer.Option("chat", "--match-on",
                                 help="whose tokens the matched pairs' activation correlation uses: base | chat"),
    min_cosine: float = typer.Option(0.0, "--min-cosine", help="matched pairs need a decoder cosine above this"),
    candidates: int = typer.Option(8, "--candidates", min=1,
                                   help="top-c decoder cosines per latent kept for the sparse assignment"),
    min_contribution: float = typer.Option(0.0, "--min-contribution", min=0.0,
                                           help="a firing needs f*||d|| above this share of the mean norm (0: any f > 0)"),
    silent: float = typer.Option(1e-5, "--silent-frequency", min=0.0,
                                 help="firing frequency at or below which a latent is silent"),
    batch_tokens: str = BatchOpt, keep_bos: bool = BosOpt, device: str | None = DeviceOpt,
) -> None:
    """Per-latent transfer of every SAE on base and chat -> OUT/latent_stats; with two SAEs, their
    decoder-cosine matching and activation correlation -> OUT/latent_matches, and the drift of a
    fine-tuned SAE from its parent (any two given SAEs) -> OUT/latent_drift."""
    from sae_transfer.diffing import api
    from sae_transfer.diffing.latent_stats import LatentStatsConfig
    from sae_transfer.diffing.matching import MatchConfig
    from sae_transfer.storage.tables import append_rows

    require(match_on in ("base", "chat"), "--match-on", match_on, "use base or chat")
    require(-1.0 <= min_cosine < 1.0, "--min-cosine", min_cosine, "use a cosine in [-1, 1)")
    caches = _caches(base_acts, chat_acts, need_both=True)
    batch = parse_count(batch_tokens, "--batch-tokens")
    skip = () if keep_bos else api.DEFAULT_SKIP_ROLES
    hook = api.cache_info(caches["chat"])["hook"]
    if api.cache_info(caches["base"])["hook"] != hook:
        raise UserError(f"--base-acts holds {api.cache_info(caches['base'])['hook']!r} but --chat-acts holds {hook!r}: "
                        "cache both models at the same hook")
    saes = _load_saes(sae, hook)
    cfg = LatentStatsConfig(batch_tokens=batch, silent_frequency=silent, min_contribution=min_contribution, device=device)
    summary = []
    for loaded in saes:
        table = api.latent_stats_table(loaded, caches, cfg, skip)
        append_rows(out, "latent_stats", table)
        status = table.filter(table.column("model").to_numpy(zero_copy_only=False) == "chat").column("status").to_pylist()
        summary.append({"sae_id": loaded.info["sae_id"], **{s: status.count(s) for s in ("shared", "dies", "appears", "dead")}})
    print_table(["sae_id", "shared", "dies", "appears", "dead"], summary)
    if len(saes) >= 2:
        a, b = saes[0], saes[1]
        mcfg = MatchConfig(candidates=candidates, min_cosine=min_cosine, batch_tokens=batch, device=device)
        matches = api.match_table(a, b, caches[match_on], match_on, mcfg, skip)
        append_rows(out, "latent_matches", matches)
        cos = matches.column("dec_cos").to_numpy()
        typer.echo(f"matched {matches.num_rows} of {a.sae.d_sae} x {b.sae.d_sae} latents ({matches.column('method')[0]}), "
                   f"median decoder cosine {float(_median(cos)):.3f}" if matches.num_rows else "no pairs above --min-cosine")
    for i, a in enumerate(saes):
        for b in saes[i + 1:]:
            pair = _child_and_parent(a, b)
            if pair:
                append_rows(out, "latent_drift", api.drift_table(*pair))
                typer.echo(f"drift of {pair[0].info['sae_id']} from its parent {pair[1].info['sae_id']} -> latent_drift")


def _median(values) -> float:
    import numpy as np

    return float(np.median(values)) if len(values) else float("nan")


def examples(
    sae: list[str] = SaeOpt, base_acts: Path | None = BaseOpt, chat_acts: Path | None = ChatOpt, out: Path = OutOpt,
    k: int = typer.Option(10, "--k", min=1, help="contexts kept per latent per model"),
    before: int = typer.Option(12, "--window-before", min=0, help="tokens shown before the max-activating token"),
    after: int = typer.Option(4, "--window-after", min=0, help="tokens shown after it"),
    tokenizer: str | None = typer.Option(None, "--tokenizer",
                                         help="tokenizer folder or id for token texts (default: the cache's model)"),
    batch_tokens: str = BatchOpt, keep_bos: bool = BosOpt, device: str | None = DeviceOpt,
) -> None:
    """Max-activating contexts of every latent of every SAE on each given model's cache, in one
    streaming pass -> OUT/latent_examples (window tokens and activations) and OUT/latent_histograms."""
    from sae_transfer.diffing import api
    from sae_transfer.diffing.examples import ExamplesConfig
    from sae_transfer.storage.tables import append_rows

    caches = _caches(base_acts, chat_acts, need_both=False)
    hook = api.cache_info(next(iter(caches.values())))["hook"]
    saes = _load_saes(sae, hook)
    cfg = ExamplesConfig(k=k, window_before=before, window_after=after, batch_tokens=parse_count(batch_tokens, "--batch-tokens"),
                         device=device)
    skip = () if keep_bos else api.DEFAULT_SKIP_ROLES
    tok = api.load_tokenizer(tokenizer) if tokenizer else "auto"
    if tok is None:
        raise UserError(f"--tokenizer {tokenizer!r}: cannot load it; pass a local tokenizer folder or a cached Hub id")
    rows = []
    for label, path in caches.items():
        for loaded in saes:
            table, hist = api.examples_tables(loaded, path, label, cfg, skip, tok)
            append_rows(out, "latent_examples", table)
            append_rows(out, "latent_histograms", hist)
            n_latents = len(set(table.column("latent").to_pylist()))
            rows.append({"sae_id": loaded.info["sae_id"], "model": label, "latents_with_examples": n_latents,
                         "rows": table.num_rows, "tokens": int(table.column("n_tokens")[0].as_py()) if table.num_rows else 0})
    print_table(["sae_id", "model", "latents_with_examples", "rows", "tokens"], rows)
