"""Result tables: every pyarrow schema declared once, an append-only part-file writer, a reader.

Each table is a folder of Parquet parts under the results folder (`RESULTS/metrics/`,
`RESULTS/outliers/`, ...; RESULTS may be an `s3://` prefix, see `sae_transfer.storage.store`).
An append writes one new part `part-<utc timestamp>-<uuid>.parquet`, encoded in memory first:
locally to a hidden temporary name renamed into place, on an object store as one whole object.
Concurrent writers never lose or duplicate rows and readers never see a half-written part
(pyarrow datasets and DuckDB globs on `part-*.parquet` skip the `.tmp-` names).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from sae_transfer.storage import diffing_tables, study_tables
from sae_transfer.storage.result_keys import ResultKey, computation, row
from sae_transfer.storage.store import RemotePath, location, write_bytes_atomic

_STR, _F64, _I64, _BOOL = pa.string(), pa.float64(), pa.int64(), pa.bool_()
_TS = pa.timestamp("us", tz="UTC")

# Who was evaluated, on what, how: shared by every per-(SAE, model) table.
_PROVENANCE = [
    ("sae_id", _STR),  # SAE folder name (the run folder for <run>/sae) + ":" + weights sha256 prefix
    ("sae_model", _STR),  # model the SAE was trained on (cfg metadata model_name)
    ("sae_finetuned_from", _STR),  # parent SAE folder (cfg metadata finetuned_from); null if trained from scratch
    ("sae_variant", _STR),  # the swept settings that set it apart (cfg metadata variant, e.g. "l1_coefficient=2"); null: no sweep
    ("model_id", _STR),  # evaluated model: Hub id or local folder
    ("model_revision", _STR),  # Hub revision, "sha256:<weights hash>" or checkpoint step
    ("hook", _STR),  # hook point, e.g. blocks.6.hook_resid_pre
    ("attn_implementation", _STR),  # attention kernel the evaluated model ran ("eager" or "sdpa")
]

METRICS = pa.schema(
    _PROVENANCE
    + [
        ("segment", _STR),  # "text" (plain corpus), "user_prompt", "rollout" or "template"
        ("outlier_policy", _STR),  # "excluded" (outlier positions keep their activation, not counted) or "included"
        ("outlier_rule", _STR),  # the exclusion rule: "absolute" (the study's), "k_median" or "either"
        ("outlier_threshold", _F64),  # absolute threshold on the scaled norm (one per model pair)
        ("threshold_source", _STR),  # "config", "pair estimate on <model>" or the robust estimate's name
        ("suggested_threshold", _F64),  # robust estimate median + 10 MAD on this model's scaled norms (recorded, not applied)
        ("kmedian_threshold", _F64),  # k x median scaled norm of this model (the k_median rule's cut-off)
        ("scale_factor_train", _F64),  # s_train folded into the SAE (null: none recorded, SAE used as saved)
        ("scale_factor_eval", _F64),  # s_eval = sqrt(d_model) / E||x|| on the evaluated model's own activations
        ("scale_ratio", _F64),  # r = s_eval / s_train: the SAE reconstructs SAE(r x) / r
        ("n_tokens", _I64),  # counted positions
        ("n_sequences", _I64),
        ("l0", _F64),  # mean active features per counted token
        ("mse", _F64),  # mean over tokens of sum_d (x - x_hat)^2, scaled units
        ("explained_variance", _F64),  # 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)
        ("explained_variance_legacy", _F64),  # mean over tokens of 1 - ||x - x_hat||^2 / ||x - mean(x)||^2
        ("variance_share", _F64),  # (E||x||^2 - ||E x||^2) / E||x||^2: EV's denominator as a share of energy
        ("ce_clean", _F64),  # nats per counted next-token prediction
        ("ce_sae", _F64),
        ("ce_zero", _F64),  # hook zeroed at every position
        ("ce_delta", _F64),  # ce_sae - ce_clean
        ("ce_loss_score", _F64),  # (ce_zero - ce_sae) / (ce_zero - ce_clean)
        ("ce_loss_score_lo", _F64),  # bootstrap percentile interval over sequences
        ("ce_loss_score_hi", _F64),
        ("ce_ci_level", _F64),  # e.g. 0.95
        ("ce_zero_segment", _F64),  # hook zeroed at the counted positions only (segments; the study's Alpaca evals)
        ("ce_loss_score_segment", _F64),  # (ce_zero_segment - ce_sae) / (ce_zero_segment - ce_clean)
        ("kl_div_score", _F64),  # (KL_zero - KL_sae) / KL_zero
        ("kl_sae", _F64),  # mean KL(clean || sae-spliced), nats
        ("kl_zero", _F64),  # mean KL(clean || zero-ablated), nats
        ("reliable", _BOOL),  # false when a ratio's denominator is ill-conditioned (see unreliable_reason)
        ("unreliable_reason", _STR),  # e.g. "only 192 tokens (< 500); token variance is 1.2% of their energy (< 5%)"
        ("context_size", _I64),  # tokens per evaluated sequence (max, for ragged segments)
        ("tokens_fingerprint", _STR),  # hash of the evaluated token set
        ("seed", _I64),  # bootstrap seed
        ("created_at", _TS),
    ]
)

OUTLIERS = pa.schema(
    [
        ("model_id", _STR),
        ("model_revision", _STR),
        ("hook", _STR),
        ("seq_id", _I64),
        ("pos", _I64),
        ("token_id", _I64),
        ("token_text", _STR),
        ("role", _STR),  # corpus ROLES: bos/text/user/assistant/template
        ("norm", _F64),  # raw ||x||
        ("scaled_norm", _F64),  # s * ||x||
        ("scale_factor", _F64),
        ("outlier_rule", _STR),  # the configured exclusion rule: absolute / k_median / either
        ("outlier_threshold", _F64),  # absolute threshold on the scaled norm
        ("threshold_source", _STR),  # where the absolute threshold came from
        ("is_outlier_abs", _BOOL),  # scaled_norm > outlier_threshold (the seed study's rule)
        ("k_median", _F64),
        ("kmedian_threshold", _F64),  # k_median * median(scaled_norm)
        ("is_outlier_kmedian", _BOOL),  # scaled_norm > kmedian_threshold
        ("is_outlier", _BOOL),  # excluded by the configured rule
        ("flagged_by", _STR),  # "absolute", "k_median", "both" or null
        ("is_newline", _BOOL),  # token text contains a newline
        ("tokens_fingerprint", _STR),
        ("created_at", _TS),
    ]
)

OUTLIER_SUMMARY = pa.schema(
    [
        ("model_id", _STR),
        ("model_revision", _STR),
        ("hook", _STR),
        ("outlier_rule", _STR),  # "absolute", "k_median" or "either"
        ("outlier_threshold", _F64),  # on the scaled norm (null for "either")
        ("threshold_source", _STR),  # where the threshold came from
        ("excludes", _BOOL),  # this is the configured rule (the one metrics exclude by)
        ("suggested_threshold", _F64),  # robust estimate median + 10 MAD on this model (recorded, not applied)
        ("n_tokens", _I64),
        ("n_outliers", _I64),
        ("frac_outliers", _F64),
        ("frac_bos", _F64),  # shares of the outliers (sum to 1): BOS,
        ("frac_first10", _F64),  # other positions < 10,
        ("frac_newline", _F64),  # newline tokens at positions >= 10,
        ("frac_other", _F64),  # everything else
        ("median_scaled_norm", _F64),
        ("scale_factor", _F64),
        ("tokens_fingerprint", _STR),
        ("created_at", _TS),
    ]
)

TOKEN_ERRORS = pa.schema(
    _PROVENANCE
    + [
        ("seq_id", _I64),
        ("pos", _I64),
        ("scaled_norm", _F64),
        ("sq_error", _F64),  # sum_d (x - x_hat)^2 in scaled units
        ("l0", _I64),  # active features at this token
        ("is_outlier", _BOOL),  # by the absolute threshold
        ("tokens_fingerprint", _STR),
        ("created_at", _TS),
    ]
)

WEIGHT_DIFF = pa.schema(
    [
        ("base_model", _STR),
        ("chat_model", _STR),
        ("param", _STR),  # full parameter name in the checkpoint
        ("layer", _I64),  # decoder layer index; null for embeddings, final norm, unembedding
        ("kind", _STR),  # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, input_layernorm, embed, unembed, ...
        ("numel", _I64),
        ("base_norm", _F64),  # ||W_base||_F
        ("diff_norm", _F64),  # ||W_chat - W_base||_F
        ("rel_diff", _F64),  # diff_norm / base_norm
        ("created_at", _TS),
    ]
)

POSITIONS = pa.schema(
    _PROVENANCE
    + [
        ("outlier_policy", _STR),
        ("outlier_threshold", _F64),
        ("scale_factor_train", _F64),  # as in metrics
        ("scale_factor_eval", _F64),
        ("scale_ratio", _F64),
        ("sae_context_size", _I64),  # context the SAE was trained at (cfg metadata)
        ("context_size", _I64),  # length of the evaluated sequences
        ("bucket_lo", _I64),  # first position in the bucket
        ("bucket_hi", _I64),  # last position in the bucket (inclusive)
        ("beyond_training_context", _BOOL),  # bucket_lo >= sae_context_size
        ("n_tokens", _I64),
        ("l0", _F64),
        ("mse", _F64),
        ("explained_variance", _F64),
        ("mean_scaled_norm", _F64),
        ("created_at", _TS),
    ]
)

ROLLOUTS = pa.schema(
    [
        ("cache_key", _STR),  # hash of model identity + prompts + max_new_tokens
        ("model_id", _STR),
        ("model_revision", _STR),
        ("prompt_idx", _I64),
        ("prompt", _STR),
        ("completion", _STR),  # the reply decoded for reading, special tokens stripped
        ("prompt_ids", pa.list_(pa.int64())),  # user turn through the chat template, as generated from
        ("completion_ids", pa.list_(pa.int64())),  # the generated ids, through the stop token: what is scored
        ("max_new_tokens", _I64),
        ("created_at", _TS),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "metrics": METRICS,
    "outliers": OUTLIERS,
    "outlier_summary": OUTLIER_SUMMARY,
    "token_errors": TOKEN_ERRORS,
    "weight_diff": WEIGHT_DIFF,
    "positions": POSITIONS,
    "rollouts": ROLLOUTS,
    "runs": study_tables.RUNS,  # provenance of every pipeline run (written by the flows)
    "checkpoints": study_tables.CHECKPOINTS,  # model checkpoints the watcher has seen / evaluated
    **diffing_tables.SCHEMAS,  # feature-level diffing: latent_stats, latent_examples, latent_matches, ...
}

# Result key of each table (see sae_transfer.storage.result_keys): the catalog view `<name>` keeps
# the current results only, `<name>_history` every appended row. Settings (threshold, rule, token
# counts, attention kernel, ...) are not part of a key: a re-run with a changed setting replaces.
KEYS: dict[str, ResultKey] = {
    "metrics": row("sae_id", "model_id", "model_revision", "hook", "outlier_policy", "segment"),
    # one model's outlier tagging at a hook: every valid token, and the summary of every rule
    "outliers": computation("model_id", "model_revision", "hook", index=("seq_id", "pos")),
    "outlier_summary": computation("model_id", "model_revision", "hook", index=("outlier_rule",)),
    # one SAE on one model (plain text): every counted token
    "token_errors": computation("sae_id", "model_id", "model_revision", "hook", index=("seq_id", "pos")),
    "weight_diff": computation("base_model", "chat_model", index=("param",)),
    # one SAE on one model: every policy, context length and bucket
    "positions": computation("sae_id", "model_id", "model_revision", "hook",
                             index=("outlier_policy", "context_size", "bucket_lo")),
    "rollouts": computation("cache_key", index=("prompt_idx",)),  # one generation of a prompt set
    **study_tables.KEYS,  # runs, checkpoints, and training_log (a catalog source, not in SCHEMAS)
    **diffing_tables.KEYS,
}


def now_utc() -> dt.datetime:
    """Timestamp for `created_at` columns."""
    return dt.datetime.now(dt.UTC)


def table_dir(results_dir: str | Path | RemotePath, name: str) -> Path | RemotePath:
    """Folder (or object-store prefix) holding the parts of table `name`."""
    if name not in SCHEMAS:
        raise KeyError(f"unknown table {name!r}; known: {sorted(SCHEMAS)}")
    return location(results_dir) / name


def to_table(name: str, rows: Iterable[Mapping] | pa.Table) -> pa.Table:
    """Rows (dicts; missing columns become null, `created_at` defaults to now) as a table of `name`'s schema."""
    schema = SCHEMAS[name]
    if isinstance(rows, pa.Table):
        return rows.select(schema.names).cast(schema)
    rows = list(rows)
    stamp = now_utc()
    columns = {
        f.name: [r.get(f.name, stamp if f.name == "created_at" else None) for r in rows] for f in schema
    }
    return pa.Table.from_pydict(columns, schema=schema)


def append_rows(results_dir: str | Path | RemotePath, name: str,
                rows: Iterable[Mapping] | pa.Table) -> Path | RemotePath | None:
    """Append rows to table `name` as one new part file; returns its path (None if no rows).

    The part is encoded in memory, then written whole (temp file + rename locally, one object
    on a store), so a reader or a second writer sees either the whole part or nothing.
    """
    table = to_table(name, rows)
    if table.num_rows == 0:
        return None
    stamp = now_utc().strftime("%Y%m%dT%H%M%S%fZ")
    final = table_dir(results_dir, name) / f"part-{stamp}-{uuid.uuid4().hex}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(final, sink.getvalue().to_pybytes())
    return final


def read_table(results_dir: str | Path, name: str) -> pa.Table:
    """All parts of table `name` as one pyarrow table (empty, with the schema, if none)."""
    folder = table_dir(results_dir, name)
    parts = sorted(folder.glob("part-*.parquet")) if isinstance(folder, RemotePath) or folder.is_dir() else []
    if not parts:
        return SCHEMAS[name].empty_table()
    fs = folder.fs if isinstance(folder, RemotePath) else None
    paths = [p.key if isinstance(p, RemotePath) else str(p) for p in parts]
    return pads.dataset(paths, schema=SCHEMAS[name], format="parquet", filesystem=fs).to_table()
