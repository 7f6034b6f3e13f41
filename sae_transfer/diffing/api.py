"""Entry points for the CLI and pipeline tasks: the diffing analyses on cached activations,
returning Arrow tables of the `sae_transfer.storage.diffing_tables` schemas (the caller appends them with
`sae_transfer.storage.tables.append_rows`). Streams come from `sae_transfer.storage.activations_scan`; the maths is in
`latent_stats`, `matching`, `examples` and `causal`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sae_transfer.corpus import ROLE_CODE
from sae_transfer.diffing import causal
from sae_transfer.diffing import examples as ex
from sae_transfer.diffing import latent_stats as ls
from sae_transfer.diffing import matching as mt
from sae_transfer.errors import UserError
from sae_transfer.models import check_device
from sae_transfer.sae.scaling import scale_factor
from sae_transfer.storage.activations import ActivationDataset, dataset_key
from sae_transfer.storage.activations_scan import mean_norm, read_sequences, scan_batches
from sae_transfer.storage.diffing_tables import columns_table

log = logging.getLogger(__name__)

DEFAULT_SKIP_ROLES = ("bos",)  # BOS activations are outliers that would top many latents' lists


def device_of(device: str | None) -> torch.device:
    """The compute device: as given, else CUDA when available, else CPU."""
    return torch.device(check_device(device))


def cache_info(path: str | Path) -> dict:
    """model_id, hook, d_model, content key and scale factor s = sqrt(d_model) / E||x|| of a cache."""
    ds = ActivationDataset(path)
    key = ds.meta.get("tokens_fingerprint")  # hash of the token ids: equal for base and chat caches of one corpus
    if not key:
        try:
            key = dataset_key(ds.meta)
        except ValueError:
            key = ds.path.name
    return {"model_id": ds.meta.get("model_id"), "hook": ds.hook, "d_model": ds.d_model, "n_tokens": ds.n_tokens,
            "tokens_fingerprint": key, "scale": scale_factor(mean_norm(path), ds.d_model), "meta": ds.meta}


def row_stream(path: str | Path, batch_tokens: int, skip_roles: tuple[str, ...] = DEFAULT_SKIP_ROLES,
               max_tokens: int | None = None) -> Iterator:
    """RowBatches of a cache in token order, without rows of the `skip_roles` roles; only the
    first `max_tokens` cache rows (None: all)."""
    codes = torch.tensor([ROLE_CODE[r] for r in skip_roles], dtype=torch.uint8)
    for batch in _first_rows(scan_batches(path, batch_tokens), max_tokens):
        if len(codes):
            keep = ~torch.isin(batch.role_B, codes)
            if not bool(keep.all()):
                idx = keep.nonzero().squeeze(1)
                batch = type(batch)(*(t.index_select(0, idx) for t in
                                      (batch.seq_id_B, batch.pos_B, batch.token_id_B, batch.role_B, batch.acts_BD)))
        yield batch


def _first_rows(batches, max_tokens: int | None):
    """The batches up to `max_tokens` rows in all (the last one cut)."""
    seen = 0
    for batch in batches:
        if max_tokens is not None and seen + len(batch) > max_tokens:
            if max_tokens > seen:
                yield batch.slice(0, max_tokens - seen)
            return
        seen += len(batch)
        yield batch


def check_pairing(loaded, info: dict, label: str) -> None:
    """UserError when the SAE's width or hook does not fit the cache."""
    sae = loaded.sae
    if sae.d_in != info["d_model"]:
        raise UserError(f"SAE {loaded.folder} has d_in={sae.d_in} but the {label} cache has d_model={info['d_model']}: "
                        "pick an SAE trained at this hook of this model family")
    hook = sae.cfg.metadata.get("hook_name")
    if hook and hook != info["hook"]:
        raise UserError(f"SAE {loaded.folder} was trained on {hook!r} but the {label} cache holds {info['hook']!r}: "
                        "pass a cache of the SAE's hook")


def _dictionary(loaded, hook: str) -> dict:
    return {"dictionary": loaded.info["sae_id"], "dictionary_model": loaded.info.get("sae_model"), "hook": hook}


def latent_stats_table(loaded, caches: dict[str, str | Path], cfg: ls.LatentStatsConfig = ls.LatentStatsConfig(),
                       skip_roles: tuple[str, ...] = DEFAULT_SKIP_ROLES, max_tokens: int | None = None):
    """`latent_stats` rows of one SAE on the caches labelled "base" and "chat"."""
    stats, infos = {}, {}
    for label, path in caches.items():
        infos[label] = info = cache_info(path)
        check_pairing(loaded, info, label)
        stream = (b.acts_BD for b in row_stream(path, cfg.batch_tokens, skip_roles, max_tokens))
        stats[label] = ls.model_latent_stats(loaded.sae, stream, info["scale"], cfg)
    cols = ls.stats_columns(stats, ("base", "chat"), cfg)
    labels = cols["model"]
    cols["model_id"] = np.where(labels == "base", infos["base"]["model_id"], infos["chat"]["model_id"])
    cols["tokens_fingerprint"] = np.where(labels == "base", infos["base"]["tokens_fingerprint"],
                                          infos["chat"]["tokens_fingerprint"])
    return columns_table("latent_stats", cols, _dictionary(loaded, infos["chat"]["hook"]))


def _token_texts(token_ids: np.ndarray, tokenizer) -> list[str] | None:
    if tokenizer is None:
        return None
    uniq, inverse = np.unique(token_ids, return_inverse=True)
    texts = np.asarray([tokenizer.decode([int(t)]) for t in uniq], dtype=object)
    return texts[inverse].tolist()


def load_tokenizer(model_id: str | None):
    """The model's tokenizer (local folder or cached Hub id), or None when it cannot be loaded offline."""
    if not model_id:
        return None
    try:
        from transformers import AutoTokenizer  # deferred: transformers takes seconds to import

        return AutoTokenizer.from_pretrained(model_id)
    except Exception as exc:  # token texts are a convenience; ids are always stored
        log.warning("no tokenizer for %s (%s): latent_examples.tokens stays null", model_id, exc)
        return None


def examples_tables(loaded, cache: str | Path, label: str, cfg: ex.ExamplesConfig = ex.ExamplesConfig(),
                    skip_roles: tuple[str, ...] = DEFAULT_SKIP_ROLES, tokenizer="auto", max_tokens: int | None = None):
    """(`latent_examples`, `latent_histograms`) tables of one SAE on one model's cache."""
    info = cache_info(cache)
    check_pairing(loaded, info, label)
    device = device_of(cfg.device)
    sae, _ = ls.applied_sae(loaded.sae, info["scale"], device)
    acts = ex.collect_max_acts(sae, row_stream(cache, cfg.batch_tokens, skip_roles, max_tokens), cfg)
    winners = acts.winners()
    seqs = np.unique(winners["seq_id"])
    per_chunk = max(1, cfg.batch_tokens // max(1, int(info["meta"].get("context_size") or 128)))
    parts = [ex.window_activations(sae, read_sequences(cache, seqs[i:i + per_chunk]), winners, cfg)
             for i in range(0, len(seqs), per_chunk)]
    cols = _concat_windows(parts)
    tokenizer = load_tokenizer(info["model_id"]) if tokenizer == "auto" else tokenizer
    texts = _token_texts(cols["token_ids"], tokenizer)
    offsets = cols.pop("window_offsets")
    cols["token_ids"] = (cols["token_ids"], offsets)
    cols["acts"] = (cols["acts"], offsets)
    if texts is not None:
        cols["tokens"] = (texts, offsets)
    const = {**_dictionary(loaded, info["hook"]), "model": label, "model_id": info["model_id"],
             "tokens_fingerprint": info["tokens_fingerprint"], "n_tokens": acts.n_tokens}
    return columns_table("latent_examples", cols, const), columns_table("latent_histograms", histogram_columns(acts), const)


def _concat_windows(parts: list[dict]) -> dict:
    """Merge window_activations outputs (offsets re-based), ordered by (latent, rank)."""
    if not parts:
        return {k: np.zeros(0, dtype=np.int64) for k in ("latent", "rank", "activation", "seq_id", "pos", "window_start",
                                                        "token_ids", "acts")} | {"window_offsets": np.zeros(1, np.int32)}
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "window_offsets"}
    lengths = np.concatenate([np.diff(p["window_offsets"]) for p in parts])
    order = np.lexsort((cols["rank"], cols["latent"]))
    starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    new_lengths = lengths[order]
    new_offsets = np.concatenate([[0], np.cumsum(new_lengths)])
    gather = np.arange(new_offsets[-1]) + np.repeat(starts[order] - new_offsets[:-1], new_lengths)
    out = {k: v[order] for k, v in cols.items() if k not in ("token_ids", "acts")}
    out["token_ids"], out["acts"] = cols["token_ids"][gather], cols["acts"][gather]
    out["window_offsets"] = new_offsets.astype(np.int32)
    return out


def histogram_columns(acts: ex.MaxActs) -> dict[str, np.ndarray]:
    """Non-empty histogram bins as `latent_histograms` columns."""
    f, b = (acts.hist_FH > 0).nonzero(as_tuple=True)
    f, b = f.numpy(), b.numpy()
    lo = np.concatenate([[0.0], acts.edges])
    hi = np.concatenate([acts.edges, [np.inf]])
    return {"latent": f, "bin": b, "bin_lo": lo[b], "bin_hi": hi[b], "count": acts.hist_FH[f, b].numpy()}


def match_table(loaded_a, loaded_b, corr_cache: str | Path | None, corr_label: str | None,
                cfg: mt.MatchConfig = mt.MatchConfig(), skip_roles: tuple[str, ...] = DEFAULT_SKIP_ROLES,
                max_tokens: int | None = None):
    """`latent_matches` rows: decoder-cosine assignment of A's and B's latents, with the
    activation correlation of each pair on `corr_cache` (both SAEs on the same tokens)."""
    matching = mt.match_decoders(loaded_a.sae, loaded_b.sae, cfg)
    cols = {"latent_a": matching.latent_a, "latent_b": matching.latent_b, "dec_cos": matching.dec_cos,
            "enc_cos": matching.enc_cos}
    const = {"dictionary_a": loaded_a.info["sae_id"], "dictionary_b": loaded_b.info["sae_id"], "method": matching.method,
             "min_cosine": cfg.min_cosine, "hook": loaded_a.sae.cfg.metadata.get("hook_name")}
    if corr_cache is not None:
        info = cache_info(corr_cache)
        for loaded in (loaded_a, loaded_b):
            check_pairing(loaded, info, corr_label or "correlation")
        device = device_of(cfg.device)
        sae_a, _ = ls.applied_sae(loaded_a.sae, info["scale"], device)
        sae_b, _ = ls.applied_sae(loaded_b.sae, info["scale"], device)
        pairs = ((b.acts_BD, b.acts_BD) for b in row_stream(corr_cache, cfg.batch_tokens, skip_roles, max_tokens))
        cols["act_corr"], n = mt.activation_correlation(sae_a, sae_b, matching, pairs, cfg)
        const.update(corr_model=corr_label, n_tokens=n, hook=info["hook"])
    return columns_table("latent_matches", cols, const)


def drift_table(loaded_child, loaded_parent, checkpoint: str | None = None, step: int | None = None):
    """`latent_drift` rows of a fine-tuned SAE against its parent (`checkpoint`/`step`: the
    fine-tuning checkpoint the child was briefly fine-tuned on, if any)."""
    try:
        cols = mt.latent_drift(loaded_child.sae, loaded_parent.sae)
    except ValueError as exc:
        raise UserError(f"{loaded_child.folder} vs {loaded_parent.folder}: {exc}") from None
    const = {"dictionary": loaded_child.info["sae_id"], "parent": loaded_parent.info["sae_id"],
             "hook": loaded_child.sae.cfg.metadata.get("hook_name"), "checkpoint": checkpoint, "step": step}
    return columns_table("latent_drift", cols, const)


def ablation_table(model, model_id: str, loaded, toks, hook: str, latents: list[int], cfg=None, s_eval: float | None = None,
                   set_name: str = "given"):
    """`latent_ablation` rows: KL(clean || ablated) per segment for `latents` (rows named
    `set_name`) and for a random set of the same size (seeded, among latents that fire on these
    transcripts) on the chat model's transcripts `toks` (evals TokenSet). `s_eval` defaults to
    the transcripts' own."""
    cfg = cfg or causal.CausalConfig()
    s_eval = s_eval or causal.transcript_scale(model, toks, hook, cfg)
    counts = causal.firing_counts(model, loaded.sae, toks, hook, s_eval, cfg)
    sets = {set_name: sorted(int(j) for j in latents),
            "random": causal.random_latents(counts, len(latents), list(latents), cfg.seed)}
    results = causal.ablation_kl(model, loaded.sae, toks, hook, sets, s_eval, cfg)
    rows = [(res, seg, acc) for res in results.values() for seg, acc in res.segments.items()]
    cols = {
        "latent_set": np.array([r.name for r, _, _ in rows], dtype=object),
        "segment": np.array([seg for _, seg, _ in rows], dtype=object),
        "set_size": np.array([len(r.latents) for r, _, _ in rows], dtype=np.int64),
        "n_tokens": np.array([a.n_tokens for _, _, a in rows], dtype=np.int64),
        "kl_mean": np.array([a.kl_mean for _, _, a in rows]),
        "kl_max": np.array([a.kl_max for _, _, a in rows]),
        "ablated_norm_frac": np.array([a.ablated_norm_frac for _, _, a in rows]),
        "scale_ratio": np.array([r.ratio for r, _, _ in rows]),
        "latents": (np.array([j for r, _, _ in rows for j in r.latents], dtype=np.int64),
                    np.concatenate([[0], np.cumsum([len(r.latents) for r, _, _ in rows])])),
    }
    const = {**_dictionary(loaded, hook), "model_id": model_id, "seed": cfg.seed,
             "tokens_fingerprint": getattr(toks, "fingerprint", None)}
    return columns_table("latent_ablation", cols, const)
