"""Schemas of the feature-level diffing tables (issue 10), and a column-wise table builder.

Registered in `sae_transfer.storage.tables.SCHEMAS`, so `append_rows` / `read_table` and the DuckDB catalog
treat them like every other result table. Per-latent tables are long: one row per
(dictionary, latent, model). `dictionary` is the SAE id of the evaluation tables
(folder name + ":" + weights sha256 prefix); `model` is the label "base" or "chat".
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from sae_transfer.storage.result_keys import ResultKey, computation

_STR, _F64, _I64, _I32 = pa.string(), pa.float64(), pa.int64(), pa.int32()
_TS = pa.timestamp("us", tz="UTC")

_DICTIONARY = [
    ("dictionary", _STR),  # SAE id: folder name + ":" + weights sha256 prefix
    ("dictionary_model", _STR),  # model the SAE was trained on (cfg metadata model_name)
    ("hook", _STR),  # hook point, e.g. blocks.6.hook_resid_pre
]
_MODEL = [
    ("model", _STR),  # "base" or "chat": whose activations
    ("model_id", _STR),  # that model's Hub id or local folder
    ("tokens_fingerprint", _STR),  # the cache's token-id hash (its dataset key when it records none)
]

LATENT_STATS = pa.schema(
    _DICTIONARY + _MODEL + [
        ("latent", _I64),
        ("n_tokens", _I64),  # tokens of the model's cache the stats are over
        ("scale_factor_eval", _F64),  # s of this model (sqrt(d_model) / E||x||)
        ("scale_factor_train", _F64),  # s_train folded into the SAE (null: none recorded)
        ("scale_ratio", _F64),  # r = s_eval / s_train: the SAE is applied as SAE(r x) / r
        ("explained_variance", _F64),  # the whole SAE on these tokens (same on every row)
        ("fire_count", _I64),  # tokens where the latent fires (see min_contribution)
        ("frequency", _F64),  # fire_count / n_tokens
        ("log10_density", _F64),  # log10(frequency + 1e-10)
        ("mean_act_firing", _F64),  # mean activation where it fires (feature units); null if never
        ("max_act", _F64),  # largest activation
        ("ev_drop", _F64),  # drop in explained variance when only this latent is removed
        ("act_share", _F64),  # share of sum_t sum_i f_ti ||d_i|| (decoder-norm-weighted activation)
        ("status", _STR),  # base -> chat: shared / dies / appears / dead (same on both rows)
        ("log10_density_shift", _F64),  # log10_density on chat - on base (same on both rows)
        ("silent_frequency", _F64),  # frequency at or below which a latent counts as silent
        ("min_contribution", _F64),  # a firing needs f ||d|| > this x sqrt(d_model), scaled units (0: any f > 0)
        ("created_at", _TS),
    ]
)

LATENT_EXAMPLES = pa.schema(
    _DICTIONARY + _MODEL + [
        ("latent", _I64),
        ("rank", _I64),  # 0 = the latent's highest activation on this model
        ("activation", _F64),  # at (seq_id, pos), feature units
        ("seq_id", _I64),  # sequence in the activation cache
        ("pos", _I64),  # position of the max-activating token
        ("window_start", _I64),  # position of the first window token (pos - window_start = its index)
        ("token_ids", pa.list_(_I64)),  # the window's token ids
        ("tokens", pa.list_(_STR)),  # the window's tokens as text (null without a tokenizer)
        ("acts", pa.list_(_F64)),  # the latent's activation at each window token
        ("n_tokens", _I64),  # tokens scanned
        ("created_at", _TS),
    ]
)

LATENT_HISTOGRAMS = pa.schema(
    _DICTIONARY + _MODEL + [
        ("latent", _I64),
        ("bin", _I64),  # 0: underflow (0 < f < bin_hi), last: overflow (f >= bin_lo)
        ("bin_lo", _F64),  # lower edge (feature units; 0 for the underflow bin)
        ("bin_hi", _F64),  # upper edge (inf for the overflow bin)
        ("count", _I64),  # firing tokens in the bin (only non-empty bins are stored)
        ("n_tokens", _I64),  # tokens scanned
        ("created_at", _TS),
    ]
)

LATENT_MATCHES = pa.schema(
    [
        ("dictionary_a", _STR),  # e.g. the base SAE
        ("dictionary_b", _STR),  # e.g. the chat SAE or the fine-tuned child
        ("hook", _STR),
        ("latent_a", _I64),
        ("latent_b", _I64),
        ("dec_cos", _F64),  # decoder-direction cosine of the pair
        ("enc_cos", _F64),  # encoder-column cosine of the pair
        ("act_corr", _F64),  # Pearson correlation of the pair's activations on the same tokens
        ("corr_model", _STR),  # whose tokens the correlation is on ("base"/"chat"); null if not measured
        ("n_tokens", _I64),  # tokens of the correlation
        ("method", _STR),  # "dense" (exact Hungarian) or "sparse-top<c>" (top-c candidate graph)
        ("min_cosine", _F64),  # pairs at or below this decoder cosine stay unmatched
        ("created_at", _TS),
    ]
)

LATENT_DRIFT = pa.schema(
    [
        ("dictionary", _STR),  # the fine-tuned child
        ("parent", _STR),  # the SAE it was fine-tuned from
        ("hook", _STR),
        ("latent", _I64),
        ("enc_cos", _F64),  # cosine of the child's and parent's encoder columns
        ("enc_norm_ratio", _F64),  # ||child column|| / ||parent column|| (training units)
        ("dec_cos", _F64),  # cosine of the decoder rows
        ("dec_norm_ratio", _F64),  # ||child row|| / ||parent row|| (training units)
        ("b_enc_delta", _F64),  # child - parent encoder bias
        ("checkpoint", _STR),  # the fine-tuning checkpoint the child was briefly fine-tuned on (null: the study's fine-tune)
        ("step", _I64),  # that checkpoint's step
        ("created_at", _TS),
    ]
)

LATENT_ABLATION = pa.schema(
    _DICTIONARY + [
        ("model_id", _STR),  # the model run (the chat model)
        ("latent_set", _STR),  # "given" (e.g. chat-only latents) or "random" (same size, seeded)
        ("latents", pa.list_(_I64)),  # the ablated latents
        ("set_size", _I64),
        ("seed", _I64),  # of the random draw
        ("segment", _STR),  # "user_prompt", "rollout", "template" or "all"
        ("n_tokens", _I64),  # positions whose next-token distribution is compared
        ("kl_mean", _F64),  # mean KL(clean || ablated), nats per token
        ("kl_max", _F64),
        ("ablated_norm_frac", _F64),  # mean ||sum_j f_j d_j|| / ||x|| over the segment's positions
        ("scale_ratio", _F64),  # r applied to the SAE on this model
        ("tokens_fingerprint", _STR),  # hash of the transcripts
        ("created_at", _TS),
    ]
)

CROSSCODER_LATENTS = pa.schema(
    _DICTIONARY + [
        ("latent", _I64),
        ("norm_base", _F64),  # ||d_j^base|| (training units)
        ("norm_chat", _F64),  # ||d_j^chat||
        ("rho", _F64),  # ||d^chat|| / (||d^base|| + ||d^chat||): ~1 chat-only, ~0 base-only, ~1/2 shared
        ("delta_norm", _F64),  # Minder et al.'s relative norm difference (1/2 ((c - b) / max + 1))
        ("dec_cos", _F64),  # cosine of the base and chat decoder directions
        ("latent_class", _STR),  # base_only / chat_only / shared / changed / other (cut-offs below)
        ("chat_only_min", _F64),  # rho cut-offs used
        ("base_only_max", _F64),
        ("shared_min", _F64),
        ("shared_max", _F64),
        ("agree_min_cos", _F64),  # shared needs dec_cos >= this; below it, both decoders alive: changed
        ("diff_norm", _F64),  # ||d^chat - d^base|| (training units)
        ("chat_minus_base", pa.list_(pa.float32())),  # changed latents: d^chat/s_chat - d^base/s_base [D], model units
        ("diff_explained", _F64),  # share of Var(chat - base) the crosscoder's own difference reproduces (all rows)
        ("fire_count", _I64),  # paired tokens where the latent fires
        ("frequency", _F64),  # fire_count / n_tokens
        ("mean_act_firing", _F64),  # mean activation where it fires (training units)
        ("n_tokens", _I64),  # paired tokens scanned
        ("created_at", _TS),
    ]
)

LATENT_SCALING = pa.schema(
    _DICTIONARY + [
        ("kind", _STR),  # "crosscoder" (chat-only latents) or "sae" (an SAE's latents on `model`)
        ("model", _STR),  # for kind = sae: whose activations ("chat"); null for the crosscoder
        ("latent", _I64),
        ("beta_error_base", _F64),  # crosscoder: beta against the base error (latent's own part added back)
        ("beta_error_chat", _F64),
        ("beta_recon_base", _F64),  # crosscoder: beta against the base reconstruction
        ("beta_recon_chat", _F64),
        ("nu_error", _F64),  # beta_error_base / beta_error_chat (Complete Shrinkage when large)
        ("nu_recon", _F64),  # beta_recon_base / beta_recon_chat (Latent Decoupling when large)
        ("verdict", _STR),  # specific / complete_shrinkage / latent_decoupling / inactive
        ("beta_activation", _F64),  # sae: beta against x - b_dec on `model`
        ("beta_error", _F64),  # sae: beta against the error with the latent's own part added back
        ("fire_count", _I64),
        ("n_tokens", _I64),
        ("created_at", _TS),
    ]
)

ACTIVATION_DIFF = pa.schema(
    _DICTIONARY[2:] + [
        ("base_model", _STR),  # the two models whose caches were paired
        ("chat_model", _STR),
        ("tokens_fingerprint", _STR),  # the paired caches' corpus fingerprint
        ("n_tokens", _I64),  # paired tokens streamed
        ("kind", _STR),  # all / token / role / position / component / component_latent
        ("key", _STR),  # token id, role name, position bucket ("3-6"), component index, or "all"
        ("rank", _I64),  # within kind: 0 = largest mean_diff_norm (token), largest variance (component)
        ("token_id", _I64),  # kind token
        ("token", _STR),  # kind token: its text (null without a tokenizer)
        ("count", _I64),  # tokens in the group
        ("mean_diff_norm", _F64),  # mean ||chat - base|| over the group, raw model units
        ("rms_diff_norm", _F64),  # sqrt(mean ||chat - base||^2)
        ("norm_of_mean", _F64),  # ||mean (chat - base)||: a shift shared by the group's tokens
        ("mean_base_norm", _F64),  # mean ||x_base||, to read the difference relative to the activation
        ("typical_diff_norm", _F64),  # median over ranked tokens of their mean_diff_norm (same on every row)
        ("component", _I64),  # kind component / component_latent: principal direction index
        ("variance", _F64),  # variance of the difference along the component (model units^2)
        ("variance_share", _F64),  # variance / total variance of the difference
        ("dictionary", _STR),  # kind component_latent: the SAE whose latent aligns with the component
        ("latent", _I64),
        ("latent_cos", _F64),  # |cosine| of that latent's decoder with the component
        ("direction", pa.list_(pa.float32())),  # mean difference [D] (groups) or unit component [D]
        ("created_at", _TS),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "latent_stats": LATENT_STATS,
    "latent_examples": LATENT_EXAMPLES,
    "latent_histograms": LATENT_HISTOGRAMS,
    "latent_matches": LATENT_MATCHES,
    "latent_drift": LATENT_DRIFT,
    "latent_ablation": LATENT_ABLATION,
    "crosscoder_latents": CROSSCODER_LATENTS,
    "latent_scaling": LATENT_SCALING,
    "activation_diff": ACTIVATION_DIFF,
}

# Result key of each table (see sae_transfer.storage.result_keys). Every diffing table is written
# a whole computation at a time (one SAE's stats on both models, its examples on one model, one
# pair's matching, ...): the view keeps every row of the newest write of each computation.
KEYS: dict[str, ResultKey] = {
    # one SAE on the pair's two caches (status compares the two models, so both are one computation)
    "latent_stats": computation("dictionary", "hook", index=("model", "latent")),
    "latent_examples": computation("dictionary", "hook", "model", index=("latent", "rank")),  # model: base / chat / paired
    "latent_histograms": computation("dictionary", "hook", "model", index=("latent", "bin")),
    "latent_matches": computation("dictionary_a", "dictionary_b", "hook", index=("latent_a", "latent_b")),
    # the study's fine-tune (checkpoint null) and each brief fine-tune on a checkpoint
    "latent_drift": computation("dictionary", "parent", "hook", "checkpoint", index=("latent",)),
    # one chosen SAE ablated on one model: every latent set and segment of the run
    "latent_ablation": computation("dictionary", "hook", "model_id", index=("latent_set", "segment")),
    "crosscoder_latents": computation("dictionary", "hook", index=("latent",)),
    # kind crosscoder (model null) or sae on one model
    "latent_scaling": computation("dictionary", "hook", "kind", "model", index=("latent",)),
    # one pair of caches at one hook: every group, component and aligned latent of the pass
    "activation_diff": computation("hook", "base_model", "chat_model", index=("kind", "key", "dictionary", "latent")),
}


def columns_table(name: str, columns: Mapping[str, object], constants: Mapping[str, object] | None = None) -> pa.Table:
    """A table of `name`'s schema from numpy columns of equal length, constants broadcast to
    every row, and list columns given as (flat values, offsets [n + 1]). Missing columns are
    null; `created_at` defaults to now."""
    from sae_transfer.storage.tables import now_utc  # deferred: storage.tables imports this module

    schema = SCHEMAS[name]
    n = next(len(v[1]) - 1 if isinstance(v, tuple) else len(v) for v in columns.values())
    constants = {"created_at": now_utc(), **(constants or {})}
    arrays = []
    for field in schema:
        if field.name in columns:
            value = columns[field.name]
            if isinstance(value, tuple):
                flat, offsets = value
                arrays.append(pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)),
                                                       pa.array(flat).cast(field.type.value_type)))
            else:
                arrays.append(pa.array(value, from_pandas=True).cast(field.type))
        elif field.name in constants and constants[field.name] is not None:
            arrays.append(pa.repeat(pa.scalar(constants[field.name], field.type), n))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
