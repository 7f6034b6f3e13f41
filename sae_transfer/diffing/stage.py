"""The diffing stage of a study: from cache, SAE and crosscoder folders to table rows.

What the `tasks/diffing.py` tasks run between loading inputs and appending Arrow tables through
`sae_transfer.storage.tables`. Every analysis streams at most `DiffingPlan.stats_tokens` rows of each cache.
Shape suffixes as in the package docstring (B batch, D d_model, F latents, L selected latents).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from sae_transfer.diffing import api
from sae_transfer.diffing import examples as ex
from sae_transfer.diffing import latent_stats as ls
from sae_transfer.diffing import matching as mt
from sae_transfer.diffing.activation_diff import ActDiffConfig, activation_diff, aligned_latents, bucket_label
from sae_transfer.diffing.crosscoder import CLASSES, chat_minus_base_FD, difference_explained, latent_table
from sae_transfer.diffing.crosscoder_io import load_crosscoder
from sae_transfer.diffing.latent_scaling import crosscoder_scaling, sae_scaling
from sae_transfer.diffing.paired import iter_paired, iter_paired_raw
from sae_transfer.evals.api import load_eval_model
from sae_transfer.evals.loading import load_saes
from sae_transfer.evals.run import chat_transcripts
from sae_transfer.storage.activations import ROLES
from sae_transfer.storage.activations_scan import RowBatch, read_sequences
from sae_transfer.storage.diffing_tables import columns_table
from sae_transfer.storage.tables import now_utc

Tables = dict[str, list[pa.Table]]


@dataclass(frozen=True)
class DiffingPlan:
    """How much of each cache the analyses read, and on which device."""

    stats_tokens: int = 131_072  # cache rows per model streamed by every analysis
    examples_k: int = 8  # max-activating contexts kept per latent and model
    top_latents: int = 6  # chat-only latents ablated in the causal check (and shown as cards)
    batch_tokens: int = 8192  # rows encoded at once
    device: str | None = None  # None: CUDA when available, else CPU

    @classmethod
    def of(cls, section, device: str | None) -> DiffingPlan:
        """The plan of a study's DiffingSection, on `device`."""
        return cls(stats_tokens=section.stats_tokens, examples_k=section.examples_k, top_latents=section.top_latents,
                   device=device)


def _np(t: torch.Tensor) -> np.ndarray:
    """A result tensor as a NumPy column, wherever it was computed."""
    return t.detach().cpu().numpy()


def _on_host(obj):
    """A dataclass of tensors (e.g. a crosscoder's LatentTable) with every tensor on the CPU."""
    return dataclasses.replace(obj, **{f.name: getattr(obj, f.name).cpu() for f in dataclasses.fields(obj)
                                       if isinstance(getattr(obj, f.name), torch.Tensor)})


def _add(out: Tables, name: str, table: pa.Table) -> None:
    out.setdefault(name, []).append(table)


def sae_tables(saes: dict[str, object], caches: dict[str, str], plan: DiffingPlan, models: dict[str, str]) -> Tables:
    """Per-latent stats of every SAE on both models, examples, matching and drift.

    `saes` maps a role ("base", "chat", "finetuned") to a LoadedSAE; `caches` maps "base" and
    "chat" to the two models' activation caches (the same corpus and hook) and `models` to the
    model specs (their tokenizers turn example token ids into text)."""
    out: Tables = {}
    stats_cfg = ls.LatentStatsConfig(batch_tokens=plan.batch_tokens, device=plan.device)
    ex_cfg = ex.ExamplesConfig(k=plan.examples_k, batch_tokens=plan.batch_tokens, device=plan.device)
    tokenizers = {label: api.load_tokenizer(models.get(label)) for label in caches}
    for loaded in saes.values():
        _add(out, "latent_stats", api.latent_stats_table(loaded, caches, stats_cfg, max_tokens=plan.stats_tokens))
        for label, path in caches.items():
            examples, hist = api.examples_tables(loaded, path, label, ex_cfg, tokenizer=tokenizers[label],
                                                 max_tokens=plan.stats_tokens)
            _add(out, "latent_examples", examples)
            _add(out, "latent_histograms", hist)
    match_cfg = mt.MatchConfig(batch_tokens=plan.batch_tokens, device=plan.device)
    pairs = [("base", "chat"), ("base", "finetuned")]
    for a, b in pairs:
        if a in saes and b in saes:
            _add(out, "latent_matches", api.match_table(saes[a], saes[b], caches["chat"], "chat", match_cfg,
                                                        max_tokens=plan.stats_tokens))
    if "finetuned" in saes and "base" in saes:
        _add(out, "latent_drift", api.drift_table(saes["finetuned"], saes["base"]))
    _add(out, "latent_scaling", sae_scaling_table(saes["base"], caches["chat"], "chat", plan))
    return out


def sae_scaling_table(loaded, cache: str, label: str, plan: DiffingPlan) -> pa.Table:
    """Latent Scaling of every latent of an SAE on another model's activations (`latent_scaling`)."""
    info = api.cache_info(cache)
    api.check_pairing(loaded, info, label)
    device = api.device_of(plan.device)
    sae, _ = ls.applied_sae(loaded.sae, info["scale"], device)
    batches = (b.acts_BD.to(device, torch.float32)
               for b in api.row_stream(cache, plan.batch_tokens, max_tokens=plan.stats_tokens))
    res = sae_scaling(sae, batches, torch.arange(sae.d_sae))
    cols = {"latent": _np(res.latents_L), "beta_activation": _np(res.beta_activation_L),
            "beta_error": _np(res.beta_error_L), "fire_count": _np(res.count_L)}
    const = {"dictionary": loaded.info["sae_id"], "dictionary_model": loaded.info.get("sae_model"), "hook": info["hook"],
             "kind": "sae", "model": label, "n_tokens": res.n_tokens}
    return columns_table("latent_scaling", cols, const)


def _paired_batches(pair, plan: DiffingPlan):
    """RowBatch-like paired rows: acts_BD = [x_base, x_chat] in the crosscoder's training units."""
    for rows in iter_paired(pair, plan.batch_tokens, max_rows=plan.stats_tokens):
        role = torch.zeros_like(rows.seq_id_B, dtype=torch.uint8)
        yield RowBatch(rows.seq_id_B, rows.pos_B, rows.token_id_B, role, rows.x_BMD.flatten(1))


def _paired_sequences(pair, seq_ids) -> object:
    """Whole paired sequences (sorted by seq_id, pos) for the examples' windows."""
    b, c = read_sequences(pair.base, seq_ids), read_sequences(pair.chat, seq_ids)
    acts = torch.cat([b.acts_BD.float() * pair.scale_base, c.acts_BD.float() * pair.scale_chat], dim=1)
    return RowBatch(b.seq_id_B, b.pos_B, b.token_id_B, b.role_B, acts)


def crosscoder_tables(cc_dir: str | Path, pair, plan: DiffingPlan, sae_id: str, chat_model: str | None = None) -> Tables:
    """`crosscoder_latents` (ρ, class, decoder cosine, firing), `latent_scaling` of the chat-only
    latents, and `latent_examples` of every latent on the paired tokens (model = "paired")."""
    device = api.device_of(plan.device)
    cc = load_crosscoder(cc_dir).to(device)
    table = _on_host(latent_table(cc))  # computed where the crosscoder is, tabulated on the host
    ex_cfg = ex.ExamplesConfig(k=plan.examples_k, batch_tokens=plan.batch_tokens, device=plan.device)
    acts = ex.collect_max_acts(cc, _paired_batches(pair, plan), ex_cfg)
    counts_F = acts.hist_FH.sum(1)
    sums_F = _firing_sums(cc, pair, plan, device)
    t = table.taxonomy
    dictionary = {"dictionary": sae_id, "dictionary_model": f"{pair.meta.get('base_model')} + {pair.meta.get('chat_model')}",
                  "hook": pair.hook}
    latents = columns_table("crosscoder_latents", {
        "latent": np.arange(cc.d_sae), "norm_base": _np(table.norm_base_F), "norm_chat": _np(table.norm_chat_F),
        "rho": _np(table.rho_F), "delta_norm": _np(table.delta_norm_F), "dec_cos": _np(table.cosine_F),
        "latent_class": np.array([CLASSES[i] for i in table.class_F.tolist()], dtype=object),
        "fire_count": _np(counts_F), "frequency": _np(counts_F / max(acts.n_tokens, 1)),
        "mean_act_firing": np.where(_np(counts_F) > 0, _np(sums_F) / np.maximum(_np(counts_F), 1), np.nan),
        "diff_norm": _np(table.diff_norm_F), "chat_minus_base": _changed_directions(cc, table),
    }, {**dictionary, "chat_only_min": t.chat_only_min, "base_only_max": t.base_only_max,
        "shared_min": t.shared_min, "shared_max": t.shared_max, "agree_min_cos": t.agree_min_cos,
        "diff_explained": difference_explained(cc, (b.acts_BD for b in _paired_batches(pair, plan))),
        "n_tokens": acts.n_tokens})
    chat_only = (table.class_F == CLASSES.index("chat_only")) & (counts_F > 0)
    latents_L = chat_only.nonzero().squeeze(1)
    x_batches = (b.acts_BD.to(device).view(-1, 2, cc.d_model) for b in _paired_batches(pair, plan))
    sc = crosscoder_scaling(cc, x_batches, latents_L)
    scaling = columns_table("latent_scaling", {
        "latent": _np(sc.latents_L), "beta_error_base": _np(sc.beta_error_base_L),
        "beta_error_chat": _np(sc.beta_error_chat_L), "beta_recon_base": _np(sc.beta_recon_base_L),
        "beta_recon_chat": _np(sc.beta_recon_chat_L), "nu_error": _np(sc.nu_error_L),
        "nu_recon": _np(sc.nu_recon_L), "verdict": np.array(sc.verdicts(), dtype=object),
        "fire_count": _np(sc.count_L),
    }, {**dictionary, "kind": "crosscoder", "n_tokens": sc.n_tokens})
    examples = _paired_examples(cc, pair, acts, ex_cfg, dictionary, chat_model)
    return {"crosscoder_latents": [latents], "latent_scaling": [scaling], "latent_examples": [examples]}


def _changed_directions(cc, table) -> tuple[np.ndarray, np.ndarray]:
    """The `chat_minus_base` list column (flat values, offsets): a changed latent's
    d^chat/s_chat − d^base/s_base [D] in model units, an empty list for every other latent."""
    changed_F = _np(table.class_F == CLASSES.index("changed"))
    diff_FD = _np(chat_minus_base_FD(cc))
    lengths_F = np.where(changed_F, cc.d_model, 0)
    return diff_FD[changed_F].astype(np.float32).ravel(), np.concatenate([[0], np.cumsum(lengths_F)])


@torch.inference_mode()
def _firing_sums(cc, pair, plan: DiffingPlan, device) -> torch.Tensor:
    """Σ f_j over the paired tokens [F] (float64, CPU), for the mean activation when firing."""
    total_F = torch.zeros(cc.d_sae, dtype=torch.float64, device=device)
    for b in _paired_batches(pair, plan):
        total_F += cc.encode(b.acts_BD.to(device, torch.float32)).sum(0).double()
    return total_F.cpu()


def _paired_examples(cc, pair, acts, cfg: ex.ExamplesConfig, dictionary: dict, chat_model: str | None) -> pa.Table:
    """The crosscoder's max-activating contexts on the paired tokens, with token texts."""
    winners = acts.winners()
    seqs = np.unique(winners["seq_id"])
    context = int(pair.meta.get("context_size") or 128)
    per_chunk = max(1, cfg.batch_tokens // context)
    parts = [ex.window_activations(cc, _paired_sequences(pair, seqs[i:i + per_chunk]), winners, cfg)
             for i in range(0, len(seqs), per_chunk)]
    cols = api._concat_windows(parts)
    texts = api._token_texts(cols["token_ids"], api.load_tokenizer(chat_model))
    offsets = cols.pop("window_offsets")
    cols["token_ids"], cols["acts"] = (cols["token_ids"], offsets), (cols["acts"], offsets)
    if texts is not None:
        cols["tokens"] = (texts, offsets)
    const = {**dictionary, "model": "paired", "model_id": chat_model or pair.meta.get("chat_model"),
             "tokens_fingerprint": pair.meta.get("tokens_fingerprint"), "n_tokens": acts.n_tokens}
    return columns_table("latent_examples", cols, const)


def chosen_latents(stats: pa.Table, sae_ids: list[str], n: int) -> tuple[str, str, list[int]]:
    """(SAE id, set name, latents) to ablate: up to n latents that appear on chat (fire on chat,
    silent on base), from whichever of `sae_ids` has the most, most frequent first; when no SAE
    has any, the chat SAE's (the last id's) n latents with the largest chat-minus-base density
    shift, named "density_shift" so the report never calls them chat-only."""
    df = stats.to_pandas()
    df = df[df["dictionary"].isin(sae_ids) & (df["model"] == "chat")]
    appears = df[df["status"] == "appears"]
    if len(appears):
        sae_id = appears["dictionary"].value_counts().index[0]
        rows = appears[appears["dictionary"] == sae_id].sort_values("frequency", ascending=False)
        return sae_id, "appears_on_chat", [int(j) for j in rows["latent"].head(n)]
    rows = df[df["dictionary"] == sae_ids[-1]].sort_values("log10_density_shift", ascending=False)
    return sae_ids[-1], "density_shift", [int(j) for j in rows["latent"].head(n)]


def causal_tables(sae_paths: list[str], chat: str, hook: str, made, chosen: dict, loading) -> Tables:
    """`latent_ablation` rows: the latents `chosen` (`chosen_latents` of the SAE diffing:
    {"sae_id", "set_name", "latents"}) and a random set of the same size, ablated on the chat
    model's greedy transcripts `made` (the segments' rollouts, an `evals.rollouts.Rollouts`);
    `loading` (ModelLoading) says how the chat model loads."""
    if not chosen.get("latents"):
        return {}
    loaded = {s.info["sae_id"]: s for s in load_saes(sae_paths, hook)}
    model, info = load_eval_model(chat, loading)
    toks = chat_transcripts(model, made)
    return {"latent_ablation": [api.ablation_table(model, info["model_id"], loaded[chosen["sae_id"]], toks, hook,
                                                   chosen["latents"], set_name=chosen["set_name"])]}


def activation_diff_tables(pair, plan: DiffingPlan, saes: dict[str, object] | None = None,
                           cfg: ActDiffConfig = ActDiffConfig(), chat_model: str | None = None) -> Tables:
    """`activation_diff` rows of the paired caches: chat − base overall, per role and position
    bucket, the top tokens, the principal directions, and (for each SAE in `saes`, role ->
    LoadedSAE) the latents aligned with each direction. `chat_model` (the model spec, a local
    folder or cached Hub id) names the tokenizer for token texts; without it they stay null."""
    res = activation_diff(iter_paired_raw(pair, plan.stats_tokens), pair.d_model, cfg, api.device_of(plan.device))
    tokenizer = api.load_tokenizer(chat_model)
    parts = [(kind, _group_columns(res, kind, cfg, pair, tokenizer)) for kind in ("all", "role", "position", "token")]
    k = len(res.variance_K)
    parts.append(("component", {"key": np.array([str(i) for i in range(k)], dtype=object), "rank": np.arange(k),
                                "component": np.arange(k), "variance": _np(res.variance_K),
                                "variance_share": _np(res.variance_K / max(res.total_variance, 1e-30)),
                                "direction": (_np(res.components_KD).ravel(), np.arange(k + 1) * pair.d_model)}))
    for loaded in (saes or {}).values():
        lat_KT, cos_KT = aligned_latents(res.components_KD, loaded.sae.W_dec, cfg.top_latents)
        comp = np.repeat(np.arange(k), lat_KT.shape[1])
        parts.append(("component_latent", {"key": np.array([str(c) for c in comp], dtype=object),
                                           "rank": np.tile(np.arange(lat_KT.shape[1]), k), "component": comp,
                                           "dictionary": np.array([loaded.info["sae_id"]] * len(comp), dtype=object),
                                           "latent": _np(lat_KT).ravel(), "latent_cos": _np(cos_KT).ravel()}))
    const = {"hook": pair.hook, "base_model": pair.meta.get("base_model"), "chat_model": pair.meta.get("chat_model"),
             "tokens_fingerprint": pair.meta.get("corpus_fingerprint"), "n_tokens": res.n_tokens,
             "typical_diff_norm": res.typical_token_norm(cfg),
             "created_at": now_utc()}  # one stamp: the report picks the newest pass by it
    # one part per computation: the catalog keeps only the newest part of a computation
    return {"activation_diff": [pa.concat_tables([columns_table("activation_diff", cols, {**const, "kind": kind})
                                                  for kind, cols in parts])]}


def _group_columns(res, kind: str, cfg: ActDiffConfig, pair, tokenizer) -> dict:
    """`activation_diff` columns of one grouping (every group; for tokens, the top cfg.top_tokens)."""
    g = res.groups[kind]
    idx = res.top_tokens(cfg) if kind == "token" else torch.arange(len(g.keys_G))
    keys = g.keys_G[idx].tolist()
    label = {"all": lambda k: "all", "role": lambda k: ROLES[k] if k < len(ROLES) else str(k),
             "position": bucket_label, "token": str}[kind]
    cols = {"key": np.array([label(k) for k in keys], dtype=object), "rank": np.arange(len(keys)),
            "count": _np(g.count_G[idx]), "mean_diff_norm": _np(g.mean_norm_G[idx]),
            "rms_diff_norm": _np(g.rms_norm_G[idx]), "norm_of_mean": _np(g.mean_GD[idx].norm(dim=-1)),
            "mean_base_norm": _np(g.base_norm_G[idx]),
            "direction": (_np(g.mean_GD[idx]).ravel(), np.arange(len(keys) + 1) * pair.d_model)}
    if kind == "token":
        cols["token_id"] = np.asarray(keys, dtype=np.int64)
        texts = api._token_texts(np.asarray(keys, dtype=np.int64), tokenizer)
        if texts is not None:
            cols["token"] = np.array(texts, dtype=object)
    return cols
